"""Benchmark the dropless expert-parallel dispatch against DeepSpeed's stock MoE and plain DP.

    python bench/moe_dispatch.py --ranks 2 --json
    python bench/moe_dispatch.py --ranks 4 --ep-sizes 1 2 4 --json    # two communicating exchanges

Spawns `--ranks` processes (NCCL + bf16 autocast when that many GPUs exist, else gloo on CPU) and
measures in one run, for a tree of tiny NAFNet experts trained on their oracle paths (k = levels):
- useful_fraction: routed images / images the experts actually ran (ours; must be 1.0),
- padded_fraction_deepspeed: the same ratio for the same routes through DeepSpeed's stock MoE layers
  (one per level, dropping off, routes forced through its top-1 gate),
- max_abs_err: our outputs vs every expert run in one process,
- overhead_ratio: expert-parallel training step time / the same step with every expert replicated on
  every rank (plain data parallel, no all-to-all), same images per rank; balanced and skewed routes,
- a2a_share: fraction of the expert-parallel step spent in the exchanges,
- communicating_exchanges: all-to-all pairs per step that cross ranks (distinct ep sizes > 1),
- rank_image_skew: images the busiest rank's experts ran / the mean rank's (probes not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import Tensor, nn


def factory(node: int) -> nn.Module:
    from unirestorer.model.experts import create_expert

    torch.manual_seed(node)
    return create_expert("nafnet", "tiny")


def routes(level_sizes: list[int], batch: int, rank: int, kind: str) -> Tensor:
    """Root -> parent -> leaf paths. balanced: leaves round-robin (exactly even); random: uniform
    i.i.d. leaves (even on average); skewed: 3/4 of the images go to the first half of the leaves
    (held, with their parents, by the first expert-parallel rank)."""
    leaves, parents = level_sizes[-1], level_sizes[1]
    gen = torch.Generator().manual_seed(rank)
    if kind == "balanced":
        leaf = (torch.arange(batch) + rank * batch) % leaves
    else:
        weights = torch.tensor([3.0 if kind == "skewed" and i < leaves // 2 else 1.0 for i in range(leaves)])
        leaf = torch.multinomial(weights, batch, replacement=True, generator=gen)
    parent = leaf * parents // leaves
    return torch.stack([torch.zeros_like(leaf), 1 + parent, 1 + parents + leaf], dim=1)


class _FlatExpert(nn.Module):
    """Stock DeepSpeed experts see `[ep, 1, capacity, C*H*W]` rows; count what they really run."""

    def __init__(self, net: nn.Module, size: int) -> None:
        super().__init__()
        self.net, self.size, self.rows = net, size, 0

    def forward(self, rows: Tensor) -> Tensor:
        images = rows.reshape(-1, 3, self.size, self.size)
        self.rows += images.shape[0]
        return self.net(images).reshape(rows.shape)


def deepspeed_stock_rows(level_sizes: list[int], ep_sizes: list[int], size: int, paths: Tensor) -> int:
    """Images DeepSpeed's capacity-padded MoE (drop_tokens=False) runs through experts for `paths`."""
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.sharded_moe import TopKGate, top1gating

    class RouteGate(TopKGate):
        """Top-1 gate forced onto precomputed routes; the rest is DeepSpeed's own gating."""
        route: Tensor

        def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):  # noqa: A002
            logits = 30.0 * nn.functional.one_hot(self.route, self.wg.out_features).float()
            return top1gating(logits, 1.0, 0, used_token, None, False, False, self.ep_group, sparse_routes, use_tutel)

    rows, first = 0, 0
    for level, (n, ep) in enumerate(zip(level_sizes, ep_sizes)):
        slots = -(-n // ep) * ep
        layer = MoE(3 * size * size, _FlatExpert(factory(first), size), num_experts=slots, ep_size=ep,
                    min_capacity=0, drop_tokens=False, use_rts=False)
        layer.deepspeed_moe.gate = RouteGate(3 * size * size, slots, k=1, min_capacity=0, drop_tokens=False,
                                             use_rts=False)
        layer.set_deepspeed_parallelism()
        layer.deepspeed_moe.gate.route = paths[:, level] - first
        with torch.no_grad():
            layer(torch.rand(paths.shape[0], 3 * size * size))
        rows += sum(e.rows for e in layer.deepspeed_moe.experts.deepspeed_experts)
        first += n
    return rows


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    sys.stdout = sys.stderr  # DeepSpeed prints to stdout; the parent's stdout carries only the result
    torch.set_num_threads(args.threads)
    import deepspeed
    import torch.distributed as dist
    from unirestorer.parallel.dispatch import CommTimer
    from unirestorer.parallel.tree_moe import TreeMoE, initialize

    gpu = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if gpu:
        torch.cuda.set_device(rank)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    levels, size, batch = args.levels, args.size, args.batch
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    adamw = lambda groups: torch.optim.AdamW(groups, lr=1e-4)  # noqa: E731
    ep_layer = TreeMoE(factory, levels, args.ep_sizes).to(device)
    dp_layer = TreeMoE(factory, levels, ep_sizes=[1] * len(levels)).to(device)
    counted = [0]
    for n in ep_layer.local_nodes():
        ep_layer.local_module(n).register_forward_pre_hook(lambda m, a: counted.__setitem__(0, counted[0] + a[0].shape[0]))
    engines = {"ep": initialize(ep_layer, config, adamw), "dp": initialize(dp_layer, config, adamw)}
    gen = torch.Generator().manual_seed(1000 + rank)
    images = torch.rand(batch, 3, size, size, generator=gen).to(device)
    paths = {kind: routes(levels, batch, rank, kind) for kind in ("balanced", "random", "skewed")}

    def step(name: str, ids: Tensor) -> float:
        engine = engines[name]
        dist.barrier()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            out = engine(images, ids)
            loss = (out.float() - images[:, None]).abs().mean()
        engine.backward(loss)
        engine.step()
        if gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # Correctness and useful work first, on the untouched weights.
    reference = nn.ModuleList(factory(n) for n in range(sum(levels))).to(device)
    ids = paths["balanced"]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
        counted[0] = 0
        ours = engines["ep"](images, ids).float()
        ran = counted[0]
        ref = torch.stack([torch.cat([reference[int(n)](images[i: i + 1]) for n in ids[i]]) for i in range(batch)])
    stats = torch.tensor([float((ours - ref.float()).abs().max()), ids.numel(), ran], device=device)
    ep_sizes = [lv.ep_size for lv in ep_layer.placement.levels]
    stock = {s: deepspeed_stock_rows(levels, ep_sizes, size, p.to(device)) for s, p in paths.items()}
    totals = torch.tensor([ids.numel(), ran, *stock.values()], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    dist.all_reduce(stats[:1], op=dist.ReduceOp.MAX)

    result = {"ranks": world, "backend": dist.get_backend(), "device": str(device.type), "dtype": "bf16" if gpu else "fp32",
              "image_size": size, "images_per_rank": batch, "levels": levels, "ep_sizes": ep_sizes,
              "communicating_exchanges": ep_layer.communicating_exchanges,
              "useful_fraction": float(totals[0] / totals[1]),
              "padded_fraction_deepspeed": float(totals[0] / totals[2]),
              "padded_fraction_deepspeed_random": float(totals[0] / totals[3]),
              "padded_fraction_deepspeed_skewed": float(totals[0] / totals[4]),
              "max_abs_err": float(stats[0])}
    for kind in ("balanced", "skewed"):
        ids = paths[kind]
        for _ in range(args.warmup):
            step("ep", ids), step("dp", ids)
        ep_times, dp_times, shares = [], [], []
        for _ in range(args.steps):  # interleaved, so load from elsewhere hits both alike
            CommTimer.enabled, CommTimer.seconds, counted[0] = True, 0.0, 0
            ep_times.append(step("ep", ids))
            CommTimer.enabled = False
            shares.append(CommTimer.seconds / ep_times[-1])
            dp_times.append(step("dp", ids))
        timing = torch.tensor([statistics.median(ep_times), statistics.median(dp_times), statistics.median(shares)],
                              device=device)
        dist.all_reduce(timing, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
        real = ep_layer.rows_per_rank()  # images each rank's experts ran in the last ep step, no probes
        rows = torch.tensor([float(counted[0])], device=device)  # the same with the idle probes
        rows_all = [torch.zeros_like(rows) for _ in range(world)]
        dist.all_gather(rows_all, rows)
        suffix = "" if kind == "balanced" else "_skewed"
        result[f"step_s_ep{suffix}"], result[f"step_s_dp{suffix}"] = float(timing[0]), float(timing[1])
        result[f"overhead_ratio{suffix}"] = float(timing[0] / timing[1])
        result[f"a2a_share{suffix}"] = float(timing[2])
        result[f"expert_images_per_rank{suffix}"] = [int(r) for r in rows_all]
        result[f"rank_image_skew{suffix}"] = max(real) / (sum(real) / world)
        if kind == "skewed":  # an expert without images runs one blank 16x16 probe (see tree_moe)
            result["useful_fraction_skewed"] = world * ids.numel() / float(sum(rows_all))
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--ep-sizes", type=int, nargs="+", default=None, help="per level (default: auto)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="images per rank")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from unirestorer.launch.ports import free_port

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        out = str(Path(tmp) / "result.json")
        mp.start_processes(worker, args=(args.ranks, port, args, out), nprocs=args.ranks, start_method="spawn")
        result = json.loads(Path(out).read_text())
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:34s} {value}")


if __name__ == "__main__":
    main()
