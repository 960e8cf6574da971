"""Does routing to an expert of the right granularity beat one degradation-agnostic network, at equal
inference cost, and what does it cost to train? `python bench/quality.py [--budget-minutes M] [--json]`

One protocol, the same shards for every model, everything in one run (bench/quality_runs.py has the
training runs). `--seed S` (default 0) draws other training crops and degradations and seeds every stage
(initialisation, sampling, the tree's k-means); the test sets stay the same, so two seeds measure the spread
of the training alone. Training: BSDS500 photos (../shared/data/train/BSDS_clean) with synthetic noise, blur,
rain, haze, low light and the mixtures in TRAIN_MIXTURES, re-degraded online, clean photos (the main job's
ALWAYS_TRAINED: the root and a clean node learn to leave images alone), plus LOL's 80 real training pairs as
low-light pairs. Testing (nothing of it trained on): CBSD68 at σ 15/25/50, Rain100L (real pairs,
another rain generator: a shift), LOL eval15 (real), Kodak24 with synthetic blur, haze, a mixture seen in
training and one never mixed in training. Rows: the tree (routed, root-only, leaf-only, oracle), dense
experts of equal inference cost and of equal training compute, the LoRA tree, the input and the
classical floor (BM3D for noise, dark channel prior for haze). Every bundle is calibrated after export, as the
demo's is (`unirestorer calibrate`, model/calibration.py), so "routed" is what `restore` gives.

`--budget-minutes M` scales every training stage's steps by (M - 14) / 24: the default plan (M = 38) took
37.9 and 37.1 min (seeds 0, 1) on 2 idle CPU cores, of which about 14 min data, start-up and evaluation,
which do not scale (BENCHMARKS.md "Quality benchmark"). `--experts SECTION.KEY=VALUE` changes every
experts-stage run alike (tree, dense, LoRA). `--quick` is the test suite's smoke run (numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_report import MIXED, goals, markdown, row_values  # noqa: E402
from quality_runs import BUNDLE_OF, EXPERTS_RUN, MODELS, plan, worker  # noqa: E402

TRAIN_TASKS = ("noise", "blur", "rain", "haze", "lowlight")
TRAIN_MIXTURES = ("blur+noise", "haze+rain", "lowlight+blur+noise")
SEEN_MIX, UNSEEN_MIX = "blur+noise", "haze+blur"  # haze was mixed only with rain in training, blur never with haze
REFERENCE_MINUTES, FIXED_MINUTES = 38.0, 14.0  # the default plan's wall time (37.9 min measured), its unscaled part
MARKER = ".unirestorer-quality"


@dataclasses.dataclass(frozen=True)
class TestSet:
    name: str
    group: str  # "single" or MIXED
    task: str | None  # the set's degradation, for the classical row (None: no classical method)
    limit: int  # images (the first ones, sorted by name)


def test_sets(quick: bool) -> list[TestSet]:
    n = (lambda k: 1) if quick else (lambda k: k)
    sets = [TestSet(f"CBSD68 σ{s}", "single", "noise", n(12)) for s in (15, 25, 50)]
    sets += [TestSet("Rain100L", MIXED, "rain", n(24)), TestSet("LOL", "single", "lowlight", n(15)),
             TestSet("Kodak24 blur", "single", "blur", n(12)), TestSet("Kodak24 haze", "single", "haze", n(12)),
             TestSet(f"Kodak24 {SEEN_MIX}", MIXED, None, n(12)),
             TestSet(f"Kodak24 {UNSEEN_MIX} (unseen)", MIXED, None, n(12))]
    return sets


def load_test_set(ts: TestSet, data: Path, crop: int | None) -> list:
    """Samples under the PromptIR convention (eval_presets), Kodak24 degraded with seed 0 after the crop."""
    from unirestorer import eval_presets as ep
    from unirestorer.evaluate import Sample, load_synthetic

    test = data / "test"
    if ts.name.startswith("CBSD68"):
        sigma = float(ts.name.split("σ")[1])
        samples = ep.load_set(ep.BenchmarkSet(ts.name, "noise", ep.CBSD68, sigma), test / "CBSD68", "", "",
                              "promptir", 0, ts.limit)
    elif ts.name == "Rain100L":
        samples = ep.load_set(ep.RAIN, test / "Rain100L", "input", "target", "promptir", 0, ts.limit)
    elif ts.name == "LOL":
        samples = ep.load_set(ep.LOL, test / "LOL", "low", "high", "promptir", 0, ts.limit)
    else:
        spec = ts.name.split()[1]
        samples = load_synthetic(test / "Kodak24", spec, seed=0, multiple=16, limit=ts.limit)
    if crop:  # --quick: small centre crops, so the smoke run stays seconds
        def centre(img: np.ndarray) -> np.ndarray:
            y, x = (img.shape[0] - crop) // 2, (img.shape[1] - crop) // 2
            return np.ascontiguousarray(img[y:y + crop, x:x + crop])
        samples = [Sample(s.name, centre(s.lq), centre(s.gt), s.label) for s in samples]
    return samples


# ---- data -------------------------------------------------------------------------------------
def write_data(data: Path, out: Path, sizes, quick: bool, seed: int) -> tuple[list[str], list[str]]:
    """Training shard sets (one per task and mixture, plus LOL's real pairs) and validation shards."""
    from unirestorer.data_shards.writer import list_images, write_paired
    from unirestorer.demo_data import ALWAYS_TRAINED, shard_pattern, write_shards

    photos = list_images(data / "train" / "BSDS_clean")
    folders = {"val": photos[:sizes.val_photos], "train": photos[sizes.val_photos:][:sizes.train_photos]}
    for split, chosen in folders.items():
        (out / "photos" / split).mkdir(parents=True, exist_ok=True)
        for i, photo in enumerate(chosen):
            shutil.copyfile(photo, out / "photos" / split / f"{i:04d}{photo.suffix.lower()}")
    tasks = TRAIN_TASKS + TRAIN_MIXTURES + ALWAYS_TRAINED
    # write_shards seeds task i with seed + i: training 100·S + i, validation 1000 + 100·S + i (< 100 tasks)
    train = write_shards(out / "photos" / "train", out / "shards" / "train", tasks, sizes, sizes.per_image,
                         seed=100 * seed)
    val = write_shards(out / "photos" / "val", out / "shards" / "val", tasks, sizes, 1, seed=1000 + 100 * seed)
    lol = data / "train" / "LOL"
    m = write_paired(lol / "low", lol / "high", "lowlight", out / "shards" / "train" / "lol_real",
                     per_image=1 if quick else 2 * sizes.per_image, patch=sizes.stored, seed=seed,
                     shard_size=sizes.shard_size, workers=1, force=True)
    train.append(shard_pattern(out / "shards" / "train" / "lol_real", len(m["shards"])))
    return train, val


# ---- training ---------------------------------------------------------------------------------
def train_all(runs: list[tuple[str, str, dict]], out: Path, gpus: int) -> dict[str, dict]:
    """Every run in one 2-rank process group (CPU ranks unless --gpus); {run: {seconds, code}}."""
    import os

    import torch.multiprocessing as mp

    from unirestorer.demo_stages import launcher_env
    from unirestorer.launch.ports import free_port

    os.environ.update({k: v for k, v in launcher_env(gpus).items() if k in ("DS_ACCELERATOR", "OMP_NUM_THREADS")})
    report, port = out / "runs.json", free_port()
    mp.start_processes(worker, args=(gpus or 2, port, runs, str(report)), nprocs=gpus or 2, start_method="spawn")
    done = json.loads(report.read_text()) if report.exists() else {}
    failed = [n for n, r in done.items() if r["code"]] + [n for n, *_ in runs if n not in done][:1]
    if failed:
        code = done.get(failed[0], {}).get("code")
        raise RuntimeError(f"run {failed[0]} failed or did not finish (exit code {code}); its output is above, its "
                           f"logs in {out / 'tensorboard' / failed[0]}")
    return done


def images_seen(ckpt: Path) -> int:
    """Expert image-passes of an experts-stage run, as the checkpoint counted them (all ranks, all nodes)."""
    from unirestorer.train.weights import read_checkpoint

    return int(read_checkpoint(ckpt, experts=False).client_state["stage_state"]["images_seen"].sum())


def bundle_size(bundle: Path) -> tuple[int, int]:
    """(bytes of weights.safetensors, expert parameters stored in it)."""
    from safetensors import safe_open

    from unirestorer.model.unirestorer import WEIGHTS, bundle_bytes

    with safe_open(str(bundle / WEIGHTS), "pt") as f:
        params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys() if k.startswith("experts."))
    return bundle_bytes(bundle), params


