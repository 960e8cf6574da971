"""Shard writer, robust image reading, `unirestorer shards` and `unirestorer demo`."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from unirestorer.data_shards import writer
from unirestorer.data_shards.inspect import inspect_shards
from unirestorer.data_shards.degradations import TASKS, synthesize
from unirestorer.data_shards.imageio import ImageReadError, decode_png, encode_png, read_rgb, to_uint8

from unirestorer import cli


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], axis=2) + rng.integers(0, 40, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _save(path: Path, img: np.ndarray, **kw) -> Path:
    Image.fromarray(img).save(path, **kw)
    return path


@pytest.fixture
def clean_dir(tmp_path: Path) -> Path:
    d = tmp_path / "clean"
    d.mkdir()
    for i, (h, w) in enumerate([(40, 56), (48, 48), (36, 60), (64, 40)]):
        _save(d / f"img{i}.png", _photo(h, w, i))
    return d


def _read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, field = m.name.partition(".")
            samples.setdefault(key, {})[field] = tar.extractfile(m).read()
    return samples


def test_same_seed_gives_byte_identical_shards_for_any_worker_count(clean_dir: Path, tmp_path: Path) -> None:
    kw = dict(tasks=TASKS, per_image=3, patch=32, seed=7, shard_size=5)
    m1 = writer.write_synthetic(clean_dir, tmp_path / "w1", workers=1, **kw)
    m2 = writer.write_synthetic(clean_dir, tmp_path / "w2", workers=2, **kw)
    names = sorted(p.name for p in (tmp_path / "w1").glob("shard-*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "w2").glob("shard-*.tar"))
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for n in names:
        assert (tmp_path / "w1" / n).read_bytes() == (tmp_path / "w2" / n).read_bytes()
    assert m1["shards"] == m2["shards"] and [s["samples"] for s in m1["shards"]] == [5, 5, 2]
    m3 = writer.write_synthetic(clean_dir, tmp_path / "w3", workers=1, **{**kw, "seed": 8})
    assert (tmp_path / "w3" / names[0]).read_bytes() != (tmp_path / "w1" / names[0]).read_bytes()
    assert m3["num_samples"] == 12


def test_samples_hold_the_crop_and_a_reproducible_degradation(clean_dir: Path, tmp_path: Path) -> None:
    manifest = writer.write_synthetic(clean_dir, tmp_path / "out", tasks=[t for t in TASKS if t != "clean"], per_image=4,
                                      patch=24, seed=3, shard_size=100, workers=1)  # fmt: skip
    samples = _read_shard(tmp_path / "out" / "shard-000000.tar")
    assert len(samples) == manifest["num_samples"] == 16
    assert manifest["tasks"] == {t: 2 for t in TASKS if t != "clean"}  # tasks rotate over the samples
    for sample in samples.values():
        assert sorted(sample) == ["gt.png", "json", "lq.png"]
        meta = json.loads(sample["json"])
        assert set(meta) == {"task", "label", "source", "seed", "crop"} and meta["label"]["task"] == meta["task"]
        y, x, h, w = meta["crop"]
        source = np.asarray(Image.open(clean_dir / meta["source"]))
        gt = decode_png(sample["gt.png"])
        assert np.array_equal(gt, source[y : y + h, x : x + w]) and gt.shape == (24, 24, 3)
        rng = np.random.default_rng(np.random.SeedSequence(meta["seed"]))
        rng.integers(source.shape[0] - 23), rng.integers(source.shape[1] - 23)  # the crop draws come first
        lq, label = synthesize(gt.astype(np.float32) / 255, meta["task"], rng)
        assert label == meta["label"]
        assert np.array_equal(decode_png(sample["lq.png"]), to_uint8(lq))


def test_manifest_and_inspect_agree(clean_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    manifest = writer.write_synthetic(clean_dir, out, tasks=("noise", "mixed"), per_image=2, patch=0, shard_size=3,
                                      workers=1)  # fmt: skip
    saved = json.loads((out / "manifest.json").read_text())
    assert saved == manifest and saved["format"] == "unirestorer-shards/1" and saved["kind"] == "synthetic"
    assert saved["tasks"] == {"mixed": 4, "noise": 4} and saved["args"]["patch"] == 0
    assert {"numpy", "webdataset", "opencv-python-headless", "python"} <= set(saved["versions"])
    report = inspect_shards(out)
    assert report["tasks"] == saved["tasks"] and report["manifest"] == {"kind": "synthetic", "matches": True}
    assert [s["samples"] for s in report["shards"]] == [3, 3, 2] and not report["errors"]
    assert not list(out.glob("*.tmp"))
    assert cli.main(["shards", "inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == report
    # whole images (--patch 0) keep their size
    first = _read_shard(out / "shard-000000.tar")
    assert decode_png(next(iter(first.values()))["gt.png"]).shape == (40, 56, 3)
    # a damaged shard is reported, not trusted
    (out / "shard-000001.tar").write_bytes((out / "shard-000001.tar").read_bytes()[:700])
    damaged = inspect_shards(out)
    assert damaged["errors"] and "shard-000001.tar" in damaged["errors"][0]
    assert damaged["manifest"]["matches"] is False
    assert cli.main(["shards", "inspect", str(out)]) == 1


def test_unfinished_shard_never_looks_complete(tmp_path: Path) -> None:
    sink = writer._ShardSink(tmp_path, shard_size=4)
    sample = {"__key__": "a", "lq.png": b"x", "gt.png": b"y", "json": b'{"task": "noise"}'}
    for i in range(3):
        sink.write({**sample, "__key__": f"k{i}"}, "noise")
    assert list(tmp_path.glob("shard-*.tar")) == [] and [bool(writer.TEMPORARY.fullmatch(p.name)) for p in tmp_path.iterdir()] == [True]
    sink.abort()
    assert list(tmp_path.iterdir()) == []


def _bad_inputs(d: Path) -> dict[str, str]:
    """Write one file per kind of awkward input; returns {file name: expected fate}."""
    d.mkdir()
    img = _photo(40, 50, 0)
    _save(d / "good.png", img)
    _save(d / "gray.png", img[..., 0])
    rgba = np.dstack([img, np.full(img.shape[:2], 128, np.uint8)])
    _save(d / "rgba.png", rgba)
    _save(d / "deep.png", (img[..., 1].astype(np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    _save(d / "rotated.jpg", img, exif=exif, quality=95)
    good_png = (d / "good.png").read_bytes()
    (d / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (d / "notes.txt").write_text("not an image")
    _save(d / "huge.png", _photo(80, 80, 1))
    _save(d / "tiny.png", _photo(20, 60, 2))
    return {"good.png": "ok", "gray.png": "mode L converted", "rgba.png": "composited over white",
            "deep.png": "16-bit grayscale", "rotated.jpg": "EXIF orientation 6",
            "truncated.png": "not a readable image", "notes.txt": "not a readable image",
            "huge.png": "6400 pixels exceeds the limit of 5000", "tiny.png": "smaller than --patch 24"}  # fmt: skip


def test_bad_inputs_are_converted_or_skipped_with_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fates = _bad_inputs(tmp_path / "in")
    manifest = writer.write_synthetic(tmp_path / "in", tmp_path / "out", per_image=1, patch=24, shard_size=10,
                                      workers=1, max_pixels=5000)  # fmt: skip
    err = capsys.readouterr().err
    skipped_lines = [line for line in err.splitlines() if line.startswith("skipped: ")]
    refused = {n: why for n, why in fates.items() if "readable" in why or "pixels" in why or "patch" in why}
    assert len(skipped_lines) == len(refused) == 4
    for name, why in refused.items():
        assert sum(name in line and why in line for line in skipped_lines) == 1, (name, err)
    assert "4 of 9 inputs skipped" in err
    assert manifest["inputs"]["found"] == 9 and manifest["inputs"]["used"] == 5 and manifest["num_samples"] == 5
    notes = " ".join(manifest["inputs"]["converted"])
    for why in ("mode L converted", "composited over white", "16-bit grayscale", "EXIF orientation 6"):
        assert why in notes and why in err
    sources = {json.loads(s["json"])["source"]: s for s in _read_shard(tmp_path / "out" / "shard-000000.tar").values()}
    assert set(sources) == {"good.png", "gray.png", "rgba.png", "deep.png", "rotated.jpg"}


def test_read_rgb_conversions_and_errors(tmp_path: Path) -> None:
    _bad_inputs(tmp_path / "in")
    img = _photo(40, 50, 0).astype(np.float32) / 255
    gray = read_rgb(tmp_path / "in" / "gray.png")
    assert gray.shape == (40, 50, 3) and np.allclose(gray[..., 2], img[..., 0])
    rgba = read_rgb(tmp_path / "in" / "rgba.png")  # 50% alpha over white
    assert np.allclose(rgba, img * 128 / 255 + (1 - 128 / 255), atol=1 / 255)
    deep = read_rgb(tmp_path / "in" / "deep.png")
    assert deep.dtype == np.float32 and np.allclose(deep[..., 0], img[..., 1], atol=1e-6)
    rotated = read_rgb(tmp_path / "in" / "rotated.jpg")
    assert rotated.shape == (50, 40, 3)
    right, wrong = (np.abs(rotated - np.rot90(img, k=k)).mean() for k in (-1, 1))
    assert right < 0.04 and wrong > 3 * right
    for name, match in [("truncated.png", "truncated.png: not a readable image"), ("missing.png", "no such file"),
                        ("notes.txt", "notes.txt: not a readable image")]:  # fmt: skip
        with pytest.raises(ImageReadError, match=match):
            read_rgb(tmp_path / "in" / name)
    assert np.array_equal(decode_png(encode_png(img)), to_uint8(img))


def test_nothing_usable_exits_non_zero_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (bad / "b.txt").write_text("hello")
    assert cli.main(["shards", "write", "--clean", str(bad), "--out", str(tmp_path / "o"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "skipped: " + str(bad / "a.png") in err
    assert "error: nothing usable in" in err and "2 inputs found, 2 skipped" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(writer.ShardWriteError, match="no such directory"):
        writer.write_synthetic(tmp_path / "nope", tmp_path / "o")
    with pytest.raises(writer.ShardWriteError, match="unknown degradation task 'fog'"):
        writer.write_synthetic(bad, tmp_path / "o", tasks=("fog",))


def test_existing_output_needs_force(clean_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    (out / "shard-000009.tar").write_bytes(b"stale")
    args = ["shards", "write", "--clean", str(clean_dir), "--out", str(out), "--patch", "32", "--workers", "1"]
    assert cli.main(args) == 2
    assert "is not empty; pass --force" in capsys.readouterr().err
    assert cli.main(args + ["--force", "--tasks", "noise,haze", "--per-image", "2"]) == 0
    assert "wrote 8 samples in 1 shard to" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "manifest.json", "shard-000000.tar"]


def test_paired_write(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lq, gt = tmp_path / "lq", tmp_path / "gt"
    lq.mkdir(), gt.mkdir()
    for name in ("1", "2"):
        _save(lq / f"{name}.png", _photo(30, 40, int(name)))
        _save(gt / f"{name}.png", _photo(30, 40, 10 + int(name)))
    _save(lq / "3.png", _photo(30, 40, 3))
    _save(gt / "3.png", _photo(32, 40, 3))  # different size
    _save(lq / "4.png", _photo(30, 40, 4))  # no partner
    argv = ["shards", "write", "--paired", str(lq), str(gt), "--task", "rain", "--out", str(tmp_path / "o"),
            "--workers", "1"]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "skipped: " + str(lq / "4.png") + ": no file named 4.* in" in err
    assert "3.png: LQ is 40x30 but GT" in err and "is 40x32" in err and "2 of 4 inputs skipped" in err
    samples = _read_shard(tmp_path / "o" / "shard-000000.tar")
    assert len(samples) == 2
    for sample in samples.values():
        meta = json.loads(sample["json"])
        assert meta["task"] == "rain" and meta["label"]["components"][0]["type"] == "real"
        assert meta["label"]["intensity"] is None and meta["lq_source"] == meta["source"]
        i = int(meta["source"][0])
        assert np.array_equal(decode_png(sample["lq.png"]), _photo(30, 40, i))
        assert np.array_equal(decode_png(sample["gt.png"]), _photo(30, 40, 10 + i))
    assert cli.main(argv[:5] + ["--out", str(tmp_path / "p")]) == 2
    assert "--paired needs --task" in capsys.readouterr().err
