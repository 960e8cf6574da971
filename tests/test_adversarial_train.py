"""Bad inputs through the real training CLI (`python -m unirestorer.train`, CPU gloo, DeepSpeed): a pickle
planted in a checkpoint, a `latest` pointing outside the folder, a corrupt COMPLETE.json, empty shards,
a checkpoint folder in use, preemption of the cluster stage, NaN gradients. Each case checks the exit code,
the error printed once, and that nothing that existed before was changed. The fast pure-Python parts of
the checkpoint rules (pruning, lost `latest`, --force) are checked without DeepSpeed at the end.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import torch
from skimage import data

from conftest import free_port
from unirestorer.data_shards.writer import write_synthetic
from unirestorer.train import checkpoint as ckpt
from unirestorer.train.ckpt_dir_guard import prepare
from unirestorer.train.config import load_config

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.extractor_backbone=test_resnet", "model.embed_dim=16", "model.extractor_proj_dim=8",
        "model.extractor_crop=16", "model.extractor_max_crops=2", "data.patch_size=16", "data.num_workers=0",
        "data.shuffle_buffer=8", "data.batches_per_epoch=3", "deepspeed.micro_batch=4", "log.every=1",
        "log.val_every=0"]

pytestmark = pytest.mark.timeout(300)


def env(port: int, rank: int = 0, world: int = 1) -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))}


def start(args: list[str], log: Path, port: int, rank: int = 0, world: int = 1,
          entry: tuple[str, ...] = ("-m", "unirestorer.train")) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *entry, *args], env=env(port, rank, world), cwd=log.parent,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 150) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"still running after {timeout} s:\n{log.read_text()[-3000:]}")
    return code, log.read_text()


def train(args: list[str], tmp: Path, name: str = "run") -> tuple[int, str]:
    log = tmp / f"{name}.log"
    return finish(start(args, log, free_port()), log)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock file's (it names whichever run holds the folder now)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def unchanged(before: dict[str, bytes], root: Path) -> bool:
    """Every file that existed is still there with the same bytes."""
    after = snapshot(root)
    return all(after.get(k) == v for k, v in before.items())


def error_once(output: str, text: str) -> None:
    """`text` printed exactly once, in an error line, and no traceback anywhere."""
    lines = [line for line in output.splitlines() if text in line]
    assert len(lines) == 1 and "error: " in lines[0], output[-3000:]
    assert "Traceback" not in output, output[-3000:]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("shards")
    (root / "clean").mkdir()
    for name in ("astronaut", "coffee"):
        img = cv2.resize(getattr(data, name)(), (48, 32), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(root / "clean" / f"{name}.png"), img[:, :, ::-1])
    write_synthetic(root / "clean", root / "train", ("noise", "blur"), per_image=4, patch=16, shard_size=8, workers=1)
    return str(root / "train" / "shard-000000.tar")


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """A real 1-rank extractor run: checkpoints step_00000001, step_00000002 and `latest`."""
    tmp = tmp_path_factory.mktemp("trained")
    code, out = train(["extractor", "--ckpt-dir", str(tmp / "ck"), "--log-dir", str(tmp / "log"), "--max-steps", "2",
                       "--ckpt-every", "1", *TINY, f"data.train_shards=[{shards}]"], tmp)
    assert code == 0, out[-3000:]
    return tmp / "ck"


def resume_args(ck: Path, shards: str, *extra: str) -> list[str]:
    return ["extractor", "--ckpt-dir", str(ck), "--log-dir", str(ck.parent / "log"), "--max-steps", "3",
            *TINY, f"data.train_shards=[{shards}]", *extra]


class Payload:
    """Pickled into a checkpoint file: unpickling it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_resume_refuses_a_planted_pickle_without_running_it(trained, shards, tmp_path):
    ck = Path(shutil.copytree(trained, tmp_path / "ck"))
    marker = tmp_path / "code_ran"
    planted = ck / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload(marker)}, planted)
    before = snapshot(ck)
    code, out = train(resume_args(ck, shards), tmp_path)
    assert code == 2
    error_once(out, f"refusing checkpoint file {planted}: torch.load(weights_only=True) cannot read it (it asks "
                    f"for io.open, which is not an allowed type); it was not unpickled")
    assert not marker.exists() and unchanged(before, ck)


