"""Launch: ranks from SLURM, and launch/slurm.sbatch for real on a local single-node Slurm: the real extractor
stage on 2 tasks, preempted with USR1, requeued, resumed, and equal to an uninterrupted run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port
from test_train_spine import finish, launch, losses, same_weights, shards, train_args  # noqa: F401 (a fixture)
from unirestorer.launch.env import rank_env_from_slurm
from unirestorer.launch.ports import MASTER_PORTS, ephemeral_ports
from unirestorer.launch.ports import free_port as free_port_in
from unirestorer.train import checkpoint as ckpt
from unirestorer.train.weights import read_checkpoint

REPO = Path(__file__).resolve().parent.parent
SLURM_TOOLS = REPO.parent / "shared" / "tools" / "slurm"
# 6 steps, checkpoints every 2; each step sleeps so the signal lands mid-run
STEPS = ("--max-steps", "6", "--ckpt-every", "2", "train.debug_step_sleep=0.5")


def test_rank_env_from_slurm() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "12123",
           "SLURM_JOB_NODELIST": "n[1-2]", "MASTER_ADDR": "n1"}
    assert rank_env_from_slurm(env) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_PORT": "20123"}
    assert rank_env_from_slurm({**env, "RANK": "0"}) == {}  # a launcher already set the ranks
    assert rank_env_from_slurm({}) == {}
    assert MASTER_PORTS.stop <= ephemeral_ports().start  # the default of launch/slurm.sbatch as well


def test_free_port_skips_listened_and_handed_out_ports_and_stays_out_of_the_ephemeral_range() -> None:
    """A master port chosen by bind(0) lay in the ephemeral range, and another socket took it before the
    launcher bound it (EADDRINUSE in CI). Ports here: 32000-32767, which no test's launcher uses."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert listener.getsockname()[1] in ephemeral_ports()  # what the old way handed out
    with socket.socket() as listener:
        for port in range(32000, 32700, 2):  # a pair with one port busy, one free
            try:
                listener.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        listener.listen()
        got = free_port_in(range(port, port + 2))
        assert got == port + 1
        with socket.socket() as s:
            s.bind(("", got))  # really free
        with pytest.raises(RuntimeError, match=f"no free TCP port in {port}-{port + 1} outside"):
            free_port_in(range(port, port + 2))  # one listened on, the other already handed out
    eph = ephemeral_ports()
    with pytest.raises(RuntimeError, match=f"ephemeral range {eph.start}-{eph.stop - 1}"):
        free_port_in(range(eph.start, eph.start + 50))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ours", "held"])
