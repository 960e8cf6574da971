"""The training spine for real: `python -m unirestorer.train` through launch/cpu_ranks.sh (the deepspeed
launcher), 2 CPU gloo ranks, a tiny extractor on tiny shards written by the project's shard writer.

One uninterrupted 2-rank extractor run (module fixture) is the reference for: exact resume after SIGKILL,
the stored config, elastic 2 -> 1 resume, and the cluster stage's input.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import cv2
import pytest
import torch
from skimage import data

from conftest import free_port
from unirestorer.data_shards.writer import write_synthetic
from unirestorer.model.tree import DegradationTree
from unirestorer.train import checkpoint as ckpt
from unirestorer.train.weights import load_submodule, read_checkpoint

REPO = Path(__file__).resolve().parent.parent
TASKS = ("noise", "blur", "lowlight")
TINY = ["model.extractor_backbone=test_resnet", "model.embed_dim=16", "model.extractor_proj_dim=8",
        "model.extractor_crop=16", "model.extractor_max_crops=2", "data.patch_size=16", "data.num_workers=0",
        "data.shuffle_buffer=8", "data.batches_per_epoch=3", "deepspeed.micro_batch=4", "log.every=1",
        "log.val_every=3", "log.val_batches=1"]

pytestmark = pytest.mark.timeout(300)


def launch(n: int, out: Path, *args: str) -> subprocess.Popen:
    """`launch/cpu_ranks.sh n <stage> args` in its own process group; output to out/output.log."""
    out.mkdir(parents=True, exist_ok=True)
    # venv last on PATH: `deepspeed` is found there, `ninja` stays the suite's (see tests/test_run_state.py)
    env = {**os.environ, "PATH": f"{os.environ['PATH']}:{REPO / '.venv' / 'bin'}", "MASTER_PORT": str(free_port()),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))}
    env.pop("UNIRESTORER_ENTRY", None)
    return subprocess.Popen([str(REPO / "launch" / "cpu_ranks.sh"), str(n), *args], env=env, cwd=out,
                            stdout=(out / "output.log").open("a"), stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, out: Path) -> tuple[int, str]:
    code = proc.wait(timeout=240)
    return code, (out / "output.log").read_text()


def train_args(shards: dict, out: Path, *extra: str) -> list[str]:
    return ["extractor", "--ckpt-dir", str(out / "ck"), "--log-dir", str(out / "log"), *TINY,
            f"data.train_shards=[{shards['train']}]", f"data.val_shards=[{shards['val']}]", *extra]


def losses(out: Path) -> dict[int, float]:
    """Per-step training loss from the JSON log (a resumed run's lines come last and win)."""
    lines = [json.loads(x) for x in (out / "log" / "metrics.jsonl").read_text().splitlines()]
    return {d["step"]: d["train/loss"] for d in lines if "train/loss" in d}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shards")
    (root / "clean").mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = cv2.resize(getattr(data, name)(), (64, 48), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(root / "clean" / f"{name}.png"), img[:, :, ::-1])
    write_synthetic(root / "clean", root / "train", TASKS, per_image=6, patch=32, shard_size=8, workers=1)
    write_synthetic(root / "clean", root / "val", TASKS, per_image=2, patch=32, shard_size=8, workers=1, seed=1)
    return {"train": str(root / "train" / "shard-{000000..000002}.tar"), "val": str(root / "val" / "shard-000000.tar")}


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """The uninterrupted run: 6 steps, checkpoints every 2 (epochs of 3 batches roll over inside segments)."""
    out = tmp_path_factory.mktemp("reference")
    code, log = finish(launch(2, out, *train_args(shards, out, "--max-steps", "6", "--ckpt-every", "2")), out)
    assert code == 0, log[-4000:]
    return out


def test_config_printed_and_stored(reference: Path) -> None:
    log = (reference / "output.log").read_text()
    assert "[config] stage extractor, 2 ranks" in log and '"extractor_backbone": "test_resnet"' in log
    ck = read_checkpoint(reference / "ck")
    assert ck.step == 6 and ck.path.name == "step_00000006" and ck.client_state["stage"] == "extractor"
    config = ck.client_state["config"]
    assert config["model"]["embed_dim"] == 16 and config["ckpt"]["every"] == 2 and config["train"]["max_steps"] == 6
    assert config["data"]["val_shards"] and ck.experts == {}
    assert sorted(losses(reference)) == [1, 2, 3, 4, 5, 6]
    lines = [json.loads(x) for x in (reference / "log" / "metrics.jsonl").read_text().splitlines()]
    val = [d for d in lines if "val/family_acc" in d]
    assert [d["step"] for d in val] == [3, 6] and all(0 <= d["val/family_acc"] <= 1 for d in val)
    train = [d for d in lines if "train/loss" in d]
    assert all(d["train/images_per_s"] > 0 and d["train/lr"] > 0 and "train/contrastive" in d for d in train)
    assert any((reference / "log" / "tb").iterdir())  # TensorBoard event file
    assert sorted(p.name for p in (reference / "ck").glob("step_*")) == ["step_00000004", "step_00000006"]


def rank_pids(pgid: int) -> dict[int, int]:
    """Rank -> pid of the training processes the launcher started in process group `pgid`."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or os.getpgid(int(proc.name)) != pgid:
                continue
            if b"unirestorer.train" not in (proc / "cmdline").read_bytes():
                continue
            env = dict(x.split(b"=", 1) for x in (proc / "environ").read_bytes().split(b"\0") if b"=" in x)
        except (OSError, ProcessLookupError):
            continue
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(proc.name)
    return found


def wait_for_step(proc: subprocess.Popen, out: Path, step: int) -> None:
    deadline = time.time() + 180
    while not (out / "log" / "metrics.jsonl").exists() or step not in losses(out):
        assert proc.poll() is None and time.time() < deadline, (out / "output.log").read_text()[-4000:]
        time.sleep(0.02)


def test_preempted_then_sigkilled_mid_segment_resumes_bit_identical(shards, reference: Path, tmp_path: Path) -> None:
    """SIGUSR1 on rank 1 only → every rank checkpoints step 3 (mid-segment 2..4) and exits 75; resume; SIGKILL of
    the whole launcher group at step 5 (mid-segment 4..6); resume: every loss and the final weights equal the
    uninterrupted run's, bit for bit."""
    args = train_args(shards, tmp_path, "--max-steps", "6", "--ckpt-every", "2", "train.debug_step_sleep=0.5")
    proc = launch(2, tmp_path, *args)
    wait_for_step(proc, tmp_path, 2)
    os.kill(rank_pids(proc.pid)[1], signal.SIGUSR1)  # caught in step 3 (the step sleeps 0.5 s)
    code, log = finish(proc, tmp_path)
    assert code == 75, log[-4000:]
    assert "[preemption] rank 1 got SIGUSR1" in log and "checkpoint at step 3 committed; exiting with 75" in log
    assert (tmp_path / "ck" / "latest").read_text() == "step_00000003"

    proc = launch(2, tmp_path, *args)  # --resume auto is the default
    wait_for_step(proc, tmp_path, 5)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait(timeout=30)
    assert (tmp_path / "ck" / "latest").read_text() == "step_00000004"
    assert not (tmp_path / "ck" / "step_00000006").exists()

    code, log = finish(launch(2, tmp_path, *args, "--resume", "auto"), tmp_path)
    assert code == 0, log[-4000:]
    assert "[resume] step 3 from" in log and "[resume] step 4 from" in log
    assert losses(tmp_path) == losses(reference)  # every step, bit for bit (JSON floats round-trip exactly)
    assert same_weights(read_checkpoint(tmp_path / "ck").dense, read_checkpoint(reference / "ck").dense)


def test_elastic_two_to_one_loads_identical_weights(reference: Path, shards, tmp_path: Path) -> None:
    args = train_args(shards, tmp_path, "--max-steps", "6", "--resume", str(reference / "ck"))
    code, log = finish(launch(1, tmp_path, *args), tmp_path)
    assert code == 0, log[-4000:]
    assert "elastic resume" in log and "written by 2 ranks, this run has 1" in log
    assert "loading weights only; optimizer, LR schedule state and RNG start fresh" in log
    assert "[resume] elastic: LR schedule moved to its saved position (6 optimizer steps)" in log
    saved = read_checkpoint(tmp_path / "ck")  # the final save of the 1-rank run, no step taken after loading
    assert saved.step == 6 and saved.ds_meta["dp_world_size"] == 1
    assert same_weights(saved.dense, read_checkpoint(reference / "ck").dense)


def test_non_finite_losses_skipped_then_stop_with_last_good_checkpoint(shards, tmp_path: Path) -> None:
    args = train_args(shards, tmp_path, "--max-steps", "8", "--ckpt-every", "2", "train.debug_nan_steps=[3,5,6]",
                      "train.max_bad_steps=2")
    code, log = finish(launch(2, tmp_path, *args), tmp_path)
    assert code == 65, log[-4000:]
    assert "[nan] step 3: non-finite loss on some rank; step skipped on every rank (1 in a row, 1 in total)" in log
    assert "[nan] stopping: 2 non-finite steps in a row (train.max_bad_steps=2), steps 5..6" in log
    assert f"Last good checkpoint: {tmp_path / 'ck' / 'step_00000004'} (intact)" in log
    steps = losses(tmp_path)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6] and steps[3] == "nan" and isinstance(steps[4], float)
    lines = [json.loads(x) for x in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [d["train/bad_steps"] for d in lines if "train/bad_steps" in d] == [0, 0, 1, 1, 2, 3]
    assert (tmp_path / "ck" / "latest").read_text() == "step_00000004"
    good = read_checkpoint(tmp_path / "ck")
    assert good.step == 4 and good.client_state["bad_steps"] == 1
    # the skipped step moved neither the optimizer nor the LR schedule
    assert good.ds_meta["global_steps"] == 3 and good.client_state["lr_steps"] == 3
    assert all(torch.isfinite(t).all() for t in good.dense.values() if t.is_floating_point())
    assert ckpt.resolve_resume("auto", tmp_path / "ck").step == 4


def test_cluster_stage_builds_tree_with_stats(reference: Path, shards, tmp_path: Path) -> None:
    tree_dir = tmp_path / "tree"
    args = ["cluster", f"data.train_shards=[{shards['train']}]", "data.patch_size=16", f"train.init_ckpt={reference / 'ck'}",
            "tree.levels=[1,2,4]", "tree.num_samples=21", f"tree.path={tree_dir}"]
    code, log = finish(launch(2, tmp_path, *args), tmp_path)
    assert code == 0, log[-4000:]
    assert "[cluster] tree written to" in log and "purity per level" in log
    stats = json.loads((tree_dir / "tree_stats.json").read_text())
    assert (tree_dir / "tree.json").is_file() and (tree_dir / "tree.safetensors").is_file()
    assert stats["num_samples"] == 21 and stats["level_sizes"] == [1, 2, 4]
    assert sorted(stats["tasks"]) == sorted(TASKS) and sum(stats["tasks"].values()) == 21
    assert [sum(c) for c in stats["counts_per_level"]] == [21, 21, 21]
    for node in stats["nodes"]:
        assert sum(node["composition"].values()) == node["count"]
        if node["count"]:
            assert node["purity"] == round(node["composition"][node["majority_task"]] / node["count"], 4)
    for level in (1, 2):  # a level's purity: its nodes' majority shares, weighted by their sizes
        nodes = [n for n in stats["nodes"] if n["level"] == level]
        majority = sum(n["composition"][n["majority_task"]] for n in nodes if n["count"])
        assert stats["purity_per_level"][level] == pytest.approx(majority / 21, abs=1e-4)
    assert stats["level1_purity"] == stats["purity_per_level"][1] and stats["leaf_purity"] == stats["purity_per_level"][2]
    # per node and task, the min and max label intensity of the samples routed there, gathered from both ranks
    tree = DegradationTree.load(tree_dir)
    labels = []
    for shard in Path(shards["train"]).parent.glob("shard-*.tar"):
        with tarfile.open(shard) as tar:
            labels += [json.loads(tar.extractfile(m).read())["label"] for m in tar if m.name.endswith(".json")]
    drawn = {t: {label["intensity"] for label in labels if label["task"] == t} for t in TASKS}
    for node in range(tree.n_nodes):
        children = (tree.parents == node).nonzero().flatten().tolist()
        for task in tree.task_names:
            span = tree.intensity_range(node, task)
            assert (span is None) == (task not in tree.composition(node))  # synthetic labels: every degree known
            if span and children:  # a node's samples are its children's
                spans = [s for c in children if (s := tree.intensity_range(c, task))]
                assert span == (min(s[0] for s in spans), max(s[1] for s in spans))
            if span:  # the degrees of that task's samples in the shards, not another task's
                assert span[0] <= span[1] and set(span) <= drawn[task]


# ---------------------------------------------------------------- weights.py on hand-made DeepSpeed-layout files


class NotAllowed:  # a pickled class: weights_only=True must refuse it
    pass


def test_read_checkpoint_experts_and_errors(tmp_path: Path) -> None:
    step = tmp_path / "ck" / "step_00000002"
    step.mkdir(parents=True)
    torch.save({"module": {"embed.weight": torch.ones(2)}, "global_steps": 2, "ds_version": "0.19.8",
                "step": 2, "stage": "experts", "config": {"train": {"lr": 1.0}}}, step / "mp_rank_00_model_states.pt")
    prefix = "levels.1.deepspeed_moe.experts.deepspeed_experts"
    for e in (0, 3):
        torch.save({f"{prefix}.{e}.conv.weight": torch.full((2,), float(e))},
                   step / f"layer_1_expert_{e}_mp_rank_00_model_states.pt")
    (step / ckpt.MARKER).write_text(json.dumps({"step": 2, "world_size": 1}))
    (tmp_path / "ck" / "latest").write_text("step_00000002")

    ck = read_checkpoint(tmp_path / "ck")  # the root: follows `latest`
    assert ck.path == step and ck.step == 2 and ck.client_state == {"step": 2, "stage": "experts",
                                                                     "config": {"train": {"lr": 1.0}}}
    assert sorted(ck.experts) == [(1, 0), (1, 3)] and torch.equal(ck.experts[(1, 3)]["conv.weight"], torch.full((2,), 3.0))
    assert ck.expert_prefix[(1, 3)] == f"{prefix}.3." and ck.ds_meta["global_steps"] == 2
    assert read_checkpoint(step, experts=False).experts == {}

    module = torch.nn.Linear(2, 1)
    with pytest.raises(ckpt.CheckpointError, match=r"no weights under prefix 'router\.'.*\['embed'\]"):
        load_submodule(module, ck.dense, "router")

    torch.save({f"{prefix}.5.conv.weight": torch.ones(1)}, step / "layer_1_expert_4_mp_rank_00_model_states.pt")
    with pytest.raises(ckpt.CheckpointError, match="layer_1_expert_4.*not a parameter of expert 4"):
        read_checkpoint(step)
    (step / "layer_1_expert_4_mp_rank_00_model_states.pt").unlink()

    torch.save({"module": {}, "x": NotAllowed()}, step / "mp_rank_00_model_states.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"mp_rank_00_model_states\.pt with torch\.load\(weights_only=True\)"):
        read_checkpoint(step)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint file .*mp_rank_00_model_states.pt"):
        read_checkpoint(step)
    (step / ckpt.MARKER).unlink()
    with pytest.raises(ckpt.CheckpointError, match="has no COMPLETE.json: its save did not finish"):
        read_checkpoint(tmp_path / "ck")
    with pytest.raises(ckpt.CheckpointError, match="holds no mp_rank_00_model_states.pt"):
        read_checkpoint(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing")
