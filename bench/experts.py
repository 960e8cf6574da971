"""Expert cost per preset: parameters, LoRA parameters and CPU forward time (one thread, 256², batch 1).

    python bench/experts.py --json          # one JSON object on stdout
    python bench/experts.py --extractor     # also time DegradationExtractor.embed (default config)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from unirestorer.model.experts import EXPERTS, create_expert
from unirestorer.model.lora import add_lora, lora_state_dict


def median_ms(fn, runs: int) -> dict[str, float]:
    """Median wall and process-CPU milliseconds: on one thread, CPU time is what one core costs even
    when other processes share the machine (wall time then also counts waiting)."""
    fn()  # warm-up: allocator, one-time kernel choices
    wall, cpu = [], []
    for _ in range(runs):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"wall_ms": round(statistics.median(wall) * 1e3, 1), "cpu_ms": round(statistics.median(cpu) * 1e3, 1)}


def bench_expert(name: str, preset: str, size: int, runs: int) -> dict:
    torch.manual_seed(0)
    expert = create_expert(name, preset).eval()
    params = sum(p.numel() for p in expert.parameters())
    lora = sum(v.numel() for v in lora_state_dict(add_lora(create_expert(name, preset))).values())
    x = torch.rand(1, 3, size, size)
    with torch.inference_mode():
        ms = median_ms(lambda: expert(x), runs)
    return {"expert": name, "preset": preset, "params": params, "lora_r8_params": lora,
            "lora_share": round(lora / params, 4),
            "forward_wall_ms": ms["wall_ms"], "forward_cpu_ms": ms["cpu_ms"]}  # fmt: skip


def bench_extractor(size: int, runs: int) -> dict:
    from unirestorer.model.extractor import DegradationExtractor

    model = DegradationExtractor().eval()
    x = torch.rand(1, 3, size, size)
    ms = median_ms(lambda: model.embed(x), runs)
    return {"extractor": model.config, "params": sum(p.numel() for p in model.parameters()),
            "embed_wall_ms": ms["wall_ms"], "embed_cpu_ms": ms["cpu_ms"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per preset (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extractor", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench_expert(n, p, args.size, args.runs) for n in EXPERTS for p in EXPERTS[n]]
    result = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": args.threads,
              "size": args.size, "batch": 1, "runs": args.runs, "torch": torch.__version__,
              "experts": rows}  # fmt: skip
    if args.extractor:
        result["extractor"] = bench_extractor(args.size, args.runs)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'expert':10} {'preset':6} {'params':>11} {'LoRA r8':>9} {'share':>6} {'cpu ms':>9} {'wall ms':>9}")
    for r in rows:
        print(f"{r['expert']:10} {r['preset']:6} {r['params']:>11,} {r['lora_r8_params']:>9,} "
              f"{r['lora_share']:>6.1%} {r['forward_cpu_ms']:>9.1f} {r['forward_wall_ms']:>9.1f}")  # fmt: skip
    if args.extractor:
        print(json.dumps(result["extractor"]))


if __name__ == "__main__":
    main()
