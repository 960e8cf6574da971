"""How far from a node's centroid does its expert still help? `python bench/trusted_core.py BUNDLE --photos DIR`

The support check trusts a type node's expert (level 1) within TRUSTED_FRACTION of its support radius and a
finer node's within all of it (model/tree.py).
This benchmark measures where that line belongs for one bundle, on validation photos (never the test
sets): random crops of each photo, degraded with every task of the bundle's tree at its training ranges
(clean crops as they are; tasks of a tree's own data, which the library cannot synthesise, are left out).
Every non-root expert restores every crop; each (crop, node) pair falls in a bin of distance to the
node's centroid / the node's radius. Per bin, for the type nodes (level 1) and the finer ones apart: the
number of pairs, the share whose output is worse than the input by more than HARM_DB (harm), and the mean
gain over the input, for all tasks and without the clean crops (which the clean check guards). That is
what a node's expert does to the images at that distance from it, whatever their family: its own near
the centre, the other families' nearest images in its outer shell.

For the demo: `python bench/trusted_core.py runs/demo/bundle --photos runs/demo/photos/val` (~5 min on 2
cores). Metrics: RGB, float, PSNR capped at 50 dB.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from unirestorer.shifts import HARM_DB, MAX_PSNR

EDGES = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def val_crops(photos: Path, tasks: list[str], per_task: int, crop: int, seed: int
              ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:  # fmt: skip
    """`per_task` random crops of each photo per task, degraded at the training ranges (clean: as they are)."""
    from unirestorer.data_shards.degradations import synthesize
    from unirestorer.data_shards.writer import list_images
    from unirestorer.image_io import load_picture

    rng = np.random.default_rng(seed)
    lqs, gts, names = [], [], []
    for path in list_images(photos):
        img = load_picture(path).rgb
        if min(img.shape[:2]) < crop:
            raise ValueError(f"{path}: {img.shape[1]}x{img.shape[0]} is smaller than the {crop}-px crop")
        for task in tasks:
            for _ in range(per_task):
                y, x = rng.integers(0, img.shape[0] - crop + 1), rng.integers(0, img.shape[1] - crop + 1)
                gt = np.ascontiguousarray(img[y : y + crop, x : x + crop])
                lq = gt.copy() if task == "clean" else np.clip(synthesize(gt, task, rng)[0], 0, 1).astype(np.float32)
                lqs.append(lq)
                gts.append(gt)
                names.append(task)
    if not lqs:
        raise ValueError(f"{photos}: no photos")
    return lqs, gts, names


def measure(model, lqs: list[np.ndarray], gts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """([N, nodes] distance / radius, [N, nodes] PSNR gain of each node's expert over the input; root column 0)."""
    import torch
    from tqdm import tqdm

    from unirestorer.metrics import Convention, psnr

    conv, tree = Convention(), model.tree
    x = torch.from_numpy(np.stack(lqs)).permute(0, 3, 1, 2)
    with torch.no_grad():
        e = torch.cat([model.embed(x[i : i + 1]) for i in range(len(x))]).float()
        ratio = (torch.cdist(e, tree.centroids.float()) / tree.radii[None]).numpy()
        inp = np.array([min(psnr(a, b, conv), MAX_PSNR) for a, b in zip(lqs, gts)])
        gain = np.zeros_like(ratio)
        for node in tqdm(range(1, tree.n_nodes), desc="experts", unit="node"):
            out = torch.cat([model.expert(node)(x[i : i + 32]).clamp(0, 1) for i in range(0, len(x), 32)])
            out = out.permute(0, 2, 3, 1).numpy()
            gain[:, node] = [min(psnr(o, g, conv), MAX_PSNR) for o, g in zip(out, gts)] - inp
    return ratio, gain


def bins(ratio: np.ndarray, gain: np.ndarray, keep: np.ndarray, nodes: list[int]) -> list[dict]:
    """Per distance bin, over `nodes` and the crops in `keep`: pairs, harm rate, mean gain."""
    rows = []
    for lo, hi in zip(EDGES[:-1], EDGES[1:]):
        inside = (ratio[:, nodes] > lo) & (ratio[:, nodes] <= hi) & keep[:, None]
        g = gain[:, nodes][inside]
        rows.append({"from": lo, "to": hi, "pairs": int(inside.sum()),
                     "harm": float(np.mean(g < -HARM_DB)) if len(g) else None,
                     "gain": float(g.mean()) if len(g) else None})
    return rows


def cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="a bundle folder (unirestorer export) whose tree has support radii")
    p.add_argument("--photos", type=Path, required=True, help="validation photos (never the test sets)")
    p.add_argument("--per-task", type=int, default=3, help="crops per photo and task (default 3)")
    p.add_argument("--crop", type=int, default=128, help="crop size in px (default 128)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    args = p.parse_args(argv)
    import torch

    from unirestorer.data_shards.degradations import TASKS
    from unirestorer.model.tree import TRUSTED_FRACTION
    from unirestorer.restore import load_model

    torch.set_num_threads(1)
    try:
        model = load_model(args.bundle, "cpu")
        if model.tree.radii is None:
            raise ValueError(f"{args.bundle}: its tree has no support radii (a bundle from before the support check)")
        tasks = [t for t in model.tree.task_names if t in TASKS]  # a tree may name tasks of its own data
        if not tasks:
            raise ValueError(f"{args.bundle}: none of its tree's tasks {model.tree.task_names} is a synthetic one")
        lqs, gts, names = val_crops(args.photos, tasks, args.per_task, args.crop, args.seed)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ratio, gain = measure(model, lqs, gts)
    tree, every, trained = model.tree, np.ones(len(lqs), bool), np.array(names) != "clean"
    groups = {"type": [n for n in range(1, tree.n_nodes) if tree.level_of(n) == 1],
              "finer": [n for n in range(1, tree.n_nodes) if tree.level_of(n) > 1]}
    doc = {"bundle": str(args.bundle), "photos": str(args.photos), "tasks": tasks, "crops": len(lqs), "harm_db": HARM_DB,
           "trusted_fraction": TRUSTED_FRACTION,
           **{g: {"nodes": nodes, "all": bins(ratio, gain, every, nodes), "without_clean": bins(ratio, gain, trained, nodes)}
              for g, nodes in groups.items() if nodes}}
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print("| nodes | distance / radius | pairs | harm | mean gain (dB) | pairs, no clean | harm, no clean | mean gain, no clean |")
    print("|---|---|---|---|---|---|---|---|")
    for g, label in (("type", "type (level 1)"), ("finer", "finer")):
        for a, c in zip(doc[g]["all"], doc[g]["without_clean"]) if g in doc else ():
            print(f"| {label} | ({a['from']:.1f}, {a['to']:.1f}] | {a['pairs']} | {cell(a['harm'], '{:.1%}')} | "
                  f"{cell(a['gain'], '{:+.2f}')} | {c['pairs']} | {cell(c['harm'], '{:.1%}')} | {cell(c['gain'], '{:+.2f}')} |")
    print(f"\n{len(lqs)} crops of {args.crop} px from {args.photos}, every non-root node of {args.bundle}; harm = output "
          f"< input - {HARM_DB} dB. The support check trusts a type node within {TRUSTED_FRACTION} of its radius, a finer "
          "node within all of it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
