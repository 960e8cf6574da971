"""Our part of checkpointing around DeepSpeed's engine.save_checkpoint / load_checkpoint.

Layout of `ckpt_dir`:

    step_00000004/                  DeepSpeed's files (model states, per-expert files, ZeRO shards)
        rank_00000_state.pt ...     one per rank: RNG states + data position (run_state.py)
        COMPLETE.json               written last, by rank 0, after every rank finished writing
    latest                          "step_00000004"; moved (temp + rename) only after COMPLETE.json

A save is complete only when COMPLETE.json exists, and `latest` only ever names complete saves, so a
crash at any point of a save leaves the previous checkpoint loadable. DeepSpeed's own `latest` write
is disabled (save_latest=False). `ckpt_dir` must be on a file system that every rank sees. Every rank
fsyncs the step folder's files before the marker is written; marker and `latest` are temp + rename.
`latest` is data, not a path: only a `step_N` tag naming a folder directly inside `ckpt_dir` is followed.
Pruning never deletes a checkpoint newer than the step just committed. Resume loads go through
train/safe_checkpoint_engine.py (torch.load with weights_only=True), never through pickle.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from unirestorer.safe_files import atomic_path, atomic_write, fsync_dir, fsync_file

MARKER = "COMPLETE.json"
LATEST = "latest"
_TAG_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from, with what is wrong and where."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def step_of(path: Path) -> int:
    return int(_TAG_RE.match(path.name)[1])


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of `ckpt_dir`, oldest first."""
    root = Path(ckpt_dir)
    found = [p for p in root.iterdir() if _TAG_RE.match(p.name) and is_complete(p)] if root.is_dir() else []
    return sorted(found, key=step_of)


def read_latest(root: Path, how: str) -> Path:
    """The step folder `root/latest` names; refuses anything but a step tag of a folder inside `root`."""
    text = (root / LATEST).read_text(errors="replace").strip()
    folder = root / text
    if not _TAG_RE.fullmatch(text) or folder.is_symlink():
        raise CheckpointError(f"{how}: {root / LATEST} holds {text[:80]!r}, not the tag of a step folder "
                              f"inside {root} (step_NNNNNNNN); refusing to follow it")
    return folder


# ---------------------------------------------------------------- save


def write_checkpoint(engine: Any, ckpt_dir: str | Path, step: int, client_state: dict[str, Any],
                     rank_state: dict[str, Any]) -> str | None:
    """All ranks: DeepSpeed's files plus this rank's state file. Returns the tag, or None when this step
    is already saved and complete (e.g. a preemption save right after a periodic one; resolve_resume
    refuses to resume into a ckpt_dir holding newer saves, so a complete one is this run's own)."""
    rank, _ = _rank_world()
    path = Path(ckpt_dir) / tag_for(step)
    if is_complete(path):
        return None
    if rank == 0 and path.exists():  # left over by a crashed save: start clean
        shutil.rmtree(path)
    engine.save_checkpoint(str(ckpt_dir), tag=tag_for(step), client_state={**client_state, "step": step},
                           save_latest=False)
    with atomic_path(path / f"rank_{rank:05d}_state.pt") as tmp:  # never through a link planted there
        torch.save(rank_state, tmp)
    for f in path.iterdir():  # durable before rank 0 marks the save complete (files of every rank, cheap)
        # another rank's atomic_path temporary (".NAME.tmpPID.N") is fsynced by its writer and may be renamed
        # away between this listing and the open: skip it (a CI run died on one, FileNotFoundError)
        if f.is_file() and not f.is_symlink() and not f.name.startswith("."):
            fsync_file(f)
    return tag_for(step)


def commit_checkpoint(ckpt_dir: str | Path, step: int, keep_last: int) -> None:
    """All ranks: barrier (every rank finished writing), then rank 0 writes the marker, moves `latest`
    and deletes all but the newest `keep_last` complete checkpoints up to `step` (and incomplete leftovers
    older than it). Folders of later steps are never deleted: they are not this run's history."""
    _barrier()
    rank, world = _rank_world()
    if rank == 0:
        root, tag = Path(ckpt_dir), tag_for(step)
        marker = {"tag": tag, "step": step, "world_size": world, "time": time.time(),
                  "files": sorted(p.name for p in (root / tag).iterdir())}
        fsync_dir(root / tag)
        atomic_write(root / tag / MARKER, json.dumps(marker, indent=1))
        atomic_write(root / LATEST, tag)
        older = [p for p in complete_checkpoints(root) if step_of(p) <= step]
        keep = {p.name for p in older[-max(keep_last, 1):]}
        for p in root.iterdir():
            if _TAG_RE.match(p.name) and p.name not in keep and step_of(p) < step and not p.is_symlink():
                shutil.rmtree(p)
    _barrier()


