"""Does the model do no harm off its training distribution? `python bench/robustness.py BUNDLE [--quick] [--json]`

A restorer that ruins a photo it does not recognise is worse than none. This benchmark feeds a bundle
shifted data it was never trained on, built only from ../shared/data/test and the degradation library:
  clean          no degradation at all (the output should be the input)
  mild           each family at or below the low end of its training range (noise σ 2-8, slight blur, ...)
  heavy          each family above its training range
  camera_noise   raw-space shot + read noise through another camera pipeline than the one trained on
                 (data_shards/camera.py `camera_noise_eval`: sRGB curve, edge-aware demosaicing, sharpening,
                 4:4:4 JPEG)
  rain_other     Rain100L: real pairs, made by another rain generator
  lowlight_real  LOL eval15: real low-light pairs
  unseen_mix     mixtures the demo and the quality benchmark never train on (haze+noise, lowlight+rain, ...)
  unseen_family  the library's families the bundle never trained (for the demo and bench/quality.py: JPEG
                 and snow), at the library's ranges; left out where the bundle trained every family
Synthetic sets take centre crops of Kodak24 and CBSD68 images, degraded with rng([seed, set, i]).

Per set, one row: input, the classical floor (BM3D with σ estimated for noise images, the dark channel
prior for haze images, the input itself where no classical method exists), root expert alone, leaf alone,
the router's own level, routed (after the fallback checks, what `restore` outputs), oracle (best node on the
path), the harm rate (share of images where routed < input - 0.5 dB) and the routed-level histogram.
Metrics: RGB, float, crop to a multiple of 16 (PromptIR convention), PSNR capped at 50 dB (the clean
set's input equals its ground truth). Side-by-side grids of each set's worst
images by routed - input land in OUT/grids/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from unirestorer.shifts import (COLUMNS, HARM_DB, HEAVY, MILD, ShiftSet, by_range, camera, harm_cell, identity, run_set,
                                set_row, synthetic_set, unseen_families, unseen_family, unseen_mix)


def clean_pool(test: Path, crop: int) -> list[tuple[str, np.ndarray]]:
    """Centre crops of Kodak24 then CBSD68 (sorted), the clean images of the synthetic sets."""
    from unirestorer.image_io import load_picture

    pool = []
    for folder in (test / "Kodak24", test / "CBSD68"):
        for path in sorted(folder.glob("*.png")):
            img = load_picture(path).rgb
            y, x = (img.shape[0] - crop) // 2, (img.shape[1] - crop) // 2
            pool.append((f"{folder.name}_{path.stem}", np.ascontiguousarray(img[y : y + crop, x : x + crop])))
    if not pool:
        raise FileNotFoundError(f"{test}: no Kodak24/CBSD68 images (../shared/data/test beside the repository?)")
    return pool


def paired_set(name: str, lq_dir: Path, gt_dir: Path, task: str, n: int, crop: int | None) -> ShiftSet:
    from unirestorer.evaluate import load_pairs

    samples = load_pairs(lq_dir, gt_dir, multiple=16, limit=n)
    if crop:
        for s in samples:
            y, x = (s.lq.shape[0] - crop) // 2, (s.lq.shape[1] - crop) // 2
            s.lq, s.gt = s.lq[y : y + crop, x : x + crop], s.gt[y : y + crop, x : x + crop]
    return ShiftSet(name, samples, [task] * len(samples))


def shift_sets(test: Path, n: int, crop: int, seed: int, quick: bool, names: tuple[str, ...] | None = None,
               trained: Sequence[str] = ()) -> list[ShiftSet]:  # fmt: skip
    """The benchmark's sets (all, or `names`), each of at most n images; `trained`: the bundle's training tasks
    (tree.task_names), whose families the unseen_family set leaves out (without any: every family it has)."""
    pool = clean_pool(test, crop)
    unseen = unseen_families(trained)
    builders = {
        "clean": lambda: synthetic_set("clean", pool, n, seed, 0, identity),
        "mild": lambda: synthetic_set("mild", pool, n, seed, 7, by_range(MILD)),
        "heavy": lambda: synthetic_set("heavy", pool, n, seed, 14, by_range(HEAVY)),
        "camera_noise": lambda: synthetic_set("camera_noise", pool, n, seed, 21, camera),
        "rain_other": lambda: paired_set("rain_other", test / "Rain100L" / "input", test / "Rain100L" / "target",
                                         "rain", n, crop if quick else None),
        "lowlight_real": lambda: paired_set("lowlight_real", test / "LOL" / "low", test / "LOL" / "high", "lowlight",
                                            n, crop if quick else None),
        "unseen_mix": lambda: synthetic_set("unseen_mix", pool, n, seed, 28, unseen_mix),
        "unseen_family": lambda: synthetic_set("unseen_family", pool, n, seed, 35, unseen_family(unseen)),
    }
    unknown = sorted(set(names or ()) - set(builders))
    if unknown:
        raise ValueError(f"unknown shift set(s) {unknown}; choose from {', '.join(builders)}")
    if not unseen:
        if names and "unseen_family" in names:
            raise ValueError(f"no unseen_family set: the bundle trained every family of the library ({', '.join(trained)})")
        print("[robustness] unseen_family: left out, the bundle trained every family of the library", file=sys.stderr)
    return [builders[k]() for k in (names or builders) if unseen or k != "unseen_family"]


def markdown(rows: dict[str, dict], bundle: str) -> str:
    head = ("| set | n | " + " | ".join(COLUMNS) + " | harm (routed) | harm (leaf) | worst routed - input | "
            "levels 0/1/2 |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['n']} | " + " | ".join(f"{r[c]:.2f}" for c in COLUMNS)
                     + f" | {harm_cell(r['harm_rate'], r['n'])} | {harm_cell(r['leaf_harm_rate'], r['n'])} | "
                     + f"{r['worst']:+.2f} | "
                     + "/".join(map(str, r["levels"])) + " |")
    means = {c: float(np.mean([r[c] for r in rows.values()])) for c in COLUMNS}
    lines.append("| **mean** | | " + " | ".join(f"{means[c]:.2f}" for c in COLUMNS) + " | | | | |")
    lines += ["", f"Bundle {bundle}. PSNR (dB), RGB, float, crop to a multiple of 16. classical = BM3D (σ estimated) "
              "on noise images, dark channel prior on haze images, the input elsewhere; PSNR capped at 50 dB; router = the router's own "
              "level, routed = after the fallback checks (what `restore` writes); harm = share of images with "
              f"routed (or leaf) < input - {HARM_DB} dB."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="a bundle folder (unirestorer export)")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "test",
                   help="the test images (default ../shared/data/test beside the repository)")
    p.add_argument("--out", type=Path, default=Path("runs/robustness"), help="output folder (default runs/robustness)")
    p.add_argument("--n", type=int, default=50,
                   help="images per set (default 50, so that one harmed image is 2 %%, the goal's bound; LOL has 15)")
    p.add_argument("--crop", type=int, default=256, help="centre crop of the synthetic sets' clean images (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sets", default=None, help="comma-separated subset of the sets (default all)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 images per set, 64-px crops, NL-means floor")
    p.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    args = p.parse_args(argv)
    import torch

    from unirestorer.evaluate import write_grid
    from unirestorer.restore import load_model
    from unirestorer.safe_files import atomic_write, ensure_dir

    torch.set_num_threads(1)  # tiny experts: more threads only contend on a busy 2-core machine
    n, crop, denoiser = (2, 64, "nlmeans") if args.quick else (args.n, args.crop, "auto")
    if n < 1 or crop < 16 or crop % 16:
        print("error: --n must be >= 1 and --crop a multiple of 16, >= 16", file=sys.stderr)
        return 2
    try:
        model = load_model(args.bundle, "cpu")
        sets = shift_sets(args.data, n, crop, args.seed, args.quick, tuple(args.sets.split(",")) if args.sets else None,
                          model.tree.task_names)
        out = ensure_dir(args.out)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows, images = {}, {}
    for shift in sets:
        print(f"[robustness] {shift.name}: {len(shift.samples)} images", file=sys.stderr, flush=True)
        records, outputs = run_set(model, shift, denoiser, "cpu")
        rows[shift.name] = set_row(records, model.tree.n_levels)
        images[shift.name] = [{k: v for k, v in r.items()} for r in records]
        order = np.argsort([r["routed_psnr"] - r["input_psnr"] for r in records], kind="stable")[:3]
        write_grid(ensure_dir(out / "grids") / f"{shift.name}.png", [shift.samples[i] for i in order],
                   [records[i] for i in order], [outputs[i] for i in order], k=3)
    doc = {"bundle": str(args.bundle), "seed": args.seed, "quick": args.quick, "harm_db": HARM_DB, "sets": rows,
           "images": images}
    table = markdown(rows, str(args.bundle))
    atomic_write(out / "robustness.json", json.dumps(doc, indent=1))
    atomic_write(out / "robustness.md", table + "\n")
    print(json.dumps(doc, indent=1) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
