"""One rank of a run that ends as the training CLI ends it, printing the c10d threads still alive afterwards.
Run by tests/test_launch.py through the real deepspeed launcher:

    UNIRESTORER_ENTRY=tests/teardown_worker.py launch/cpu_ranks.sh 2 ours|held

Both modes import timm after the process group exists, as every stage does (timm -> torchvision ->
torch._dynamo -> torch.distributed.nn, whose functions take `group.WORLD` as a default argument), train one
DeepSpeed step, gather and meet at a barrier. `ours` then ends as train/__main__.py does (engine.destroy(),
launch.env.destroy_distributed); `held` keeps a reference to the world group and calls torch's
destroy_process_group alone, the teardown that left gloo's threads running into interpreter shutdown.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from unirestorer.launch.env import destroy_distributed, init_distributed


def c10d_threads() -> list[str]:
    """Names of this process's gloo and TCPStore threads (Linux names them in /proc)."""
    names = (Path("/proc/self/task", t, "comm").read_text().strip() for t in os.listdir("/proc/self/task"))
    return sorted(n for n in names if "gloo" in n or "tcpstore" in n)


def main(mode: str) -> None:
    info = init_distributed()
    import timm  # noqa: F401

    model = torch.nn.Linear(4, 4)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    engine.backward(engine(torch.ones(2, 4)).sum())
    engine.step()
    gathered = [torch.zeros(3) for _ in range(info.world_size)]
    dist.all_gather(gathered, torch.full((3,), float(info.rank)))
    dist.barrier()
    print(f"[rank {info.rank}] before teardown: {c10d_threads()}", flush=True)
    engine.destroy()
    if mode == "held":
        held = dist.group.WORLD  # noqa: F841
        dist.destroy_process_group()
    else:
        del engine, model
        destroy_distributed()
    print(f"[rank {info.rank}] after teardown: {c10d_threads()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
