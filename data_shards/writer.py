"""Shard writer: clean images -> synthetic (lq, gt) pairs, or real pairs, packed as WebDataset shards.

Each sample is `<key>.lq.png`, `<key>.gt.png` and `<key>.json`; the json holds the task, the full
degradation label, the source file, the seed triple and the crop. Shards `shard-%06d.tar` hold a fixed
number of samples (the last one the remainder) and appear under their final name only when complete;
`manifest.json`, written last, records counts per task and shard, the arguments and library versions.

Reproducibility: sample k of image i draws everything from SeedSequence([seed, i, k]), workers
return samples in input order, PNG compression and tar metadata are fixed, so the same inputs and
seed give byte-identical shards whatever the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm
from unirestorer.data_shards.degradations import TASKS, synthesize, task_name
from unirestorer.data_shards.imageio import (DEFAULT_MAX_PIXELS, ImageReadError, encode_png, input_files,
                                             passed_over_note, read_rgb)
from unirestorer.safe_files import UnsafePathError, atomic_path, atomic_write, check_writable, output_folder

SHARD_NAME = "shard-%06d.tar"
MANIFEST = "manifest.json"
FORMAT = "unirestorer-shards/1"
# temporary files are safe_files.atomic_path's: ".NAME.tmpPID.N" (".tmp" names: older versions)
TEMPORARY = re.compile(r"\.(shard-\d{6}\.tar|manifest\.json)\.tmp\d+\.\d+|(shard-\d{6}\.tar|manifest\.json)\.tmp")
_OURS = re.compile(rf"shard-\d{{6}}\.tar|manifest\.json|{TEMPORARY.pattern}")
_TASK_NAME = re.compile(r"[a-z][a-z0-9_]*")


class ShardWriteError(RuntimeError):
    """Nothing can be written (no usable input, or OUT is in the way); the message says why."""


# ---- per-image work (runs in worker processes) --------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """What a worker needs, picklable."""

    per_image: int
    patch: int
    seed: int
    max_pixels: int | None
    tasks: tuple[str, ...] = ()  # synthetic only
    task: str = ""  # paired only


@dataclass(frozen=True)
class _Item:
    index: int
    source: str  # relative name recorded in the samples
    path: Path
    lq_path: Path | None = None  # paired only


@dataclass
class _Result:
    samples: list[dict]
    error: str | None
    notes: list[str]


def _crop_box(h: int, w: int, patch: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    if patch <= 0:
        return 0, 0, h, w
    return int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1)), patch, patch


def _sample(item: _Item, k: int, lq: np.ndarray, gt: np.ndarray, meta: dict) -> dict:
    meta = {"source": item.source, **meta}
    return {
        "__key__": f"{item.index:07d}_{k:04d}",
        "lq.png": encode_png(lq),
        "gt.png": encode_png(gt),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def _too_small(item: _Item, img: np.ndarray, patch: int) -> str | None:
    h, w = img.shape[:2]
    return f"{item.path}: {w}x{h} is smaller than --patch {patch}" if patch and min(h, w) < patch else None


def _synthetic(job: _Job, item: _Item) -> _Result:
    notes: list[str] = []
    try:
        clean = read_rgb(item.path, job.max_pixels, notes)
    except ImageReadError as e:
        return _Result([], str(e), notes)
    if err := _too_small(item, clean, job.patch):
        return _Result([], err, notes)
    samples = []
    for k in range(job.per_image):
        seed = [job.seed, item.index, k]
        rng = np.random.default_rng(np.random.SeedSequence(seed))
        task = job.tasks[(item.index * job.per_image + k) % len(job.tasks)]
        y, x, h, w = _crop_box(*clean.shape[:2], job.patch, rng)
        # degrade the 8-bit gt that is stored, so online re-degradation of gt sees the same input
        gt = np.round(clean[y : y + h, x : x + w] * 255) / np.float32(255)
        lq, label = synthesize(gt, task, rng)
        samples.append(_sample(item, k, lq, gt, {"task": task, "label": label, "seed": seed, "crop": [y, x, h, w]}))
    return _Result(samples, None, notes)


def _real_label(task: str) -> dict:
    return {"task": task, "intensity": None,
            "components": [{"family": task, "type": "real", "params": {}, "intensity": None}]}  # fmt: skip


def _paired(job: _Job, item: _Item) -> _Result:
    notes: list[str] = []
    try:
        lq = read_rgb(item.lq_path, job.max_pixels, notes)
        gt = read_rgb(item.path, job.max_pixels, notes)
    except ImageReadError as e:
        return _Result([], str(e), notes)
    if lq.shape != gt.shape:
        (lh, lw), (gh, gw) = lq.shape[:2], gt.shape[:2]
        return _Result([], f"{item.lq_path}: LQ is {lw}x{lh} but GT {item.path} is {gw}x{gh}", notes)
    if err := _too_small(item, gt, job.patch):
        return _Result([], err, notes)
    samples = []
    for k in range(job.per_image if job.patch else 1):  # whole pairs: one copy is enough
        seed = [job.seed, item.index, k]
        y, x, h, w = _crop_box(*gt.shape[:2], job.patch, np.random.default_rng(np.random.SeedSequence(seed)))
        meta = {"task": job.task, "label": _real_label(job.task), "seed": seed, "crop": [y, x, h, w],
                "lq_source": item.lq_path.name}  # fmt: skip
        samples.append(_sample(item, k, lq[y : y + h, x : x + w], gt[y : y + h, x : x + w], meta))
    return _Result(samples, None, notes)


@contextmanager
def _parallel_map(fn: Callable, workers: int) -> Iterator[Callable[[Iterable], Iterator]]:
    """An ordered map over `workers` processes (spawned, so safe from any parent), or in-process."""
    if workers <= 1:
        yield lambda items: map(fn, items)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield lambda items: pool.imap(fn, items, chunksize=1)


# ---- shard files --------------------------------------------------------------------------------
class _ShardSink:
    """Writes samples into fixed-size shards through safe_files.atomic_path: a fresh temporary name
    (O_EXCL | O_NOFOLLOW, so a link planted there is never followed) while open, renamed when complete."""

    def __init__(self, out: Path, shard_size: int):
        import webdataset as wds

        self._wds, self.out, self.shard_size = wds, out, shard_size
        self.shards: list[dict] = []
        self._file = self._tar = self._commit = None
        self._count, self._tasks = 0, Counter()

    def write(self, sample: dict, task: str) -> None:
        if self._tar is None:
            self._commit = atomic_path(self.out / (SHARD_NAME % len(self.shards)))
            tmp = self._commit.__enter__()
            self._file = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW), "wb")
            # fixed owner and mtime: same samples -> same bytes
            self._tar = self._wds.TarWriter(self._file, encoder=False, user="unirestorer", group="unirestorer", mtime=0)
        self._tar.write(sample)
        self._count += 1
        self._tasks[task] += 1
        if self._count == self.shard_size:
            self._finish()

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()
        name = SHARD_NAME % len(self.shards)
        self._commit.__exit__(None, None, None)  # fsync + rename onto the final name
        self.shards.append({"name": name, "samples": self._count, "tasks": dict(sorted(self._tasks.items()))})
        self._file = self._tar = None
        self._count, self._tasks = 0, Counter()

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            error = RuntimeError("shard writing aborted")
            self._commit.__exit__(RuntimeError, error, None)  # removes the temporary file


def _prepare_out(out: Path, force: bool) -> bool:
    """Make OUT ready; returns whether we created it. --force removes only our own files (a link with one
    of their names is removed, never followed)."""
    if out.exists() and not out.is_dir():
        raise ShardWriteError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ShardWriteError(f"{out}: exists and is not empty; pass --force to replace the shards in it")
        for p in out.iterdir():
            if (p.is_file() or p.is_symlink()) and _OURS.fullmatch(p.name):
                p.unlink()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return created


def list_images(root: str | os.PathLike, report: bool = False) -> list[Path]:
    """Every non-hidden regular file under `root`, sorted by relative path (non-images are reported later);
    `report`: say on stderr how many entries were passed over (hidden, FIFOs...)."""
    root = Path(root)
    if not root.is_dir():
        raise ShardWriteError(f"{root}: no such directory")
    files, passed = input_files(root, recursive=True)
    if report and passed:
        print(passed_over_note(root, passed), file=sys.stderr)
    return files


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("unirestorer", "numpy", "opencv-python-headless", "pillow", "webdataset"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _run(kind: str, out: Path, items: list[_Item], worker: Callable, args: dict, shard_size: int,
         workers: int, force: bool, source: str, skipped: list[str]) -> dict:  # fmt: skip
    """Drive the workers, write shards and the manifest; report skipped and converted inputs.
    `skipped` holds inputs already refused before any image was read (reported by the caller)."""
    if shard_size < 1:
        raise ShardWriteError(f"--shard-size must be at least 1, got {shard_size}")
    try:
        out = output_folder(out, "--out")
        check_writable(out, "--out")
    except UnsafePathError as err:
        raise ShardWriteError(str(err)) from None
    created = _prepare_out(out, force)
    sink, converted = _ShardSink(out, shard_size), Counter()
    skipped, found = list(skipped), len(items) + len(skipped)
    try:
        with _parallel_map(worker, workers) as pmap:
            bar = tqdm(pmap(items), total=len(items), desc=f"shards {kind}", unit="img", disable=None, file=sys.stderr)
            for result in bar:
                if result.error:
                    skipped.append(result.error)
                    tqdm.write(f"skipped: {result.error}", file=sys.stderr)
                    continue
                converted.update(result.notes)
                for sample in result.samples:
                    sink.write(sample, json.loads(sample["json"])["task"])
        sink.close()
    except BaseException:
        sink.abort()
        raise
    used = found - len(skipped)
    if skipped:
        print(f"{len(skipped)} of {found} inputs skipped", file=sys.stderr)
    if converted:
        print("converted: " + ", ".join(f"{n} {note}" for note, n in sorted(converted.items())), file=sys.stderr)
    if not sink.shards:
        if created:
            out.rmdir()
        raise ShardWriteError(f"nothing usable in {source}: {found} inputs found, {len(skipped)} skipped")
    tasks = Counter()
    for shard in sink.shards:
        tasks.update(shard["tasks"])
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "num_samples": sum(s["samples"] for s in sink.shards),
        "shard_size": shard_size,
        "tasks": dict(sorted(tasks.items())),
        "shards": sink.shards,
        "inputs": {"found": found, "used": used, "skipped": skipped, "converted": dict(sorted(converted.items()))},
        "args": args,
        "versions": _versions(),
    }
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _check_common(per_image: int, patch: int, workers: int | None) -> int:
    if per_image < 1:
        raise ShardWriteError(f"--per-image must be at least 1, got {per_image}")
    if patch < 0:
        raise ShardWriteError(f"--patch must be 0 (whole images) or positive, got {patch}")
    return max(1, os.cpu_count() or 1) if workers is None else workers


def write_synthetic(clean_dir: str | os.PathLike, out: str | os.PathLike, tasks: Iterable[str] = TASKS,
                    per_image: int = 4, patch: int = 256, seed: int = 0, shard_size: int = 256,
                    workers: int | None = None, force: bool = False,
                    max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict:  # fmt: skip
    """Synthesise `per_image` degraded crops of `patch` px (0: whole image) per clean image, tasks in
    rotation; returns the manifest. Raises ShardWriteError when nothing usable remains."""
    try:
        tasks = tuple(task_name(t) for t in tasks)
    except ValueError as err:
        raise ShardWriteError(str(err)) from None
    if not tasks:
        raise ShardWriteError(f"no task given; choose from {', '.join(TASKS)} or a mixture like blur+noise")
    workers = _check_common(per_image, patch, workers)
    root = Path(clean_dir)
    items = [_Item(i, p.relative_to(root).as_posix(), p) for i, p in enumerate(list_images(root, report=True))]
    args = {"clean": str(clean_dir), "tasks": list(tasks), "per_image": per_image, "patch": patch, "seed": seed,
            "shard_size": shard_size, "workers": workers, "max_pixels": max_pixels}  # fmt: skip
    job = _Job(per_image=per_image, patch=patch, seed=seed, max_pixels=max_pixels, tasks=tasks)
    worker = partial(_synthetic, job)
    return _run("synthetic", Path(out), items, worker, args, shard_size, workers, force, str(root), [])


def write_paired(lq_dir: str | os.PathLike, gt_dir: str | os.PathLike, task: str, out: str | os.PathLike,
                 per_image: int = 1, patch: int = 0, seed: int = 0, shard_size: int = 256,
                 workers: int | None = None, force: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict:  # fmt: skip
    """Pack real (LQ, GT) pairs matched by file name (extension aside), whole or as `per_image` crops."""
    if not _TASK_NAME.fullmatch(task):
        raise ShardWriteError(f"--task must be a lower-case name such as 'rain' or 'lowlight', got {task!r}")
    workers = _check_common(per_image, patch, workers)
    lq_root, gt_root = Path(lq_dir), Path(gt_dir)

    def by_name(root: Path) -> dict[str, list[Path]]:
        names: dict[str, list[Path]] = {}
        for p in list_images(root, report=True):
            names.setdefault(p.relative_to(root).with_suffix("").as_posix(), []).append(p)
        return names

    lq_names, gt_names = by_name(lq_root), by_name(gt_root)
    unmatched = []
    for name in sorted(lq_names.keys() ^ gt_names.keys()):
        side, other = (lq_names, gt_root) if name in lq_names else (gt_names, lq_root)
        unmatched.append(f"{side[name][0]}: no file named {name}.* in {other}")
    for name in sorted(lq_names.keys() & gt_names.keys()):
        if len(lq_names[name]) > 1 or len(gt_names[name]) > 1:
            unmatched.append(f"{name}: several files share this name: {lq_names[name] + gt_names[name]}")
    for line in unmatched:
        print(f"skipped: {line}", file=sys.stderr)
    pairs = sorted(n for n in lq_names.keys() & gt_names.keys() if len(lq_names[n]) == len(gt_names[n]) == 1)
    items = [_Item(i, gt_names[n][0].relative_to(gt_root).as_posix(), gt_names[n][0], lq_names[n][0])
             for i, n in enumerate(pairs)]  # fmt: skip
    args = {"lq": str(lq_dir), "gt": str(gt_dir), "task": task, "per_image": per_image, "patch": patch, "seed": seed,
            "shard_size": shard_size, "workers": workers, "max_pixels": max_pixels}  # fmt: skip
    job = _Job(per_image=per_image, patch=patch, seed=seed, max_pixels=max_pixels, task=task)
    return _run("paired", Path(out), items, partial(_paired, job), args, shard_size, workers, force,
                f"{lq_root} + {gt_root}", unmatched)  # fmt: skip
