"""The paper trees on cluster sizes, on paper: placement, memory, exchange volume and time against compute.

    python bench/placement.py --json
    python bench/placement.py --trees 1,7,19 --ranks 8 64 --expert-img-per-s 35.4

For each tree and world size, from `plan_placement` (the rule the trainer uses) with even clusters:
- ep sizes, idle slots, experts and parameters per rank (Restormer-paper experts, counted on the meta device),
  and the per-rank skew of the expected expert compute;
- expert weight + optimizer memory per rank under ZeRO-2 with bf16 (2 B weights + 2 B grads per parameter,
  12 B fp32 master + Adam moments partitioned over the expert-data-parallel ranks);
- all-to-all bytes one rank sends per training step (micro batch images of `--size`² bf16, one expert per level,
  an image leaves its rank with probability (ep-1)/ep; forward there and back plus the same in backward),
  and the gradient all-reduce bytes (ring: 2 (n-1)/n of the local expert gradients per expert-data group);
- their time at NVLink (450 GB/s per GPU one way) and at 400 Gb/s InfiniBand (50 GB/s per GPU), and with
  8 GPUs per node (an expert-parallel group of <= 8 consecutive ranks stays on NVLink), against the step's
  compute: busiest rank's expert passes / `--expert-img-per-s` (fwd + bwd + optimizer images per second of
  one expert; default 35.4 = PromptIR on one H100, bf16, 128², batch 8, DESIGN §7, an upper bound for
  Restormer-paper, which is PromptIR without its prompt blocks);
- images each leaf expert trains on per step (world x micro batch / leaves): its effective batch.
"""

from __future__ import annotations

import argparse
import json

import torch

from unirestorer.model.experts import create_expert
from unirestorer.parallel.placement import Placement, plan_placement

NVLINK, INFINIBAND, GPUS_PER_NODE = 450e9, 50e9, 8
BF16 = 2


def expert_params() -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create_expert("restormer", "paper").parameters())


def a2a_bytes(placement: Placement, batch: int, image_bytes: int) -> tuple[float, float]:
    """(bytes to ranks on the same node, bytes to other nodes) one rank sends per step, uniform routes.
    Levels sharing an ep_size share one exchange but carry their images all the same."""
    near = far = 0.0
    for lv in placement.levels:
        if lv.ep_size == 1:
            continue
        per_peer = batch * image_bytes * 4 / lv.ep_size  # there + back, forward + backward
        peers_near = min(lv.ep_size, GPUS_PER_NODE) - 1
        near += per_peer * peers_near
        far += per_peer * (lv.ep_size - 1 - peers_near)
    return near, far


def memory_and_grads(placement: Placement, params: int) -> tuple[float, float, float]:
    """Busiest rank: (parameters, ZeRO-2 bf16 weight + optimizer bytes, gradient all-reduce bytes sent)."""
    worst = (0.0, 0.0, 0.0)
    for rank in range(placement.world_size):
        n_params = mem = grads = 0.0
        for lv in placement.levels:
            local = len(lv.nodes_on(rank % lv.ep_size)) * params
            dp = placement.world_size // lv.ep_size
            n_params += local
            mem += local * (2 * BF16 + 12 / dp)
            grads += local * BF16 * 2 * (dp - 1) / dp
        worst = max(worst, (n_params, mem, grads))
    return worst


def analyse(levels: list[int], world: int, params: int, batch: int, size: int, img_per_s: float) -> dict:
    placement = plan_placement(levels, world)
    near, far = a2a_bytes(placement, batch, 3 * size * size * BF16)
    n_params, mem, grads = memory_and_grads(placement, params)
    skew = placement.skew()
    compute = skew * batch * len(levels) / img_per_s
    a2a_node = max(near / NVLINK, far / INFINIBAND)
    grad_node = grads / (NVLINK if world <= GPUS_PER_NODE else INFINIBAND)  # ring over nodes runs at IB speed
    experts_per_rank = max(len(placement.nodes_on_rank(r)) for r in range(world))
    return {
        "tree": levels, "ranks": world, "ep_sizes": [lv.ep_size for lv in placement.levels],
        "slots": [lv.num_slots for lv in placement.levels], "idle_slots": sum(lv.idle_slots for lv in placement.levels),
        "experts_per_rank": experts_per_rank, "params_per_rank_M": round(n_params / 1e6, 1),
        "zero2_bf16_weight_optimizer_GiB": round(mem / 2 ** 30, 2), "skew": round(skew, 3),
        "a2a_MB_per_step": round((near + far) / 1e6, 2),
        "a2a_ms_nvlink": round(1e3 * (near + far) / NVLINK, 3), "a2a_ms_infiniband": round(1e3 * (near + far) / INFINIBAND, 3),
        "a2a_ms_8_per_node": round(1e3 * a2a_node, 3),
        "grad_allreduce_MB_per_step": round(grads / 1e6, 1), "grad_allreduce_ms_8_per_node": round(1e3 * grad_node, 2),
        "compute_ms": round(1e3 * compute, 1), "images_per_leaf_per_step": round(world * batch / levels[-1], 1),
        "comm_share_8_per_node": round((a2a_node + grad_node) / (compute + a2a_node + grad_node), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", default=["1,7,19", "1,4,8"], help="level sizes, comma separated")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64, 512])
    parser.add_argument("--batch", type=int, default=8, help="micro batch images per rank")
    parser.add_argument("--size", type=int, default=128, help="patch side")
    parser.add_argument("--expert-img-per-s", type=float, default=35.4)
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args()
    params = expert_params()
    rows = [analyse([int(x) for x in tree.split(",")], world, params, args.batch, args.size, args.expert_img_per_s)
            for tree in args.trees for world in args.ranks]
    result = {"expert": "restormer paper", "expert_params": params, "batch": args.batch, "size": args.size,
              "dtype": "bf16", "expert_img_per_s": args.expert_img_per_s, "rows": rows}
    if args.json:
        print(json.dumps(result))
        return
    print({k: v for k, v in result.items() if k != "rows"})
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
