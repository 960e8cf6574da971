"""One rank of the LoRA tree tests: extractor → cluster → experts (LoRA tree) → its resume → router, through
the real spine (train/loop.py), on 2 gloo ranks.

Run B of the experts stage resumes run A from its step-4 checkpoint, the step level 2 starts at. Each rank
writes, per expert placed on it, the parameter names the experts stage put into the optimizer and the ones
still requiring grad after the run, so the test can check that no LoRA base was ever trainable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch


def run(rank: int, world: int, port: int, configs: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from unirestorer.launch.env import destroy_distributed, init_distributed
    from unirestorer.train import stage_experts, stage_extractor, stage_router
    from unirestorer.train.config import from_dict
    from unirestorer.train.loop import run as run_stage
    from unirestorer.train.stage_cluster import run_cluster

    info = init_distributed()
    codes = {"extractor": run_stage(stage_extractor.make_stage(), from_dict(configs["extractor"]), info),
             "cluster": run_cluster(from_dict(configs["cluster"]), info)}
    experts = stage_experts.make_stage()
    in_optimizer: dict[str, list[str]] = {}
    param_groups = experts.param_groups

    def recording(module: torch.nn.Module) -> list[dict]:  # what the stage hands to the optimizer, by node
        groups = param_groups(module)
        ids = {id(p) for g in groups for p in g["params"]}
        tree = module.tree_moe
        in_optimizer.update({str(n): sorted(k for k, p in tree.local_module(n).named_parameters() if id(p) in ids)
                             for n in tree.local_nodes()})
        return groups

    experts.param_groups = recording
    codes["experts_a"] = run_stage(experts, from_dict(configs["experts_a"]), info)
    tree = experts.engine.module.tree_moe
    grad_after = {str(n): sorted(k for k, p in tree.local_module(n).named_parameters() if p.requires_grad)
                  for n in tree.local_nodes()}
    a, b = Path(configs["experts_a"]["ckpt"]["dir"]), Path(configs["experts_b"]["ckpt"]["dir"])
    if rank == 0:
        shutil.copytree(a / "step_00000004", b / "step_00000004")
        (b / "latest").write_text("step_00000004")
    torch.distributed.barrier()
    codes["experts_b"] = run_stage(stage_experts.make_stage(), from_dict(configs["experts_b"]), info)
    codes["router"] = run_stage(stage_router.make_stage(), from_dict(configs["router"]), info)
    Path(out_dir, f"report_rank{rank}.json").write_text(json.dumps(
        {"codes": codes, "in_optimizer": in_optimizer, "grad_after": grad_after}))
    torch.distributed.barrier()
    destroy_distributed()  # not left to interpreter shutdown (launch/env.py)
