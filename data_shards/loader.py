"""Streaming WebDataset loader for training: N ranks x W workers, equal steps, reproducible.

Pipeline of one (rank, worker) stream, all in the DataLoader worker:

    shard sets --endless seeded shard order, split by node and worker--> tar samples (raw bytes)
      --weighted mix of the sets--> shuffle buffer --decode PNG/JPEG + JSON--> crop, flips, 90° rotations
      --[online: re-degrade gt with fresh parameters]--> batch of tensors

Equal steps: every stream is endless (like webdataset's `resampled=True`) and the loader is
`WebLoader(...).with_epoch(batches_per_epoch)`, so every rank yields exactly that many batches per
epoch however uneven the shards are; there is nothing to exhaust, so collectives never wait on a
rank that ran out. Unlike `resampled=True` (independent draws with replacement), the shard order
of a set is an endless chain of seeded permutations shared by all streams and split explicitly:
stream s = rank * W + worker reads every (world * W)-th entry, so within one pass over a set every
shard is read by exactly one (rank, worker).

Determinism and resume: the stream of a (rank, worker) is a function of (seed, rank, worker,
restart, epoch); its random generators (set mixing, shuffle, crops, flips, online synthesis) come
from `SeedSequence([seed, rank, worker, restart, epoch])`, the shared shard orders from
`SeedSequence([seed, restart, epoch])`. webdataset keeps no position, so a resumed run does not
replay the interrupted stream: it calls `make_loader(cfg, rank, world, restart=previous + 1)` and
continues with a fresh, equally reproducible stream (optionally `loader.epoch = saved_epoch`).

Online mode degrades the cropped 8-bit gt and rounds the result to 8 bits, like the stored PNGs. By
default each sample gets fresh parameters of its own stored task (so shard-set mixing weights keep
their meaning, and real pairs keep their real LQ); `online_tasks` draws tasks uniformly instead, and
`online_sigmas` is the noise-only path.

Safety: only `lq.*`/`gt.*` images (PNG/JPEG) and `json` are ever read and decoded; other members are
skipped unread, never unpickled. Shards are opened, checked and counted in data_shards/shards.py. Members are capped in size from their tar header (data_shards/members.py),
images in pixels from their header, JSON in depth, and a local shard must be a regular file (a FIFO would
block the stream). A corrupt shard (unreadable, not a tar, truncated, failing pipe: command)
or sample (bad image bytes, bad JSON, missing member, mismatched sizes) is logged, counted and
skipped; a shard counts once per read, and the incomplete sample a truncation leaves behind counts
as a corrupt sample too. A shard set whose shards were all read, one full pass, without a single file
coming out (valid empty tars, tars of directories only, all unreadable) stops the stream with
`EmptyShardsError` naming the set, instead of spinning forever. Each batch carries `skipped = {"shards": n, "samples": m}` (skips since the
previous batch of that worker); `StreamLoader.skipped` holds the totals over the batches consumed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator

import cv2
import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys

from unirestorer.data_shards.augment import crop_pair
from unirestorer.data_shards.degradations import DEGRADATIONS, SIGMA, apply_label, synthesize, task_name, to_uint8
from unirestorer.data_shards.imageio import DEFAULT_MAX_PIXELS
from unirestorer.data_shards.members import expand_members, image_pixels, sample_json
from unirestorer.data_shards.shards import EmptyShardsError, PassWatch, Skips, expand_source, open_shards, shard_order

IMAGE_EXTS = ("png", "jpg", "jpeg")
READ_FIELDS = {"json"} | {f"{name}.{ext}" for name in ("lq", "gt") for ext in IMAGE_EXTS}  # all else: skipped unread


@dataclass
class StreamConfig:
    """What to stream and how; one `sources` entry per shard set (a path, brace pattern or pipe:)."""

    sources: list[str]
    weights: list[float] | None = None  # mixture weights per set (e.g. per task); None = equal
    patch: int = 128
    batch_size: int = 8
    num_workers: int = 4
    shuffle_buffer: int = 256  # raw (undecoded) samples per worker
    batches_per_epoch: int = 1000  # per rank; with_epoch(n)
    seed: int = 0
    augment: bool = True  # flips and 90° rotations (random crops always)
    online: bool = False  # re-degrade gt with fresh parameters instead of the stored lq
    online_tasks: tuple[str, ...] = ()  # online: tasks drawn uniformly per sample; () = each sample's own task
    online_sigmas: tuple[float, ...] = ()  # online noise-only path: Gaussian sigma (0..255) from this set
    pin_memory: bool = field(default_factory=torch.cuda.is_available)  # page-locked batches: async copies to GPU
    persistent_workers: bool = True  # workers (and their imports, decoders) live across epochs; same batches

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("StreamConfig.sources is empty: give at least one shard set")
        if self.weights is not None:
            if len(self.weights) != len(self.sources):
                raise ValueError(f"{len(self.weights)} weights for {len(self.sources)} shard sets")
            if min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {self.weights}")
        for name in ("patch", "batch_size", "batches_per_epoch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StreamConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("StreamConfig.num_workers and shuffle_buffer must be >= 0")
        if self.online_sigmas and not self.online:
            raise ValueError("StreamConfig.online_sigmas needs online=True")
        for task in self.online_tasks:
            try:
                task_name(task)
            except ValueError as err:
                raise ValueError(f"online_tasks: {err}") from None


def _image(sample: dict, name: str) -> np.ndarray:
    """Decode member `name`.{png,jpg,jpeg} to uint8 HxWx3 BGR (OpenCV order; flipped after the crop)."""
    for ext in IMAGE_EXTS:
        data = sample.get(f"{name}.{ext}")
        if data is not None:
            pixels = image_pixels(data)
            if pixels > DEFAULT_MAX_PIXELS:
                raise ValueError(f"{name}.{ext}: {pixels} pixels exceeds the limit of {DEFAULT_MAX_PIXELS}")
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"{name}.{ext}: not a decodable PNG/JPEG image ({len(data)} bytes)")
            return img
    raise ValueError(f"no {name} image (.png/.jpg) among members {sorted(k for k in sample if k[:2] != '__')}")


def decode(sample: dict, cfg: StreamConfig) -> dict:
    """Raw tar sample -> {"meta", "gt", "lq"?} with checked sizes; raises ValueError on bad data. The stored lq
    is decoded only where it is used (`keeps_stored_lq`): online re-degradation makes its own."""
    if "json" not in sample:
        raise ValueError("no json member")
    meta = sample_json(sample["json"], "json member")
    if not isinstance(meta.get("label", {}), dict):
        raise ValueError("json member: 'label' must be an object")
    out = {"meta": meta, "gt": _image(sample, "gt")}
    if keeps_stored_lq(cfg, meta.get("label", {})):
        out["lq"] = _image(sample, "lq")
        if out["lq"].shape != out["gt"].shape:
            raise ValueError(f"lq {out['lq'].shape[:2]} and gt {out['gt'].shape[:2]} differ in size")
    if min(out["gt"].shape[:2]) < cfg.patch:
        raise ValueError(f"image {out['gt'].shape[:2]} is smaller than the patch {cfg.patch}")
    return out


def mix(streams: list[Iterator[dict]], weights: list[float] | None, rng: np.random.Generator) -> Iterator[dict]:
    """Draw each sample from set i with probability weights[i] / sum(weights)."""
    if len(streams) == 1:
        yield from streams[0]
        return
    p = np.full(len(streams), 1.0) if weights is None else np.asarray(weights, dtype=np.float64)
    cumulative = np.cumsum(p / p.sum())
    while True:
        yield next(streams[min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(streams) - 1)])


class ShardStream(torch.utils.data.IterableDataset):
    """The batches of one rank; each DataLoader worker runs its own seeded stream."""

    def __init__(self, cfg: StreamConfig, rank: int, world_size: int, restart: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.cfg, self.rank, self.world_size, self.restart = cfg, rank, world_size, restart
        self.urls = [expand_source(s) for s in cfg.sources]
        self.epoch = 0  # set by StreamLoader before workers start; a persistent worker's copy counts on itself

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        cfg, epoch = self.cfg, self.epoch
        self.epoch += 1  # in a persistent worker this copy lives on: its next __iter__ is the next epoch
        mix_seed, shuffle_seed, sample_seed = np.random.SeedSequence(
            [cfg.seed, self.rank, worker, self.restart, epoch]
        ).spawn(3)
        order_seeds = np.random.SeedSequence([cfg.seed, self.restart, epoch]).spawn(len(self.urls))
        stream, n_streams = self.rank * n_workers + worker, self.world_size * n_workers
        skips = Skips()
        sets = []
        for spec, urls, seed in zip(cfg.sources, self.urls, order_seeds):
            order = shard_order(urls, stream, n_streams, np.random.default_rng(seed))
            watch = PassWatch(spec, urls)
            files = watch.files(expand_members(open_shards(order, skips, watch), skips.shard_error, READ_FIELDS))
            sets.append(group_by_keys(files, handler=skips.shard_error))
        samples = mix(sets, cfg.weights, np.random.default_rng(mix_seed))
        if cfg.shuffle_buffer > 1:
            rng = random.Random(int(shuffle_seed.generate_state(1)[0]))
            samples = wds.filters.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=rng)(samples)
        rng = np.random.default_rng(sample_seed)
        batch = []
        for raw in samples:
            try:
                item = decode(raw, cfg)
            except ValueError as exn:
                skips.sample_error(raw, exn)
                continue
            skips.bad_in_a_row = 0
            batch.append(self.make_pair(raw["__key__"], item, rng))
            if len(batch) == cfg.batch_size:
                yield collate(batch, skips.take())
                batch = []

    def make_pair(self, key: str, item: dict, rng: np.random.Generator) -> dict:
        """Crop and augment (same transform for lq and gt), then re-degrade gt in online mode."""
        cfg, meta = self.cfg, item["meta"]
        images = [item["gt"], item["lq"]] if "lq" in item else [item["gt"]]
        gt, *lq = crop_pair(images, cfg.patch, rng, cfg.augment)
        stored = {"gt": gt, "lq": lq[0] if lq else None, "task": meta["task"], "label": meta.get("label", {}), "key": key}
        if keeps_stored_lq(cfg, stored["label"]):
            return stored  # offline, or a real pair: its real degradation
        clean = gt.astype(np.float32) * np.float32(1 / 255)
        if cfg.online_sigmas:
            label = noise_label(float(cfg.online_sigmas[rng.integers(len(cfg.online_sigmas))]))
            degraded = apply_label(clean, label, rng)
        elif own_task_online(cfg):
            degraded, label = synthesize(clean, meta["task"], rng)
        else:
            degraded, label = synthesize(clean, cfg.online_tasks[rng.integers(len(cfg.online_tasks))], rng)
        return {"gt": gt, "lq": to_uint8(degraded), "task": label["task"], "label": label, "key": key}


def own_task_online(cfg: StreamConfig) -> bool:
    """Online mode that re-degrades every sample with fresh parameters of its own stored task."""
    return cfg.online and not cfg.online_sigmas and not cfg.online_tasks


def keeps_stored_lq(cfg: StreamConfig, label: dict) -> bool:
    """Whether a sample's stored lq is its training input: offline, or online re-degradation of its own task
    where the sample is a real pair (nothing to re-synthesize it from)."""
    return not cfg.online or (own_task_online(cfg) and not resynthesizable(label))


def resynthesizable(label: dict) -> bool:
    """A label our synthesis made (every component a known type); real pairs are not."""
    components = label.get("components") or []
    return bool(components) and all(c.get("type") in DEGRADATIONS for c in components)


def noise_label(sigma: float) -> dict:
    """Label of additive Gaussian noise of std sigma/255, in the shape `synthesize` returns."""
    component = {"family": "noise", "type": "gaussian_noise", "params": {"sigma": sigma},
                 "intensity": round(min(sigma / SIGMA[1], 1.0), 4)}
    return {"task": "noise", "intensity": component["intensity"], "components": [component]}


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 list -> float32 [B, 3, H, W] in [0, 1], contiguous."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return x.to(torch.float32, memory_format=torch.contiguous_format).div_(255)


def collate(samples: list[dict], skipped: dict[str, int]) -> dict:
    return {
        "lq": _tensor([s["lq"] for s in samples]),
        "gt": _tensor([s["gt"] for s in samples]),
        "task": [s["task"] for s in samples],
        "label": [s["label"] for s in samples],
        "key": [s["key"] for s in samples],
        "skipped": skipped,
    }


def _as_is(batch: dict) -> dict:
    """Batches are built in the worker; skip DataLoader's default_convert walk over the labels."""
    return batch


