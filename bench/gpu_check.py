"""The GPU proof run (issue 12), in one process at world size 1: data, extractor, cluster, the experts stage
at 128² in bf16 with NAFNet-paper and Restormer-paper experts (images/s per GPU and peak memory beside
DESIGN.md §7's H100 references), the router stage, export, and `restore` latency of one 1024² image in bf16
(one expert plus the extractor). Writes OUT/gpu_check.json and prints a table last.

    bash bench/gpu_check.sh [--dry-run]          # the wrapper: carried wheels, the CUDA test files, then this
    python bench/gpu_check.py --out DIR [--dry-run]

`--dry-run`: tiny presets and sizes on the CPU, the same code paths (CI runs it: tests/test_gpu_check.py).
Throughput per experts run: the root level trains alone for `steps` steps (each image through one expert
with the whole batch: comparable with a plain network at that batch), then the leaf level (each image
through its leaf's expert, the batch split over the leaves: what expert parallelism costs on one GPU).
Each phase's number is the median of its `log.every` intervals after the first (warm-up: cudnn autotuning).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# DESIGN.md §7: one H100, bf16 autocast, 128² patches, fwd + bwd + AdamW, images/s at batch 8 and 32
REFERENCE = {"PromptIR": {8: 35.4, 32: 55.1}, "NAFNet-w32": {8: 66.1, 32: 251.1}}
GOALS = {"restormer": ("PromptIR", 4.0), "nafnet": ("NAFNet-w32", 2.0)}  # issue 12: x the reference's img/s
RESTORE_REFERENCE_MS = 264.0  # PromptIR, 1024², bf16
TASKS = ("noise", "blur")
PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")  # bundled with skimage


@dataclass(frozen=True)
class Plan:
    preset: str  # expert preset of both archs
    patch: int
    batches: tuple[int, ...]
    steps: int  # per phase (root, then leaves)
    log_every: int
    workers: int  # loader workers
    crops_per_photo: int  # stored crops per photo and task
    extractor: dict  # extractor model keys
    extractor_steps: int
    cluster_samples: int
    router_steps: int
    restore_size: int
    restore_runs: int


GPU = Plan(preset="paper", patch=128, batches=(8, 32), steps=40, log_every=5, workers=6, crops_per_photo=16,
           extractor={"extractor_backbone": "resnet10t", "embed_dim": 256, "extractor_proj_dim": 128,
                      "extractor_crop": 64, "extractor_max_crops": 16},
           extractor_steps=40, cluster_samples=160, router_steps=20, restore_size=1024, restore_runs=5)
DRY = Plan(preset="tiny", patch=32, batches=(2,), steps=2, log_every=1, workers=0, crops_per_photo=1,
           extractor={"extractor_backbone": "test_resnet", "embed_dim": 16, "extractor_proj_dim": 8,
                      "extractor_crop": 16, "extractor_max_crops": 2},
           extractor_steps=1, cluster_samples=16, router_steps=1, restore_size=64, restore_runs=1)


def write_data(out: Path, plan: Plan) -> list[str]:
    """One shard set per task from skimage's bundled photos (no network); returns the shard patterns."""
    from unirestorer.data_shards.writer import write_synthetic
    from unirestorer.demo_data import save_photos

    photos = out / "photos"
    save_photos(photos, PHOTOS)
    shards = []
    for i, task in enumerate(TASKS):
        m = write_synthetic(photos, out / "shards" / task, (task,), per_image=plan.crops_per_photo, patch=plan.patch,
                            seed=i, shard_size=1024, workers=1, force=True)
        assert len(m["shards"]) == 1
        shards.append(str(out / "shards" / task / "shard-000000.tar"))
    return shards


