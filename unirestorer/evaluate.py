"""`unirestorer eval`: PSNR/SSIM of the routed model beside the baselines that test its claim.

Per image, on the root→leaf path of the leaf the estimator picks (blind, or inside `--instruct`'s
subtree), every node's expert is run once; from those outputs come
  input   the degraded image itself (no restoration),
  classical  the classical floor for the set's task (unirestorer/classical.py: BM3D or NL-means for
          noise, the dark channel prior for haze; none for other tasks),
  root    the root expert alone (degradation-agnostic all-in-one),
  leaf    the estimator's leaf alone (no granularity: always the finest expert),
  routed  the node the router picks (leaf and level), i.e. the model,
  oracle  the best node on that path for this image by PSNR against the ground truth.
So oracle >= root, leaf and routed per image by construction; routed vs root and leaf is the claim.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unirestorer.metrics import Convention, crop_to_multiple, mean, psnr, ssim
from unirestorer.safe_files import atomic_write, check_writable, child, ensure_dir

METHODS = ("input", "classical", "root", "leaf", "routed", "oracle")
# --synth FAMILY:VALUE -> (degradation type, the parameter VALUE sets); FAMILY alone draws params.
SYNTH_PARAM = {"noise": ("gaussian_noise", "sigma"), "jpeg": ("jpeg", "quality"), "blur": ("gaussian_blur", "sigma")}


@dataclass
class Sample:
    name: str
    lq: np.ndarray  # HxWx3 float32 in [0, 1], already cropped per the convention
    gt: np.ndarray
    label: dict | None = None  # the synthetic degradation's label, where known

    @property
    def sigma(self) -> float | None:
        """Std of additive Gaussian noise in [0, 1] units where the label says (else the classical row estimates it)."""
        return known_sigma(self.label) if self.label else None


def known_sigma(label: dict) -> float | None:
    """The Gaussian noise std of a one-component noise label (None for anything else: estimated then)."""
    comps = label.get("components", [])
    if len(comps) == 1 and comps[0].get("type") == "gaussian_noise":
        return float(comps[0]["params"]["sigma"]) / 255
    return None


def images_by_name(folder: Path) -> dict[str, Path]:
    """The folder's images by file stem; two files of one stem (a.png, a.jpg) are refused, naming both,
    since either could be the one scored. Entries passed over (hidden, not regular) are said on stderr."""
    from unirestorer.data_shards.imageio import input_files, passed_over_note

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files, passed = input_files(folder)
    if passed:
        print(passed_over_note(folder, passed), file=sys.stderr)
    by_name: dict[str, Path] = {}
    for p in files:
        if p.stem in by_name:
            raise ValueError(f"{by_name[p.stem]} and {p} have the same name {p.stem!r}; keep one of them")
        by_name[p.stem] = p
    return by_name


def _crop(img: np.ndarray, path: Path, multiple: int) -> np.ndarray:
    img = crop_to_multiple(img, multiple)
    if img.size == 0:
        raise ValueError(f"{path}: smaller than the crop multiple {multiple}")
    return img


def _read(path: Path, multiple: int) -> np.ndarray:
    from unirestorer.image_io import load_picture

    return _crop(load_picture(path).rgb, path, multiple)


def read_pair(lq: Path, gt: Path, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """An LQ image and its GT, cropped alike; sizes are compared before the crop, which would hide a
    misalignment (a 50x50 and a 48x50 image crop to the same 48x48)."""
    from unirestorer.image_io import load_picture

    a, b = load_picture(lq).rgb, load_picture(gt).rgb
    if a.shape != b.shape:
        raise ValueError(f"{lq}: {a.shape[1]}x{a.shape[0]} but its ground truth {gt} is {b.shape[1]}x{b.shape[0]}; "
                         f"refusing to score a misaligned pair")
    return _crop(a, lq, multiple), _crop(b, gt, multiple)


def load_pairs(lq_dir: Path, gt_dir: Path, multiple: int = 16, limit: int | None = None) -> list[Sample]:
    """Pairs matched by file stem; every LQ needs one GT of the same size."""
    lq, gt = images_by_name(lq_dir), images_by_name(gt_dir)
    missing = sorted(set(lq) - set(gt))
    if missing:
        raise ValueError(f"{len(missing)} input(s) in {lq_dir} have no ground truth in {gt_dir}: {missing[:5]}")
    samples = [Sample(name, *read_pair(lq[name], gt[name], multiple)) for name in sorted(lq)[:limit]]
    if not samples:
        raise ValueError(f"{lq_dir}: no image pairs found")
    return samples


def synth_label(spec: str) -> tuple[str, dict | None]:
    """'noise:25' -> ('noise', a fixed label); 'rain' -> ('rain', None: params drawn per image)."""
    from unirestorer.data_shards.degradations import task_name

    family, _, value = spec.partition(":")
    if not value:
        try:
            return task_name(family), None
        except ValueError as err:
            raise ValueError(f"--synth {spec!r}: {err}, or FAMILY:VALUE") from None
    if family not in SYNTH_PARAM:
        raise ValueError(f"--synth {spec!r}: a value can be given for {', '.join(SYNTH_PARAM)} only")
    kind, key = SYNTH_PARAM[family]
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"--synth {spec!r}: {value!r} is not a number") from None
    return family, {"task": family, "components": [{"family": family, "type": kind, "params": {key: number}}]}


def load_synthetic(clean_dir: Path, spec: str, seed: int = 0, multiple: int = 16,
                   limit: int | None = None) -> list[Sample]:  # fmt: skip
    """Clean images degraded at test time after the crop; image i uses rng([seed, i]) (order-proof)."""
    from unirestorer.data_shards.degradations import apply_label, sample_label

    task, fixed = synth_label(spec)
    samples = []
    for i, (name, path) in enumerate(sorted(images_by_name(clean_dir).items())[:limit]):
        gt = _read(path, multiple)
        rng = np.random.default_rng([seed, i])
        label = fixed or sample_label(task, rng)  # synthesize() draws the label from rng the same way
        lq = apply_label(gt, label, rng)
        samples.append(Sample(name, np.clip(lq, 0, 1).astype(np.float32), gt, label))
    if not samples:
        raise ValueError(f"{clean_dir}: no images found")
    return samples


def evaluate(model, samples: list[Sample], conv: Convention = Convention(), task: str | None = None,
             tile: int = 0, overlap: int = 64, device: str = "cpu", progress: bool = True,
             set_task: str | None | list[str | None] = None, denoiser: str = "auto", bf16: bool = False,
             ) -> tuple[list[dict], list[np.ndarray]]:  # fmt: skip
    """Per-image records (route, PSNR/SSIM of every method and of every path node) and routed outputs.

    `task` routes in instruction mode; `set_task` (the set's degradation, or one per sample) and `denoiser`
    pick the classical row; `bf16` runs the experts under bf16 autocast (routing stays fp32)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from unirestorer import classical

    records, outputs = [], []
    tasks = set_task if isinstance(set_task, list) else [set_task] * len(samples)
    if len(tasks) != len(samples):
        raise ValueError(f"set_task: {len(tasks)} tasks for {len(samples)} samples")
    # the classical floors on the other cores while the experts run here: BM3D, OpenCV and PyTorch release the GIL
    pool = ThreadPoolExecutor(classical.WORKERS)
    floors = [pool.submit(classical.restore, s.lq, t, s.sigma, denoiser) for s, t in zip(samples, tasks)]
    try:
        for s, floor in zip(tqdm(samples, desc="eval", unit="img", disable=not progress), floors):
            record, output = score_sample(model, s, task, tile, overlap, device, bf16, floor.result(), conv)
            records.append(record)
            outputs.append(output)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return records, outputs


def score_sample(model, s: Sample, task: str | None, tile: int, overlap: int, device: str, bf16: bool,
                 floor: np.ndarray | None, conv: Convention) -> tuple[dict, np.ndarray]:
    """One image's record and routed output."""
    import torch

    from unirestorer.restore import route_image, run_expert

    x = torch.from_numpy(s.lq).permute(2, 0, 1)[None].to(device)
    route = route_image(model, x, task)
    leaf, leaf0 = int(route.leaf[0]), model.tree.level_starts[-1]
    path = [int(n) for n in model.router.leaf_paths[leaf]]
    outs = {n: run_expert(model, n, x, tile, overlap, bf16=bf16)[0].permute(1, 2, 0).cpu().numpy() for n in path}
    if bad := [n for n, o in outs.items() if not np.isfinite(o).all()]:
        raise ValueError(f"{s.name}: the output of expert {bad[0]} holds NaN/Inf values; refusing to score it")
    score = {n: (psnr(o, s.gt, conv), ssim(o, s.gt, conv)) for n, o in outs.items()}
    node = int(route.node[0])
    best = max(path, key=lambda n: score[n][0])
    scores = {"input": (psnr(s.lq, s.gt, conv), ssim(s.lq, s.gt, conv)),
              "classical": (None, None) if floor is None else (psnr(floor, s.gt, conv), ssim(floor, s.gt, conv)),
              "root": score[path[0]], "leaf": score[leaf0 + leaf], "routed": score[node], "oracle": score[best]}
    router_level = route.level if route.router_level is None else route.router_level  # before the support check
    return {"name": s.name, "level": int(route.level[0]), "router_level": int(router_level[0]), "node": node,
            "leaf": leaf0 + leaf, "oracle_node": best, "path": path, "path_psnr": [score[n][0] for n in path],
            **{f"{m}_{k}": v[j] for m, v in scores.items() for j, k in enumerate(("psnr", "ssim"))}}, outs[node]


def summarise(records: list[dict]) -> dict[str, dict[str, float | None]]:
    """Mean PSNR/SSIM per method; None for a method with no value (no classical method for the task)."""
    def avg(values: list) -> float | None:
        return None if any(v is None for v in values) else mean(values)

    return {m: {k: avg([r[f"{m}_{k}"] for r in records]) for k in ("psnr", "ssim")} for m in METHODS}


def cell(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(title: str, conv: Convention, records: list[dict], n_levels: int, set_task: str | None = None,
             denoiser: str = "auto") -> str:  # fmt: skip
    from unirestorer.classical import method_name

    summary = summarise(records)
    floor = method_name(set_task, denoiser)
    lines = [f"### {title}", "", f"Convention: {conv.describe()}. {len(records)} images. Classical row: "
             f"{floor or 'none for this task'}.", "",
             "| method | PSNR (dB) | SSIM | ΔPSNR vs input |", "|---|---|---|---|"]
    for m in METHODS:
        p, q = summary[m]["psnr"], summary[m]["ssim"]
        gain = "—" if p is None else f"{p - summary['input']['psnr']:+.2f}"
        lines.append(f"| {m if m != 'classical' or not floor else f'classical ({floor})'} | {cell(p)} | "
                     f"{cell(q, 4)} | {gain} |")
    levels = np.bincount([r["level"] for r in records], minlength=n_levels)
    lines += ["", "Routed level counts (0 = root): " + ", ".join(f"level {l}: {c}" for l, c in enumerate(levels))]
    return "\n".join(lines) + "\n"


def summary_row(name: str, conv: Convention, records: list[dict]) -> str:
    s = summarise(records)
    cells = " | ".join(f"{cell(s[m]['psnr'])} / {cell(s[m]['ssim'], 4)}" for m in METHODS)
    return f"| {name} | {'Y' if conv.y_channel else 'RGB'}{', uint8' if conv.uint8 else ''} | {len(records)} | {cells} |"


SUMMARY_HEADER = ("| set | metric on | n | " + " | ".join(f"{m} PSNR / SSIM" for m in METHODS) + " |\n"
                  + "|---" * (3 + len(METHODS)) + "|\n")


def write_csv(path: Path, records: list[dict]) -> None:
    keys = [k for k in records[0] if k not in ("path", "path_psnr")]
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(keys + ["path"])
    for r in records:
        w.writerow([r[k] for k in keys] + [" ".join(map(str, r["path"]))])
    atomic_write(path, f.getvalue())


def _finite(x):
    """JSON has no inf/nan: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def write_grid(path: Path, samples: list[Sample], records: list[dict], outputs: list[np.ndarray],
               k: int = 3, height: int = 128) -> None:  # fmt: skip
    """PNG: the k worst then the k best images by routed PSNR, as input | routed | ground truth."""
    order = np.argsort([r["routed_psnr"] for r in records], kind="stable")
    picks = list(order[:k]) + [i for i in order[-k:] if i not in order[:k]]
    rows = [[(samples[i].lq, f"input {records[i]['input_psnr']:.2f}"),
             (outputs[i], f"routed {records[i]['routed_psnr']:.2f}"), (samples[i].gt, f"{samples[i].name} GT")]
            for i in picks]
    atomic_write(path, grid_png(rows, height))


def grid_png(rows: list[list[tuple[np.ndarray, str]]], height: int = 128) -> bytes:
    """PNG bytes of labelled images (HxWx3 float in [0, 1]), each scaled to `height`, one list per row."""
    import cv2

    from unirestorer.data_shards.imageio import to_uint8

    lines = []
    for row in rows:
        cells = []
        for img, text in row:
            h, w = img.shape[:2]
            cell = cv2.resize(to_uint8(img), (max(1, round(w * height / h)), height), interpolation=cv2.INTER_AREA)
            cv2.putText(cell, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
            cells.append(cell)
        lines.append(np.hstack(cells))
    width = max(r.shape[1] for r in lines)
    grid = np.vstack([np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in lines])
    ok, png = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError("OpenCV could not encode the grid")
    return png.tobytes()


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from unirestorer.arguments import COUNT, NON_NEGATIVE

    p = subparsers.add_parser("eval", help="PSNR/SSIM of the model and its baselines on a test set")
    p.add_argument("--weights", required=True, metavar="BUNDLE")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", nargs=2, type=Path, metavar=("LQ_DIR", "GT_DIR"), help="paired set, matched by name")
    src.add_argument("--clean", type=Path, metavar="DIR", help="clean images, degraded by --synth")
    src.add_argument("--preset", nargs=2, metavar=("NAME", "ROOT"),
                     help="standard test sets under ROOT, e.g. promptir-3task (see unirestorer/eval_presets.py)")
    p.add_argument("--synth", metavar="SPEC", help="with --clean: noise:SIGMA, jpeg:QUALITY, blur:SIGMA, a task, or a fixed mixture such as haze+blur")
    p.add_argument("--task", help="task label of this set (default: the --synth family)")
    p.add_argument("--instruct", action="store_true", help="route in instruction mode for --task")
    p.add_argument("--classical", choices=("auto", "bm3d", "nlmeans"), default="auto",
                   help="denoiser of the classical row on noise sets (default auto: BM3D where installed)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the synthetic degradation (default 0)")
    p.add_argument("--y-channel", action="store_true", help="metrics on BT.601 Y (BasicSR, e.g. rain)")
    p.add_argument("--uint8", action="store_true", help="round outputs and targets to uint8 first")
    p.add_argument("--border", type=NON_NEGATIVE, default=0, help="pixels cropped from each side before the metrics")
    p.add_argument("--multiple", type=COUNT, default=16, help="centre crop inputs to this multiple (default 16)")
    p.add_argument("--tile", type=NON_NEGATIVE, default=0, help="tiled inference tile size (default 0: whole image)")
    p.add_argument("--overlap", type=NON_NEGATIVE, default=64)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--bf16", action="store_true", help="experts under bf16 autocast (routing stays fp32)")
    p.add_argument("--limit", type=COUNT, default=None, help="first N images only")
    p.add_argument("--name", help="name of this run in titles and the summary (default: --synth, else --task); "
                                  "also the folder under runs/eval/, so a plain name (no '/', '..')")
    p.add_argument("--out", type=Path, help="output folder (default runs/eval/NAME)")
    p.add_argument("--json", action="store_true", help="also write results.json")
    p.add_argument("--summary", type=Path, metavar="FILE", help="append one row to this markdown table")
    p.add_argument("--grid", type=NON_NEGATIVE, default=3, metavar="K", help="worst and best K images in grid.png")
    p.set_defaults(func=run)
    return p


def pick_device(args: argparse.Namespace):
    """--device as a torch.device (default cuda when available); None, with the error printed, when absent."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return None
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def run(args: argparse.Namespace) -> int:
    """`eval` on pairs or synthetic degradations (`--preset` runs eval_presets.run instead: cli wires it)."""
    from unirestorer.classical import pick_denoiser
    from unirestorer.restore import check_tiling, load_model

    device = pick_device(args)
    if device is None:
        return 2
    conv = Convention(args.y_channel, args.uint8, args.border, args.multiple)
    try:
        if args.summary is not None:
            check_writable(args.summary, "--summary", folder=False)
        if args.out is not None:
            check_writable(args.out, "--out")
        if args.clean is not None:
            if not args.synth:
                raise ValueError("--clean needs --synth (e.g. noise:25)")
            samples = load_synthetic(args.clean, args.synth, args.seed, args.multiple, args.limit)
            task = args.task or synth_label(args.synth)[0]
        else:
            if not args.task:
                raise ValueError("--pairs needs --task (the task label of the set)")
            samples, task = load_pairs(*args.pairs, args.multiple, args.limit), args.task
        model = load_model(args.weights, device)
        if (args.instruct or args.task) and task not in model.router.task_names:
            raise ValueError(f"--task {task!r} unknown; this model knows {model.router.task_names}")
        check_tiling(model, args.tile, args.overlap)
        pick_denoiser(args.classical)
        name = args.name or args.synth or task
        out = ensure_dir(args.out or child("runs/eval", name.replace(" ", "_").replace(":", ""), "--name"))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    source = f"{args.clean} + {args.synth} (seed {args.seed})" if args.clean else f"{args.pairs[0]} vs {args.pairs[1]}"
    try:
        records, outputs = evaluate(model, samples, conv, task if args.instruct else None, args.tile, args.overlap,
                                    device, set_task=task, denoiser=args.classical, bf16=args.bf16)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = markdown(f"{name}: {source}{' (instruction mode)' if args.instruct else ''}{' (experts in bf16)' if args.bf16 else ''}", conv, records,
                     model.tree.n_levels, task, args.classical)
    print(table)
    atomic_write(out / "results.md", table)
    write_csv(out / "results.csv", records)
    if args.json:
        doc = {"name": name, "source": source, "convention": conv.describe(), "bf16": args.bf16, "summary": summarise(records),
               "images": records}
        atomic_write(out / "results.json", json.dumps(_finite(doc), indent=1))
    if args.grid > 0:
        write_grid(out / "grid.png", samples, records, outputs, args.grid)
    if args.summary:
        old = args.summary.read_text() if args.summary.exists() else ""
        atomic_write(args.summary, old + (SUMMARY_HEADER if not old else "") + summary_row(name, conv, records) + "\n")
    print(f"wrote {out}")
    return 0