# ---- evaluation -------------------------------------------------------------------------------
def evaluate_models(bundles: dict[str, Path], sets: list[TestSet], data: Path, out: Path, crop: int | None,
                    denoiser: str) -> dict[str, dict[str, dict]]:
    """{set: {row: {psnr, ssim}}} for every table row; side-by-side grids in out/eval/."""
    import torch
    from tqdm import tqdm

    from unirestorer.evaluate import evaluate, summarise
    from unirestorer.metrics import Convention
    from unirestorer.model.unirestorer import UniRestorer

    torch.set_num_threads(2)
    models = {name: UniRestorer.load_bundle(path).eval() for name, path in bundles.items()}
    results: dict[str, dict[str, dict]] = {}
    for ts in tqdm(sets, desc="evaluate", unit="set"):
        samples = load_test_set(ts, data, crop)
        rows, shown = {}, {}
        for name, model in models.items():
            # the classical row once, with the tree: the other models' evaluations skip it (set_task None)
            recs, outs = evaluate(model, samples, Convention(), progress=False,
                                  set_task=ts.task if name == "tree" else None, denoiser=denoiser)
            s = summarise(recs)
            for row, method in row_values(name):
                rows[row] = s[method]
            shown[name] = outs[:2]
        results[ts.name] = rows
        write_side_by_side(out / "eval" / f"{slug(ts.name)}.png", samples[:2], shown)
    return results


