"""Tiled restore vs whole-image restore, every expert of a bundle (issue 19, goal >= 45 dB PSNR).

    .venv/bin/python bench/tiling.py BUNDLE [--photo FILE] [--sizes 1024 2048] [--tiles 256 512]
        [--nodes 0 3 9] [--looks photo dark hazy] [--stat-window 64] [--global] [--json]

A photo (default: skimage's astronaut) is resized to each size² (bicubic) and given three looks: as is,
dark (0.12·x^1.4, a night shot) and hazy (0.55·x + 0.4, veiling light); those are where per-tile
statistics went wrong. Each node's expert restores each image whole (`--tile 0`) and tiled at the
default overlap, as `restore` runs them (`restore.run_expert`), and the PSNR between the two is printed.
`--stat-window P` restores a bundle exported before TLSC as if its experts had been trained on P-px
patches (its bundle.json gets `stat_window` in a temporary copy); `--global` adds the same numbers with
the experts pooling over their whole input (stat_window 0, the behaviour before TLSC).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unirestorer.model.unirestorer import CONFIG, UniRestorer
from unirestorer.restore import DEFAULT_OVERLAP, run_expert

LOOKS = {"photo": lambda x: x, "dark": lambda x: 0.12 * x.pow(1.4), "hazy": lambda x: 0.55 * x + 0.4}


def photo(path: str | None, size: int) -> torch.Tensor:
    """[1,3,size,size] in [0, 1]: the photo centre-cropped square and resized."""
    if path:
        from unirestorer.image_io import load_picture

        rgb = load_picture(Path(path)).rgb
    else:
        from skimage import data

        rgb = data.astronaut().astype(np.float32) / 255
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    s = min(x.shape[-2:])
    top, left = (x.shape[-2] - s) // 2, (x.shape[-1] - s) // 2
    return F.interpolate(x[..., top : top + s, left : left + s], size=(size, size), mode="bicubic").clamp(0, 1)


def with_window(bundle: str, window: int, tmp: Path) -> str:
    """A copy of `bundle` whose experts have stat_window `window` (0: pool globally)."""
    out = tmp / f"window{window}"
    shutil.copytree(bundle, out)
    cfg = json.loads((out / CONFIG).read_text())
    for spec in cfg["experts"].values():
        spec["stat_window"] = window
    (out / CONFIG).write_text(json.dumps(cfg))
    return str(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def measure(model, nodes: list[int], images: dict[str, torch.Tensor], tiles: list[int], overlap: int) -> list[dict]:
    rows = []
    for name, x in images.items():
        for node in nodes:
            t0 = time.process_time()
            whole = run_expert(model, node, x, 0, 0)
            row = {"image": name, "node": node, "whole_cpu_s": round(time.process_time() - t0, 1)}
            for tile in tiles:
                row[f"tile{tile}_db"] = round(psnr(run_expert(model, node, x, tile, overlap), whole), 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--photo", default=None, help="photo file (default: skimage's astronaut)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--tiles", type=int, nargs="+", default=[256, 512])
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP)
    p.add_argument("--nodes", type=int, nargs="*", default=None, help="default: every node")
    p.add_argument("--looks", nargs="+", choices=sorted(LOOKS), default=list(LOOKS))
    p.add_argument("--stat-window", type=int, default=None, help="give a pre-TLSC bundle's experts this window")
    p.add_argument("--global", dest="glob", action="store_true", help="also measure global pooling (before TLSC)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images = {f"{look} {s}²": fn(photo(args.photo, s)) for s in args.sizes for look, fn in LOOKS.items() if look in args.looks}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle if args.stat_window is None else with_window(args.bundle, args.stat_window, Path(tmp))
        variants = {"tlsc": bundle} | ({"global": with_window(args.bundle, 0, Path(tmp))} if args.glob else {})
        for label, path in variants.items():
            model = UniRestorer.load_bundle(path)
            nodes = args.nodes if args.nodes is not None else list(range(model.tree.n_nodes))
            results[label] = measure(model, nodes, images, args.tiles, args.overlap)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    cols = [f"tile{t}_db" for t in args.tiles]
    print("| pooling | image | node | " + " | ".join(f"tile {t} dB" for t in args.tiles) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for label, rows in results.items():
        for r in rows:
            print(f"| {label} | {r['image']} | {r['node']} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
        worst = min(r[c] for r in rows for c in cols)
        print(f"| {label} | **worst** | | **{worst:.2f}** (goal >= 45: {'met' if worst >= 45 else 'missed'}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