def config(out: Path, plan: Plan, shards: list[str], name: str, stage: str, steps: int, batch: int,
           arch: str = "nafnet", train: dict | None = None, init: str | None = None) -> dict:
    """One stage's config (train/config.py schema): logs and checkpoints under OUT/NAME. The extractor
    trains at its own crop size (random crops of the stored patches)."""
    patch = plan.extractor["extractor_crop"] if stage == "extractor" else plan.patch
    return {"data": {"train_shards": shards, "patch_size": patch, "num_workers": plan.workers,
                     "shuffle_buffer": 32, "batches_per_epoch": 1000},
            "model": {"arch": arch, "preset": plan.preset, **plan.extractor},
            "tree": {"levels": [1, 2, 4], "num_samples": plan.cluster_samples, "path": str(out / "tree")},
            "train": {"stage": stage, "max_steps": steps, "lr": 3e-4, "warmup_steps": 0,
                      **({"init_ckpt": str(out / init)} if init else {}), **(train or {})},
            "deepspeed": {"micro_batch": batch},
            "log": {"dir": str(out / name / "logs"), "every": plan.log_every, "val_every": 0},
            "ckpt": {"dir": str(out / name), "every": max(steps, 1), "resume": "none"}}


def metrics(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name / "logs" / "metrics.jsonl").read_text().splitlines()]


def phase_rate(lines: list[dict], first: int, last: int) -> float | None:
    """Median images/s of the logged intervals ending in (first, last], the first interval left out."""
    rates = [m["train/images_per_s"] for m in lines if first < m["step"] <= last and "train/images_per_s" in m]
    return round(statistics.median(rates[1:]), 1) if len(rates) > 1 else None


def release(device) -> float:
    """Drop the finished engine's memory; returns what is still allocated (GiB) before the next run."""
    import torch

    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return round(torch.cuda.memory_allocated(device) / 2**30, 3)


def run_experts(out: Path, plan: Plan, shards: list[str], info, arch: str, batch: int) -> dict:
    from unirestorer.train import stage_experts
    from unirestorer.train.config import from_dict
    from unirestorer.train.loop import run as run_stage

    s, name = plan.steps, f"experts_{arch}_bs{batch}"
    train = {"level_start_steps": [0, s, s], "level_end_steps": [s, s + 1, 2 * s],
             "channels_last": True}
    before = release(info.device)
    started = time.perf_counter()
    code = run_stage(stage_experts.make_stage(), from_dict(config(out, plan, shards, name, "experts", 2 * s, batch,
                                                                  arch, train, "extractor")), info)
    lines = metrics(out, name)
    peaks = [m["train/gpu_peak_gib"] for m in lines if "train/gpu_peak_gib" in m]
    ref_name, factor = GOALS[arch]
    ref = REFERENCE[ref_name].get(batch)
    row = {"name": name, "exit_code": code, "arch": arch, "preset": plan.preset, "batch": batch,
           "root_img_s": phase_rate(lines, 0, s), "leaf_img_s": phase_rate(lines, s, 2 * s),
           "peak_gib": round(max(peaks), 2) if peaks else None, "allocated_before_gib": before,
           "reference": ref_name, "reference_img_s": ref, "goal_img_s": round(ref * factor, 1) if ref else None,
           "seconds": round(time.perf_counter() - started, 1)}
    print(f"[gpu_check] {json.dumps(row)}", flush=True)
    return row


def run_router_and_export(out: Path, plan: Plan, shards: list[str], info, experts: str) -> dict:
    from unirestorer.cli import main as cli_main
    from unirestorer.train import stage_router
    from unirestorer.train.config import from_dict
    from unirestorer.train.loop import run as run_stage

    release(info.device)
    started = time.perf_counter()
    cfg = config(out, plan, shards, "router", "router", plan.router_steps, plan.batches[0], "restormer",
                 {"lr": 1e-3, "schedule": "constant"}, experts)
    cfg["tree"]["path"] = ""  # the experts checkpoint carries its tree
    code = run_stage(stage_router.make_stage(), from_dict(cfg), info)
    last = metrics(out, "router")[-1]
    export = cli_main(["export", str(out / "router"), "--out", str(out / "bundle")])
    return {"exit_code": code, "export_exit_code": export, "steps": plan.router_steps,
            "img_s": round(last["train/images_per_s"], 1) if "train/images_per_s" in last else None, "leaf_accuracy": last.get("train/route/leaf_accuracy"),
            "seconds": round(time.perf_counter() - started, 1)}


