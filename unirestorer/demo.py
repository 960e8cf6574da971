"""`unirestorer demo`: the whole pipeline, end to end, on the photos scikit-image ships.

    photos ──▶ train shards (5 photos, 64-px crops, every task) + held-out degraded crops (2 other photos)
      ──deepspeed, 2 CPU ranks (or --gpus N)──▶ extractor ▶ cluster ▶ experts ▶ router
      ──export──▶ bundle ──restore──▶ restored held-out images ──eval──▶ table per task

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
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Colour photographs bundled with scikit-image (no download). Train and held-out sets share no photo
# (stereo_motorcycle's right view is never used: it is nearly the left one).
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
HELDOUT_PHOTOS = ("chelsea", "stereo_motorcycle")
STAGES = ("extractor", "cluster", "experts", "router")


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the demo's cost; `FULL` for `unirestorer demo`, `QUICK` for smoke tests."""

    per_image: int  # training crops per train photo and task
    patch: int  # training crop size
    eval_crop: int  # held-out crop size
    eval_per_photo: int  # held-out crops per held-out photo
    levels: tuple[int, ...]  # tree nodes per level
    shard_size: int
    cluster_samples: int  # training samples embedded to build the tree
    micro_batch: dict[str, int]  # per rank, per stage
    steps: dict[str, int]  # max_steps per trained stage
    log_every: int


FULL = Sizes(per_image=40, patch=64, eval_crop=128, eval_per_photo=6, levels=(1, 2, 4), shard_size=64,
             cluster_samples=1600, micro_batch={"extractor": 16, "cluster": 16, "experts": 8, "router": 8},
             steps={"extractor": 300, "experts": 300, "router": 100}, log_every=50)  # fmt: skip
QUICK = Sizes(per_image=2, patch=64, eval_crop=64, eval_per_photo=1, levels=(1, 2, 4), shard_size=64,
              cluster_samples=80, micro_batch={"extractor": 4, "cluster": 4, "experts": 4, "router": 4},
              steps={"extractor": 3, "experts": 3, "router": 3}, log_every=1)  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train, export, restore and evaluate on the photos scikit-image ships")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR", help="output folder (default runs/demo)")
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
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


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


def degrade_heldout(clean: Path, out: Path, tasks: tuple[str, ...], seed: int = 0) -> dict[str, Path]:
    """Per task, the clean crops degraded with a fixed seed, saved as 8-bit PNGs in out/TASK/."""
    from unirestorer.data_shards.imageio import encode_png
    from unirestorer.evaluate import load_synthetic

    folders = {}
    for task in tasks:
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        for s in load_synthetic(clean, task, seed, multiple=16):
            (folder / f"{s.name}.png").write_bytes(encode_png(s.lq))
        folders[task] = folder
    return folders


# ---- stages -----------------------------------------------------------------------------------
def write_shards(photos: Path, out: Path, tasks: tuple[str, ...], sizes: Sizes) -> list[str]:
    """One shard set per task (so the stages can mix tasks evenly); returns their patterns."""
    from unirestorer.data_shards.writer import write_synthetic

    patterns = []
    for i, task in enumerate(tasks):  # seed i: each task's crops come from other places of the photos
        m = write_synthetic(photos, out / task, (task,), per_image=sizes.per_image, patch=sizes.patch, seed=i,
                            shard_size=sizes.shard_size, workers=1, force=True)  # fmt: skip
        n = len(m["shards"])
        patterns.append(str(out / task / (f"shard-{{000000..{n - 1:06d}}}.tar" if n > 1 else "shard-000000.tar")))
    return patterns


