"""Run state around DeepSpeed: RNG capture/restore, data position, preemption flag, checkpoints + resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from unirestorer.train import checkpoint as ckpt
from unirestorer.train.preemption import PREEMPTED_EXIT_CODE, PreemptionHandler, exit_preempted
from unirestorer.train.run_state import DataPosition, capture_rng, restore_rng

REPO = Path(__file__).resolve().parent.parent


def draw(gens: dict) -> list[float]:
    return [random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.normal()),
            torch.rand(1).item(), torch.randn(1, generator=gens["t"]).item(), float(gens["n"].normal()),
            float(gens["m"].random())]


def test_rng_capture_restore_every_source(tmp_path: Path) -> None:
    gens = {"t": torch.Generator().manual_seed(1), "n": np.random.default_rng(2),
            "m": np.random.Generator(np.random.MT19937(3))}
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    state = capture_rng(gens)
    torch.save(state, tmp_path / "rng.pt")
    first = draw(gens)
    assert draw(gens) != first
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True), gens)
    assert draw(gens) == first


def test_restore_rejects_generator_without_state() -> None:
    state = capture_rng({"a": torch.Generator()})
    with pytest.raises(KeyError, match="no saved RNG state for generator 'b'"):
        restore_rng(state, {"b": torch.Generator()})


def test_data_position() -> None:
    pos = DataPosition(seed=5, restarts=1, batches=40)
    assert DataPosition.from_dict(pos.to_dict()) == pos
    assert pos.stream_seed(0) == DataPosition(5, 1).stream_seed(0)
    seeds = {pos.stream_seed(0), pos.stream_seed(1), pos.restarted().stream_seed(0), DataPosition(6, 1).stream_seed(0)}
    assert len(seeds) == 4 and pos.restarted() == DataPosition(5, 2, 0)


# ------------------------------------------------------------------ preemption


def _preempt_worker(rank: int, port: int, out: str) -> None:
    os.environ.pop("SLURM_JOB_ID", None)
    handler = PreemptionHandler().install()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    step = 0
    while step < 500:
        step += 1
        Path(out, f"progress{rank}").write_text(str(step))
        time.sleep(0.02)
        if handler.should_stop():
            break
    Path(out, f"stop{rank}").write_text(json.dumps({"step": step, "signal": handler.received}))
    dist.barrier()
    try:
        exit_preempted(rank)
    finally:
        dist.destroy_process_group()  # not left to interpreter shutdown (launch/env.py destroy_distributed)


def test_signal_on_one_rank_stops_both_at_same_step(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_preempt_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.time() + 60
    while not (tmp_path / "progress1").exists() or int((tmp_path / "progress1").read_text() or 0) < 3:
        assert time.time() < deadline, "ranks did not start"
        time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGUSR1)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [PREEMPTED_EXIT_CODE] * 2
    stops = [json.loads((tmp_path / f"stop{r}").read_text()) for r in range(2)]
    assert stops[0]["step"] == stops[1]["step"] < 500
    assert (stops[0]["signal"], stops[1]["signal"]) == (None, "SIGUSR1")


def test_sigterm_sets_flag_without_distributed() -> None:
    handler = PreemptionHandler().install()
    try:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.should_stop() and handler.received == "SIGTERM"
    finally:
        handler.uninstall()


# ------------------------------------------------------------------ checkpoints


def _fake_save(root: Path, step: int) -> None:
    (root / ckpt.tag_for(step)).mkdir(parents=True)
    torch.save({"w": torch.ones(1)}, root / ckpt.tag_for(step) / "mp_rank_00_model_states.pt")


def test_resolve_resume(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    assert ckpt.resolve_resume("none", root) is None
    assert ckpt.resolve_resume("auto", root) is None  # fresh run
    with pytest.raises(ckpt.CheckpointError, match=f"--resume {tmp_path}/nope: .* does not exist"):
        ckpt.resolve_resume(str(tmp_path / "nope"), root)
    for step in (2, 4, 6):
        _fake_save(root, step)
        ckpt.commit_checkpoint(root, step, keep_last=2)
    _fake_save(root, 8)  # a save that never committed
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000006", "step_00000008"]
    point = ckpt.resolve_resume("auto", root)
    assert (point.tag, point.step, point.world_size, point.root) == ("step_00000006", 6, 1, root)
    assert ckpt.resolve_resume(str(root), "elsewhere") == point
    assert ckpt.resolve_resume(str(root / "step_00000004"), tmp_path / "new").step == 4
    with pytest.raises(ckpt.CheckpointError, match="also holds newer checkpoints \\(step_00000006\\) of another"):
        ckpt.resolve_resume(str(root / "step_00000004"), root)
    with pytest.raises(ckpt.CheckpointError, match="step_00000008 has no COMPLETE.json: its save did not finish"):
        ckpt.resolve_resume(str(root / "step_00000008"), root)
    (root / "latest").write_text("step_00000008")  # corrupted pointer
    with pytest.raises(ckpt.CheckpointError, match="--resume auto: .*latest names 'step_00000008'.*no COMPLETE"):
        ckpt.resolve_resume("auto", root)
    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint folder nor"):
        ckpt.resolve_resume(str(tmp_path), root)


def run_tiny(n: int, tmp: Path, out: str, *args: str, launcher: bool = False) -> tuple[list[int], str]:
    """tests/tiny_train.py on n CPU ranks, through launch/cpu_ranks.sh (the real deepspeed launcher) or as
    n plain processes with the torch.distributed variables set (cheaper: no launcher processes).
    Returns the exit codes and the output."""
    (tmp / out).mkdir()
    # venv last on PATH: `deepspeed` is found there, while `ninja` stays the one the rest of the suite sees
    # (two ninja versions make each other rebuild DeepSpeed's CPU comm op, ~50 s).
    env = {**os.environ, "PATH": f"{os.environ['PATH']}:{REPO / '.venv' / 'bin'}", "MASTER_PORT": str(free_port()),
           "UNIRESTORER_ENTRY": str(REPO / "tests" / "tiny_train.py"), "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))}
    cmd = ["--out", str(tmp / out), "--ckpt-dir", str(tmp / "ck"), "--max-steps", "6", "--ckpt-every", "2",
           "deepspeed.micro_batch=4", *args]
    if launcher:
        argvs, envs = [[str(REPO / "launch" / "cpu_ranks.sh"), str(n), *cmd]], [env]
    else:
        env.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(n), OMP_NUM_THREADS="1")
        argvs = [[sys.executable, env["UNIRESTORER_ENTRY"], *cmd]] * n
        envs = [{**env, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(n)]
    logs = [tmp / out / f"output{i}.log" for i in range(len(argvs))]
    procs = [subprocess.Popen(a, env=e, stdout=log.open("w"), stderr=subprocess.STDOUT)
             for a, e, log in zip(argvs, envs, logs)]
    codes = [p.wait(timeout=300) for p in procs]
    return codes, "\n".join(log.read_text() for log in logs)


def read_log(path: Path) -> tuple[dict, dict[int, float], dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return lines[0], {d["step"]: d["loss"] for d in lines if "loss" in d}, lines[-1]


@pytest.mark.slow
def test_deepspeed_checkpoint_crash_and_exact_resume(tmp_path: Path) -> None:
    """2 CPU ranks, ZeRO-2: rank 1 dies after writing save 4 → `latest` stays at 2; resume auto replays
    steps 3-4 with identical losses (weights, optimizer, every RNG and the data stream restored), and
    keep_last=2 leaves only saves 4 and 6."""
    codes, output = run_tiny(2, tmp_path, "crash", "--crash-at-save", "4")
    assert codes[1] == 3 and codes[0] != 0, output[-3000:]  # rank 0 fails in the commit barrier
    root = tmp_path / "ck"
    assert (root / "latest").read_text() == "step_00000002"
    assert (root / "step_00000004" / "rank_00001_state.pt").exists()
    assert not ckpt.is_complete(root / "step_00000004")
    assert ckpt.resolve_resume("auto", root).step == 2

    codes, output = run_tiny(2, tmp_path, "resume", "--resume", "auto", launcher=True)
    assert codes == [0], output[-3000:]
    for rank in range(2):
        _, before, _ = read_log(tmp_path / "crash" / f"rank{rank}.jsonl")
        head, after, done = read_log(tmp_path / "resume" / f"rank{rank}.jsonl")
        assert head["world"] == 2 and head["rank"] == rank and head["resumed_from"] == 2
        assert sorted(before) == [1, 2, 3, 4] and sorted(after) == [3, 4, 5, 6]
        assert [after[3], after[4]] == [before[3], before[4]]
        assert done["done"] == 6
    weights = [read_log(tmp_path / "resume" / f"rank{r}.jsonl")[2]["weights"] for r in range(2)]
    assert weights[0] == weights[1]
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert (root / "latest").read_text() == "step_00000006"
    marker = json.loads((root / "step_00000006" / ckpt.MARKER).read_text())
    assert marker["world_size"] == 2 and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in marker["files"]
    state = torch.load(root / "step_00000006" / "rank_00001_state.pt", weights_only=True)
    assert state["data"] == {"seed": 0, "restarts": 0, "batches": 6}

    # Elastic 2 → 1: the weights load, the optimizer starts fresh, and the run says so.
    codes, output = run_tiny(1, tmp_path, "elastic", "--max-steps", "7")
    assert codes == [0], output[-3000:]
    assert "elastic resume" in output and "written by 2 ranks, this run has 1" in output
    head, losses, done = read_log(tmp_path / "elastic" / "rank0.jsonl")
    assert head["world"] == 1 and head["resumed_from"] == 6 and head["weights"] == weights[0]
    assert sorted(losses) == [7] and done["done"] == 7