class StreamLoader:
    """Iterable of batches; one `for` loop is one epoch of exactly `batches_per_epoch` batches."""

    def __init__(self, cfg: StreamConfig, rank: int, world_size: int, restart: int) -> None:
        self.dataset = ShardStream(cfg, rank, world_size, restart)
        self.loader = wds.WebLoader(
            self.dataset, batch_size=None, collate_fn=_as_is, num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory, persistent_workers=cfg.persistent_workers and cfg.num_workers > 0,
        ).with_epoch(cfg.batches_per_epoch)
        self.batches_per_epoch = cfg.batches_per_epoch
        self.epoch = 0  # next epoch to run; part of every worker's seed
        self.skipped = {"shards": 0, "samples": 0}

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        self.dataset.epoch = self.epoch  # workers start (fork or pickle) after this line
        self.epoch += 1
        try:
            for batch in self.loader:
                for kind, n in batch["skipped"].items():
                    self.skipped[kind] += n
                yield batch
        except EmptyShardsError as err:  # from a worker its message carries the worker's traceback: keep the gist
            raise EmptyShardsError(str(err).strip().splitlines()[-1].rsplit("EmptyShardsError: ", 1)[-1]) from None


def make_loader(cfg: StreamConfig, rank: int = 0, world_size: int = 1, restart: int = 0) -> StreamLoader:
    """The training stream of `rank` in a world of `world_size`; `restart` counts resumes."""
    return StreamLoader(cfg, rank, world_size, restart)
