"""`unirestorer demo`: the whole pipeline, end to end, on clean photos with synthetic degradations.

    clean photos ──▶ train shards (one set per task) + validation shards (other photos)
                     + held-out degraded crops of two photos scikit-image ships (in no training set)
      ──deepspeed, 2 CPU ranks (or --gpus N)──▶ extractor ▶ cluster ▶ experts ▶ router
      ──export──▶ bundle ──restore──▶ restored held-out images ──eval──▶ table per task + shift section

Photos: `--photos DIR`, else the BSDS500 images in ../shared/data/train/BSDS_clean when that folder is
beside the repository (353 natural photos, none in any test set; 12 are held out for the table, 20 make
the validation shards, the rest trains), else the five colour photos scikit-image ships (enough to run
everything, too few to learn to recognise degradations on new photos; two other bundled photos are then
held out). The default tasks are noise, blur, rain, haze and low light (`--tasks all` for all eight); clean
photos are trained always (ALWAYS_TRAINED) and scored in the shift section with mild degradations and camera
noise of a pipeline never trained on (unirestorer/shifts.py), with the harm rate.

What it trains, and why (BENCHMARKS.md "Demo model" has the numbers): every training stream re-degrades
its clean crops online with fresh parameters of the crop's task, so nothing can memorise a few
thousand patches; the tree is sized from the data, one level-1 node per task and two leaves per
level-1 node; the experts train level by level, the root alone first, then each level from its
trained parent; the router learns the coarsest level that restores within 0.3 dB of the best from the frozen
experts' measured PSNR, and restore's support check falls back further where an image lies outside what a
node was trained on (README "Do no harm").

Nothing is downloaded. Every stage runs through the real `deepspeed` launcher with the config the demo
writes to OUT/configs/STAGE.toml, so any stage can be rerun by hand the same way
(`launch/cpu_ranks.sh 2 experts --config OUT/configs/experts.toml`). Each stage's output goes to the
terminal and to OUT/logs/STAGE.log; a failing stage stops the demo with its exit code and log path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from unirestorer.demo_data import (ALWAYS_TRAINED, DEMO_TASKS, FULL, QUICK, SHARED_PHOTOS, degrade_heldout, demo_photos,
                                   save_crops, write_shards)
from unirestorer.demo_report import evaluate_shifts, evaluate_tasks, summary, summary_table
from unirestorer.demo_stages import STAGES, Progress, train_stages
from unirestorer.safe_files import atomic_write, output_folder


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train, export, restore and evaluate on clean photos with synthetic "
                                           "degradations")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR", help="output folder (default runs/demo)")
    p.add_argument("--photos", type=Path, default=None, metavar="DIR",
                   help=f"clean training photos (default: {SHARED_PHOTOS} if it exists, else scikit-image's photos)")
    p.add_argument("--tasks", default=",".join(DEMO_TASKS), metavar="LIST",
                   help=f"comma-separated tasks, or 'all' (default {','.join(DEMO_TASKS)})")
    p.add_argument("--gpus", type=int, default=0, metavar="N", help="train on N GPUs (default: 2 CPU ranks)")
    p.add_argument("--steps-scale", type=float, default=1.0, metavar="F", help="multiply every stage's steps by F")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="training crops, degradations and every stage's seed (default 0); the held-out crops stay "
                        "the same, so two seeds measure the spread of a training run")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, a few steps (numbers mean nothing)")
    p.set_defaults(func=run)


# ---- the demo ---------------------------------------------------------------------------------
OURS = ("photos", "heldout", "shards", "configs", "logs", "checkpoints", "tensorboard", "bundle", "restored", "eval")
MARKER = ".unirestorer-demo"


def prepare_out(out: Path) -> Path:
    """A fresh demo folder: an earlier demo's outputs are removed, any other non-empty folder is refused, and
    so is a link at the folder itself. A link among an earlier demo's outputs is removed, never followed: the
    demo then writes into folders it created itself. Returns the folder (links in its parents resolved)."""
    out = output_folder(out, "--out")
    marker = out / MARKER
    ours = marker.is_file() and not marker.is_symlink()
    if out.exists() and not ours and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: exists and is not an earlier demo's folder; choose another")
    for name in OURS:
        if (out / name).is_symlink():
            (out / name).unlink()
        else:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return out


def parse_tasks(text: str) -> tuple[str, ...]:
    from unirestorer.data_shards.degradations import TASKS, task_name

    degraded = tuple(t for t in TASKS if t not in ALWAYS_TRAINED)  # clean photos: trained always, scored as a shift
    tasks = degraded if text == "all" else tuple(t.strip() for t in text.split(",") if t.strip())
    if not tasks or set(tasks) <= set(ALWAYS_TRAINED):
        raise ValueError(f"--tasks {text!r}: no degradation given; choose from {', '.join(degraded)} or 'all' "
                         f"({', '.join(ALWAYS_TRAINED)} is always trained)")
    try:
        return tuple(task_name(t) for t in tasks if t not in ALWAYS_TRAINED)
    except ValueError as err:
        raise ValueError(f"--tasks {text!r}: {err}") from None


def restore_folder(argv: list[str]) -> int:
    """`unirestorer restore ARGV...` in this process, without importing the command-line entry point."""
    from unirestorer import restore

    parser = argparse.ArgumentParser(prog="unirestorer")
    restore.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["restore", *argv])
    return int(args.func(args) or 0)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from unirestorer.restore import load_model

    try:
        if args.gpus < 0 or args.steps_scale <= 0 or args.seed < 0:
            raise ValueError("--gpus and --seed must be >= 0 and --steps-scale > 0")
        tasks = parse_tasks(args.tasks)
        if args.photos is not None and not args.photos.is_dir():
            raise ValueError(f"--photos {args.photos}: no such folder")
        sizes, device = (QUICK if args.quick else FULL), "cuda" if args.gpus else "cpu"
        out = prepare_out(args.out)
    except (ValueError, OSError) as err:  # FileExistsError, UnsafePathError, a folder we cannot create
        print(f"error: {err}", file=sys.stderr)
        return 2
    progress = Progress(len(STAGES) + 6)

    progress.phase(f"photos and held-out images into {out}")
    try:
        train_dir, val_dir, heldout_photos, what = demo_photos(args.photos, out, sizes)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    clean = out / "heldout" / "clean"
    crops = save_crops(heldout_photos, clean, sizes.eval_crop, sizes.eval_per_photo)
    heldout = degrade_heldout(clean, out / "heldout", tasks)
    print(f"photos: {what}\nheld-out: {len(crops)} clean {sizes.eval_crop}-px crops x {len(tasks)} tasks "
          f"({', '.join(tasks)})")

    progress.phase("training and validation shards, one set per task")
    trained = tasks + tuple(t for t in ALWAYS_TRAINED if t not in tasks)
    # write_shards seeds task i with seed + i: training 100·S + i, validation 1000 + 100·S + i (bench/quality.py's)
    shards = write_shards(train_dir, out / "shards" / "train", trained, sizes, sizes.per_image, seed=100 * args.seed)
    val = write_shards(val_dir, out / "shards" / "val", trained, sizes, 1, seed=1000 + 100 * args.seed)
    print(f"{sizes.per_image} clean {sizes.stored}-px crops per photo and task ({', '.join(trained)}) in "
          f"{out / 'shards'}; the training streams re-degrade them online")

    if code := train_stages(out, shards, val, sizes, args.steps_scale, args.gpus, progress, args.seed):
        return code

    progress.phase("restore the held-out degraded images")
    torch.set_num_threads(1)  # tiny networks: extra threads only contend (20x slower on a busy 2-core box)
    bundle = out / "bundle"
    for task in tasks:
        folder = out / "heldout" / task
        code = restore_folder(["--weights", str(bundle), "--input", str(folder), "--output", str(out / "restored" / task),
                              "--tile", "0", "--device", device])  # fmt: skip
        if code:
            print(f"\ndemo stopped: restoring {folder} failed with exit code {code}", file=sys.stderr)
            return code

    progress.phase("evaluate: input vs classical vs root-only vs leaf-only vs routed vs oracle, then the shifts")
    model = load_model(str(bundle), device)
    records, extractor, confusion = evaluate_tasks(model, heldout, out / "eval", device)
    shifts = evaluate_shifts(model, clean, out / "eval", device)
    stats = json.loads((out / "checkpoints" / "tree" / "tree_stats.json").read_text())
    doc = summary(records, extractor, stats, progress.elapsed()) | {"seed": args.seed, "shifts": shifts}
    levels = {t: np.bincount([r["level"] for r in recs], minlength=len(recs[0]["path"])).tolist()
              for t, recs in records.items()}
    table = summary_table(doc, levels)
    atomic_write(out / "eval" / "summary.md", f"{table}\n\nExtractor confusion on the held-out single-degradation "
                                              f"crops (rows: truth, columns: top family):\n\n```\n{confusion}\n```\n")
    atomic_write(out / "eval" / "summary.json", json.dumps(doc, indent=1))
    from unirestorer.classical import method_name

    print(f"\nPSNR (dB) on held-out crops, RGB, float, crop to a multiple of 16 (PromptIR convention); classical = "
          f"{method_name('noise')} for noise (σ known), dark channel prior for haze; root = root expert alone, leaf = "
          f"estimated leaf alone, oracle = best node on the path:\n")
    print(table)
    print(f"\ndemo done in {progress.elapsed():.0f} s. Everything is in {out}:\n"
          f"  bundle/        the exported weights and their calibration bank (unirestorer restore --weights {bundle} ...)\n"
          f"  restored/TASK  restored held-out images; heldout/ their inputs and clean crops\n"
          f"  eval/          summary.md, summary.json, results.md (PSNR and SSIM per method), per-image CSV, grids\n"
          f"  tensorboard/   training curves (tensorboard --logdir {out / 'tensorboard'})\n"
          f"  logs/ configs/ checkpoints/  each stage's output, config and checkpoints\n"
          f"Try it in a browser: unirestorer serve --weights {bundle}   (then open http://127.0.0.1:7860)")  # fmt: skip
    return 0
