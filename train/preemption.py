"""Preemption: a signal on any rank stops every rank at the same step, after a checkpoint.

SLURM sends `--signal=USR1@180` to the tasks before the time limit (and TERM on preemption / scancel);
often only some ranks see it first. The handler only sets a flag; `should_stop()` all-reduces the flag
(MAX) once per step so all ranks leave the loop together, checkpoint, then exit with
`PREEMPTED_EXIT_CODE`. Under SLURM rank 0 requeues the job after the checkpoint is committed, and the
requeued run resumes with `--resume auto`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
from typing import NoReturn

import torch
import torch.distributed as dist

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry". A run that exits
# with it has committed a checkpoint after a preemption signal and can be resumed with --resume auto.
PREEMPTED_EXIT_CODE = 75


class PreemptionHandler:
    """Install once per process (main thread), then call `should_stop()` at the same point of every step."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
        self.signals = signals
        self.received: str | None = None  # name of the first signal seen on this rank
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> PreemptionHandler:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"[preemption] rank {os.environ.get('RANK', '0')} got {self.received}; stopping after this step",
                  file=sys.stderr, flush=True)

    def should_stop(self, group: dist.ProcessGroup | None = None) -> bool:
        """True on every rank once any rank got a signal. A collective: all ranks must call it."""
        local = self.received is not None
        if not (dist.is_available() and dist.is_initialized()):
            return local
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        flag = torch.tensor([int(local)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())


def requeue_slurm_job() -> None:
    """`scontrol requeue $SLURM_JOB_ID` when running under SLURM; nothing otherwise.

    Call on one rank, after the checkpoint is committed: Slurm ends the running job's tasks at once, so
    the log line comes first (printed after the requeue, it was sometimes killed before it was written).
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return
    print(f"[preemption] requeueing SLURM job {job_id}", file=sys.stderr, flush=True)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)


def exit_preempted(rank: int) -> NoReturn:
    """End a run whose checkpoint is committed on every rank: rank 0 requeues (under SLURM), all exit 75.

    By SystemExit, so that the code that made the process group destroys it on the way out, after the engine
    that still references DeepSpeed's groups is gone (train/__main__.py, launch/env.py destroy_distributed).
    """
    if rank == 0:
        requeue_slurm_job()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank exits before the requeue is issued (srun --kill-on-bad-exit would end rank 0)
    sys.exit(PREEMPTED_EXIT_CODE)
