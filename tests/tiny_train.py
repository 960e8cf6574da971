"""A tiny real DeepSpeed training run (nn.Linear, ZeRO-2, CPU gloo) that uses the whole run machinery:
launch env, config + flags, ds_config merge, checkpoints, RNG/data state, preemption.

Run by tests/test_run_state.py through launch/cpu_ranks.sh. Every RNG source feeds the loss, so
equal losses and weights after a resume prove that every source was restored. Writes
OUT/rank{r}.jsonl: one line per step as it is done, then a final
line with the weights; and OUT/progress (last step done, rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from unirestorer.launch.env import destroy_distributed, init_distributed
from unirestorer.train import checkpoint as ckpt
from unirestorer.train.config import add_common_args, build_ds_config, config_from_args
from unirestorer.train.preemption import PreemptionHandler, exit_preempted
from unirestorer.train.run_state import DataPosition, capture_rng, restore_rng, seed_everything


def main() -> None:
    parser = add_common_args(argparse.ArgumentParser())
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--crash-at-save", type=int, default=-1, help="rank 1 dies after writing this save")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args()
    cfg = config_from_args(args)
    handler = PreemptionHandler().install()
    info = init_distributed(timeout_s=60)
    torch.set_num_threads(1)
    torch.manual_seed(1234)  # same initial weights on every rank
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=build_ds_config(cfg, info.device.type))

    seed_everything(cfg.train.seed, info.rank)
    data = DataPosition(cfg.train.seed)
    gens = {"data": torch.Generator().manual_seed(data.stream_seed(info.rank)),
            "aug": np.random.default_rng(data.stream_seed(info.rank))}
    step, resumed_from = 0, None
    point = ckpt.resolve_resume(cfg.ckpt.resume, cfg.ckpt.dir)
    if point is not None:
        client, rank_state = ckpt.load_checkpoint(engine, point)
        step = resumed_from = client["step"]
        if rank_state is None:  # elastic resume: weights only, a new data stream
            data = data.restarted()
            gens["data"].manual_seed(data.stream_seed(info.rank))
        else:
            restore_rng(rank_state["rng"], gens)
            data = DataPosition.from_dict(rank_state["data"])

    log = open(args.out / f"rank{info.rank}.jsonl", "a", buffering=1)
    log.write(json.dumps({"rank": info.rank, "world": info.world_size, "local_rank": info.local_rank,
                          "resumed_from": resumed_from, "weights": engine.module.weight.detach().flatten().tolist()}) + "\n")
    micro = engine.train_micro_batch_size_per_gpu()
    while step < cfg.train.max_steps:
        x = torch.randn(micro, 8, generator=gens["data"])
        noise = random.random() + np.random.rand() + torch.rand(1).item() + gens["aug"].normal()
        target = x[:, :4] * 2.0 + noise
        loss = torch.nn.functional.mse_loss(engine(x), target)
        engine.backward(loss)
        engine.step()
        step, data.batches = step + 1, data.batches + 1
        log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
        if info.rank == 0:
            (args.out / "progress").write_text(str(step))
        time.sleep(args.step_sleep)
        stop = handler.should_stop()
        if stop or step % cfg.ckpt.every == 0 or step == cfg.train.max_steps:
            client = {"config": cfg.to_dict()}
            rank_state = {"rng": capture_rng(gens), "data": data.to_dict()}
            if step == args.crash_at_save:  # save = write + commit; die in between
                ckpt.write_checkpoint(engine, cfg.ckpt.dir, step, client, rank_state)
                if info.rank == 1:
                    os._exit(3)
                ckpt.commit_checkpoint(cfg.ckpt.dir, step, cfg.ckpt.keep_last)
            else:
                ckpt.save_checkpoint(engine, cfg.ckpt.dir, step, client, rank_state, cfg.ckpt.keep_last)
        if stop:
            log.write(json.dumps({"preempted": handler.received, "step": step}) + "\n")
            try:
                exit_preempted(info.rank)
            finally:
                destroy_distributed()  # not left to interpreter shutdown (launch/env.py)
    log.write(json.dumps({"done": step, "weights": engine.module.weight.detach().flatten().tolist()}) + "\n")
    dist.barrier()
    destroy_distributed()  # not left to interpreter shutdown (launch/env.py)


if __name__ == "__main__":
    main()
