"""The training runs of bench/quality.py: which stage runs with which config, and the 2-rank worker.

Every model is trained by the project's own stages (train/loop.py, train/stage_cluster.py) on the same
shards, with the main job's recipe (`unirestorer.demo_stages.stage_configs`); only the differences are here:

    extractor, cluster           shared by the UniRestorer tree and the LoRA tree
    experts, router              model 1, the UniRestorer tree, levels trained one after the other
    cluster_dense                a root-only tree (levels [1]) for the dense experts
    dense_inference              one expert, the tree's architecture and size, trained for as many steps
                                 as each tree level (so as each tree expert)
    dense_compute                the same expert trained for as many expert image-passes as the tree
                                 (its root's polish included); the dense experts get no polish of their own:
                                 they are the restorers compared, not a fallback
    lora_experts, lora_router    the LoRA tree: the same schedule, the root frozen once level 1 starts,
                                 rank-8 LoRA on the root's convs for every other node (so no root polish)

All runs share one 2-rank process group (gloo on CPU, NCCL with --gpus), so the launcher's start-up is
paid once; each run's wall time is measured on rank 0 around its stage call.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

LORA_RANK, LORA_ALPHA = 8, 16.0
MODELS = {  # table row -> the runs that train it (their wall times add up); shared runs are named in the table
    "tree": ("extractor", "cluster", "experts", "router"),
    "dense_inference": ("cluster_dense", "dense_inference"),
    "dense_compute": ("cluster_dense", "dense_compute"),
    "lora": ("lora_experts", "lora_router"),
}
EXPERTS_RUN = {"tree": "experts", "dense_inference": "dense_inference", "dense_compute": "dense_compute",
               "lora": "lora_experts"}  # the run whose checkpoint counts the model's expert image-passes
BUNDLE_OF = {"tree": "router", "dense_inference": "dense_inference", "dense_compute": "dense_compute",
             "lora": "lora_router"}  # the checkpoint each model's bundle is exported from


def plan(base: dict[str, dict], ckpt: Path, seed: int) -> list[tuple[str, str, dict]]:
    """(run name, stage, config) in training order; `base` = the main job's four stage configs; every run
    seeded with `seed`."""
    tree_train = base["experts"]["train"]
    e = tree_train["level_end_steps"][-1]  # demo.stage_configs: three levels, one after the other, then the polish
    per_level = e // 3
    runs = [(name, name, base[name]) for name in ("extractor", "cluster", "experts", "router")]

    dense_tree = copy.deepcopy(base["cluster"])
    dense_tree["tree"] |= {"path": str(ckpt / "tree_dense"), "levels": [1]}
    runs.append(("cluster_dense", "cluster", dense_tree))
    for name, steps in (("dense_inference", per_level), ("dense_compute", tree_train["max_steps"])):
        cfg = copy.deepcopy(base["experts"])
        cfg["tree"] |= {"path": str(ckpt / "tree_dense"), "levels": [1]}
        cfg["train"] |= {"max_steps": steps, "level_start_steps": [0], "level_end_steps": [steps],
                         "root_polish_steps": 0, "level_lrs": tree_train["level_lrs"][-1:]}  # a leaf's LR
        cfg["ckpt"] |= {"dir": str(ckpt / name), "every": steps}
        cfg["log"] |= {"val_every": steps}
        runs.append((name, "experts", cfg))

    lora = copy.deepcopy(base["experts"])
    lora["model"] |= {"lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA}
    lora["train"] |= {"max_steps": e, "root_polish_steps": 0}
    lora["ckpt"] |= {"dir": str(ckpt / "lora_experts"), "every": e}
    lora["log"] |= {"val_every": e}
    runs.append(("lora_experts", "experts", lora))
    router = copy.deepcopy(base["router"])
    router["model"] |= {"lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA}
    router["train"] |= {"init_ckpt": str(ckpt / "lora_experts")}
    router["ckpt"] |= {"dir": str(ckpt / "lora_router")}
    runs.append(("lora_router", "router", router))
    log_root = Path(base["experts"]["log"]["dir"])
    for name, stage, cfg in runs:  # every run logs to a folder of its own
        cfg["train"] = {**cfg["train"], "stage": stage, "seed": seed}
        cfg["ckpt"]["resume"] = "none"
        cfg["log"] = {**cfg["log"], "dir": str(log_root / name)}
    return runs


def worker(rank: int, world: int, port: int, runs: list[tuple[str, str, dict]], out: str) -> None:
    """One rank: every run in order through the stage spine; rank 0 writes {run: seconds or exit code}."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    os.dup2(2, 1)  # the stages' output goes to stderr: stdout holds only the benchmark's table (or --json)
    import torch

    torch.set_num_threads(1)  # one core per rank
    from unirestorer.launch.env import init_distributed
    from unirestorer.train import stage_experts, stage_extractor, stage_router
    from unirestorer.train.config import from_dict
    from unirestorer.train.loop import run as run_stage
    from unirestorer.train.stage_cluster import run_cluster

    stages = {"extractor": stage_extractor.make_stage, "experts": stage_experts.make_stage,
              "router": stage_router.make_stage}
    info = init_distributed()
    report: dict[str, dict] = {}
    for name, stage, cfg in runs:
        if rank == 0:
            print(f"\n[quality] run {name} (stage {stage})", flush=True)
        start = time.perf_counter()
        config = from_dict(cfg)
        code = run_cluster(config, info) if stage == "cluster" else run_stage(stages[stage](), config, info)
        report[name] = {"seconds": round(time.perf_counter() - start, 1), "code": code}
        if rank == 0:
            Path(out).write_text(json.dumps(report, indent=1))
        if code:
            break
    torch.distributed.barrier()