@pytest.mark.slow
def test_latest_pointing_outside_the_folder_is_refused(trained, shards, tmp_path):
    ck = Path(shutil.copytree(trained, tmp_path / "ck"))
    shutil.copytree(trained / "step_00000001", tmp_path / "other" / "step_00000009")
    (ck / "latest").write_text("../other/step_00000009")
    before = snapshot(tmp_path)
    code, out = train(resume_args(ck, shards), tmp_path)
    assert code == 2
    error_once(out, f"--resume auto: {ck / 'latest'} holds '../other/step_00000009', not the tag of a step folder "
                    f"inside {ck} (step_NNNNNNNN); refusing to follow it")
    assert unchanged(before, tmp_path)


@pytest.mark.slow
def test_corrupt_complete_marker_is_a_clear_error(trained, shards, tmp_path):
    ck = Path(shutil.copytree(trained, tmp_path / "ck"))
    (ck / "step_00000002" / ckpt.MARKER).write_text('{"tag": "step_0000')  # truncated by a full disk
    before = snapshot(ck)
    code, out = train(resume_args(ck, shards), tmp_path)
    assert code == 2
    error_once(out, f"{ck / 'step_00000002' / ckpt.MARKER} is corrupt (not valid JSON")
    assert unchanged(before, ck)


@pytest.mark.slow
def test_empty_shards_stop_with_an_error_naming_them(tmp_path):
    import tarfile

    with tarfile.open(tmp_path / "empty-0.tar", "w"):
        pass
    with tarfile.open(tmp_path / "empty-1.tar", "w") as tar:  # a directory entry only
        entry = tarfile.TarInfo("images")
        entry.type = tarfile.DIRTYPE
        tar.addfile(entry)
    spec = str(tmp_path / "empty-{0..1}.tar")
    code, out = train(["extractor", "--ckpt-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "log"),
                       "--max-steps", "2", *TINY, f"data.train_shards=[{spec}]"], tmp_path)
    assert code == 2
    error_once(out, f"shard set '{spec}': a full pass over its 2 shard(s) gave no sample")
    assert not (tmp_path / "ck" / "latest").exists()


