"""`unirestorer calibrate BUNDLE [--shards SPEC ...] [--samples N]`: measure a bundle's calibration bank.

The step after `export`. It streams stored samples of the training shards (unshuffled, unaugmented, the stored
degradations), runs every expert on each sample's own tree path and keeps the embedding, the path, the
PSNRs, the dark channel floor and the brightness ceiling (model/calibration.py). `restore` then lets a node keep
an image only where its floor and ceiling reach those of the samples the node did not harm and the bank's nearest
samples gained through that node. Shards and patch size default to the training config export stored in
bundle.json.
One process, on CPU or one GPU: ~25 s for the demo's 1500 samples on two CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_SAMPLES = 1500


def calibrate(bundle: str | Path, shards: list[str] | None = None, samples: int = DEFAULT_SAMPLES,
              patch: int | None = None, device: str = "cpu", batch: int = 32) -> str:
    """Measure the bank of `bundle` on `shards` (default: its training shards) and store it beside the bundle."""
    import torch
    from tqdm import tqdm

    from unirestorer.data_shards.loader import StreamConfig, make_loader
    from unirestorer.model.calibration import measure
    from unirestorer.model.unirestorer import CALIBRATION, CONFIG, UniRestorer, save_calibration
    from unirestorer.safe_files import check_writable, output_folder
    from unirestorer.safe_json import read_json

    folder = output_folder(bundle, "BUNDLE")
    check_writable(folder, "BUNDLE")
    check_writable(folder / CALIBRATION, "the bank", folder=False)  # before minutes of measuring, not after
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG} (not a bundle folder)")
    if samples < 1:
        raise ValueError(f"--samples {samples}: must be >= 1")
    model = UniRestorer.load_bundle(folder, device=device)  # bundle.json checked (size, schema) before it is read here
    config = read_json(folder / CONFIG)
    data = config.get("training_config", {}).get("data")
    data = data if isinstance(data, dict) else {}
    shards = shards or data.get("train_shards")
    if not shards or not all(isinstance(s, str) for s in shards):
        raise ValueError(f"{folder / CONFIG} names no training shards (a bundle not written by export?); pass --shards")
    patch = patch or data.get("patch_size")
    if not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch size {patch!r}: pass --patch (the training config in {folder / CONFIG} names none)")
    stream = make_loader(StreamConfig(sources=list(shards), patch=patch, batch_size=batch, num_workers=0,
                                      shuffle_buffer=0, batches_per_epoch=-(-samples // batch), augment=False,
                                      pin_memory=False, persistent_workers=False))
    with tqdm(total=samples, desc="calibrate", unit="sample", file=sys.stderr) as bar:
        moved = ({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in stream)
        bank = measure(model, moved, samples, model.tree.leaf_paths(), list(shards), bar.update)
    if read_json(folder / CONFIG) != config:
        raise ValueError(f"{folder / CONFIG} changed while the bank was measured; run calibrate again")
    save_calibration(folder, bank, config)
    return f"{len(bank)} samples of {len(shards)} shard set(s), {patch}-px patches"


def _run(args: argparse.Namespace) -> int:
    try:
        note = calibrate(args.bundle, args.shards, args.samples, args.patch, args.device)
    except (ValueError, OSError) as err:  # a BundleError or JsonError is a ValueError
        print(f"error: calibrate failed: {err}", file=sys.stderr)
        return 2
    print(f"calibrated {args.bundle}: {note}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="measure the bank that lets restore fall back where a node's "
                                                "expert harmed images like the input (after export)")
    p.add_argument("bundle", help="bundle folder (written by export); the bank is stored in it")
    p.add_argument("--shards", nargs="+", help="shard sets to measure on (default: the training shards named in "
                                               "bundle.json)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="samples in the bank (default %(default)s)")
    p.add_argument("--patch", type=int, help="patch size (default: the training config's data.patch_size)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.set_defaults(func=_run)
