"""`unirestorer shards write|inspect`: build WebDataset shards and look inside them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SYNTHETIC_DEFAULTS = {"per_image": 4, "patch": 256}
PAIRED_DEFAULTS = {"per_image": 1, "patch": 0}
LAYOUTS = ("promptir", "rain100l", "reside-ots", "gopro", "lol", "basicsr", "clean")  # data_shards/layouts.py


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from unirestorer.arguments import COUNT, NON_NEGATIVE

    shards = subparsers.add_parser("shards", help="write or inspect WebDataset shards of (lq, gt) pairs")
    sub = shards.add_subparsers(dest="shards_command", required=True, metavar="ACTION")

    w = sub.add_parser("write", help="synthesise degraded pairs from clean images, or pack real pairs")
    src = w.add_mutually_exclusive_group(required=True)
    src.add_argument("--clean", metavar="DIR", help="folder of clean images to degrade")
    src.add_argument("--paired", nargs=2, metavar=("LQ_DIR", "GT_DIR"), help="real pairs, matched by file name")
    src.add_argument("--layout", choices=LAYOUTS, help="a standard dataset layout under --root (data_shards/layouts.py)")
    w.add_argument("--root", metavar="DIR", help="with --layout: the dataset folder as distributed")
    w.add_argument("--task", help="task name of the real pairs (--paired, --layout basicsr), e.g. rain")
    w.add_argument("--lq-dir", help="--layout basicsr: LQ folder (relative to --root)")
    w.add_argument("--gt-dir", help="--layout basicsr: GT folder (relative to --root)")
    w.add_argument("--filename-tmpl", default="{}", help="--layout basicsr: LQ name from GT name, e.g. '{}_x4'")
    w.add_argument("--lq-regex", help="--layout basicsr: regex on LQ names; GT name from --gt-name, e.g. '\\1'")
    w.add_argument("--gt-name", help="--layout basicsr: GT name template for --lq-regex (backrefs \\1 or \\g<name>)")
    w.add_argument("--sigmas", default="15,25,50", help="--layout promptir: noise sigmas (0..255) of Denoise/")
    w.add_argument("--out", required=True, metavar="OUT", help="output folder for shard-*.tar and manifest.json")
    w.add_argument("--tasks", default=None, help="comma-separated tasks for --clean, fixed mixtures as blur+noise (default: all)")
    w.add_argument("--per-image", type=COUNT, default=None,
                   help="samples per input image (default 4 for --clean, 1 for --paired)")  # fmt: skip
    w.add_argument("--patch", type=NON_NEGATIVE, default=None,
                   help="crop size in px, 0 = whole images (default 256 for --clean, 0 for --paired)")  # fmt: skip
    w.add_argument("--seed", type=NON_NEGATIVE, default=0)
    w.add_argument("--shard-size", type=COUNT, default=256, help="samples per shard (default 256)")
    w.add_argument("--workers", type=COUNT, default=None, help="CPU worker processes (default: all cores)")
    w.add_argument("--force", action="store_true", help="replace shards already in OUT")
    w.add_argument("--max-pixels", type=COUNT, default=None, help="skip larger images (default 50 million)")
    w.set_defaults(func=_write)

    i = sub.add_parser("inspect", help="samples per task and per shard")
    i.add_argument("out", metavar="OUT")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=_inspect)


def _write(args: argparse.Namespace) -> int:
    from unirestorer.data_shards import writer
    from unirestorer.data_shards.degradations import TASKS
    from unirestorer.data_shards.imageio import DEFAULT_MAX_PIXELS

    if args.layout == "clean":
        if not args.root:
            return _fail("--layout clean needs --root DIR")
        args.clean = args.root
    if (args.paired or args.layout == "basicsr") and not args.task:
        return _fail(f"{'--paired' if args.paired else '--layout basicsr'} needs --task NAME (e.g. --task rain)")
    if args.task and not (args.paired or args.layout == "basicsr"):
        return _fail("--task belongs to --paired and --layout basicsr; with --clean use --tasks")
    if args.layout and args.layout != "clean" and not args.root:
        return _fail(f"--layout {args.layout} needs --root DIR")
    defaults = SYNTHETIC_DEFAULTS if args.clean else PAIRED_DEFAULTS
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
        if args.layout and not args.clean:
            return _write_layout(args, common)
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


def _write_layout(args: argparse.Namespace, common: dict) -> int:
    """Scan the layout, write its shard sets, print the one summary line (stdout)."""
    from unirestorer.data_shards import layouts

    root = Path(args.root)
    if args.layout == "basicsr":
        if not args.lq_dir or not args.gt_dir:
            return _fail("--layout basicsr needs --lq-dir and --gt-dir (relative to --root)")
        scan = layouts.scan_basicsr(root / args.lq_dir, root / args.gt_dir, args.task, args.filename_tmpl,
                                    args.lq_regex, args.gt_name)  # fmt: skip
    elif args.layout == "promptir":
        try:
            sigmas = tuple(float(s) for s in args.sigmas.split(",") if s.strip())
        except ValueError:
            return _fail(f"--sigmas {args.sigmas!r}: expected numbers such as 15,25,50")
        scan = layouts.scan_promptir(root, sigmas or layouts.PROMPTIR_SIGMAS)
    else:
        scan = {"rain100l": layouts.scan_rain100l, "reside-ots": layouts.scan_reside_ots,
                "gopro": layouts.scan_gopro, "lol": layouts.scan_lol}[args.layout](root)  # fmt: skip
    manifests, line = layouts.write_scan(scan, args.out, **common)
    print(line)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from unirestorer.data_shards import writer
    from unirestorer.data_shards.inspect import inspect_shards

    out = Path(args.out)
    sets = [p for p in sorted(out.iterdir()) if p.is_dir() and any(p.glob("shard-*.tar"))] if out.is_dir() else []
    if sets and not any(out.glob("shard-*.tar")):  # a layout's one shard set per task: OUT/<task>/
        reports = [inspect_shards(p) for p in sets]
        if args.json:
            print(json.dumps(reports, indent=1))
        else:
            totals = {}
            for r in reports:
                for task, n in r["tasks"].items():
                    totals[task] = totals.get(task, 0) + n
            print("\n\n".join(format_report(r) for r in reports))
            print(f"\n{out}: {len(sets)} shard sets, {sum(totals.values())} samples: "
                  + ", ".join(f"{t} {n}" for t, n in sorted(totals.items())))
        return 1 if any(r["errors"] or not r["shards"] for r in reports) else 0
    try:
        report = inspect_shards(out)
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
