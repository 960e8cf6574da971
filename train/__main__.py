"""Entry: `python -m unirestorer.train STAGE [flags] [section.key=value ...]`, one process per rank.

    deepspeed --num_gpus 8 --module unirestorer.train extractor --config configs/extractor.toml
    launch/cpu_ranks.sh 2 cluster --config configs/cluster.toml tree.num_samples=512

Stage modules are imported only for the stage asked for. Exit codes: see train/loop.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch.distributed as dist

from unirestorer.data_shards.shards import EmptyShardsError
from unirestorer.train.checkpoint import CheckpointError
from unirestorer.train.config import ConfigError, add_common_args, config_from_args
from unirestorer.train.fail_fast import FailFast
from unirestorer.train.loop import EXIT_BAD_LOSS, EXIT_ERROR, EXIT_PREEMPTED, EXIT_USAGE, run

STAGES = ("extractor", "cluster", "experts", "router")

EPILOG = f"""exit codes: 0 done; {EXIT_ERROR} unexpected error; {EXIT_USAGE} bad command line, config or resume
request (before training); {EXIT_BAD_LOSS} train.max_bad_steps non-finite losses or gradients in a row (last good
checkpoint intact); {EXIT_PREEMPTED} preempted, checkpoint committed (resume with --resume auto)"""


def make_stage(name: str):
    try:
        if name == "extractor":
            from unirestorer.train import stage_extractor as module
        elif name == "experts":
            from unirestorer.train import stage_experts as module
        elif name == "router":
            from unirestorer.train import stage_router as module
        else:
            raise ConfigError(f"unknown stage {name!r}; choose from {', '.join(STAGES)}")
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("unirestorer.train.stage_"):
            raise
        raise ConfigError(f"stage {name!r} is not available in this install ({e})") from None
    return module.make_stage()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unirestorer.train", epilog=EPILOG,
                                     description="Train one UniRestorer stage (run one process per rank).")
    parser.add_argument("stage", choices=STAGES)
    add_common_args(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may follow flags that follow STAGE
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank reads the same config: one message
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    cfg.train.stage = args.stage

    from unirestorer.launch.env import destroy_distributed, init_distributed  # imports deepspeed

    info = init_distributed()
    guard = FailFast(info.rank, info.world_size).start()  # one rank's error stops every rank (fail_fast.py)
    failed = False
    try:
        if cfg.train.reference_batch:  # the recipe's LR and steps, for this world size (train/scaling.py)
            from unirestorer.train.scaling import micro_batch_of, scale_to_world

            line = scale_to_world(cfg, info.world_size, micro_batch_of(cfg))
            if info.rank == 0:
                print(line, flush=True)
        if args.stage == "cluster":
            from unirestorer.train.stage_cluster import run_cluster

            return run_cluster(cfg, info)
        return run(make_stage(args.stage), cfg, info)
    except (ConfigError, CheckpointError, FileNotFoundError, EmptyShardsError) as e:
        failed = True
        return guard.fail(EXIT_USAGE, f"[rank {info.rank}] error: {e}")
    except Exception:
        failed = True
        return guard.fail(EXIT_ERROR, f"[rank {info.rank}] {traceback.format_exc()}")
    finally:
        guard.stop()
        # done or preempted (SystemExit from exit_preempted); after a failure the peers are gone: nothing to tear down
        if dist.is_initialized() and not failed:
            destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
