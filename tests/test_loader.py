"""Streaming loader on real webdataset shards and real DataLoader workers (tiny images, tiny patches)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds

from conftest import free_port
from unirestorer.data_shards.loader import StreamConfig, make_loader
from unirestorer.data_shards.shards import EmptyShardsError, shard_order

H, W = 20, 24  # stored image size
P = 8  # patch


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    return buf.tobytes()


def clean_image(key: str, lo: int = 0, hi: int = 256) -> np.ndarray:
    """Deterministic random RGB content per key (no symmetry, so every transform is recognisable)."""
    seed = int.from_bytes(key.encode()[-8:].rjust(8, b"\0"), "little")
    return np.random.default_rng(seed).integers(lo, hi, (H, W, 3), dtype=np.uint8)


def write_set(root: Path, name: str, sizes: list[int], task: str = "noise", lq=lambda gt: 255 - gt, lo=0, hi=256):
    """Shards `name-%06d.tar` in the project's sample format; returns (brace spec, {key: (gt, label)})."""
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(root / f"{name}-{s:06d}.tar")) as sink:
            for i in range(n):
                key = f"{name}{s:02d}x{i:03d}"
                gt = clean_image(key, lo, hi)
                label = {"task": task, "intensity": i / 10, "components": [{"family": task, "params": {"i": i}}]}
                meta = {"task": task, "label": label, "source": f"{key}.png", "seed": i}
                sink.write({"__key__": key, "lq.png": png(lq(gt)), "gt.png": png(gt), "json": json.dumps(meta)})
                truth[key] = (gt, label)
    return str(root / f"{name}-{{{0:06d}..{len(sizes) - 1:06d}}}.tar"), truth


def cfg(sources, **kw) -> StreamConfig:
    base = dict(patch=P, batch_size=4, num_workers=2, shuffle_buffer=8, batches_per_epoch=5, seed=7)
    return StreamConfig(sources=sources, **{**base, **kw})


def take(loader, epochs: int = 1) -> list[dict]:
    return [b for _ in range(epochs) for b in loader]


