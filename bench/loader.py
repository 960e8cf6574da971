"""Loader throughput on one CPU core: patches/s of batch-ready 128² tensors.

    python bench/loader.py --json

Measures, in one process pinned to one core (num_workers=0, torch/OpenCV/BLAS on 1 thread):
- stored:    stored (lq, gt) pairs from shards: tar read, PNG decode, crop, flips/rotations, tensors;
- noise_mix: online Gaussian noise on stored gt, sigma drawn from {15, 25, 50} (the PromptIR
             denoising mix; the loader's `online_sigmas` path);
- full_mix:  online `synthesize` with a task drawn from all 8 tasks (7 families + mixed);
- reference: a PromptIR-style Dataset: per sample, PIL-decode a whole image from the folder, crop
             to a multiple of 16, random 128² crop and flip/rotation, numpy Gaussian noise, ToTensor.
Shards are written first (not timed) into a temp dir from the clean images with the project's writer
(`write_synthetic`, crops of --stored-patch px). Modes are timed round-robin for --rounds rounds;
rates are patches per CPU second of the pinned, single-threaded process (what one core delivers,
robust to other processes sharing the machine; wall-clock rates are reported beside them), medians
over rounds; ratios are medians of per-round ratios against the reference.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads: one core means one thread everywhere

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from unirestorer.data_shards.degradations import TASKS, synthesize
from unirestorer.data_shards.loader import StreamConfig, make_loader
from unirestorer.data_shards.writer import list_images, write_synthetic

SIGMAS = (15.0, 25.0, 50.0)
CLEAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "train" / "BSDS_clean"


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """torchvision's ToTensor for uint8 HxWx3: CHW float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(a).transpose(2, 0, 1)).float().div(255)


class PromptIRStyle(torch.utils.data.Dataset):
    """What PromptIR's denoising TrainDataset does per sample (decode, crop, augment, noise, tensor)."""

    def __init__(self, paths: list[Path], patch: int) -> None:
        self.paths, self.patch = paths, patch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = np.array(Image.open(self.paths[i]).convert("RGB"))
        h, w = img.shape[0] // 16 * 16, img.shape[1] // 16 * 16
        y, x = np.random.randint(0, h - self.patch + 1), np.random.randint(0, w - self.patch + 1)
        clean = np.rot90(img[y : y + self.patch, x : x + self.patch], np.random.randint(4))
        if np.random.randint(2):
            clean = clean[:, ::-1]
        sigma = SIGMAS[np.random.randint(len(SIGMAS))]
        noisy = np.clip(clean + np.random.randn(*clean.shape) * sigma, 0, 255).astype(np.uint8)
        return to_tensor(noisy), to_tensor(clean)


def batches(mode: str, args, spec: str, paths: list[Path]):
    """An endless-enough iterator of batches for one mode."""
    n = args.warmup + args.batches
    if mode == "reference":
        np.random.seed(args.seed)
        loader = torch.utils.data.DataLoader(PromptIRStyle(paths, args.patch), batch_size=args.batch_size,
                                             shuffle=True, num_workers=0, drop_last=True)  # fmt: skip
        return (batch for _ in range(n) for batch in loader)
    online = {"stored": {}, "noise_mix": {"online": True, "online_sigmas": SIGMAS}, "full_mix": {"online": True, "online_tasks": TASKS}}
    cfg = StreamConfig(sources=[spec], patch=args.patch, batch_size=args.batch_size, num_workers=0,
                       shuffle_buffer=256, batches_per_epoch=n, seed=args.seed, **online[mode])  # fmt: skip
    return iter(make_loader(cfg))


def patches_per_second(mode: str, args, spec: str, paths: list[Path]) -> tuple[float, float]:
    """(patches per CPU second of this process, patches per wall-clock second)."""
    it = batches(mode, args, spec, paths)
    for _ in range(args.warmup):
        next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    count = 0
    for _ in range(args.batches):
        batch = next(it)
        lq = batch["lq"] if isinstance(batch, dict) else batch[0]
        assert lq.shape == (args.batch_size, 3, args.patch, args.patch) and lq.dtype == torch.float32
        count += lq.shape[0]
    return count / (time.process_time() - cpu_start), count / (time.perf_counter() - start)


