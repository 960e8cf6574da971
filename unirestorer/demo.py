"""`unirestorer demo`: the whole pipeline, end to end, on clean photos with synthetic degradations.

    clean photos ──▶ train shards (one set per task) + validation shards (other photos)
                     + held-out degraded crops of two photos scikit-image ships (in no training set)
      ──deepspeed, 2 CPU ranks (or --gpus N)──▶ extractor ▶ cluster ▶ experts ▶ router
      ──export──▶ bundle ──restore──▶ restored held-out images ──eval──▶ table per task

Photos: `--photos DIR`, else the BSDS500 images in ../shared/data/train/BSDS_clean when that folder is
beside the repository (353 natural photos, none in any test set; 12 are held out for the table, 20 make
the validation shards, the rest trains), else the five colour photos scikit-image ships (enough to run
everything, too few to learn to recognise degradations on new photos; two other bundled photos are then
held out). The default tasks are noise, blur, rain, haze and low light (`--tasks all` for all eight).

What it trains, and why (BENCHMARKS.md "Demo model" has the numbers): every training stream re-degrades
its clean crops online with fresh parameters of the crop's task, so nothing can memorise a few
thousand patches; the tree is sized from the data, one level-1 node per task and two leaves per
level-1 node; the experts train level by level, the root alone first, then each level from its
trained parent; the router learns which level restores best from the frozen experts' measured errors.

Nothing is downloaded. Every stage runs through the real `deepspeed` launcher with the config the demo
writes to OUT/configs/STAGE.toml, so any stage can be rerun by hand the same way
(`launch/cpu_ranks.sh 2 experts --config OUT/configs/experts.toml`). Each stage's output goes to the
terminal and to OUT/logs/STAGE.log; a failing stage stops the demo with its exit code and log path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEMO_TASKS = ("noise", "blur", "rain", "haze", "lowlight")
SHARED_PHOTOS = Path("..") / "shared" / "data" / "train" / "BSDS_clean"  # beside the repository
# scikit-image's colour photos (no download): the fallback training set, and the held-out photos
FALLBACK_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
HELDOUT_PHOTOS = ("chelsea", "stereo_motorcycle")
STAGES = ("extractor", "cluster", "experts", "router")


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the demo's cost; `FULL` for `unirestorer demo`, `QUICK` for smoke tests."""

    train_photos: int  # at most this many training photos
    val_photos: int  # photos (not trained on) for the validation shards
    test_photos: int  # photos held out for the final table (from a photo folder)
    per_image: int  # stored clean crops per training photo and task
    stored: int  # stored crop size; training streams take random `patch` crops of it
    patch: int  # training crop size (also the extractor's crop)
    eval_crop: int  # held-out crop size
    eval_per_photo: int  # held-out crops per held-out photo
    shard_size: int
    cluster_samples: int  # training samples embedded to build the tree
    micro_batch: dict[str, int]  # per rank, per stage
    steps: dict[str, int]  # max_steps per trained stage
    lr: dict[str, float]  # peak LR per trained stage
    log_every: int


FULL = Sizes(train_photos=300, val_photos=20, test_photos=12, per_image=4, stored=128, patch=64, eval_crop=128,
             eval_per_photo=2,
             shard_size=256, cluster_samples=1500,
             micro_batch={"extractor": 16, "cluster": 32, "experts": 8, "router": 8},
             steps={"extractor": 2000, "experts": 900, "router": 300},
             lr={"extractor": 3e-3, "experts": 1e-3, "router": 2e-3}, log_every=50)  # fmt: skip
QUICK = Sizes(train_photos=5, val_photos=1, test_photos=2, per_image=2, stored=64, patch=64, eval_crop=64,
              eval_per_photo=1,
              shard_size=64, cluster_samples=80,
              micro_batch={"extractor": 4, "cluster": 4, "experts": 4, "router": 4},
              steps={"extractor": 3, "experts": 3, "router": 3},
              lr={"extractor": 3e-3, "experts": 1e-3, "router": 1e-3}, log_every=1)  # fmt: skip


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
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, a few steps (numbers mean nothing)")
    p.set_defaults(func=run)


