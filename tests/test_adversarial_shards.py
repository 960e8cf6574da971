"""Issue 20 for shards through the real `unirestorer shards` CLI and the training loader: links at the
writer's temporary names, FIFOs named like shards, members that inflate, malformed JSON and manifests.
Each case checks that nothing outside OUT is written, nothing hangs, and errors are lines, not tracebacks."""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import cv2
import pytest

from unirestorer.cli import main
from unirestorer.data_shards.loader import StreamConfig, make_loader
from unirestorer.data_shards.members import MAX_JSON_MEMBER

from test_adversarial_images import _png, photo

pytestmark = pytest.mark.timeout(60)  # a FIFO read would block forever: fail instead


def tar_bytes(members: dict[str, bytes], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue()) if compress else buf.getvalue()


def sample(key: str, meta: bytes = b'{"task": "noise"}') -> dict[str, bytes]:
    """One sample of the project's shard format: lq.png, gt.png, json."""
    png = cv2.imencode(".png", photo(32, 32))[1].tobytes()
    return {f"{key}.lq.png": png, f"{key}.gt.png": png, f"{key}.json": meta}


def test_write_force_never_follows_links_at_temporary_names(tmp_path, capsys):
    src, out = tmp_path / "clean", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    _png(src / "a.png", photo())
    for name in ("shard-000000.tar.tmp", "manifest.json.tmp", "shard-000000.tar"):  # dangling: open() would create
        (out / name).symlink_to(tmp_path / f"victim-{name}")
    rc = main(["shards", "write", "--clean", str(src), "--out", str(out), "--force", "--per-image", "1",
               "--patch", "0", "--workers", "1", "--tasks", "noise"])
    assert rc == 0, capsys.readouterr().err
    assert not list(tmp_path.glob("victim-*"))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]
    assert not any(p.is_symlink() for p in out.iterdir())


def test_inspect_reports_fifos_inflating_members_and_malformed_json(tmp_path, capsys):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(tar_bytes(sample("k0")))
    os.mkfifo(out / "shard-000001.tar")
    huge = b'{"task": "noise", "pad": "' + b" " * MAX_JSON_MEMBER + b'"}'  # gzip makes it a few kB
    (out / "shard-000002.tar").write_bytes(tar_bytes(sample("k2", huge), compress=True))
    (out / "shard-000003.tar").write_bytes(tar_bytes(sample("k3", b'["not", "an", "object"]')))
    (out / "shard-000004.tar").write_bytes(tar_bytes(sample("k4", b"[" * 5000 + b"]" * 5000)))
    (out / "manifest.json").write_text('["a list"]')
    assert main(["shards", "inspect", str(out)]) == 1
    report = capsys.readouterr().out
    assert "shard-000001.tar: not a regular file (a FIFO, device or folder)" in report
    assert f"member k2.json is {len(huge)} bytes, over the limit of {MAX_JSON_MEMBER}" in report
    assert "k3.json: json member must be an object with a string 'task'" in report
    assert "JSON nested 5000 deep exceeds the limit of 64" in report
    assert f"{out / 'manifest.json'}: expected a JSON object" in report
    assert f"{out}: 1 samples in 1 shards" in report


def test_loader_skips_fifos_and_inflating_members(tmp_path, caplog):
    good = tmp_path / "shard-000000.tar"
    good.write_bytes(tar_bytes({**sample("a"), **sample("b"), **sample("c"), **sample("d")}))
    os.mkfifo(tmp_path / "shard-000001.tar")
    huge = b'{"task": "noise", "pad": "' + b" " * MAX_JSON_MEMBER + b'"}'
    (tmp_path / "shard-000002.tar").write_bytes(tar_bytes(sample("e", huge), compress=True))
    cfg = StreamConfig([str(tmp_path)], patch=16, batch_size=4, num_workers=0, shuffle_buffer=0, batches_per_epoch=2)
    loader = make_loader(cfg)
    batches = list(loader)
    assert len(batches) == 2 and all(set(b["key"]) <= {"a", "b", "c", "d"} for b in batches)
    assert loader.skipped["shards"] >= 2
    assert "not a regular file" in caplog.text and "over the limit of" in caplog.text
    assert tuple(batches[0]["gt"].shape) == (4, 3, 16, 16)
