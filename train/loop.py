"""The training spine: one loop for every stage that trains (see train/stage.py for the contract).

Per step, on every rank, in this order:

    batch (from the stream of segment step // ckpt.every)  ->  loss, metrics = stage.forward(batch, step)
    -> one all-reduce (MAX) of ["loss is not finite", "preemption signal"]: all ranks agree  ->  backward,
       all-reduce "gradients are finite" (plain fp32 engines only, see grads_finite)  ->  step, or skip the
       step everywhere  ->  logs / validation  ->  checkpoint at ckpt.every, at the end, or when preempted

On ZeRO / bf16 engines that flag all-reduce and its read are the only host sync of a step: the loss and
the stage's metrics are read at `log.every` steps only.

Seeds: every rank seeds from `train.seed` (rank 0's stream) while the stage builds its modules, so the
initial weights are the same everywhere, then from `train.seed + rank` for training.

Exit codes (also `python -m unirestorer.train --help`):
    0   finished (final checkpoint committed)
    1   an unexpected error (traceback printed)
    2   bad command line, config or resume request, found before any training step
    65  `train.max_bad_steps` non-finite losses or gradients in a row; the last good checkpoint is intact
        (EX_DATAERR)
    75  preempted (SIGUSR1/SIGTERM): checkpoint committed on every rank, resume with --resume auto
        (EX_TEMPFAIL; under SLURM the job was requeued)
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import torch
import torch.distributed as dist

from unirestorer import cuda_setup
from unirestorer.launch.env import DistInfo
from unirestorer.train import checkpoint as ckpt
from unirestorer.train.ckpt_dir_guard import prepare as prepare_ckpt_dir
from unirestorer.train.config import ConfigError, RunConfig
from unirestorer.train.monitor import Monitor
from unirestorer.train.preemption import PREEMPTED_EXIT_CODE, PreemptionHandler, exit_preempted
from unirestorer.train.run_state import capture_rng, restore_rng, seed_everything
from unirestorer.train.stage import Stage

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BAD_LOSS, EXIT_PREEMPTED = 0, 1, 2, 65, PREEMPTED_EXIT_CODE


def all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def mean_over_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of each scalar over ranks (every rank must pass the same keys)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    all_reduce(t)
    return dict(zip(keys, (t / info.world_size).tolist()))


def step_flags(loss: torch.Tensor, handler: PreemptionHandler, info: DistInfo) -> tuple[bool, bool]:
    """(the loss is finite on every rank, some rank got a preemption signal): one all-reduce, one read."""
    flags = torch.stack([(~torch.isfinite(loss.detach()).all()).to(device=info.device, dtype=torch.int32),
                         torch.full((), int(handler.received is not None), dtype=torch.int32, device=info.device)])
    bad, stop = all_reduce(flags, dist.ReduceOp.MAX).tolist()
    return not bad, bool(stop)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def grads_finite(engine: Any, info: DistInfo) -> bool:
    """All ranks: are the gradients finite everywhere? Checked where they live in `param.grad`: a plain fp32
    engine (ZeRO stage 0, no fp16/bf16 optimizer, as the router stage runs). ZeRO and the mixed-precision
    optimizers keep gradients in their own buffers; there only the loss check applies."""
    if engine.zero_optimization_stage() > 0 or engine.fp16_enabled() or engine.bfloat16_enabled():
        return True
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    ok = all(bool(torch.isfinite(g).all()) for g in grads)
    return bool(all_reduce(torch.tensor([int(ok)], dtype=torch.int32, device=info.device), dist.ReduceOp.MIN).item())


def check_config(cfg: RunConfig, engine: Any) -> None:
    if cfg.ckpt.every <= 0 or cfg.log.every <= 0 or cfg.train.max_steps < 0:
        raise ConfigError(f"ckpt.every ({cfg.ckpt.every}) and log.every ({cfg.log.every}) must be positive, "
                          f"train.max_steps ({cfg.train.max_steps}) >= 0")
    if engine.gradient_accumulation_steps() != 1:
        raise ConfigError(f"gradient_accumulation_steps is {engine.gradient_accumulation_steps()}: the spine runs "
                          f"one micro batch per step (its NaN skipping and exact resume assume it); raise "
                          f"deepspeed.micro_batch or the number of ranks instead")


def batches(stage: Stage, cfg: RunConfig, info: DistInfo, segment: int, skip: int) -> Iterator[dict]:
    """Endless batches of one segment: the stage's stream, epoch after epoch, `skip` batches dropped."""
    stream, n = stage.stream(cfg, info, segment), 0
    while True:
        before = n
        for batch in stream:
            n += 1
            if n > skip:
                yield batch
        if n == before:
            raise RuntimeError(f"stage {stage.name}: the data stream of segment {segment} yielded no batch")


def _next(it: Iterator[dict]) -> dict:
    with torch.random.fork_rng(devices=[]):  # DataLoader iterators draw their base seed from the global RNG
        return next(it)