# ---- data -------------------------------------------------------------------------------------
def save_photos(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Write the bundled photos `names` as PNGs (RGB, uint8) into `folder`."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        path = folder / f"{name}.png"
        Image.fromarray(img[..., :3]).save(path)
        paths.append(path)
    return paths


def demo_photos(source: Path | None, out: Path, sizes: Sizes) -> tuple[Path, Path, list[Path], str]:
    """Training and validation photos copied into out/photos/{train,val}, the held-out photos, and a description.

    From a folder of photos (`--photos`, else ../shared's BSDS500 images), the first `test_photos` are
    held out for the final table, the next `val_photos` make the validation shards and the rest (at most
    `train_photos`) the training shards. Without such a folder: scikit-image's five bundled photos train
    (validation on other crops of them) and its chelsea and stereo_motorcycle are held out.
    """
    from unirestorer.data_shards.writer import list_images

    train, val = out / "photos" / "train", out / "photos" / "val"
    source = source or next((p for p in (Path.cwd() / SHARED_PHOTOS, Path(__file__).resolve().parents[1] / SHARED_PHOTOS)
                             if p.is_dir()), None)  # fmt: skip
    if source is None:
        bundled = save_photos(train, FALLBACK_PHOTOS)
        shutil.copytree(train, val)
        heldout = save_photos(out / "photos" / "heldout", HELDOUT_PHOTOS)
        return train, val, heldout, (f"scikit-image's {len(bundled)} bundled photos (no {SHARED_PHOTOS} beside the "
                                     f"repository: expect weak recognition on new photos); held out: "
                                     f"{', '.join(HELDOUT_PHOTOS)}")
    photos = list_images(source)
    if len(photos) < 3:
        raise ValueError(f"--photos {source}: needs at least 3 images (held-out, validation, training), found "
                         f"{len(photos)}")
    n_test = min(sizes.test_photos, len(photos) // 3)
    n_val = min(sizes.val_photos, len(photos) // 3)
    heldout = photos[:n_test]
    for folder, chosen in ((val, photos[n_test:n_test + n_val]), (train, photos[n_test + n_val:][:sizes.train_photos])):
        folder.mkdir(parents=True, exist_ok=True)
        for i, photo in enumerate(chosen):
            shutil.copyfile(photo, folder / f"{i:04d}{photo.suffix.lower()}")
    n_train = len(list(train.iterdir()))
    return train, val, heldout, (f"{source.resolve()}: {n_test} held out, {n_val} for validation, {n_train} for "
                                 f"training")


def save_crops(photos: list[Path], folder: Path, size: int, per_photo: int) -> list[Path]:
    """Non-overlapping `size` crops spread over each photo's grid: the held-out clean images."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for photo in photos:
        img = np.asarray(Image.open(photo).convert("RGB"))
        cells = [(y, x) for y in range(img.shape[0] // size) for x in range(img.shape[1] // size)]
        k = min(per_photo, len(cells))
        for y, x in (cells[int((i + 0.5) * len(cells) / k)] for i in range(k)):  # k distinct, evenly spread
            path = folder / f"{photo.stem}_{y}_{x}.png"
            Image.fromarray(img[y * size : (y + 1) * size, x * size : (x + 1) * size]).save(path)
            paths.append(path)
    return paths


def degrade_heldout(clean: Path, out: Path, tasks: tuple[str, ...], seed: int = 0) -> dict[str, list]:
    """Per task, the clean crops degraded with a fixed seed, saved as 8-bit PNGs in out/TASK/; returns the
    evaluation samples (LQ exactly as saved, with their labels)."""
    import numpy as np

    from unirestorer.data_shards.imageio import encode_png, to_uint8
    from unirestorer.evaluate import load_synthetic

    samples = {}
    for task in tasks:
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        samples[task] = load_synthetic(clean, task, seed, multiple=16)
        for s in samples[task]:
            (folder / f"{s.name}.png").write_bytes(encode_png(s.lq))
            s.lq = to_uint8(s.lq).astype(np.float32) / 255  # what restore reads back from the PNG
    return samples


# ---- stages -----------------------------------------------------------------------------------
def write_shards(photos: Path, out: Path, tasks: tuple[str, ...], sizes: Sizes, per_image: int, seed: int
                 ) -> list[str]:  # fmt: skip
    """One shard set per task (so the stages can mix tasks evenly); returns their patterns."""
    from unirestorer.data_shards.writer import write_synthetic

    patterns = []
    for i, task in enumerate(tasks):  # seed + i: each task's crops come from other places of the photos
        m = write_synthetic(photos, out / task, (task,), per_image=per_image, patch=sizes.stored, seed=seed + i,
                            shard_size=sizes.shard_size, workers=1, force=True)  # fmt: skip
        n = len(m["shards"])
        patterns.append(shard_pattern(out / task, n))
    return patterns


def shard_pattern(folder: Path, n: int) -> str:
    """The brace pattern of the n shards `shards write` made in folder."""
    return str(folder / (f"shard-{{000000..{n - 1:06d}}}.tar" if n > 1 else "shard-000000.tar"))


def stage_configs(out: Path, shards: list[str], val: list[str], sizes: Sizes, scale: float) -> dict[str, dict]:
    """The demo's config of every stage, as nested {section: {key: value}} (train/config.py schema)."""
    ck = out / "checkpoints"
    steps = {k: max(1, round(v * scale)) for k, v in sizes.steps.items()}
    data = {"train_shards": shards, "val_shards": val, "patch_size": sizes.patch, "num_workers": 1,
            "shuffle_buffer": 200, "online": True}
    model = {"arch": "nafnet", "preset": "tiny", "extractor_backbone": "test_resnet", "embed_dim": 64,
             "extractor_proj_dim": 32, "extractor_crop": sizes.patch}
    tree = {"path": str(ck / "tree"), "num_samples": sizes.cluster_samples}
    log = {"dir": str(out / "tensorboard"), "every": sizes.log_every, "val_batches": 4}
    common = {"data": data, "model": model, "tree": tree}

    def stage(name: str, init: str | None) -> dict:
        train = {"lr": sizes.lr[name], "max_steps": steps[name]} if name in steps else {}
        ckpt = {"dir": str(ck / name)} | ({"every": steps[name]} if name in steps else {})
        val_every = {"val_every": steps[name]} if name in steps else {}
        return {**common, "train": train | ({"init_ckpt": str(ck / init)} if init else {}), "ckpt": ckpt,
                "log": log | val_every, "deepspeed": {"micro_batch": sizes.micro_batch[name]}}

    configs = {"extractor": stage("extractor", None), "cluster": stage("cluster", "extractor"),
               "experts": stage("experts", "extractor"), "router": stage("router", "experts")}
    configs["extractor"]["train"]["warmup_steps"] = min(100, steps["extractor"] // 10)
    # the experts: the root alone for the first third, then each level from its parent, one level at a time; the
    # PSNR loss (mean over images of 10·log10 MSE) weighs a 1 dB gain the same on a mild blur as on a dark image,
    # where L1 is ruled by the dark and hazy images (bench/quality.py: +1.2 dB for the tree, BENCHMARKS.md)
    e = steps["experts"]
    configs["experts"]["train"] |= {"level_start_steps": [0, e // 3, 2 * e // 3], "loss": "psnr",
                                    "level_end_steps": [e // 3, 2 * e // 3, e], "warmup_steps": min(20, e // 10)}
    return configs


def write_toml(path: Path, config: dict[str, dict]) -> None:
    """Flat two-level TOML; JSON scalars and lists of them are valid TOML values."""
    lines = []
    for section, values in config.items():
        lines += [f"[{section}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items()), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(gpus: int) -> dict[str, str]:
    """The environment of a stage: CPU ranks unless --gpus; the venv's `deepspeed` found last on PATH
    (a second `ninja` earlier on PATH would rebuild DeepSpeed's CPU comm op every time)."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = env.get("PATH", "") + os.pathsep + bindir
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("DS_ACCELERATOR", None)
    if not gpus:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def stage_command(stage: str, config: Path, ranks: int, port: int) -> list[str]:
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(ranks), "--master_port", str(port), "--no_local_rank",
            "--module", "unirestorer.train", stage, "--config", str(config), "--resume", "none"]  # fmt: skip


def release_shm(port: int) -> None:
    """DeepSpeed's CPU all-reduce op leaves a 69 MB buffer per rank of a finished run in /dev/shm."""
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        f.unlink(missing_ok=True)


class Terminal:
    """What of a stage's output reaches the terminal: all of it but DeepSpeed's INFO lines and the full
    config JSON after `[config]` (both stay in the log). Progress bars (text redrawn after a carriage
    return) are shown as they come, complete lines once they end."""

    HIDDEN = re.compile(rb"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[INFO\] ")

    def __init__(self, log: Path) -> None:
        self.log, self.pending, self.in_config = log, b"", False

    def feed(self, chunk: bytes) -> None:
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            self.show_line(line)
        if b"\r" in self.pending:  # a progress bar redrawing in place
            sys.stdout.buffer.write(self.pending)
            self.pending = b""
        sys.stdout.flush()

    def show_line(self, line: bytes) -> None:
        text = line.strip(b"\r")
        if self.in_config:
            self.in_config = text != b"}"
        elif text.startswith(b"[config]"):
            self.in_config = True
            sys.stdout.buffer.write(text + f" (full config in {self.log})\n".encode())
        elif not self.HIDDEN.match(text):
            sys.stdout.buffer.write(line + b"\n")


def run_logged(cmd: list[str], env: dict[str, str], log: Path) -> int:
    """Run cmd, its output copied to `log` and streamed to the terminal (through a pty when we have one,
    so progress bars stay live). Returns the exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as f:
        f.write((" ".join(cmd) + "\n").encode())
        if sys.stdout.isatty():
            import pty

            parent, child = pty.openpty()
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=child, stderr=child,
                                    start_new_session=True)  # fmt: skip
            os.close(child)
            source = parent
        else:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            source = proc.stdout.fileno()
        terminal = Terminal(log)
        try:
            while chunk := _read(source):
                f.write(chunk)
                terminal.feed(chunk)
            terminal.feed(b"\n" if terminal.pending else b"")
        except BaseException:  # Ctrl-C or a broken terminal: stop the launcher and every rank it started
            os.killpg(proc.pid, signal.SIGTERM)
            raise
        finally:
            code = proc.wait()
            os.close(source) if proc.stdout is None else proc.stdout.close()
    return code


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # a pty whose writers are all gone raises EIO instead of returning b""
        return b""


# ---- evaluation -------------------------------------------------------------------------------
def evaluate_tasks(bundle: Path, heldout: dict[str, list], out: Path, device: str
                   ) -> tuple[dict[str, list], dict, str]:  # fmt: skip
    """Routed model, baselines and the classical floor per task on the held-out samples (out/results.md, CSVs,
    grids); the extractor's exact-match family accuracy on the single-degradation ones, and their confusion
    (true family -> the family with the highest logit) as text."""
    import torch

    from unirestorer.model.extractor import confusion_text

    from unirestorer.evaluate import evaluate, markdown, write_csv, write_grid
    from unirestorer.metrics import Convention
    from unirestorer.restore import load_model

    model, conv, records, sections = load_model(str(bundle), device), Convention(), {}, []
    out.mkdir(parents=True, exist_ok=True)
    hits: dict[str, list[bool]] = {}
    families = model.extractor.families
    confusion = torch.zeros(len(families), len(families), dtype=torch.long)
    for task, samples in heldout.items():
        recs, outputs = evaluate(model, samples, conv, device=device, progress=False, set_task=task)
        records[task] = recs
        sections.append(markdown(f"{task}: {out.parent / 'heldout' / task}", conv, recs, model.tree.n_levels, task))
        write_csv(out / f"{task}.csv", recs)
        write_grid(out / f"{task}_grid.png", samples, recs, outputs)
        if task in families:
            with torch.no_grad():
                for s in samples:  # the image's family logits: the heads on its (crop-averaged) embedding
                    e = model.extractor.embed(torch.from_numpy(s.lq).permute(2, 0, 1)[None].to(device))
                    logits = model.extractor.family_head(e)[0]
                    hits.setdefault(task, []).append(bool(((logits > 0) == torch.tensor(
                        [f == task for f in families], device=logits.device)).all()))
                    confusion[families.index(task), int(logits.argmax())] += 1
    (out / "results.md").write_text("\n".join(sections))
    per_family = {f: sum(v) / len(v) for f, v in hits.items()}
    every = [h for v in hits.values() for h in v]
    return (records, {"family_accuracy": sum(every) / len(every) if every else None, "per_family": per_family},
            confusion_text(confusion, families))


def summary(records: dict[str, list], extractor: dict, tree_stats: dict, seconds: float) -> dict:
    """summary.json: mean PSNR per task and method, their mean over tasks, extractor accuracy, tree purity."""
    import numpy as np

    from unirestorer.evaluate import METHODS, summarise

    tasks = {}
    for task, recs in records.items():
        s = summarise(recs)
        tasks[task] = {"n": len(recs), **{m: s[m]["psnr"] for m in METHODS}}
    mean = {m: (None if any(t[m] is None for t in tasks.values()) else float(np.mean([t[m] for t in tasks.values()])))
            for m in METHODS}
    return {"tasks": tasks, "mean": mean, "extractor": extractor,
            "tree": {"leaf_purity": tree_stats.get("leaf_purity"), "level1_purity": tree_stats.get("level1_purity")},
            "seconds": round(seconds, 1)}


def summary_table(doc: dict, levels: dict[str, list[int]]) -> str:
    """One row per task (mean PSNR of every method) and their mean, with the routed level counts."""
    from unirestorer.evaluate import METHODS, cell

    head = "| task | n | " + " | ".join(METHODS) + " | images routed to level 0/1/2 |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for task, row in doc["tasks"].items():
        cells = " | ".join(cell(row[m]) for m in METHODS)
        lines.append(f"| {task} | {row['n']} | {cells} | {'/'.join(map(str, levels[task]))} |")
    lines.append(f"| **mean** | {sum(r['n'] for r in doc['tasks'].values())} | "
                 f"{' | '.join(cell(doc['mean'][m]) for m in METHODS)} | |")
    ex, tree = doc["extractor"], doc["tree"]
    acc = "—" if ex["family_accuracy"] is None else f"{ex['family_accuracy']:.3f}"
    lines += ["", f"Extractor exact-match family accuracy on the held-out single-degradation crops: {acc} "
              f"({', '.join(f'{f} {a:.2f}' for f, a in ex['per_family'].items())}). Tree purity: level 1 "
              f"{tree['level1_purity']}, leaves {tree['leaf_purity']}."]
    return "\n".join(lines)


# ---- the demo ---------------------------------------------------------------------------------
class Progress:
    """`[  12.3 s] phase 3/9: ...` lines: where the demo is and how long it has run."""

    def __init__(self, total: int) -> None:
        self.start, self.total, self.n = time.monotonic(), total, 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def phase(self, text: str) -> None:
        self.n += 1
        print(f"\n[{self.elapsed():7.1f} s] phase {self.n}/{self.total}: {text}", flush=True)


OURS = ("photos", "heldout", "shards", "configs", "logs", "checkpoints", "tensorboard", "bundle", "restored", "eval")
MARKER = ".unirestorer-demo"


def prepare_out(out: Path) -> None:
    """A fresh demo folder: an earlier demo's outputs are removed, any other non-empty folder is refused."""
    if out.exists() and not (out / MARKER).exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out}: exists and is not an earlier demo's folder; choose another")
    for name in OURS:
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def train_stages(out: Path, shards: list[str], val: list[str], sizes: Sizes, scale: float, gpus: int,
                 progress: Progress) -> int:  # fmt: skip
    """The four stages through the deepspeed launcher, each on its written config; 0 or the failing code."""
    ranks = gpus or 2
    env = launcher_env(gpus)
    for stage, cfg in stage_configs(out, shards, val, sizes, scale).items():
        path, log = out / "configs" / f"{stage}.toml", out / "logs" / f"{stage}.log"
        write_toml(path, cfg)
        steps = f", {cfg['train']['max_steps']} steps" if "max_steps" in cfg["train"] else ""
        progress.phase(f"stage {stage} on {ranks} {'GPU' if gpus else 'CPU rank'}s{steps} (config {path})")
        port = free_port()
        code = run_logged(stage_command(stage, path, ranks, port), env, log)
        release_shm(port)
        if code:
            print(f"\ndemo stopped: stage {stage} failed with exit code {code}; its log: {log}", file=sys.stderr)
            return code
    progress.phase("export the bundle")
    log = out / "logs" / "export.log"
    cmd = [sys.executable, "-m", "unirestorer.cli", "export", str(out / "checkpoints" / "router"), "--out",
           str(out / "bundle")]  # fmt: skip
    if code := run_logged(cmd, env, log):
        print(f"\ndemo stopped: export failed with exit code {code}; its log: {log}", file=sys.stderr)
    return code


def parse_tasks(text: str) -> tuple[str, ...]:
    from unirestorer.data_shards.degradations import TASKS, task_name

    tasks = TASKS if text == "all" else tuple(t.strip() for t in text.split(",") if t.strip())
    if not tasks:
        raise ValueError(f"--tasks {text!r}: no task given; choose from {', '.join(TASKS)} or 'all'")
    try:
        return tuple(task_name(t) for t in tasks)
    except ValueError as err:
        raise ValueError(f"--tasks {text!r}: {err}") from None


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from unirestorer.cli import main as cli_main

    try:
        if args.gpus < 0 or args.steps_scale <= 0:
            raise ValueError("--gpus must be >= 0 and --steps-scale > 0")
        tasks = parse_tasks(args.tasks)
        if args.photos is not None and not args.photos.is_dir():
            raise ValueError(f"--photos {args.photos}: no such folder")
        sizes, out, device = (QUICK if args.quick else FULL), args.out.resolve(), "cuda" if args.gpus else "cpu"
        prepare_out(out)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    progress = Progress(len(STAGES) + 5)

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
    shards = write_shards(train_dir, out / "shards" / "train", tasks, sizes, sizes.per_image, seed=0)
    val = write_shards(val_dir, out / "shards" / "val", tasks, sizes, 1, seed=1000)
    print(f"{sizes.per_image} clean {sizes.stored}-px crops per photo and task in {out / 'shards'}; the training "
          f"streams re-degrade them online")

    if code := train_stages(out, shards, val, sizes, args.steps_scale, args.gpus, progress):
        return code

    progress.phase("restore the held-out degraded images")
    torch.set_num_threads(1)  # tiny networks: extra threads only contend (20x slower on a busy 2-core box)
    bundle = out / "bundle"
    for task in tasks:
        folder = out / "heldout" / task
        code = cli_main(["restore", "--weights", str(bundle), "--input", str(folder), "--output",
                         str(out / "restored" / task), "--tile", "0", "--device", device])  # fmt: skip
        if code:
            print(f"\ndemo stopped: restoring {folder} failed with exit code {code}", file=sys.stderr)
            return code

    progress.phase("evaluate: input vs classical vs root-only vs leaf-only vs routed vs oracle")
    records, extractor, confusion = evaluate_tasks(bundle, heldout, out / "eval", device)
    stats = json.loads((out / "checkpoints" / "tree" / "tree_stats.json").read_text())
    doc = summary(records, extractor, stats, progress.elapsed())
    levels = {t: np.bincount([r["level"] for r in recs], minlength=len(recs[0]["path"])).tolist()
              for t, recs in records.items()}
    table = summary_table(doc, levels)
    (out / "eval" / "summary.md").write_text(f"{table}\n\nExtractor confusion on the held-out single-degradation "
                                             f"crops (rows: truth, columns: top family):\n\n```\n{confusion}\n```\n")
    (out / "eval" / "summary.json").write_text(json.dumps(doc, indent=1))
    from unirestorer.classical import method_name

    print(f"\nPSNR (dB) on held-out crops, RGB, float, crop to a multiple of 16 (PromptIR convention); classical = "
          f"{method_name('noise')} for noise (σ known), dark channel prior for haze; root = root expert alone, leaf = "
          f"estimated leaf alone, oracle = best node on the path:\n")
    print(table)
    print(f"\ndemo done in {progress.elapsed():.0f} s. Everything is in {out}:\n"
          f"  bundle/        the exported weights (unirestorer restore --weights {bundle} ...)\n"
          f"  restored/TASK  restored held-out images; heldout/ their inputs and clean crops\n"
          f"  eval/          summary.md, summary.json, results.md (PSNR and SSIM per method), per-image CSV, grids\n"
          f"  tensorboard/   training curves (tensorboard --logdir {out / 'tensorboard'})\n"
          f"  logs/ configs/ checkpoints/  each stage's output, config and checkpoints")  # fmt: skip
    return 0