def slug(name: str) -> str:
    """A test set's name as a plain file name: 'Kodak24 haze+blur (unseen)' -> 'Kodak24_haze_blur_unseen'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name.replace("σ", "sigma")).strip("_")


def write_side_by_side(path: Path, samples: list, shown: dict[str, list]) -> None:
    """input | each model's output | ground truth, one row per image, labelled."""
    from unirestorer.evaluate import grid_png

    rows = [[(s.lq, "input"), *((v[i], k) for k, v in shown.items()), (s.gt, "GT")] for i, s in enumerate(samples)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(grid_png(rows, height=160))


# ---- the benchmark ----------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, str, object]:
    """'train.loss=psnr' -> ('train', 'loss', 'psnr'); the stage's config refuses unknown keys when it starts."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.partition(".")
    if not sep or not dot or not section or not key:
        raise ValueError(f"--experts {text!r}: expected SECTION.KEY=VALUE, e.g. train.loss=psnr")
    try:
        return section, key, json.loads(raw)
    except json.JSONDecodeError:
        return section, key, raw


def prepare_out(out: Path) -> None:
    if out.exists() and not (out / MARKER).exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out}: exists and is not an earlier quality run's folder; choose another")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / MARKER).touch()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-minutes", type=float, default=REFERENCE_MINUTES, metavar="M",
                   help=f"wall-time budget; scales every stage's steps (default {REFERENCE_MINUTES:g})")
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps, tiny sizes (numbers mean nothing)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the markdown table")
    p.add_argument("--out", type=Path, default=Path("runs/quality"), help="output folder (default runs/quality)")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data",
                   help="the shared data folder (train/BSDS_clean, train/LOL, test/...)")
    p.add_argument("--gpus", type=int, default=0, help="train on N GPUs (default: 2 CPU ranks)")
    p.add_argument("--seed", type=int, default=0, help="training data and stage seed (default 0); test sets fixed")
    p.add_argument("--experts", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key of every experts-stage run (tree, dense, LoRA), e.g. train.loss=psnr; "
                        "repeatable; VALUE is JSON where it parses, else a string")
    args = p.parse_args(argv)
    from unirestorer.demo_data import FULL, QUICK
    from unirestorer.demo_stages import stage_configs

    try:
        if args.budget_minutes <= FIXED_MINUTES and not args.quick:
            raise ValueError(f"--budget-minutes {args.budget_minutes:g}: the data and the evaluation alone take about "
                             f"{FIXED_MINUTES:g} min; give more")
        missing = [d for d in ("train/BSDS_clean", "train/LOL", "test/CBSD68", "test/Kodak24", "test/Rain100L",
                               "test/LOL") if not (args.data / d).is_dir()]
        if missing:
            raise ValueError(f"--data {args.data}: missing {', '.join(missing)}")
        overrides = [parse_override(o) for o in args.experts]
        out = args.out.resolve()
        prepare_out(out)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.monotonic()
    sizes = QUICK if args.quick else FULL
    scale = 1.0 if args.quick else (args.budget_minutes - FIXED_MINUTES) / (REFERENCE_MINUTES - FIXED_MINUTES)
    train, val = write_data(args.data, out, sizes, args.quick, args.seed)
    base = stage_configs(out, train, val, sizes, scale)
    runs = plan(base, out / "checkpoints", args.seed)
    for _, stage, cfg in runs:
        for section, key, value in overrides if stage == "experts" else ():
            cfg.setdefault(section, {})[key] = value
    seconds = train_all(runs, out, args.gpus)

    from unirestorer.train.calibrate import calibrate
    from unirestorer.train.export import export

    bundles = {}
    for model, run in BUNDLE_OF.items():
        export(out / "checkpoints" / run, out / "bundles" / model)
        calibrate(out / "bundles" / model, samples=sizes.cluster_samples)  # as the demo does: restore's fallback
        bundles[model] = out / "bundles" / model
    sets = test_sets(args.quick)
    denoiser = "nlmeans" if args.quick else "auto"
    results = evaluate_models(bundles, sets, args.data, out, 64 if args.quick else None, denoiser)
    costs = {}
    for model, run_names in MODELS.items():
        size, params = bundle_size(bundles[model])
        costs[model] = {"image_passes": images_seen(out / "checkpoints" / EXPERTS_RUN[model]),
                        "train_seconds": round(sum(seconds[r]["seconds"] for r in run_names), 1),
                        "bundle_bytes": size, "expert_params": params}
    doc = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python bench/quality.py", *(argv or sys.argv[1:])]),
           "steps": {r: c["train"].get("max_steps") for r, _, c in runs}, "runs": seconds,
           "experts_overrides": args.experts, "seed": args.seed,
           "sets": {ts.name: {"group": ts.group, "n": ts.limit} for ts in sets}, "results": results, "costs": costs,
           "classical": "NL-means" if args.quick else "BM3D (σ known) for noise, dark channel prior for haze",
           "seconds": round(time.monotonic() - start, 1)}
    doc["goals"] = goals(doc)
    (out / "quality.json").write_text(json.dumps(doc, indent=1))
    table = markdown(doc)
    (out / "quality.md").write_text(table + "\n")
    print(json.dumps(doc, indent=1) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