def _resume(stage: Stage, cfg: RunConfig, info: DistInfo, engine: Any, gens: dict,
            point: ckpt.ResumePoint | None) -> tuple[int, int]:
    """Load `point` (what `--resume` named); returns (step, non-finite steps so far)."""
    if point is None:
        if info.rank == 0:
            print(f"[resume] starting fresh (--resume {cfg.ckpt.resume}, ckpt dir {cfg.ckpt.dir})", flush=True)
        return 0, 0
    client, rank_state = ckpt.load_checkpoint(engine, point)
    if client.get("stage") != stage.name:
        raise ckpt.CheckpointError(f"{point.path} is a checkpoint of stage {client.get('stage')!r}, not "
                                   f"{stage.name!r}; to start from its weights use train.init_ckpt")
    step = int(client["step"])
    if rank_state is None:  # elastic: a new world, fresh RNG streams; the LR schedule goes on where it was
        seed_everything(cfg.train.seed + step, info.rank)
        sched, lr_steps = getattr(engine, "lr_scheduler", None), client.get("lr_steps")
        if sched is not None and lr_steps:
            sched.last_epoch = int(lr_steps) - 1
            sched.step()
            if info.rank == 0:
                print(f"[resume] elastic: LR schedule moved to its saved position ({lr_steps} optimizer steps)",
                      flush=True)
    else:
        restore_rng(rank_state["rng"], gens)
    stage.load_state(client.get("stage_state", {}))
    if info.rank == 0:
        print(f"[resume] step {step} from {point.path} (written by {point.world_size} ranks, now {info.world_size})",
              flush=True)
        saved, now = _flat(client.get("config", {})), _flat(cfg.to_dict())
        changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
        if changed:
            print("[resume] config differs from the checkpoint's: " + "; ".join(changed), flush=True)
    return step, int(client.get("bad_steps", 0))


def run(stage: Stage, cfg: RunConfig, info: DistInfo) -> int:
    """Train `stage` to `train.max_steps`; returns the exit code (see the module docstring)."""
    rank, world = info.rank, info.world_size
    if rank == 0:
        print(f"[config] stage {stage.name}, {world} ranks, device {info.device}\n{cfg.pretty()}", flush=True)
    point = prepare_ckpt_dir(cfg, rank)  # lock, resume point, refusals: before anything is built
    handler = PreemptionHandler().install()
    cuda_setup.configure(info.device)
    seed_everything(cfg.train.seed, 0)
    engine = stage.build(cfg, info)
    check_config(cfg, engine)
    seed_everything(cfg.train.seed, rank)
    gens = getattr(stage, "generators", dict)()
    step, bad_total = _resume(stage, cfg, info, engine, gens, point)

    every, max_steps = cfg.ckpt.every, cfg.train.max_steps
    per_step = getattr(stage, "images_per_step", engine.train_micro_batch_size_per_gpu)() * world
    monitor = Monitor(cfg.log.dir, rank, step, max_steps, stage.name)

    def save() -> None:
        sched = getattr(engine, "lr_scheduler", None)
        client = {"config": cfg.to_dict(), "stage": stage.name, "stage_state": stage.state(), "bad_steps": bad_total,
                  "lr_steps": sched.last_epoch if sched is not None else None}
        rank_state = {"rng": capture_rng(gens), "data": {"segment": step // every, "batches": step % every}}
        if ckpt.save_checkpoint(engine, cfg.ckpt.dir, step, client, rank_state, cfg.ckpt.keep_last):
            monitor.note(f"[checkpoint] step {step} -> {cfg.ckpt.dir}/{ckpt.tag_for(step)}")

    segment = step // every
    it = batches(stage, cfg, info, segment, step - segment * every)
    bad_in_row, t_last, steps_since, shown = 0, time.perf_counter(), 0, {}
    try:
        while step < max_steps:
            if step // every != segment:
                segment = step // every
                it = batches(stage, cfg, info, segment, 0)
            batch = _next(it)
            loss, metrics = stage.forward(batch, step)
            step += 1
            if step in cfg.train.debug_nan_steps and rank == world - 1:  # test hook
                loss = loss * float("nan")
            finite, stop = step_flags(loss, handler, info)
            what = "loss"
            if finite:
                engine.backward(loss)
                what = "gradients"
                if grads_finite(engine, info):
                    engine.step()
                    bad_in_row = 0
                    what = ""
                else:
                    engine.zero_grad()
            if what:
                bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
                monitor.note(f"[nan] step {step}: non-finite {what} on some rank; step skipped on every rank "
                             f"({bad_in_row} in a row, {bad_total} in total)")
            steps_since += 1
            time.sleep(cfg.train.debug_step_sleep)
            if step % cfg.log.every == 0 or step == max_steps:
                now = time.perf_counter()
                values = mean_over_ranks({"loss": loss.item(), **(metrics() if callable(metrics) else metrics)}, info)
                values.update({f"lr{i}" if i else "lr": lr for i, lr in enumerate(engine.get_lr())},
                              images_per_s=per_step * steps_since / max(now - t_last, 1e-9), bad_steps=bad_total)
                monitor.scalars(step, values)
                t_last, steps_since, shown = now, 0, {"loss": values["loss"]}
            if bad_in_row >= cfg.train.max_bad_steps:
                latest = ckpt.resolve_resume("auto", cfg.ckpt.dir)
                monitor.note(f"[nan] stopping: {bad_in_row} non-finite steps in a row (train.max_bad_steps="
                             f"{cfg.train.max_bad_steps}), steps {step - bad_in_row + 1}..{step}. Last good "
                             f"checkpoint: {latest.path if latest else 'none'} (intact); lower train.lr or "
                             f"check the data, then resume from it")
                return EXIT_BAD_LOSS
            if cfg.log.val_every > 0 and step % cfg.log.val_every == 0:
                with torch.random.fork_rng(devices=[]):
                    val = stage.validate(step)
                if val:
                    monitor.scalars(step, val, prefix="val")
                monitor.images(step, getattr(stage, "images", dict)())
            monitor.advance(step, shown)
            if stop or step % every == 0:
                save()
            if stop:
                monitor.note(f"[preemption] {handler.received or 'signal on another rank'}: checkpoint at step "
                             f"{step} committed; exiting with {EXIT_PREEMPTED}")
                monitor.close()
                exit_preempted(rank)
        save()
        monitor.note(f"[done] {stage.name}: {step} steps, {bad_total} skipped (non-finite)")
        return EXIT_OK
    finally:
        monitor.close()
        handler.uninstall()
        engine.destroy()