def test_teardown_ends_every_gloo_thread_before_interpreter_shutdown(mode: str, tmp_path: Path) -> None:
    """A group alive at exit keeps gloo's threads into interpreter shutdown, where one of them freeing a
    collective's tensors aborted a rank (the demo's cluster stage, 2 exits in 117). The CLI's teardown
    leaves none; the `held` control shows the check sees them when a reference survives."""
    env = {**os.environ, "PATH": f"{os.environ['PATH']}:{REPO / '.venv' / 'bin'}", "MASTER_PORT": str(free_port()),
           "UNIRESTORER_ENTRY": str(REPO / "tests" / "teardown_worker.py")}
    res = subprocess.run([str(REPO / "launch" / "cpu_ranks.sh"), "2", mode], env=env, cwd=tmp_path, timeout=240,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for rank in (0, 1):
        before = re.search(rf"\[rank {rank}\] before teardown: (\[.*?\])", res.stdout).group(1)
        after = re.search(rf"\[rank {rank}\] after teardown: (\[.*?\])", res.stdout).group(1)
        assert "pt_gloo_runloop" in before
        assert (after == "[]") == (mode == "ours"), (mode, rank, after)


@pytest.fixture()
def local_slurm():
    """Install (apt, ~11 s the first time) and start a private Slurm; stop it afterwards.

    Skipped (the issue's one allowed reason) only where Slurm cannot be installed; CI runs as root with
    apt, so there the same condition is a failure, never a silent skip."""
    unavailable = pytest.fail if os.environ.get("CI") else pytest.skip
    if os.geteuid() != 0:
        unavailable("local Slurm needs root (SlurmUser=root)")
    install = subprocess.run([str(SLURM_TOOLS / "install.sh")], capture_output=True, text=True, timeout=600)
    if install.returncode != 0:
        unavailable(f"Slurm cannot be installed here: {(install.stdout + install.stderr)[-500:]}")
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


def task_env(job: str, ckpt_dir: Path) -> dict[int, dict[str, str]]:
    """Rank -> rank variables of the job's running training processes, read from /proc (what srun + the
    batch script really gave each task)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit():
                continue
            cmd = (proc / "cmdline").read_bytes()
            if b"unirestorer.train" not in cmd or str(ckpt_dir).encode() not in cmd:  # ids restart on other Slurms
                continue
            env = dict(x.decode().split("=", 1) for x in (proc / "environ").read_bytes().split(b"\0") if b"=" in x)
        except (OSError, UnicodeDecodeError):
            continue
        if env.get("SLURM_JOB_ID") == job and "RANK" in env:
            found[int(env["RANK"])] = {k: env[k] for k in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return found


@pytest.mark.slow
def test_slurm_extractor_preempted_requeued_matches_uninterrupted(local_slurm: dict, shards: dict, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  request: pytest.FixtureRequest) -> None:
    """The real extractor stage through `sbatch launch/slurm.sbatch`, 2 tasks: `scancel --signal=USR1` after the
    first checkpoint → both ranks checkpoint, the job requeues itself, the second run (SLURM_RESTART_COUNT=1)
    resumes and finishes with the losses and final weights of an uninterrupted run, bit for bit."""
    monkeypatch.setenv("SLURM_CONF", local_slurm["SLURM_CONF"])  # scontrol reads it even to expand names
    nodes = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7",
             "SLURM_JOB_NODELIST": "gpu[07-09],cpu1"}
    assert rank_env_from_slurm(nodes)["MASTER_ADDR"] == "gpu07"

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # both runs: one thread per rank
    ref, out = tmp_path / "reference", tmp_path / "slurm"
    out.mkdir()
    reference = launch(2, ref, *train_args(shards, ref, *STEPS))  # uninterrupted, outside Slurm, meanwhile
    request.addfinalizer(lambda: reference.poll() is None and os.killpg(reference.pid, signal.SIGKILL))

    # venv last on PATH: see run_tiny in test_run_state.py. sbatch hands this environment to the job.
    env = {**local_slurm, "PATH": f"{os.environ['PATH']}:{REPO / '.venv' / 'bin'}", "DS_ACCELERATOR": "cpu",
           "PYTHON": sys.executable, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))}
    env.pop("UNIRESTORER_ENTRY", None)  # the default: python -m unirestorer.train
    submit = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-task=0", "--cpus-per-task=1", "--time=10",
         f"--output={tmp_path}/slurm-%j.out", str(REPO / "launch" / "slurm.sbatch"),
         *train_args(shards, out, *STEPS)],
        env=env, capture_output=True, text=True, cwd=out, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    wait_for("the first checkpoint", lambda: (out / "ck" / "latest").exists(), 240, tmp_path)
    ranks = task_env(job, out / "ck")
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
    wait_for("the requeued run to complete", lambda: job_field(env, job, "JobState") == "COMPLETED", 240, tmp_path)
    assert job_field(env, job, "Restarts") == "1"

    host = socket.gethostname().split(".")[0]
    assert ranks == {r: {"LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": host,
                         "MASTER_PORT": env["MASTER_PORT"]} for r in range(2)}
    log = (tmp_path / f"slurm-{job}.out").read_text()  # one log per job id, appended across the requeue
    assert f"job {job} run 0 " in log and f"job {job} run 1 " in log, log[-4000:]
    assert log.count("[config] stage extractor, 2 ranks") == 2
    assert "[preemption] rank 0 got SIGUSR1" in log and "[preemption] rank 1 got SIGUSR1" in log  # every task
    stop = int(re.search(r"checkpoint at step (\d+) committed; exiting with 75", log)[1])
    assert 3 <= stop < 6 and f"[preemption] requeueing SLURM job {job}" in log
    assert f"[resume] step {stop} from {out / 'ck' / ckpt.tag_for(stop)} (written by 2 ranks, now 2)" in log
    assert (out / "ck" / "latest").read_text() == "step_00000006"

    code, ref_log = finish(reference, ref)
    assert code == 0, ref_log[-4000:]
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    assert losses(out) == losses(ref)  # every step, bit for bit (JSON floats round-trip exactly)
    assert same_weights(read_checkpoint(out / "ck").dense, read_checkpoint(ref / "ck").dense)
