"""Recipes are written for a reference global batch; at start they are scaled to the actual one.

The per-rank micro batch stays as configured, so the global batch is `world × micro batch` (the spine
runs one micro batch per step). Against `train.reference_batch` the run then keeps the number of
*images* of the recipe: every step count (`max_steps`, `warmup_steps`, `level_start_steps`,
`level_end_steps`, the start of the root's polish) is multiplied by reference / global and rounded up.
The learning rates (`lr`, `min_lr`, `level_lrs`) follow `train.lr_scaling`: "sqrt" (× √(global /
reference), the rule for Adam-type optimizers), "linear" (× global / reference, the SGD rule; with Adam
it overshoots at large batches) or "none".
`ckpt.every`, `log.every` and `log.val_every` stay in steps: a step takes about the same wall time at
any world size, so they stay wall-clock cadences.

The number of GPUs is never in a config: the same recipe runs on 1, 8 or 64 ranks. A resume at another
world size recomputes the step counts for the new world while the steps already done keep their count
(and their old batch): a run resumed on more ranks past its new `max_steps` ends at once. To change the
world size mid-run, pin `train.max_steps` and set `train.reference_batch = 0`.
"""

from __future__ import annotations

import math

from unirestorer.train.config import ConfigError, RunConfig, build_ds_config

RULES = ("sqrt", "linear", "none")


def lr_factor(rule: str, global_batch: int, reference: int) -> float:
    if rule == "sqrt":
        return math.sqrt(global_batch / reference)
    if rule == "linear":
        return global_batch / reference
    if rule == "none":
        return 1.0
    raise ConfigError(f"train.lr_scaling must be one of {', '.join(RULES)}, got {rule!r}")


def _steps(steps: int, reference: int, global_batch: int) -> int:
    return -(-steps * reference // global_batch)  # ceil: at least the recipe's images


def _num(x: float) -> str:
    return f"{x:.2e}" if x != 0 else "0"


def scale_to_world(cfg: RunConfig, world: int, micro_batch: int) -> str:
    """Scale `cfg.train` in place from `train.reference_batch` to world × micro_batch; returns the line
    that says what was done (also when nothing is: reference_batch 0)."""
    t = cfg.train
    global_batch = world * micro_batch
    if t.reference_batch == 0:
        return f"[scale] global batch {global_batch}: lr and steps as written (train.reference_batch = 0)"
    if t.reference_batch < 0 or world < 1 or micro_batch < 1:
        raise ConfigError(f"train.reference_batch ({t.reference_batch}), ranks ({world}) and micro batch "
                          f"({micro_batch}) must be positive")
    factor = lr_factor(t.lr_scaling, global_batch, t.reference_batch)
    ratio = f"{global_batch}/{t.reference_batch}"
    how = {"sqrt": f"× √({ratio})", "linear": f"× {ratio}", "none": "× 1"}[t.lr_scaling]
    ranks = f"{world} rank{'s' * (world != 1)}"
    steps = _steps(t.max_steps, t.reference_batch, global_batch)
    line = (f"[scale] global batch {global_batch} = {ranks} × {micro_batch}; lr {_num(t.lr * factor)} = {_num(t.lr)} "
            f"{how} ({t.lr_scaling} rule, reference global batch {t.reference_batch}); max_steps {steps} = "
            f"⌈{t.max_steps} × {t.reference_batch}/{global_batch}⌉ (the recipe's images)")
    t.lr, t.min_lr = t.lr * factor, t.min_lr * factor
    t.level_lrs = [lr * factor for lr in t.level_lrs]
    polish_start = _steps(t.max_steps - t.root_polish_steps, t.reference_batch, global_batch)
    t.max_steps = steps
    t.root_polish_steps = steps - polish_start if t.root_polish_steps else 0  # its start scaled as the ends are
    t.warmup_steps = _steps(t.warmup_steps, t.reference_batch, global_batch)
    t.level_start_steps = [_steps(s, t.reference_batch, global_batch) for s in t.level_start_steps]
    t.level_end_steps = [_steps(s, t.reference_batch, global_batch) for s in t.level_end_steps]
    return line


def micro_batch_of(cfg: RunConfig) -> int:
    """Images per rank per step: ds_config.json's micro batch with the [deepspeed] overrides."""
    ds = build_ds_config(cfg, "cpu")
    return int(ds["train_micro_batch_size_per_gpu"]) * int(ds.get("gradient_accumulation_steps", 1))
