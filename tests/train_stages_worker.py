"""One rank of the stage tests: extractor → cluster → experts → router through the real spine (train/loop.py).

The configs come from the test as plain dicts. Run B of the experts stage resumes run A from its step-2
checkpoint. After the router stage every rank restores the same fixed
images with the distributed model (eval routing, top-1 through TreeMoE) and saves its half, so the test
can compare them with the exported single-process bundle.
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
             "cluster": run_cluster(from_dict(configs["cluster"]), info),
             "experts": run_stage(stage_experts.make_stage(), from_dict(configs["experts"]), info),
             "experts_a": run_stage(stage_experts.make_stage(), from_dict(configs["experts_a"]), info),
             "experts_p": run_stage(stage_experts.make_stage(), from_dict(configs["experts_p"]), info)}
    # resume: run B starts from A's step-2 checkpoint (the step level 2 starts at) and goes on to step 4
    a, b = Path(configs["experts_a"]["ckpt"]["dir"]), Path(configs["experts_b"]["ckpt"]["dir"])
    if rank == 0:
        shutil.copytree(a / "step_00000002", b / "step_00000002")
        (b / "latest").write_text("step_00000002")
    torch.distributed.barrier()
    codes["experts_b"] = run_stage(stage_experts.make_stage(), from_dict(configs["experts_b"]), info)
    router = stage_router.make_stage()
    codes["router"] = run_stage(router, from_dict(configs["router"]), info)

    images = torch.rand(2 * world, 3, 32, 32, generator=torch.Generator().manual_seed(5))[rank::world]
    module = router.engine.module.eval()
    with torch.no_grad():
        route = module.router.route(module.extractor.embed(images))
        out = router.engine(images, route.node[:, None])[:, 0]
    torch.save({"images": images, "out": out, "node": route.node}, Path(out_dir, f"dist_rank{rank}.pt"))
    Path(out_dir, f"codes_rank{rank}.json").write_text(json.dumps(codes))
    torch.distributed.barrier()
    destroy_distributed()  # not left to interpreter shutdown (launch/env.py)