@pytest.mark.slow
def test_one_rank_failing_stops_every_rank_with_the_error_printed_once(shards, tmp_path):
    """2 real gloo ranks started without a launcher (as a bare srun or a multi-node job would): rank 0 finds
    --ckpt-dir locked by another run and fails; rank 1, already inside deepspeed.initialize's collectives,
    must not wait for the 30 min process-group timeout."""
    ck = tmp_path / "ck"
    ck.mkdir()
    holder = open(ck / ".lock", "a+")  # another run holds the folder
    fcntl.lockf(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.write("pid 4242 on elsewhere since earlier")
    holder.flush()
    port, args = free_port(), ["extractor", "--ckpt-dir", str(ck), "--log-dir", str(tmp_path / "log"),
                               "--max-steps", "2", *TINY, f"data.train_shards=[{shards}]"]
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = [start(args, logs[r], port, r, 2) for r in range(2)]
    t0 = time.monotonic()
    results = [finish(p, log, timeout=120) for p, log in zip(procs, logs)]
    elapsed = time.monotonic() - t0
    holder.close()
    assert [code for code, _ in results] == [2, 2], results
    both = results[0][1] + results[1][1]
    error_once(both, f"--ckpt-dir {ck} is in use by another run (pid 4242 on elsewhere since earlier)")
    assert "[rank 1] stopping: rank 0 failed (exit 2)" in results[1][1] and "Connection reset" not in both
    assert elapsed < 120  # far below the 1800 s process-group timeout (the bound is the wait above)
    assert not list(ck.glob("step_*"))


@pytest.mark.slow
def test_bad_node_id_inside_the_dispatch_stops_both_ranks(tmp_path):
    """Rank 1 raises in TreeMoE.forward (a node id the tree lacks) while rank 0 waits in the exchange."""
    port, logs = free_port(), [tmp_path / f"rank{r}.log" for r in range(2)]
    entry = (str(REPO / "tests" / "fail_fast_worker.py"),)
    procs = [start([], logs[r], port, r, 2, entry=entry) for r in range(2)]
    results = [finish(p, log, timeout=120) for p, log in zip(procs, logs)]
    assert [code for code, _ in results] == [2, 2], results
    error_once(results[0][1] + results[1][1], "node ids must lie in [0, 3), got [1, 9]")
    assert "Connection reset" not in results[0][1] + results[1][1]  # no rank tripped over a vanished peer
    assert "[rank 0] stopping: rank 1 failed (exit 2)" in results[0][1]
    assert "forward finished" not in results[0][1]


@pytest.mark.slow
def test_cluster_stage_stops_cleanly_on_preemption(trained, shards, tmp_path):
    log, tree = tmp_path / "cluster.log", tmp_path / "tree"
    proc = start(["cluster", *TINY, f"train.init_ckpt={trained}", f"tree.path={tree}", "tree.levels=[1,2]",
                  "tree.num_samples=50000", f"data.train_shards=[{shards}]"], log, free_port())
    deadline = time.monotonic() + 120
    while "[config] stage cluster" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    code, out = finish(proc, log)
    assert code == 75, out[-3000:]
    assert "[preemption] SIGUSR1: cluster stopped after" in out and "no tree written; exiting with 75" in out
    assert not tree.exists()


@pytest.mark.slow
def test_finite_loss_with_nan_gradients_is_skipped_not_applied(tmp_path):
    log = tmp_path / "nan.log"
    proc = start(["--ckpt-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "log"), "--max-steps", "5",
                  "deepspeed.zero_stage=0", "deepspeed.micro_batch=2", "train.max_bad_steps=2", "log.every=1",
                  "log.val_every=0"], log, free_port(), entry=(str(REPO / "tests" / "nan_grad_worker.py"),))
    code, out = finish(proc, log)
    assert code == 65, out[-3000:]
    assert "[nan] step 1: non-finite gradients on some rank; step skipped on every rank" in out
    assert "[nan] stopping: 2 non-finite steps in a row" in out
    assert json.loads(out.strip().splitlines()[-1]) == {"code": 65, "finite": True}  # weights never took NaN


# ---------------------------------------------------------------- checkpoint rules without DeepSpeed


def fake_save(root: Path, step: int, complete: bool = True) -> None:
    folder = root / ckpt.tag_for(step)
    folder.mkdir(parents=True)
    torch.save({"w": torch.ones(1)}, folder / "mp_rank_00_model_states.pt")
    if complete:
        (folder / ckpt.MARKER).write_text(json.dumps({"step": step, "world_size": 1}))


def test_pruning_never_deletes_newer_steps(tmp_path):
    root = tmp_path / "ck"
    fake_save(root, 9)  # a newer step of another history
    for step in (1, 2, 3):
        fake_save(root, step, complete=False)
        ckpt.commit_checkpoint(root, step, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003", "step_00000009"]
    assert (root / "latest").read_text() == "step_00000003"


def test_lost_latest_resumes_from_the_newest_complete_step(tmp_path, capsys):
    root = tmp_path / "ck"
    for step in (2, 4):
        fake_save(root, step)
    fake_save(root, 6, complete=False)
    point = ckpt.resolve_resume("auto", root)
    assert (point.tag, point.step) == ("step_00000004", 4)
    assert "has no 'latest' file: resuming from its newest complete checkpoint step_00000004" in capsys.readouterr().err


def test_fresh_run_into_a_used_folder_is_refused_unless_force(tmp_path):
    root = tmp_path / "ck"
    for step in (2, 4):
        fake_save(root, step)
        ckpt.commit_checkpoint(root, step, keep_last=2)
    before = snapshot(root)
    cfg = load_config(None, [f"ckpt.dir={root}", "ckpt.resume=none"])
    with pytest.raises(ckpt.CheckpointError, match=r"already holds checkpoints of another run \(step_00000002, "
                                                   r"step_00000004, latest\); refusing to start fresh"):
        prepare(cfg, rank=0)
    assert unchanged(before, root)
    other = load_config(None, [f"ckpt.dir={root}", f"ckpt.resume={root / 'step_00000004'}"])
    assert prepare(other, rank=0).step == 4  # resuming inside its own folder is fine
    cfg.ckpt.force = True
    assert prepare(cfg, rank=0) is None
    moved = list(root.glob("replaced-*"))
    assert len(moved) == 1 and not list(root.glob("step_*")) and not (root / "latest").exists()
    assert snapshot(moved[0]) == before


def test_export_refuses_a_latest_outside_the_folder(tmp_path, capsys):
    from unirestorer.cli import main

    root = tmp_path / "ck"
    fake_save(root, 1)
    fake_save(tmp_path / "elsewhere", 5)
    (root / "latest").write_text("../elsewhere/step_00000005")
    assert main(["export", str(root), "--out", str(tmp_path / "bundle")]) == 2
    assert f"export failed: checkpoint {root}: {root / 'latest'} holds '../elsewhere/step_00000005', not the tag " \
           f"of a step folder inside {root} (step_NNNNNNNN); refusing to follow it" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()
