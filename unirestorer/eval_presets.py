"""`unirestorer eval --weights BUNDLE --preset NAME ROOT`: the standard test sets of a paper setting, read
from their standard layout under ROOT, scored under a stated convention, printed in the papers' table
shape so the numbers can be pasted beside theirs.

Settings: `3task` (PromptIR Table 1: SOTS, Rain100L, CBSD68 σ 15/25/50) and `5task` (IDR's five:
CBSD68 σ 25, SOTS, Rain100L, GoPro, LOL). Conventions (DESIGN §6):
    promptir-*  RGB, float (no rounding), images centre-cropped to a multiple of 16 before restoration,
                noise added to the uint8 clean image and stored as uint8 (truncated, PromptIR's
                `np.clip(...).astype(np.uint8)`), drawn with a fixed seed per image
    basicsr-*   uint8-rounded outputs, Y (BT.601) for rain and RGB otherwise, whole images (padded
                inside the model, not cropped), noise in float
Noise realisations come from `rng([seed, i])` per image, not from numpy's global seed-0 stream as in
PromptIR's test.py, so σ-sets differ from theirs by the noise draw (≈ ±0.02 dB over CBSD68).

ROOT layouts looked for, first match wins (PromptIR's `test/` tree, then the plain dataset names):
    CBSD68      denoise/bsd68/*, CBSD68/*
    Rain100L    derain/Rain100L/{input,target}, Rain100L/{input,target}
    SOTS        dehaze/{input,target}, SOTS/outdoor/{hazy,gt}  (ID_A_BETA.* -> ID.*)
    GoPro       deblur/GoPro/{input,target}, GoPro/test/SEQ/{blur,sharp}
    LOL         lowlight/LOL/{low,high}, LOL/eval15/{low,high}, LOL/{low,high}
A set that is not found is left blank in the table and named in a line below it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unirestorer import evaluate as evaluation
from unirestorer.evaluate import (Sample, evaluate, images_by_name, load_pairs, load_synthetic, markdown, read_pair,
                                  summarise, write_csv)
from unirestorer.metrics import Convention, mean
from unirestorer.safe_files import atomic_write, ensure_dir

ROWS = (("input", "Input (no restoration)"), ("root", "Root expert only"), ("leaf", "Estimated leaf only"),
        ("routed", "UniRestorer (routed)"), ("oracle", "Oracle node on the path"))  # fmt: skip


@dataclass(frozen=True)
class BenchmarkSet:
    column: str  # the papers' column name
    task: str
    layouts: tuple[tuple[str, str, str], ...]  # (folder under ROOT, LQ sub-folder, GT sub-folder); "" = clean only
    sigma: float | None = None  # synthetic noise on clean images
    gt_key: str = "same"  # "same" name, "id" (SOTS: ID_A_BETA -> ID) or "sequences" (GoPro SEQ/{blur,sharp})


CBSD68 = (("denoise/bsd68", "", ""), ("CBSD68", "", ""))
SOTS = BenchmarkSet("Dehazing SOTS", "haze", (("dehaze", "input", "target"), ("SOTS/outdoor", "hazy", "gt")),
                    gt_key="id")
RAIN = BenchmarkSet("Deraining Rain100L", "rain", (("derain/Rain100L", "input", "target"),
                                                   ("Rain100L", "input", "target")))
GOPRO_PAIRS = BenchmarkSet("Deblurring GoPro", "blur", (("deblur/GoPro", "input", "target"),))
GOPRO_SEQS = BenchmarkSet("Deblurring GoPro", "blur", (("GoPro/test", "blur", "sharp"),), gt_key="sequences")
LOL = BenchmarkSet("Low-light LOL", "lowlight", (("lowlight/LOL", "low", "high"), ("LOL/eval15", "low", "high"),
                                            ("LOL", "low", "high")))  # fmt: skip
SETTINGS: dict[str, tuple[BenchmarkSet | tuple[BenchmarkSet, ...], ...]] = {
    "3task": (SOTS, RAIN, *(BenchmarkSet(f"Denoising CBSD68 σ={s}", "noise", CBSD68, float(s)) for s in (15, 25, 50))),
    "5task": (BenchmarkSet("Denoising CBSD68 σ=25", "noise", CBSD68, 25.0), SOTS, RAIN, (GOPRO_PAIRS, GOPRO_SEQS), LOL),
}
PRESETS = tuple(f"{family}-{setting}" for family in ("promptir", "basicsr") for setting in SETTINGS)


def convention(family: str, task: str) -> Convention:
    if family == "promptir":
        return Convention(y_channel=False, uint8=False, border=0, multiple=16)
    return Convention(y_channel=task == "rain", uint8=True, border=0, multiple=1)


def _mapped(base: Path, lq: str, gt: str, gt_key: str, multiple: int, limit: int | None) -> list[Sample]:
    """Pairs whose GT name is not the LQ name: SOTS's ID_A_BETA -> ID, GoPro's SEQ/{blur,sharp}/N."""
    if gt_key == "id":
        targets = images_by_name(base / gt)
        names = [(n, p, targets.get(n.split("_")[0])) for n, p in images_by_name(base / lq).items()]
    else:  # sequences: every SEQ folder of the split holds lq/ and gt/
        names = []
        for seq in sorted(p for p in base.iterdir() if (p / lq).is_dir()):
            targets = images_by_name(seq / gt) if (seq / gt).is_dir() else {}
            names += [(f"{seq.name}/{n}", p, targets.get(n)) for n, p in images_by_name(seq / lq).items()]
    if missing := [str(p) for _, p, g in names if g is None]:
        raise ValueError(f"{len(missing)} input(s) have no ground truth: {missing[:3]}")
    return [Sample(n, *read_pair(p, g, multiple)) for n, p, g in names[:limit]]


def find(root: Path, options: BenchmarkSet | tuple[BenchmarkSet, ...]) -> tuple[BenchmarkSet, Path, str, str] | None:
    """The first layout of the set present under root."""
    for ts in options if isinstance(options, tuple) else (options,):
        for folder, lq, gt in ts.layouts:
            base = root / folder
            if not base.is_dir():
                continue
            if ts.gt_key == "sequences":
                if any((p / lq).is_dir() and (p / gt).is_dir() for p in base.iterdir()):
                    return ts, base, lq, gt
            elif not lq or ((base / lq).is_dir() and (base / gt).is_dir()):
                return ts, base, lq, gt
    return None


def load_set(ts: BenchmarkSet, base: Path, lq: str, gt: str, family: str, seed: int,
             limit: int | None) -> list[Sample]:  # fmt: skip
    conv = convention(family, ts.task)
    if ts.sigma is not None:
        samples = load_synthetic(base, f"noise:{ts.sigma:g}", seed, conv.multiple, limit)
        if family == "promptir":  # PromptIR stores the noisy input as uint8, truncating
            samples = [Sample(s.name, (np.floor(s.lq * np.float32(255)) / np.float32(255)), s.gt) for s in samples]
        return samples
    if ts.gt_key == "same":
        return load_pairs(base / lq, base / gt, conv.multiple, limit)
    return _mapped(base, lq, gt, ts.gt_key, conv.multiple, limit)


def paper_table(preset: str, columns: list[str], results: dict[str, dict]) -> str:
    """Rows = methods, columns = test sets, cells PSNR/SSIM, and the average over the sets found."""
    lines = [f"| Method | {' | '.join(columns)} | Average |", "|---" * (len(columns) + 2) + "|"]
    for key, label in ROWS:
        cells, ps, ss = [], [], []
        for col in columns:
            if col not in results:
                cells.append("—")
                continue
            s = results[col][key]
            cells.append(f"{s['psnr']:.2f}/{s['ssim']:.3f}")
            ps.append(s["psnr"])
            ss.append(s["ssim"])
        avg = f"{mean(ps):.2f}/{mean(ss):.3f}" if ps else "—"
        lines.append(f"| {label} | {' | '.join(cells)} | {avg} |")
    return "\n".join(lines) + "\n"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """`unirestorer eval`: evaluate's parser, --preset dispatched here, so data flows one way (evaluate never
    imports this module)."""
    evaluation.add_parser(subparsers).set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.preset:
        return evaluation.run(args)
    device = evaluation.pick_device(args)
    return 2 if device is None else run_preset(args, device)


def run_preset(args: argparse.Namespace, device) -> int:
    from unirestorer.restore import check_tiling, load_model

    name, root = args.preset[0], Path(args.preset[1])
    if name not in PRESETS:
        print(f"error: --preset {name!r}: choose one of {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    family, setting = name.split("-", 1)
    try:
        found = {}
        for options in SETTINGS[setting]:
            if (hit := find(root, options)) is not None:
                found[hit[0].column] = (hit, load_set(*hit, family, args.seed, args.limit))
        if not found:
            raise ValueError(f"{root}: none of the {setting} test sets found (layouts: unirestorer/eval_presets.py)")
        model = load_model(args.weights, device)
        check_tiling(model, args.tile, args.overlap)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or Path("runs/eval") / name
    columns = [(o[0] if isinstance(o, tuple) else o).column for o in SETTINGS[setting]]
    results, notes = {}, []
    for col, ((ts, base, _, _), samples) in found.items():
        conv = convention(family, ts.task)
        records, _ = evaluate(model, samples, conv, ts.task if args.instruct else None, args.tile, args.overlap,
                              device, progress=False)  # fmt: skip
        results[col] = summarise(records)
        folder = out / col.split()[-1].replace("=", "").replace("σ", "sigma")
        atomic_write(ensure_dir(folder) / "results.md", markdown(f"{col}: {base}", conv, records, model.tree.n_levels))
        write_csv(folder / "results.csv", records)
        extra = ""
        if ts.sigma is not None:
            quant = "uint8-truncated" if family == "promptir" else "float"
            extra = f"; Gaussian σ={ts.sigma:g} added after the crop, seed {args.seed} per image, noisy input {quant}"
        notes.append(f"- {col}: {len(records)} images from {base}. Convention: {conv.describe()}{extra}.")
    missing = [c for c in columns if c not in results]
    table = (f"### {name}{' (instruction mode)' if args.instruct else ''}\n\n" + paper_table(name, columns, results)
             + "\nPSNR (dB) / SSIM per set; Average over the sets found.\n" + "\n".join(notes) + "\n"
             + (f"- Not found under {root} (left blank): {', '.join(missing)}\n" if missing else ""))  # fmt: skip
    print(table)
    atomic_write(ensure_dir(out) / "table.md", table)
    print(f"wrote {out}")
    return 0
