"""One run per checkpoint folder, and no fresh run over another run's checkpoints.

Before a stage builds anything, `prepare(cfg, rank)` decides what to resume from (train/checkpoint.py's
`resolve_resume`) and protects `ckpt.dir`:

- rank 0 takes an exclusive lock on `ckpt.dir/.lock` (POSIX `lockf`, which NFS also honours) held until
  the process exits; a second run into the same folder is refused with the holder's pid and host;
- a run that would start fresh (or from a checkpoint elsewhere) while `ckpt.dir` already holds complete
  checkpoints or a `latest` is refused: its saves would mix with another history, and the other history's
  newer steps would shadow its own. `--force` (ckpt.force) starts fresh anyway, after moving that history
  aside into `ckpt.dir/replaced-<UTC time>/` (nothing is deleted).

Every rank computes the same decision from the shared folder; only the lock is rank 0's alone, and its
failure reaches the other ranks through train/fail_fast.py.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO

from unirestorer.train.checkpoint import LATEST, CheckpointError, ResumePoint, complete_checkpoints, resolve_resume
from unirestorer.train.config import RunConfig

LOCK = ".lock"
_held: list[IO] = []  # the lock file stays open (and locked) for the life of the process


def lock_dir(ckpt_dir: Path) -> None:
    """Exclusive lock on ckpt_dir/.lock for this process, or CheckpointError naming the holder."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / LOCK
    f = open(path, "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown process"
        f.close()
        raise CheckpointError(f"--ckpt-dir {ckpt_dir} is in use by another run ({holder}); two runs must not share "
                              f"a checkpoint folder: wait for it, or pass another --ckpt-dir") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    f.flush()
    _held.append(f)


def history(ckpt_dir: Path) -> list[str]:
    """What marks `ckpt_dir` as holding a run's checkpoints: complete step folders and `latest`."""
    return [p.name for p in complete_checkpoints(ckpt_dir)] + ([LATEST] if (ckpt_dir / LATEST).exists() else [])


def move_aside(ckpt_dir: Path, names: list[str]) -> Path:
    """Move the given entries of ckpt_dir into a fresh replaced-<time> folder beside them."""
    target = ckpt_dir / f"replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    target.mkdir()
    for name in names + [p.name for p in ckpt_dir.glob("step_*") if p.name not in names]:
        os.rename(ckpt_dir / name, target / name)
    return target


def prepare(cfg: RunConfig, rank: int) -> ResumePoint | None:
    """Lock (rank 0), resolve `--resume`, refuse or (with --force) move aside another run's checkpoints."""
    root = Path(cfg.ckpt.dir)
    if rank == 0:
        lock_dir(root)
    point = resolve_resume(cfg.ckpt.resume, root)
    if point is not None and point.root.resolve() == root.resolve():
        return point  # continuing the history this folder holds
    found = history(root) if root.is_dir() else []
    if not found:
        return point
    if not cfg.ckpt.force:
        start = "start fresh" if point is None else f"continue from {point.path}"
        raise CheckpointError(f"--ckpt-dir {root} already holds checkpoints of another run ({', '.join(found[:4])}); "
                              f"refusing to {start} into it, where its newer steps would shadow this run's: resume "
                              f"it with --resume auto, pass another --ckpt-dir, or --force to move them aside")
    if rank == 0:
        moved = move_aside(root, found)
        print(f"[resume] --force: moved {', '.join(found)} of the previous run into {moved}", file=sys.stderr, flush=True)
    return point
