"""`unirestorer shards write|inspect`: build WebDataset shards and look inside them."""

from __future__ import annotations

import argparse
import json
import sys

SYNTHETIC_DEFAULTS = {"per_image": 4, "patch": 256}
PAIRED_DEFAULTS = {"per_image": 1, "patch": 0}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    shards = subparsers.add_parser("shards", help="write or inspect WebDataset shards of (lq, gt) pairs")
    sub = shards.add_subparsers(dest="shards_command", required=True, metavar="ACTION")

    w = sub.add_parser("write", help="synthesise degraded pairs from clean images, or pack real pairs")
    src = w.add_mutually_exclusive_group(required=True)
    src.add_argument("--clean", metavar="DIR", help="folder of clean images to degrade")
    src.add_argument("--paired", nargs=2, metavar=("LQ_DIR", "GT_DIR"), help="real pairs, matched by file name")
    w.add_argument("--task", help="task name of the real pairs (with --paired), e.g. rain")
    w.add_argument("--out", required=True, metavar="OUT", help="output folder for shard-*.tar and manifest.json")
    w.add_argument("--tasks", default=None, help="comma-separated tasks for --clean (default: all)")
    w.add_argument("--per-image", type=int, default=None,
                   help="samples per input image (default 4 for --clean, 1 for --paired)")  # fmt: skip
    w.add_argument("--patch", type=int, default=None,
                   help="crop size in px, 0 = whole images (default 256 for --clean, 0 for --paired)")  # fmt: skip
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    w.add_argument("--workers", type=int, default=None, help="CPU worker processes (default: all cores)")
    w.add_argument("--force", action="store_true", help="replace shards already in OUT")
    w.add_argument("--max-pixels", type=int, default=None, help="skip larger images (default 50 million)")
    w.set_defaults(func=_write)

    i = sub.add_parser("inspect", help="samples per task and per shard")
    i.add_argument("out", metavar="OUT")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=_inspect)


def _write(args: argparse.Namespace) -> int:
    from unirestorer.data_shards import writer
    from unirestorer.data_shards.degradations import TASKS
    from unirestorer.data_shards.imageio import DEFAULT_MAX_PIXELS

    if args.paired and not args.task:
        return _fail("--paired needs --task NAME (e.g. --task rain)")
    if args.clean and args.task:
        return _fail("--task belongs to --paired; with --clean use --tasks")
    defaults = PAIRED_DEFAULTS if args.paired else SYNTHETIC_DEFAULTS
    common = {
        "per_image": defaults["per_image"] if args.per_image is None else args.per_image,
        "patch": defaults["patch"] if args.patch is None else args.patch,
        "seed": args.seed,
        "shard_size": args.shard_size,
        "workers": args.workers,
        "force": args.force,
        "max_pixels": DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels,
    }
    try:
        if args.paired:
            manifest = writer.write_paired(args.paired[0], args.paired[1], args.task, args.out, **common)
        else:
            tasks = TASKS if args.tasks is None else tuple(t.strip() for t in args.tasks.split(",") if t.strip())
            manifest = writer.write_synthetic(args.clean, args.out, tasks, **common)
    except writer.ShardWriteError as e:
        return _fail(str(e))
    n_shards = len(manifest["shards"])
    print(f"wrote {manifest['num_samples']} samples in {n_shards} shard{'s' * (n_shards != 1)} to {args.out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from unirestorer.data_shards import writer

    try:
        report = writer.inspect_shards(args.out)
    except writer.ShardWriteError as e:
        return _fail(str(e))
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 1 if report["errors"] or not report["shards"] else 0


def format_report(report: dict) -> str:
    """Human-readable summary of `inspect_shards`."""
    m = report["manifest"]
    state = "no manifest.json" if m is None else f"{m['kind']}, manifest {'matches' if m['matches'] else 'DIFFERS'}"
    lines = [f"{report['out']}: {report['num_samples']} samples in {len(report['shards'])} shards ({state})", ""]
    lines += [f"  {'task':<12}{'samples':>8}"] + [f"  {t:<12}{n:>8}" for t, n in report["tasks"].items()]
    lines += ["", f"  {'shard':<20}{'samples':>8}  tasks"]
    for s in report["shards"]:
        lines.append(f"  {s['name']:<20}{s['samples']:>8}  " + ", ".join(f"{t} {n}" for t, n in s["tasks"].items()))
    lines += [f"  error: {e}" for e in report["errors"]]
    lines += [f"  leftover temporary file: {t}" for t in report["temporary_files"]]
    return "\n".join(lines)


def _fail(message: str) -> int:
    print(f"unirestorer shards: error: {message}", file=sys.stderr)
    return 2