def stage_configs(out: Path, shards: list[str], sizes: Sizes, scale: float) -> dict[str, dict]:
    """The demo's config of every stage, as nested {section: {key: value}} (train/config.py schema)."""
    ck = out / "checkpoints"
    steps = {k: max(1, round(v * scale)) for k, v in sizes.steps.items()}
    data = {"train_shards": shards, "patch_size": sizes.patch, "num_workers": 0, "shuffle_buffer": 200}
    model = {"arch": "nafnet", "preset": "tiny", "extractor_backbone": "test_resnet", "embed_dim": 64,
             "extractor_proj_dim": 32, "extractor_crop": 32, "extractor_crops": 4}
    tree = {"levels": list(sizes.levels), "path": str(ck / "tree"), "num_samples": sizes.cluster_samples}
    common = {"data": data, "model": model, "tree": tree, "log": {"dir": str(out / "tensorboard"), "every": sizes.log_every}}

    def stage(name: str, init: str | None, lr: float) -> dict:
        train = {"lr": lr} | ({"max_steps": steps[name]} if name in steps else {})
        ckpt = {"dir": str(ck / name)} | ({"every": steps[name]} if name in steps else {})
        return {**common, "train": train | ({"init_ckpt": str(ck / init)} if init else {}), "ckpt": ckpt,
                "deepspeed": {"micro_batch": sizes.micro_batch[name]}}

    # cluster writes only tree.path: experts read the extractor from its checkpoint and the tree from there
    return {"extractor": stage("extractor", None, 1e-3), "cluster": stage("cluster", "extractor", 1e-3),
            "experts": stage("experts", "extractor", 2e-3), "router": stage("router", "experts", 1e-3)}


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


def stage_command(stage: str, config: Path, ranks: int) -> list[str]:
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--no_local_rank",
            "--module", "unirestorer.train", stage, "--config", str(config), "--resume", "none"]  # fmt: skip


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
def evaluate_tasks(bundle: Path, heldout: dict[str, Path], clean: Path, out: Path, device: str) -> dict[str, list]:
    """Routed model and baselines per task on the held-out images; writes out/results.md and grids."""
    from unirestorer.evaluate import evaluate, load_pairs, markdown, write_csv, write_grid
    from unirestorer.metrics import Convention
    from unirestorer.restore import load_model

    model, conv, records, sections = load_model(str(bundle), device), Convention(), {}, []
    out.mkdir(parents=True, exist_ok=True)
    for task, folder in heldout.items():
        samples = load_pairs(folder, clean)
        recs, outputs = evaluate(model, samples, conv, device=device, progress=False)
        records[task] = recs
        sections.append(markdown(f"{task}: {folder}", conv, recs, model.tree.n_levels))
        write_csv(out / f"{task}.csv", recs)
        write_grid(out / f"{task}_grid.png", samples, recs, outputs)
    (out / "results.md").write_text("\n".join(sections))
    return records