def synthesize_ms(patch: int, paths: list[Path], seed: int, n: int = 40) -> dict[str, float]:
    """Where full_mix time goes: CPU ms per patch of `synthesize` for each task on real crops."""
    rng = np.random.default_rng(seed)
    crops = [np.asarray(Image.open(p).convert("RGB"))[:patch, :patch].astype(np.float32) / 255 for p in paths[:n]]
    out = {}
    for task in TASKS:
        start = time.process_time()
        for crop in crops:
            synthesize(crop, task, rng)
        out[task] = round((time.process_time() - start) / len(crops) * 1e3, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--clean", type=Path, default=CLEAN, help="folder of clean images")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--stored-patch", type=int, default=128, help="crop size written into the bench shards")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=60, help="timed batches per mode and round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    paths = [p for p in list_images(args.clean) if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    if not paths:
        raise SystemExit(f"no images in {args.clean}")
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        t0 = time.perf_counter()
        manifest = write_synthetic(args.clean, Path(tmp) / "shards", tasks=TASKS, per_image=2,
                                   patch=args.stored_patch, seed=args.seed, shard_size=64, workers=1)  # fmt: skip
        build_s = time.perf_counter() - t0
        n_shards = len(list((Path(tmp) / "shards").glob("shard-*.tar")))
        spec = str(Path(tmp) / "shards" / f"shard-{{000000..{n_shards - 1:06d}}}.tar")

        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        modes = ("reference", "stored", "noise_mix", "full_mix")
        runs, wall = {m: [] for m in modes}, {m: [] for m in modes}
        for _ in range(args.rounds):
            for m in modes:
                cpu_rate, wall_rate = patches_per_second(m, args, spec, paths)
                runs[m].append(cpu_rate)
                wall[m].append(wall_rate)
        synth = synthesize_ms(args.patch, paths, args.seed)

    rate = {m: round(statistics.median(v), 1) for m, v in runs.items()}
    ratio = {m: round(statistics.median(x / r for x, r in zip(runs[m], runs["reference"])), 2)
             for m in ("stored", "noise_mix", "full_mix")}  # fmt: skip
    result = {
        "bench": "loader",
        "command": "python bench/loader.py --json",
        "cpu": platform.processor() or platform.machine(),
        "core": core,
        "threads": 1,
        "num_workers": 0,
        "patch": args.patch,
        "stored_patch": args.stored_patch,
        "batch_size": args.batch_size,
        "timed_patches_per_mode_and_round": args.batches * args.batch_size,
        "rounds": args.rounds,
        "clean_images": len(paths),
        "shard_samples": sum(manifest["tasks"].values()) if isinstance(manifest.get("tasks"), dict) else None,
        "shard_build_s": round(build_s, 1),
        "patches_per_s": rate,
        "patches_per_s_all_rounds": {m: [round(x, 1) for x in v] for m, v in runs.items()},
        "patches_per_wall_s": {m: round(statistics.median(v), 1) for m, v in wall.items()},
        "load_average_1min": round(os.getloadavg()[0], 2),
        "ratio": ratio,
        "goals": {"noise_mix >= 2x reference": ratio["noise_mix"] >= 2,
                  "full_mix >= 0.7x reference": ratio["full_mix"] >= 0.7},  # fmt: skip
        "synthesize_ms_per_patch": synth,
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "opencv": cv2.__version__},
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"one core ({result['cpu']}, core {core}), batch {args.batch_size}, patch {args.patch}, "
          f"median of {args.rounds} rounds, patches per CPU second")
    for m in modes:
        ratio = "" if m == "reference" else f"  {result['ratio'][m]:.2f}x reference"
        print(f"  {m:10s} {rate[m]:8.1f} patches/s{ratio}")
    print("  synthesize ms/patch:", ", ".join(f"{t} {ms}" for t, ms in synth.items()))


if __name__ == "__main__":
    main()
