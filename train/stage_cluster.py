"""Stage 2, `cluster`: embed shard samples with the trained extractor on every rank, build the tree on rank 0.

Not a training loop (nothing to resume; SIGUSR1/SIGTERM stop every rank at the same batch with exit 75 and
no tree written, so a requeued job simply runs it again): each rank embeds its share of `tree.num_samples` samples of
`data.train_shards` (native-resolution crops, `DegradationExtractor.embed`), the embeddings, task names
and label intensities are gathered, rank 0 fits `DegradationTree.fit(k=levels)` and writes `tree.path/` (tree.json,
tree.safetensors) plus `tree_stats.json`: nodes per level, counts, task composition, purity (share of a
node's majority task) per node and per level. `tree.levels = []` sizes the tree from the data: level 1
gets one node per task present (so it can be "degradation type"), level 2 two per level-1 node (type +
degree); with `tree.level1_from_tasks` level 1's k-means starts from the tasks' mean embeddings.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from unirestorer.launch.env import DistInfo
from unirestorer.model.tree import DegradationTree
from unirestorer.safe_files import atomic_write
from unirestorer.train.config import ConfigError, RunConfig
from unirestorer.train.preemption import PREEMPTED_EXIT_CODE, PreemptionHandler, exit_preempted
from unirestorer.train.stage_extractor import shard_stream
from unirestorer.train.stage_state import extractor_from_checkpoint
from unirestorer.train.weights import read_checkpoint

STATS_FILE = "tree_stats.json"


def tree_levels(levels: list[int], tasks: list[str]) -> list[int]:
    """`tree.levels`, or [1, T, 2T] for the T distinct tasks when it is empty."""
    if levels:
        return list(levels)
    n = len(set(tasks))
    return [1, n, 2 * n]


def _gather(x: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """all_gather of tensors whose first dimension differs per rank."""
    n = torch.tensor([len(x)], device=info.device)
    sizes = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(sizes, n)
    top = max(int(s.item()) for s in sizes)
    padded = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=info.device)
    padded[: len(x)] = x
    out = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(out, padded)
    return [o[: int(s.item())].cpu() for o, s in zip(out, sizes)]


def _gather_strings(items: list[str], info: DistInfo) -> list[str]:
    blob = torch.frombuffer(bytearray(json.dumps(items).encode()), dtype=torch.uint8)
    return [s for part in _gather(blob, info) for s in json.loads(bytes(part.tolist()).decode())]


def purity(nodes: list[dict]) -> float:
    """Sample-weighted share of each node's majority task."""
    total = sum(n["count"] for n in nodes)
    return round(sum(n["count"] * (n["purity"] or 0) for n in nodes) / max(total, 1), 4)


def tree_stats(tree: DegradationTree, extractor_ckpt: str) -> dict[str, Any]:
    nodes = []
    for i in range(tree.n_nodes):
        comp = tree.composition(i)
        count = int(tree.counts[i])
        major = max(comp, key=comp.get) if comp else None
        nodes.append({"id": i, "level": tree.level_of(i), "parent": int(tree.parents[i]), "count": count,
                      "composition": comp, "majority_task": major,
                      "purity": round(comp[major] / count, 4) if major and count else None})
    per_level = [purity([n for n in nodes if n["level"] == l]) for l in range(tree.n_levels)]
    return {
        "num_samples": int(tree.counts[0]), "extractor": extractor_ckpt, "level_sizes": tree.level_sizes,
        "tasks": tree.composition(0),
        "counts_per_level": [[n["count"] for n in nodes if n["level"] == l] for l in range(tree.n_levels)],
        "purity_per_level": per_level, "level1_purity": per_level[1] if tree.n_levels > 1 else None,
        "leaf_purity": per_level[-1], "nodes": nodes,
    }


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"tree: levels {stats['level_sizes']}, {stats['num_samples']} samples, tasks {stats['tasks']}, "
             f"purity per level {stats['purity_per_level']}"]
    for n in stats["nodes"]:
        lines.append(f"{'  ' * n['level']}node {n['id']} (level {n['level']}): {n['count']} samples, majority "
                     f"{n['majority_task']} ({n['purity']}), {n['composition']}")
    return "\n".join(lines)


def run_cluster(cfg: RunConfig, info: DistInfo) -> int:
    if not cfg.train.init_ckpt:
        raise ConfigError("stage cluster: set train.init_ckpt to the extractor checkpoint folder")
    if not cfg.tree.path:
        raise ConfigError("stage cluster: set tree.path (the folder the tree is written to)")
    if not cfg.data.train_shards:
        raise ConfigError("stage cluster: data.train_shards is empty")
    handler = PreemptionHandler().install()
    try:
        return _cluster(cfg, info, handler)
    finally:
        handler.uninstall()


def _cluster(cfg: RunConfig, info: DistInfo, handler: PreemptionHandler) -> int:
    if info.rank == 0:
        print(f"[config] stage cluster, {info.world_size} ranks\n{cfg.pretty()}", flush=True)
    extractor = extractor_from_checkpoint(read_checkpoint(cfg.train.init_ckpt)).to(info.device)
    share = cfg.tree.num_samples // info.world_size + (info.rank < cfg.tree.num_samples % info.world_size)
    most = math.ceil(cfg.tree.num_samples / info.world_size)
    batch = max(1, min(32, most))  # the same batch count on every rank: the stop flag is all-reduced per batch
    embs, tasks, degrees = [], [], []  # degrees: each sample's label intensity, NaN where unknown (real pairs)
    for b in shard_stream(cfg, info, cfg.data.train_shards, batch, math.ceil(most / batch), 0, train=False):
        keep = min(batch, share - len(tasks))
        if keep > 0:
            embs.append(extractor.embed(b["lq"][:keep].to(info.device)).float().cpu())
            tasks += b["task"][:keep]
            degrees += [math.nan if label.get("intensity") is None else float(label["intensity"])
                        for label in b["label"][:keep]]
        if handler.should_stop():  # nothing is written: a rerun (a requeued job) embeds again from the start
            if info.rank == 0:
                print(f"[preemption] {handler.received or 'signal on another rank'}: cluster stopped after "
                      f"{len(tasks)} of {share} samples on rank 0; no tree written; exiting with "
                      f"{PREEMPTED_EXIT_CODE} (rerun it, under SLURM the job is requeued)", file=sys.stderr, flush=True)
            exit_preempted(info.rank)
    local = torch.cat(embs) if embs else torch.zeros(0, extractor.config["embed_dim"])
    all_emb = torch.cat(_gather(local, info))
    all_tasks = _gather_strings(tasks, info)
    all_degrees = torch.cat(_gather(torch.tensor(degrees, dtype=torch.float64, device=info.device), info)).tolist()
    if info.rank == 0:
        levels = tree_levels(cfg.tree.levels, all_tasks)
        # on rank 0's device: k-means runs in torch there (minutes on a CPU, seconds on a GPU) while the others wait
        tree = DegradationTree.fit(all_emb.to(info.device), k=levels, tasks=all_tasks, seed=cfg.train.seed,
                                   level1_from_tasks=cfg.tree.level1_from_tasks, intensities=all_degrees)
        out = Path(cfg.tree.path)
        tree.save(out)
        stats = tree_stats(tree, str(cfg.train.init_ckpt))
        atomic_write(out / STATS_FILE, json.dumps(stats, indent=1))
        print(format_stats(stats), flush=True)
        print(f"[cluster] tree written to {out} ({STATS_FILE} beside it)", flush=True)
    dist.barrier()
    return 0