def to_u8(x: torch.Tensor) -> np.ndarray:
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_shard_order_splits_each_pass_over_streams():
    urls = [f"s{i}" for i in range(10)]
    # 2 ranks x 2 workers: 4 streams with the same order seed, stream s takes positions s, s + 4, ...
    streams = [shard_order(urls, s, 4, np.random.default_rng(3)) for s in range(4)]
    taken = [[next(it) for _ in range(5)] for it in streams]
    chain = [taken[p % 4][p // 4] for p in range(20)]
    assert sorted(chain[:10]) == urls and sorted(chain[10:]) == urls  # every pass: each shard read once
    assert chain[:10] != chain[10:]  # and each pass is a fresh permutation


def test_two_ranks_two_workers_equal_batches_on_uneven_shards(tmp_path):
    spec, truth = write_set(tmp_path, "u", [1, 7, 2, 5, 3])
    counts, keys = [], set()
    for rank in range(2):
        loader = make_loader(cfg([spec], batches_per_epoch=6), rank=rank, world_size=2)
        assert len(loader) == 6
        batches = take(loader, epochs=2)
        counts.append(len(batches))
        for b in batches:
            assert b["lq"].shape == b["gt"].shape == (4, 3, P, P) and b["lq"].dtype == torch.float32
            assert 0.0 <= float(b["gt"].min()) and float(b["gt"].max()) <= 1.0
            keys.update(b["key"])
    assert counts == [12, 12]
    assert keys <= set(truth) and len(keys) > len(truth) // 2


def _rank_main(rank: int, port: int, spec: str, out) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    steps = 0
    for batch in make_loader(cfg([spec], batches_per_epoch=7), rank=rank, world_size=2):
        dist.all_reduce(batch["gt"].mean())  # one collective per step, like a data-parallel trainer
        steps += 1
    total = torch.tensor([steps])
    dist.all_reduce(total)
    out.put((rank, steps, int(total)))
    dist.destroy_process_group()


def test_real_two_rank_gloo_run_takes_equal_steps(tmp_path):
    """2 gloo ranks x 2 workers, shards of 1..9 samples: no rank runs out, no collective hangs."""
    import multiprocessing

    spec, _ = write_set(tmp_path, "r", [1, 9, 2])
    port = free_port()
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, spec, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(out.get(timeout=5) for _ in procs) == [(0, 7, 14), (1, 7, 14)]


def corrupt_set(root: Path):
    """One good shard with three bad samples, a truncated shard and a non-tar file."""
    spec, truth = write_set(root, "c", [6, 6])
    bad = {"c00x001": {"gt.png": b"\x89PNG not really"}, "c00x002": {"json": b"{oops"}, "c00x003": {"gt.png": None}}
    samples = list(wds.WebDataset(str(root / "c-000000.tar"), shardshuffle=False))
    with wds.TarWriter(str(root / "c-000000.tar")) as sink:
        for s in samples:
            s = {k: v for k, v in s.items() if k != "__url__"} | bad.get(s["__key__"], {})
            sink.write({k: v for k, v in s.items() if v is not None})
    data = (root / "c-000001.tar").read_bytes()
    (root / "c-000001.tar").write_bytes(data[: len(data) // 2])
    (root / "c-000002.tar").write_bytes(b"this is not a tar file" * 40)
    return str(root / "c-{000000..000002}.tar"), truth, set(bad)


def test_corrupt_shard_and_samples_are_skipped_and_counted_with_workers(tmp_path):
    spec, truth, bad = corrupt_set(tmp_path)
    loader = make_loader(cfg([spec], batches_per_epoch=8))
    batches = take(loader)
    assert len(batches) == 8
    keys = [k for b in batches for k in b["key"]]
    assert not bad & set(keys) and set(keys) <= set(truth)
    assert all(torch.isfinite(b["lq"]).all() for b in batches)
    assert loader.skipped["shards"] >= 2 and loader.skipped["samples"] >= 3
    assert loader.skipped == {k: sum(b["skipped"][k] for b in batches) for k in ("shards", "samples")}


def one_shard(root: Path, cut) -> str:
    """A 3-sample shard t00x000..t00x002, its bytes cut at cut(data)."""
    spec, _ = write_set(root, "t", [3])
    path = root / "t-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: cut(data)])
    return spec


ZERO = {"shards": 0, "samples": 0}


@pytest.mark.parametrize(
    "cut,expected",
    [
        # inside the last member's data (members are sorted: gt.png, json, lq.png): tarfile raises,
        # and the incomplete sample t00x002 (no lq) is dropped as well
        (lambda data: data.index(b"t00x002.lq.png") + 512 + 300, {"shards": 1, "samples": 1}),
        # inside a header: tarfile reports a normal end, only the missing end-of-archive blocks tell
        (lambda data: data.rindex(b"././@PaxHeader", 0, data.index(b"t00x002")) + 40, {"shards": 1, "samples": 0}),
    ],
)
def test_truncated_shard_counted_once_per_read(tmp_path, cut, expected):
    spec = one_shard(tmp_path, cut)
    loader = make_loader(cfg([spec], batch_size=1, num_workers=0, shuffle_buffer=0, augment=False))
    batches = take(loader)
    assert [b["key"][0] for b in batches] == ["t00x000", "t00x001"] * 2 + ["t00x000"]
    assert [b["skipped"] for b in batches] == [ZERO, ZERO, expected, ZERO, expected]
    assert loader.skipped == {k: 2 * v for k, v in expected.items()}


def test_corrupt_sample_logged_by_name_and_counted(tmp_path, caplog):
    spec, truth, bad = corrupt_set(tmp_path)
    single = spec.replace("{000000..000002}", "000000")
    loader = make_loader(cfg([single], batch_size=1, num_workers=0, shuffle_buffer=0, batches_per_epoch=3))
    with caplog.at_level(logging.WARNING, logger="unirestorer.data_shards.shards"):
        batches = take(loader)
    assert [b["key"][0] for b in batches] == ["c00x000", "c00x004", "c00x005"]
    assert batches[1]["skipped"] == {"shards": 0, "samples": 3}
    text = caplog.text
    assert "c00x001" in text and "not a decodable PNG/JPEG image" in text
    assert "c00x002" in text and "not valid JSON" in text
    assert "c00x003" in text and "no gt image" in text


def test_shards_of_another_format_stop_the_run_with_a_clear_error(tmp_path):
    with wds.TarWriter(str(tmp_path / "other.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "jpg": png(clean_image(f"k{i}")), "cls": b"3"})
    with pytest.raises(RuntimeError, match=r"1000 samples in a row were unusable; last k\d in .*other.tar: no json"):
        take(make_loader(cfg([str(tmp_path / "other.tar")], num_workers=0)))


def test_stream_is_a_function_of_seed_rank_restart_epoch(tmp_path):
    spec, _ = write_set(tmp_path, "d", [5, 4, 6])

    def run(rank=1, restart=0, seed=7, epochs=1):
        return take(make_loader(cfg([spec], seed=seed), rank=rank, world_size=2, restart=restart), epochs)

    a, b = run(), run()
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and torch.equal(x["lq"], y["lq"]) and torch.equal(x["gt"], y["gt"])
    for other in (run(rank=0), run(restart=1), run(seed=8)):
        assert any(not torch.equal(x["gt"], y["gt"]) for x, y in zip(a, other))
    two = run(epochs=2)  # the second epoch is a new stream, not a replay of the first
    assert all(torch.equal(x["gt"], y["gt"]) for x, y in zip(a, two[:5]))
    assert any(not torch.equal(x["gt"], y["gt"]) for x, y in zip(two[:5], two[5:]))


def test_persistent_workers_give_the_same_epochs(tmp_path):
    """Workers kept across epochs (the default) count epochs on their own copy: the same batches as fresh ones."""
    spec, _ = write_set(tmp_path, "d", [5, 4, 6])
    kept, fresh = (make_loader(cfg([spec], persistent_workers=p), rank=1, world_size=2) for p in (True, False))
    assert kept.loader.pipeline[0].persistent_workers and not fresh.loader.pipeline[0].persistent_workers
    a, b = take(kept, epochs=3), take(fresh, epochs=3)
    assert len(a) == len(b) == 15
    assert all(x["key"] == y["key"] and torch.equal(x["lq"], y["lq"]) for x, y in zip(a, b))
    assert any(x["key"] != y["key"] for x, y in zip(a[:5], a[5:10]))  # epochs differ


def test_labels_and_pairs_survive_round_trip(tmp_path):
    spec, truth = write_set(tmp_path, "l", [4, 4], task="haze")
    for b in take(make_loader(cfg([spec], augment=False))):
        for i, key in enumerate(b["key"]):
            gt, label = truth[key]
            assert b["task"][i] == "haze" and b["label"][i] == label
            patch = to_u8(b["gt"][i])
            windows = (gt[y : y + P, x : x + P] for y in range(H - P + 1) for x in range(W - P + 1))
            assert any(np.array_equal(patch, w) for w in windows)


def test_weighted_mixture_follows_weights(tmp_path):
    a, _ = write_set(tmp_path, "a", [5, 5], task="rain")
    b, _ = write_set(tmp_path, "b", [5, 5], task="snow")
    batches = take(make_loader(cfg([a, b], weights=[3.0, 1.0], batch_size=8, batches_per_epoch=50)))
    tasks = [t for x in batches for t in x["task"]]
    share = tasks.count("rain") / len(tasks)
    # 400 independent draws with p = 0.75: standard deviation 0.022, so +-0.08 is a 3.7-sigma band
    assert len(tasks) == 400 and abs(share - 0.75) < 0.08


DIHEDRAL = [lambda a, k=k, f=f: np.rot90(a[:, ::-1] if f else a, k) for k in range(4) for f in (False, True)]


def which_transform(patch: np.ndarray, gt: np.ndarray) -> set[int]:
    windows = [gt[y : y + P, x : x + P] for y in range(H - P + 1) for x in range(W - P + 1)]
    return {t for t, f in enumerate(DIHEDRAL) if any(np.array_equal(patch, f(w)) for w in windows)}


@pytest.mark.parametrize("augment", [True, False])
def test_augment_applies_one_transform_to_lq_and_gt(tmp_path, augment):
    spec, truth = write_set(tmp_path, "g", [6, 6])  # stored lq = 255 - gt
    seen = set()
    for b in take(make_loader(cfg([spec], augment=augment, batch_size=8, batches_per_epoch=4))):
        assert torch.allclose(b["lq"], 1.0 - b["gt"], atol=1e-6)  # same crop, same flips, same turns
        for i, key in enumerate(b["key"]):
            found = which_transform(to_u8(b["gt"][i]), truth[key][0])
            assert len(found) == 1
            seen |= found
    assert len(seen) >= 6 if augment else seen == {0}


def test_online_mode_resynthesises_from_gt(tmp_path):
    spec, truth = write_set(tmp_path, "o", [4, 4], task="stored", lq=lambda gt: gt)  # stored lq == gt
    batches = take(make_loader(cfg([spec], online=True, online_tasks=("noise", "blur", "mixed"))))
    labels = [lab for b in batches for lab in b["label"]]
    assert all(lab["components"] and lab["task"] in ("noise", "blur", "mixed") for lab in labels)
    assert len({json.dumps(lab, sort_keys=True) for lab in labels}) == len(labels)  # fresh draws
    for b in batches:
        assert b["task"] == [lab["task"] for lab in b["label"]]
        assert (b["lq"] - b["gt"]).abs().mean(dim=(1, 2, 3)).min() > 0.002  # lq is no longer the stored copy


def test_online_default_redraws_each_samples_own_task_and_keeps_real_pairs(tmp_path):
    """The default online mode: fresh parameters of the stored task (so per-set mixing weights hold);
    a real pair (a label our synthesis cannot replay) keeps its stored LQ."""
    synthetic, _ = write_set(tmp_path, "s", [6], task="haze", lq=lambda gt: gt)
    for path in tmp_path.glob("s-*.tar"):  # give the samples labels our synthesis made
        samples = list(wds.WebDataset(str(path), shardshuffle=False))
        with wds.TarWriter(str(path)) as sink:
            for x in samples:
                meta = json.loads(x["json"])
                meta["label"] = {"task": "haze", "components": [{"family": "haze", "type": "haze", "params": {}}]}
                sink.write({"__key__": x["__key__"], "lq.png": x["lq.png"], "gt.png": x["gt.png"],
                            "json": json.dumps(meta)})
    real, truth = write_set(tmp_path, "r", [6], task="rain", lq=lambda gt: 255 - gt)
    batches = take(make_loader(cfg([synthetic, real], online=True)))
    seen = set()
    for b in batches:
        for i, (task, label, key) in enumerate(zip(b["task"], b["label"], b["key"])):
            seen.add(task)
            if task == "haze":  # re-degraded: a fresh haze label, lq no longer the stored copy of gt
                assert [c["type"] for c in label["components"]] == ["haze"] and label["components"][0]["params"]
                assert (b["lq"][i] - b["gt"][i]).abs().mean() > 0.002
            else:  # the real pair: its stored lq (the inverted gt) and its own label
                assert task == "rain" and label == truth[key][1]
                assert torch.allclose(b["lq"][i], 1 - b["gt"][i], atol=1e-6)
    assert seen == {"haze", "rain"}


def rewrite(path: Path, change) -> None:
    """Rewrite every sample of shard `path` through change(sample dict) -> sample dict."""
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    with wds.TarWriter(str(path)) as sink:
        for x in samples:
            sink.write(change({k: x[k] for k in ("__key__", "lq.png", "gt.png", "json")}))


def test_online_never_decodes_a_resynthesised_samples_stored_lq(tmp_path, caplog):
    """Online re-degradation makes its own lq: a corrupt stored lq changes nothing there (same batches, nothing
    skipped); a real pair's stored lq is its input, so a corrupt one is skipped by name, as is a label that is
    not an object."""
    haze = {"task": "haze", "components": [{"family": "haze", "type": "haze", "params": {}}]}
    synthetic = lambda x: {**x, "json": json.dumps({**json.loads(x["json"]), "label": haze})}
    batches = {}
    for name, corrupt in (("intact", False), ("corrupt", True)):
        spec, _ = write_set(tmp_path / name, "s", [6], task="haze", lq=lambda gt: gt)
        rewrite(tmp_path / name / "s-000000.tar",
                lambda x: {**synthetic(x), "lq.png": b"not a png" if corrupt else x["lq.png"]})
        batches[name] = take(make_loader(cfg([spec], online=True, batches_per_epoch=3)))
    for a, b in zip(batches["intact"], batches["corrupt"], strict=True):
        assert a["key"] == b["key"] and torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])
        assert b["skipped"]["samples"] == 0

    spec, _ = write_set(tmp_path / "real", "r", [6], task="rain")
    bad = {"r00x001": {"lq.png": b"not a png"}, "r00x002": {"json": json.dumps({"task": "rain", "label": "x"})}}
    rewrite(tmp_path / "real" / "r-000000.tar", lambda x: {**x, **bad.get(x["__key__"], {})})
    loader = make_loader(cfg([spec], online=True, batch_size=1, num_workers=0, shuffle_buffer=0, batches_per_epoch=4))
    with caplog.at_level(logging.WARNING, logger="unirestorer.data_shards.shards"):
        keys = [b["key"][0] for b in take(loader)]
    assert keys == ["r00x000", "r00x003", "r00x004", "r00x005"]
    assert "r00x001" in caplog.text and "lq.png: not a decodable PNG/JPEG image" in caplog.text
    assert "r00x002" in caplog.text and "'label' must be an object" in caplog.text


def test_online_noise_mix_has_requested_sigma(tmp_path):
    spec, _ = write_set(tmp_path, "n", [8], lo=96, hi=160, lq=lambda gt: gt)
    sigmas = (15.0, 25.0, 50.0)
    loader = make_loader(cfg([spec], patch=16, online=True, online_sigmas=sigmas, batch_size=16, batches_per_epoch=6))
    measured = {s: [] for s in sigmas}
    for b in take(loader):
        for i, lab in enumerate(b["label"]):
            assert lab["task"] == "noise" and lab["components"][0]["type"] == "gaussian_noise"
            measured[lab["components"][0]["params"]["sigma"]].append(float((b["lq"][i] - b["gt"][i]).std() * 255))
    for s, values in measured.items():
        assert values, f"sigma {s} never drawn"
        # 768 values per patch; clipping at 0/1 only trims sigma 50 a little around grey 96..160
        assert abs(np.mean(values) / s - 1) < (0.12 if s == 50 else 0.06), (s, np.mean(values))


def test_pipe_source_and_clear_config_errors(tmp_path):
    spec, truth = write_set(tmp_path, "p", [3])
    piped = f"pipe:cat {tmp_path / 'p-000000.tar'}"
    batches = take(make_loader(cfg([piped], num_workers=0, batches_per_epoch=2)))
    assert len(batches) == 2 and set(k for b in batches for k in b["key"]) <= set(truth)
    failing = make_loader(cfg([f"{piped}::pipe:exit 3"], num_workers=0, batches_per_epoch=4, shuffle_buffer=0))
    assert len(take(failing)) == 4 and failing.skipped["shards"] >= 1  # a failing command is a corrupt shard
    with pytest.raises(EmptyShardsError, match="shard set 'pipe:exit 3': a full pass over its 1 shard"):
        take(make_loader(cfg(["pipe:exit 3"], num_workers=0)))  # nothing readable: stop, don't spin
    with pytest.raises(FileNotFoundError, match=r"no such shard file .*p-000001.tar \(and 6 more\)"):
        make_loader(StreamConfig(sources=[str(tmp_path / "p-{000000..000007}.tar")]))
    with pytest.raises(ValueError, match="2 weights for 1 shard sets"):
        StreamConfig(sources=[spec], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="online_tasks"):
        StreamConfig(sources=[spec], online=True, online_tasks=("fog",))
    with pytest.raises(ValueError, match="online_sigmas needs online=True"):
        StreamConfig(sources=[spec], online_sigmas=(15.0,))


def test_reads_the_project_shard_writer_output(tmp_path):
    """The contract with data_shards.writer: its shards stream back pixel- and label-exact."""
    from unirestorer.data_shards.writer import write_synthetic

    clean = tmp_path / "clean"
    clean.mkdir()
    for i in range(3):
        cv2.imwrite(str(clean / f"im{i}.png"), clean_image(f"im{i}"))
    write_synthetic(clean, tmp_path / "out", tasks=("noise", "jpeg"), per_image=2, patch=16, shard_size=4, workers=1)
    spec = str(tmp_path / "out" / "shard-{000000..000001}.tar")
    stored = {s["__key__"]: s for s in wds.WebDataset(spec, shardshuffle=False)}
    # one worker, no shuffle: the first 6 samples are one pass over both shards (4 + 2 samples)
    one_pass = dict(patch=16, augment=False, batch_size=3, batches_per_epoch=2, num_workers=0, shuffle_buffer=0)
    loader = make_loader(cfg([spec], **one_pass))
    batches = take(loader)
    for b in batches:
        for i, key in enumerate(b["key"]):
            meta = json.loads(stored[key]["json"])
            assert b["task"][i] == meta["task"] and b["label"][i] == meta["label"]
            for name in ("lq", "gt"):
                rgb = cv2.imdecode(np.frombuffer(stored[key][f"{name}.png"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
                assert np.array_equal(to_u8(b[name][i]), rgb)
    assert sorted(k for b in batches for k in b["key"]) == sorted(stored)