def summary_table(records: dict[str, list]) -> str:
    """One row per task (mean PSNR of every method) and their mean, with the routed level counts."""
    import numpy as np

    from unirestorer.evaluate import METHODS, summarise

    head = "| task | n | " + " | ".join(METHODS) + " | images routed to level 0/1/2 |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    rows = {task: summarise(recs) for task, recs in records.items()}
    for task, recs in records.items():
        counts = np.bincount([r["level"] for r in recs], minlength=len(recs[0]["path"]))
        cells = " | ".join(f"{rows[task][m]['psnr']:.2f}" for m in METHODS)
        lines.append(f"| {task} | {len(recs)} | {cells} | {'/'.join(map(str, counts))} |")
    mean = " | ".join(f"{np.mean([rows[t][m]['psnr'] for t in rows]):.2f}" for m in METHODS)
    lines.append(f"| **mean** | {sum(map(len, records.values()))} | {mean} | |")
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
    import shutil

    if out.exists() and not (out / MARKER).exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out}: exists and is not an earlier demo's folder; choose another")
    for name in OURS:
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def train_stages(out: Path, shards: list[str], sizes: Sizes, scale: float, gpus: int, progress: Progress) -> int:
    """The four stages through the deepspeed launcher, each on its written config; 0 or the failing code."""
    ranks = gpus or 2
    env = launcher_env(gpus)
    for stage, cfg in stage_configs(out, shards, sizes, scale).items():
        path, log = out / "configs" / f"{stage}.toml", out / "logs" / f"{stage}.log"
        write_toml(path, cfg)
        steps = f", {cfg['train']['max_steps']} steps" if "max_steps" in cfg["train"] else ""
        progress.phase(f"stage {stage} on {ranks} {'GPU' if gpus else 'CPU rank'}s{steps} (config {path})")
        if code := run_logged(stage_command(stage, path, ranks), env, log):
            print(f"\ndemo stopped: stage {stage} failed with exit code {code}; its log: {log}", file=sys.stderr)
            return code
    progress.phase("export the bundle")
    log = out / "logs" / "export.log"
    cmd = [sys.executable, "-m", "unirestorer.cli", "export", str(out / "checkpoints" / "router"), "--out",
           str(out / "bundle")]  # fmt: skip
    if code := run_logged(cmd, env, log):
        print(f"\ndemo stopped: export failed with exit code {code}; its log: {log}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    import torch

    from unirestorer.cli import main as cli_main
    from unirestorer.data_shards.degradations import TASKS

    if args.gpus < 0 or args.steps_scale <= 0:
        print("error: --gpus must be >= 0 and --steps-scale > 0", file=sys.stderr)
        return 2
    sizes, out, device = (QUICK if args.quick else FULL), args.out.resolve(), "cuda" if args.gpus else "cpu"
    try:
        prepare_out(out)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    progress = Progress(len(STAGES) + 5)

    progress.phase(f"photos and held-out images into {out}")
    train_dir, clean = out / "photos" / "train", out / "heldout" / "clean"
    save_photos(train_dir, TRAIN_PHOTOS)
    crops = save_crops(save_photos(out / "photos" / "heldout", HELDOUT_PHOTOS), clean, sizes.eval_crop,
                       sizes.eval_per_photo)  # fmt: skip
    heldout = degrade_heldout(clean, out / "heldout", TASKS)
    print(f"train photos: {', '.join(TRAIN_PHOTOS)}; held-out: {len(crops)} crops of {', '.join(HELDOUT_PHOTOS)} "
          f"x {len(TASKS)} tasks")  # fmt: skip

    progress.phase("training shards, one set per task")
    shards = write_shards(train_dir, out / "shards", TASKS, sizes)
    print(f"{sizes.per_image * len(TRAIN_PHOTOS)} crops of {sizes.patch} px per task in {out / 'shards'}")

    if code := train_stages(out, shards, sizes, args.steps_scale, args.gpus, progress):
        return code

    progress.phase("restore the held-out degraded images")
    torch.set_num_threads(1)  # tiny networks: extra threads only contend (20x slower on a busy 2-core box)
    bundle = out / "bundle"
    for task, folder in heldout.items():
        code = cli_main(["restore", "--weights", str(bundle), "--input", str(folder), "--output",
                         str(out / "restored" / task), "--tile", "0", "--device", device])  # fmt: skip
        if code:
            print(f"\ndemo stopped: restoring {folder} failed with exit code {code}", file=sys.stderr)
            return code

    progress.phase("evaluate: input vs root-only vs leaf-only vs routed vs oracle")
    records = evaluate_tasks(bundle, heldout, clean, out / "eval", device)
    table = summary_table(records)
    (out / "eval" / "summary.md").write_text(table + "\n")
    (out / "eval" / "summary.json").write_text(json.dumps(
        {t: {r["name"]: {k: v for k, v in r.items() if k.endswith(("_psnr", "_ssim")) or k == "level"}
             for r in recs} for t, recs in records.items()}, indent=1))  # fmt: skip
    print("\nPSNR (dB) on held-out crops, RGB, float, crop to a multiple of 16 (PromptIR convention);"
          " root = root expert alone, leaf = estimated leaf alone, oracle = best node on the path:\n")
    print(table)
    print(f"\ndemo done in {progress.elapsed():.0f} s. Everything is in {out}:\n"
          f"  bundle/        the exported weights (unirestorer restore --weights {bundle} ...)\n"
          f"  restored/TASK  restored held-out images; heldout/ their inputs and clean crops\n"
          f"  eval/          summary.md, results.md (PSNR and SSIM per method), per-image CSV, grids\n"
          f"  tensorboard/   training curves (tensorboard --logdir {out / 'tensorboard'})\n"
          f"  logs/ configs/ checkpoints/  each stage's output, config and checkpoints")  # fmt: skip
    return 0