def time_restore(out: Path, plan: Plan, device) -> dict:
    """Median latency of `restore_tensor` (extractor + router + one expert, untiled) on one image, bf16."""
    import torch

    from unirestorer.restore import load_model, restore_tensor

    release(device)
    model = load_model(str(out / "bundle"), device)
    x = torch.rand(1, 3, plan.restore_size, plan.restore_size, generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    y32, _ = restore_tensor(model, x, tile=0)  # warm-up (and the fp32 reference)
    times = []
    for _ in range(plan.restore_runs + 1):  # the first bf16 call warms up
        sync()
        start = time.perf_counter()
        y16, info = restore_tensor(model, x, tile=0, bf16=True)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"size": plan.restore_size, "ms": round(statistics.median(times[1:]), 1), "runs": plan.restore_runs,
            "node": info["node"], "max_abs_diff_vs_fp32": round(float((y16 - y32).abs().max()), 4),
            "peak_gib": round(peak, 2) if peak is not None else None, "reference_ms": RESTORE_REFERENCE_MS}


def table(doc: dict) -> str:
    fmt = lambda v: "—" if v is None else str(v)  # noqa: E731
    rows = ["| experts (bf16 on CUDA) | batch | root img/s | leaf img/s | peak GiB | H100 reference img/s | goal |",
            "|---|---|---|---|---|---|---|"]
    for r in doc["experts"]:
        rows.append(f"| {r['arch']}-{r['preset']} | {r['batch']} | {fmt(r['root_img_s'])} | {fmt(r['leaf_img_s'])} "
                    f"| {fmt(r['peak_gib'])} | {r['reference']} {fmt(r['reference_img_s'])} | {fmt(r['goal_img_s'])} |")
    rt, ro = doc["restore"], doc["router"]
    rows += ["", f"router: exit {ro['exit_code']}, export exit {ro['export_exit_code']}, {fmt(ro['img_s'])} img/s",
             f"restore {rt['size']}² bf16 (extractor + router + one expert): {rt['ms']} ms (PromptIR {rt['reference_ms']} "
             f"ms), peak {fmt(rt['peak_gib'])} GiB, max |bf16 - fp32| {rt['max_abs_diff_vs_fp32']}",
             f"{doc['device']}, torch {doc['torch']}, {doc['seconds']} s{' (dry run: numbers mean nothing)' if doc['dry_run'] else ''}"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_check")))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, the same code paths")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    if args.dry_run:
        os.environ["DS_ACCELERATOR"] = "cpu"
        torch.set_num_threads(1)
    plan, out, started = DRY if args.dry_run else GPU, args.out.resolve(), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    from unirestorer.launch.env import init_distributed
    from unirestorer.train import stage_extractor
    from unirestorer.train.config import from_dict
    from unirestorer.train.loop import run as run_stage
    from unirestorer.train.stage_cluster import run_cluster

    info = init_distributed()
    print(f"[gpu_check] {time.perf_counter() - started:.0f} s: imports and init, device {info.device}", flush=True)
    shards = write_data(out, plan)
    print(f"[gpu_check] {time.perf_counter() - started:.0f} s: shards written", flush=True)
    codes = {"extractor": run_stage(stage_extractor.make_stage(), from_dict(
        config(out, plan, shards, "extractor", "extractor", plan.extractor_steps, 16 if not args.dry_run else 2,
               train={"lr": 1e-3})), info)}
    codes["cluster"] = run_cluster(from_dict(config(out, plan, shards, "cluster", "cluster", 0, 8,
                                                    init="extractor")), info)
    print(f"[gpu_check] {time.perf_counter() - started:.0f} s: extractor and cluster done", flush=True)
    experts = [run_experts(out, plan, shards, info, arch, batch) for arch in ("nafnet", "restormer")
               for batch in plan.batches]
    router = run_router_and_export(out, plan, shards, info, f"experts_restormer_bs{plan.batches[0]}")
    device = torch.cuda.get_device_name() if info.device.type == "cuda" else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    doc = {"dry_run": args.dry_run, "device": device, "torch": torch.__version__, "plan": asdict(plan),
           "stage_exit_codes": codes, "experts": experts, "router": router,
           "restore": time_restore(out, plan, info.device)}
    doc["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=1))
    print(f"\n{table(doc)}\n\nsummary: {out / 'gpu_check.json'}", flush=True)
    failed = [k for k, v in codes.items() if v] + [r["name"] for r in experts if r["exit_code"]]
    failed += ["router"] * bool(router["exit_code"] or router["export_exit_code"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
