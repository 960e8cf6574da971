"""The demo's four stages: their configs, and each run through the real `deepspeed` launcher with its
output copied to a log and, filtered, to the terminal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from unirestorer.demo_data import Sizes
from unirestorer.launch.ports import free_port
from unirestorer.safe_files import atomic_write

STAGES = ("extractor", "cluster", "experts", "router")
ROUTER_MARGIN_DB = 0.3


def stage_configs(out: Path, shards: list[str], val: list[str], sizes: Sizes, scale: float, seed: int = 0
                  ) -> dict[str, dict]:  # fmt: skip
    """The demo's config of every stage, as nested {section: {key: value}} (train/config.py schema); `seed`
    seeds each stage (initialisation, sampling, the tree's k-means)."""
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
        train = ({"lr": sizes.lr[name], "max_steps": steps[name]} if name in steps else {}) | {"seed": seed}
        ckpt = {"dir": str(ck / name)} | ({"every": steps[name]} if name in steps else {})
        val_every = {"val_every": steps[name]} if name in steps else {}
        return {**common, "train": train | ({"init_ckpt": str(ck / init)} if init else {}), "ckpt": ckpt,
                "log": log | val_every, "deepspeed": {"micro_batch": sizes.micro_batch[name]}}

    configs = {"extractor": stage("extractor", None), "cluster": stage("cluster", "extractor"),
               "experts": stage("experts", "extractor"), "router": stage("router", "experts")}
    configs["extractor"]["train"]["warmup_steps"] = min(100, steps["extractor"] // 10)
    # the experts: the root alone for the first fifth, then each level from its parent, one level at a time, two
    # fifths each (in thirds, the types were still half-trained: the haze type re-exposed the clean photos among
    # its members, and the calibration check then kept hazy images from the haze leaves, BENCHMARKS.md); the
    # PSNR loss (mean over images of 10·log10 MSE) weighs a 1 dB gain the same on a mild blur as on a dark image,
    # where L1 is ruled by the dark and hazy images (bench/quality.py: +1.2 dB for the tree, BENCHMARKS.md)
    # Then the root alone again for a sixth as many steps, at a 60 dB floor (`train.root_polish_steps`): the
    # fallback learns to leave a near-clean photo as it is, and its children, done by then, stay as they are
    e = steps["experts"]
    polish = e // 6
    types, leaves = max(1, e // 5), max(2, 3 * e // 5)  # the steps where levels 1 and 2 start
    # the root, the fallback, at half the LR of the finer levels: at the full LR its polish stopped leaving a
    # slightly blurred 47 dB photo alone (kodim14: -0.67 dB, BENCHMARKS.md "seventh session")
    lr = sizes.lr["experts"]
    configs["experts"]["train"] |= {"level_lrs": [lr / 2, lr, lr], "loss": "psnr",
                                    "level_start_steps": [0, types, leaves], "level_end_steps": [types, leaves, e],
                                    "warmup_steps": min(20, e // 10),
                                    "max_steps": e + polish, "root_polish_steps": polish}
    configs["experts"]["ckpt"]["every"] = configs["experts"]["log"]["val_every"] = e + polish
    # the router's level target is the coarsest level within ROUTER_MARGIN_DB of the best: a finer expert must
    # earn its place, so what it barely helps goes to a coarser, more generic expert
    configs["router"]["train"]["level_margin_db"] = ROUTER_MARGIN_DB
    return configs


def write_toml(path: Path, config: dict[str, dict]) -> None:
    """Flat two-level TOML; JSON scalars and lists of them are valid TOML values."""
    lines = []
    for section, values in config.items():
        lines += [f"[{section}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items()), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "\n".join(lines))


def launcher_env(gpus: int) -> dict[str, str]:
    """The environment of a stage: CPU ranks unless --gpus; the venv's `deepspeed` on PATH."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = env.get("PATH", "") + os.pathsep + bindir
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("DS_ACCELERATOR", None)
    if not gpus:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def stage_command(stage: str, config: Path, ranks: int, port: int) -> list[str]:
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(ranks), "--master_port", str(port), "--no_local_rank",
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


class Progress:
    """`[  12.3 s] phase 3/9: ...` lines: where the demo is and how long it has run."""

    def __init__(self, total: int) -> None:
        self.start, self.total, self.n = time.monotonic(), total, 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def phase(self, text: str) -> None:
        self.n += 1
        print(f"\n[{self.elapsed():7.1f} s] phase {self.n}/{self.total}: {text}", flush=True)


def train_stages(out: Path, shards: list[str], val: list[str], sizes: Sizes, scale: float, gpus: int,
                 progress: Progress, seed: int = 0) -> int:  # fmt: skip
    """The four stages through the deepspeed launcher, each on its written config, then export and calibrate;
    0 or the failing code."""
    ranks = gpus or 2
    env = launcher_env(gpus)
    for stage, cfg in stage_configs(out, shards, val, sizes, scale, seed).items():
        path, log = out / "configs" / f"{stage}.toml", out / "logs" / f"{stage}.log"
        write_toml(path, cfg)
        steps = f", {cfg['train']['max_steps']} steps" if "max_steps" in cfg["train"] else ""
        progress.phase(f"stage {stage} on {ranks} {'GPU' if gpus else 'CPU rank'}s{steps} (config {path})")
        port = free_port()
        code = run_logged(stage_command(stage, path, ranks, port), env, log)
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
    progress.phase("calibrate the bundle: every path expert on stored training samples (model/calibration.py)")
    log = out / "logs" / "calibrate.log"
    cmd = [sys.executable, "-m", "unirestorer.cli", "calibrate", str(out / "bundle"), "--samples",
           str(sizes.cluster_samples)]  # fmt: skip
    if code := run_logged(cmd, env, log):
        print(f"\ndemo stopped: calibrate failed with exit code {code}; its log: {log}", file=sys.stderr)
    return code