def save_checkpoint(engine: Any, ckpt_dir: str | Path, step: int, client_state: dict[str, Any],
                    rank_state: dict[str, Any], keep_last: int = 2) -> bool:
    """Collective. Writes and commits checkpoint `step`; False when it already existed."""
    if write_checkpoint(engine, ckpt_dir, step, client_state, rank_state) is None:
        return False
    commit_checkpoint(ckpt_dir, step, keep_last)
    return True


# ---------------------------------------------------------------- resume


@dataclass
class ResumePoint:
    root: Path  # the ckpt_dir DeepSpeed loads from
    tag: str
    step: int
    world_size: int  # ranks that wrote it

    @property
    def path(self) -> Path:
        return self.root / self.tag


def _point(path: Path, how: str) -> ResumePoint:
    if not path.is_dir():
        raise CheckpointError(f"{how}: checkpoint {path} does not exist")
    if not is_complete(path):
        raise CheckpointError(f"{how}: checkpoint {path} has no {MARKER}: its save did not finish "
                              f"(crash or preemption during the write); resume from an older one or use --resume none")
    info = read_marker(path, how)
    return ResumePoint(path.parent, path.name, info["step"], info["world_size"])


def read_marker(path: Path, how: str) -> dict[str, int]:
    """The COMPLETE.json of step folder `path` ({"step", "world_size"}, integers); CheckpointError if corrupt."""
    from unirestorer.safe_json import JsonError, read_json

    try:
        info = read_json(path / MARKER)
    except JsonError as err:
        info = err
    if not isinstance(info, dict) or not all(type(info.get(k)) is int for k in ("step", "world_size")):
        problem = str(info).removeprefix(f"{path / MARKER}: ") if isinstance(info, JsonError) else (
            "expected integers 'step' and 'world_size'")
        raise CheckpointError(f"{how}: {path / MARKER} is corrupt ({problem[:160]}); use another checkpoint "
                              f"(--resume PATH)")
    return {"step": info["step"], "world_size": info["world_size"]}


def resolve_resume(resume: str, ckpt_dir: str | Path) -> ResumePoint | None:
    """`--resume` → what to load. `none`: nothing. `auto`: what `ckpt_dir/latest` names; without a `latest`,
    the newest complete step folder, else nothing (fresh run). PATH: a checkpoint folder, or a ckpt_dir
    with a `latest` file."""
    if resume == "none":
        return None
    if resume == "auto":
        root = Path(ckpt_dir)
        if not (root / LATEST).is_file():
            found = complete_checkpoints(root)
            if not found:
                return None
            if _rank_world()[0] == 0:
                print(f"[resume] {root} has no '{LATEST}' file: resuming from its newest complete checkpoint "
                      f"{found[-1].name}", file=sys.stderr, flush=True)
            return _point(found[-1], "--resume auto")
        folder = read_latest(root, "--resume auto")
        return _point(folder, f"--resume auto: {root / LATEST} names {folder.name!r}, but")
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: {path} does not exist")
    if (path / LATEST).is_file() and not (path / MARKER).exists():
        return _point(read_latest(path, f"--resume {resume}"), f"--resume {resume}: {path / LATEST} points to a")
    if not (path / MARKER).exists() and not any(path.glob("*.pt")):
        raise CheckpointError(f"--resume {resume}: {path} is neither a checkpoint folder nor a folder with a "
                              f"'{LATEST}' file")
    point = _point(path, f"--resume {resume}")
    newer = [p.name for p in complete_checkpoints(ckpt_dir) if step_of(p) > point.step]
    if newer and Path(ckpt_dir).resolve() == point.root.resolve():
        raise CheckpointError(f"--resume {resume}: {ckpt_dir} also holds newer checkpoints ({', '.join(newer)}) of "
                              f"another run history, which this run's saves would mix with; pass another --ckpt-dir")
    return point


def load_checkpoint(engine: Any, point: ResumePoint) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Collective. Loads weights and, when the world size and expert layout are unchanged, optimizer + scheduler
    states.

    Returns (client_state, this rank's run state). With a different world size or expert layout (elastic
    resume, train/elastic.py) only the weights load, experts re-placed by tree node, the optimizer starts
    fresh and the rank state is None: the caller re-seeds its RNG and data stream.
    """
    from unirestorer.train import elastic  # here: elastic imports weights.py, which imports this module
    from unirestorer.train.safe_checkpoint_engine import safe_load, safe_loading  # imports this module too

    rank, world = _rank_world()
    if world != point.world_size or not elastic.layout_matches(engine.module, point):
        return elastic.load_replaced(engine, point, rank, world), None
    with safe_loading(engine):  # DeepSpeed's loads go through torch.load(weights_only=True)
        load_path, client_state = engine.load_checkpoint(str(point.root), tag=point.tag)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {point.path}")
    rank_state = safe_load(point.path / f"rank_{rank:05d}_state.pt")
    return client_state or {}, rank_state
