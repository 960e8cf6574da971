"""Launch: ranks from SLURM, and launch/slurm.sbatch for real on a local single-node Slurm (2 ranks,
preempted with USR1, requeued, resumed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from unirestorer.launch.env import rank_env_from_slurm

REPO = Path(__file__).resolve().parent.parent
SLURM_TOOLS = REPO.parent / "shared" / "tools" / "slurm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_env_from_slurm() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "123",
           "SLURM_JOB_NODELIST": "n[1-2]", "MASTER_ADDR": "n1"}
    assert rank_env_from_slurm(env) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_PORT": "20123"}
    assert rank_env_from_slurm({**env, "RANK": "0"}) == {}  # a launcher already set the ranks
    assert rank_env_from_slurm({}) == {}


@pytest.fixture()
def local_slurm():
    """Install (apt, ~11 s the first time) and start a private Slurm; stop it afterwards."""
    if os.geteuid() != 0:
        pytest.skip("local Slurm needs root (SlurmUser=root)")
    install = subprocess.run([str(SLURM_TOOLS / "install.sh")], capture_output=True, text=True, timeout=600)
    if install.returncode != 0:
        pytest.skip(f"Slurm cannot be installed here: {(install.stdout + install.stderr)[-500:]}")
    run_dir = tempfile.mkdtemp(prefix="ur-slurm-", dir="/tmp")  # short: Unix socket paths <= 108 bytes
    env = {**os.environ, "SLURM_LOCAL_DIR": run_dir, "SLURM_CTLD_PORT": str(free_port()),
           "SLURMD_PORT": str(free_port())}
    start = subprocess.run([str(SLURM_TOOLS / "start_local_slurm.sh")], env=env, capture_output=True, text=True,
                           timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    env["SLURM_CONF"] = f"{run_dir}/etc/slurm.conf"
    try:
        yield env
    finally:
        subprocess.run([str(SLURM_TOOLS / "stop_local_slurm.sh")], env=env, capture_output=True, timeout=120)
        shutil.rmtree(run_dir, ignore_errors=True)


def job_field(env: dict, job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next((tok.split("=", 1)[1] for tok in out.split() if tok.startswith(f"{name}=")), "")


def wait_for(what: str, ok, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while not ok():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; job log:\n" +
                                 "\n".join(p.read_text()[-3000:] for p in log.glob("slurm-*.out")))
        time.sleep(0.3)


@pytest.mark.slow
def test_slurm_sbatch_two_ranks_preempted_requeued_resumed(local_slurm: dict, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CONF", local_slurm["SLURM_CONF"])  # scontrol reads it even to expand names
    nodes = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7",
             "SLURM_JOB_NODELIST": "gpu[07-09],cpu1"}
    assert rank_env_from_slurm(nodes)["MASTER_ADDR"] == "gpu07"

    # venv last on PATH: see run_tiny in test_run_state.py.
    env = {**local_slurm, "PATH": f"{os.environ['PATH']}:{REPO / '.venv' / 'bin'}", "DS_ACCELERATOR": "cpu",
           "PYTHON": sys.executable,
           "UNIRESTORER_ENTRY": str(REPO / "tests" / "tiny_train.py"), "MASTER_PORT": str(free_port()),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))}
    out = tmp_path / "out"
    out.mkdir()
    submit = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-task=0", "--cpus-per-task=1", "--time=10",
         f"--output={tmp_path}/slurm-%j.out", str(REPO / "launch" / "slurm.sbatch"),
         "--out", str(out), "--ckpt-dir", str(tmp_path / "ck"), "--max-steps", "8", "--ckpt-every", "100",
         "--step-sleep", "0.3", "deepspeed.micro_batch=2"],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    progress = out / "progress"
    wait_for("step 2 of the first run", lambda: progress.exists() and int(progress.read_text() or 0) >= 2, 240,
             tmp_path)
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
    wait_for("the requeued run to complete", lambda: job_field(env, job, "JobState") == "COMPLETED", 240, tmp_path)
    assert job_field(env, job, "Restarts") == "1"

    first = [[json.loads(x) for x in (out / f"rank{r}_run0.jsonl").read_text().splitlines()] for r in range(2)]
    second = [[json.loads(x) for x in (out / f"rank{r}_run1.jsonl").read_text().splitlines()] for r in range(2)]
    host = socket.gethostname().split(".")[0]
    for rank in range(2):
        assert (first[rank][0]["rank"], first[rank][0]["world"], first[rank][0]["local_rank"]) == (rank, 2, rank)
        assert first[rank][0]["master"] == [host, env["MASTER_PORT"]] and first[rank][0]["resumed_from"] is None
        assert first[rank][-1]["preempted"] == "SIGUSR1"  # scancel --signal reaches every task
    stop_step = first[0][-1]["step"]
    assert first[1][-1]["step"] == stop_step and 2 <= stop_step < 8
    for rank in range(2):  # SLURM_RESTART_COUNT=1 names the second run's file
        assert second[rank][0]["world"] == 2 and second[rank][0]["resumed_from"] == stop_step
        assert [d["step"] for d in second[rank][1:-1]] == list(range(stop_step + 1, 9))
        assert second[rank][-1]["done"] == 8
    assert second[0][-1]["weights"] == second[1][-1]["weights"]
    assert (tmp_path / "ck" / "latest").read_text() == "step_00000008"
    log = (tmp_path / f"slurm-{job}.out").read_text()  # one log per job id, appended across the requeue
    assert f"job {job} run 0 " in log and f"job {job} run 1 " in log and "requeued SLURM job" in log
