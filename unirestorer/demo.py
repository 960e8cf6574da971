"""`unirestorer demo`: the main job on the embedded default data.

Until the end-to-end pipeline exists, it saves the colour photos scikit-image ships as PNGs, writes
synthetic-degradation shards from them (every task, 128-px crops) and prints what it wrote.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Colour photographs bundled with scikit-image (no download), all at least 256 px on each side.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "stereo_motorcycle")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the pipeline on the photos scikit-image ships")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    p.set_defaults(func=run)


def save_photos(folder: Path) -> list[Path]:
    """Write the bundled photos as PNGs (RGB, uint8) into `folder`."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        path = folder / f"{name}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    from unirestorer.data_shards.cli import format_report
    from unirestorer.data_shards.degradations import TASKS
    from unirestorer.data_shards.writer import inspect_shards, write_synthetic

    out = Path(args.out)
    photos = save_photos(out / "clean")
    print(f"saved {len(photos)} photos to {out / 'clean'}")
    write_synthetic(out / "clean", out / "shards", TASKS, per_image=len(TASKS), patch=128, seed=0,
                    shard_size=16, workers=2, force=True)  # fmt: skip
    print(format_report(inspect_shards(out / "shards")))
    print(f"\ndemo output: {out.resolve()}")
    return 0
