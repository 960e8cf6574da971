"""Ranks from whichever launcher started us, then DeepSpeed's process group.

The deepspeed launcher (and torchrun) set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
`srun` sets only SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS / SLURM_JOB_NODELIST; launch/slurm.sbatch
exports the standard names too, but a bare `srun python -m ...` works as well through this mapping.
A plain `python -m ...` is a world of one.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch

from unirestorer.launch.ports import MASTER_PORTS


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def slurm_master_addr(nodelist: str) -> str:
    """First host of a SLURM node list such as `gpu[01-04],cpu7` (expanded by `scontrol show hostnames`)."""
    res = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    hosts = res.stdout.split()
    if res.returncode != 0 or not hosts:
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} gave no host: {res.stderr.strip()[-300:]}")
    return hosts[0]


def rank_env_from_slurm(env: dict[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables derived from SLURM's, for the keys not already set."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env["SLURM_LOCALID"], "WORLD_SIZE": env["SLURM_NTASKS"]}
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = slurm_master_addr(env["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" not in env:  # same on every task of a job, different between concurrent jobs
        out["MASTER_PORT"] = str(MASTER_PORTS[int(env["SLURM_JOB_ID"]) % len(MASTER_PORTS)])
    return out


def skip_shm_comm_op(deepspeed) -> None:
    """Keep DeepSpeed from compiling and loading its CPU shared-memory all-reduce op (34 s of C++ on a fresh
    machine, then a 69 MB /dev/shm buffer per rank left behind): only its inference all-reduce uses it, never
    training, and it needs a compiler. DeepSpeed builds it when `deepspeed.ops.__compatible_ops__` says the op
    is compatible, a dict it documents as editable."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Set the rank variables (SLURM or single process), pick the device, and create the process group
    through deepspeed.init_distributed: NCCL on CUDA, gloo on CPU (DS_ACCELERATOR=cpu)."""
    import deepspeed  # heavy; only when a run starts
    # torch.distributed.nn binds `group.WORLD` as a default argument when first imported. Imported after the
    # group exists (timm -> torchvision -> torch._dynamo does), it holds the group for good: destroy_process_group
    # then leaves gloo's worker threads running, and one of them may free a collective's tensors during
    # interpreter shutdown and abort the rank (SIGABRT, "terminate called without an active exception", 2 of
    # 117 exits of the demo's cluster stage). Imported here, before the group exists, it binds None.
    import torch.distributed.nn

    os.environ.update(rank_env_from_slurm())
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, default)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    skip_shm_comm_op(deepspeed)
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s), rank=rank, world_size=world)
    return DistInfo(rank, local_rank, world, device)


def destroy_distributed() -> None:
    """End every process group now, on every rank, once no collective is left (a normal end or a preemption).

    A group still referenced at exit keeps gloo's worker threads alive into interpreter shutdown, where one of
    them may free a finished collective's tensors and abort the rank (SIGABRT). DeepSpeed caches the groups it
    creates (the engine's data-parallel and expert groups); its destroy_process_group drops those references
    too, and the collection first frees an engine already destroyed (train/loop.py) but left in a cycle.
    """
    import gc

    import deepspeed.comm
    import torch.distributed as dist

    gc.collect()
    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    elif dist.is_initialized():  # a group made without DeepSpeed (tests)
        dist.destroy_process_group()
