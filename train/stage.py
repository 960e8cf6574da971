"""The contract between the training spine (`train/loop.py`) and the stages that train something.

The spine owns everything a stage has in common: distributed init, config printing, resume, the step
loop with NaN/Inf skipping and preemption, checkpoint cadence, logs and progress. A stage owns only
what it trains: its modules, its DeepSpeed engine, its data stream and its loss.

Exact resume: the spine recreates the data stream at every checkpoint boundary with
`restart = step // ckpt.every` (the segment index), in the uninterrupted run as in a resumed one, so a
run killed anywhere and resumed from its last checkpoint sees exactly the batches it would have seen (a
preemption save mid-segment is resumed by skipping the batches already used). Fetching a batch and
`validate` run with the global torch RNG saved and restored around them (DataLoader iterators draw a seed
from it), so only `forward` advances it.

Entry: each stage module (`train/stage_<name>.py`) exposes `make_stage() -> Stage`; `python -m
unirestorer.train <name>` imports it (lazily) and hands the stage to `train.loop.run`.

Optional methods the spine calls only when present (`getattr`):
    generators() -> dict[str, torch.Generator | np.random.Generator]
        the stage's own random generators; their states are saved per rank and restored on resume.
    images_per_step() -> int
        images one rank processes per step, for the images/s log (default: the micro batch size).
    images() -> dict[str, Tensor]
        CHW images captured by the last `validate` (LQ | output | GT grids), written to TensorBoard by rank 0.

Non-finite losses: the spine all-reduces an "is finite" flag, so a stage never needs its own NaN check.
`forward`'s metrics are averaged over ranks at every `log.every` step: every rank must return the same keys.
They may be a zero-argument callable returning the dict: the spine calls it at `log.every` steps only (on
every rank at the same step, so it may all-reduce), which keeps per-step `.item()` syncs out of the step.
`forward`'s `step` is the 0-based index of the step being run (logs and checkpoints count done steps, 1-based).
Elastic resume (another world size): the spine moves `engine.lr_scheduler` to its saved `last_epoch`
(client state "lr_steps") before `load_state`.
`train.debug_nan_steps` (a test hook) makes the spine replace the loss of those steps on the last rank by
NaN.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Protocol

import torch

from unirestorer.launch.env import DistInfo
from unirestorer.train.config import RunConfig


Metrics = dict[str, float] | Callable[[], dict[str, float]]  # a callable is read at log steps only


class Stage(Protocol):
    name: str

    def build(self, cfg: RunConfig, dist: DistInfo) -> Any:
        """Build modules, optimizer and the DeepSpeed engine; return the engine the spine checkpoints."""

    def stream(self, cfg: RunConfig, dist: DistInfo, segment: int) -> Iterable[dict]:
        """The batches of one checkpoint segment (a deterministic function of seed, rank and segment)."""

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, Metrics]:
        """Loss of one micro batch (the spine calls engine.backward / engine.step) and scalar metrics."""

    def state(self) -> dict[str, Any]:
        """Stage-specific client state stored with each checkpoint (tensors, numbers, strings only)."""

    def load_state(self, state: dict[str, Any]) -> None:
        """Inverse of `state`, after the engine weights were loaded."""

    def validate(self, step: int) -> dict[str, float]:
        """Held-out metrics (may be empty); called on every rank at `log.val_every`."""


def lr_lambda(start: int, warmup: int, total: int, floor: float, schedule: str) -> Callable[[int], float]:
    """LR factor at optimizer step s: 0 before `start`, linear warmup, then `schedule` (cosine down to the
    factor `floor`, or constant) until `total`."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"train.schedule must be 'cosine' or 'constant', got {schedule!r}")

    def factor(step: int) -> float:
        t = step - start
        if t < 0:
            return 0.0
        if t < warmup:
            return (t + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (t - warmup) / max(1, total - start - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def warmup_cosine(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`train.schedule` after `train.warmup_steps` of linear warmup, down to `train.min_lr`; pass it as
    `lr_scheduler=` to deepspeed.initialize (DeepSpeed steps and saves it)."""
    t = cfg.train
    floor = t.min_lr / t.lr if t.lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(0, t.warmup_steps, t.max_steps, floor, t.schedule))
