"""The experts stage at cluster shape: 4 ranks, SIGKILL + exact resume, elastic 4 -> 2, 2 -> 4 and 2 -> 3, export
of a load-balanced placement, and a two-"node" launch. Everything through `python -m unirestorer.train` and the
real `deepspeed` launcher (launch/cpu_ranks.sh, launch/deepspeed_multi_node.sh), gloo CPU ranks, tiny NAFNet
experts on 16² patches.

Tree [1, 3, 5] with ep sizes [1, 2, 4] on 4 ranks (two communicating exchanges with different groups, slots
[1, 4, 8]), [1, 2, 2] on 2 (slots [1, 4, 6]) and [1, 3, 3] on 3 (slots [1, 3, 6]): every elastic step changes
the padded slot counts, which DeepSpeed's own loader cannot map; train/elastic.py re-places the experts by
tree node instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import free_port  # noqa: E402
from test_train_spine import REPO, finish, launch, losses, wait_for_step  # noqa: E402

from unirestorer.train.weights import expert_files_by_node, read_checkpoint  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
LEVELS = [1, 3, 5]
EP = {4: "[1,2,4]", 2: "[1,2,2]", 3: "[1,3,3]"}
TINY_EXTRACTOR = ["model.extractor_backbone=test_resnet", "model.embed_dim=16", "model.extractor_proj_dim=8",
                  "model.extractor_crop=16", "model.extractor_max_crops=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Shards, an extractor checkpoint (0 steps: a real stage checkpoint, weights as initialised) and a tree."""
    from unirestorer.data_shards.writer import write_synthetic

    root = tmp_path_factory.mktemp("cluster_shape")
    rng = np.random.default_rng(0)
    (root / "clean").mkdir()
    for i in range(4):
        img = cv2.GaussianBlur(rng.random((40, 40, 3)), (0, 0), 2) * 200 + 30
        cv2.imwrite(str(root / "clean" / f"{i}.png"), img.astype(np.uint8))
    write_synthetic(root / "clean", root / "shards", tasks=["noise", "blur", "lowlight"], per_image=6, patch=32,
                    workers=1, shard_size=3, seed=0)
    shards = f"data.train_shards=[{','.join(str(p) for p in sorted((root / 'shards').glob('shard-*.tar')))}]"
    common = [shards, "data.patch_size=16", "data.num_workers=0"]
    code, log = finish(launch(1, root / "extractor", "extractor", "--max-steps", "0", "--ckpt-dir",
                              str(root / "extractor" / "ck"), "--log-dir", str(root / "extractor" / "log"),
                              *common, *TINY_EXTRACTOR), root / "extractor")
    assert code == 0, log[-3000:]
    code, log = finish(launch(1, root / "cluster", "cluster", f"train.init_ckpt={root / 'extractor' / 'ck'}",
                              f"tree.levels={json.dumps(LEVELS)}", "tree.num_samples=24", f"tree.path={root / 'tree'}",
                              *common), root / "cluster")
    assert code == 0, log[-3000:]
    (root / "experts.yaml").write_text(json.dumps({
        "data": {"patch_size": 16, "num_workers": 0, "shuffle_buffer": 4, "batches_per_epoch": 3},
        "model": {"arch": "nafnet", "preset": "tiny"},
        "tree": {"path": str(root / "tree"), "levels": LEVELS},
        "train": {"stage": "experts", "init_ckpt": str(root / "extractor" / "ck"), "lr": 1e-3, "warmup_steps": 1,
                  "level_start_steps": [0, 0, 0]},  # every level from step 1: both exchanges communicate
        "deepspeed": {"micro_batch": 2}, "log": {"every": 1, "val_every": 0}}))
    return {"root": root, "shards": shards}


def experts_args(setup: dict, out: Path, ranks: int, *extra: str) -> list[str]:
    return ["experts", "--config", str(setup["root"] / "experts.yaml"), "--ckpt-dir", str(out / "ck"),
            "--log-dir", str(out / "log"), setup["shards"], f"tree.ep_sizes={EP[ranks]}", *extra]


def node_weights(path: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Every tree node's weights in a checkpoint, whatever its layout (via its slot table)."""
    ck = read_checkpoint(path)
    return {node: ck.experts[key] for node, key in expert_files_by_node(ck, LEVELS).items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    """4 ranks, 4 steps, checkpoints at 2 and 4."""
    out = setup["root"] / "reference"
    code, log = finish(launch(4, out, *experts_args(setup, out, 4, "--max-steps", "4", "--ckpt-every", "2")), out)
    assert code == 0, log[-4000:]
    return out


def test_four_ranks_sigkill_mid_segment_resumes_bit_identical(setup, reference, tmp_path):
    log = (reference / "output.log").read_text()
    assert "placement of 9 experts on 4 ranks" in log and "level 2: 5 experts, ep_size 4, 8 slots" in log
    metrics = [json.loads(x) for x in (reference / "log" / "metrics.jsonl").read_text().splitlines()]
    per_rank = [m for m in metrics if "train/compute/skew" in m]
    assert len(per_rank) == 4 and all(m["train/compute/skew"] >= 1 for m in per_rank)
    # every image runs through one expert per level: 3 rows per image, 2 images per rank
    assert all(sum(m[f"train/compute/rank{r}_images"] for r in range(4)) == 4 * 2 * 3 for m in per_rank)

    args = experts_args(setup, tmp_path, 4, "--max-steps", "4", "--ckpt-every", "2", "train.debug_step_sleep=0.5")
    proc = launch(4, tmp_path, *args)
    wait_for_step(proc, tmp_path, 3)  # mid-segment 2..4; step 4 sleeps 0.5 s before its checkpoint
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (tmp_path / "ck" / "latest").read_text() == "step_00000002"
    code, log = finish(launch(4, tmp_path, *args), tmp_path)
    assert code == 0, log[-4000:]
    assert "[resume] step 2 from" in log and "elastic" not in log
    assert losses(tmp_path) == losses(reference)
    a, b = node_weights(reference / "ck"), node_weights(tmp_path / "ck")
    assert sorted(a) == list(range(9)) and all(same(a[n], b[n]) for n in a)


def elastic(setup, source: Path, out: Path, ranks: int, step: int) -> str:
    """Resume `source` on `ranks` ranks and take one step at LR 0: every expert must stay as saved, so the
    re-placed weights (and ZeRO's refreshed fp32 copies) are exact, whatever the optimizer does."""
    args = experts_args(setup, out, ranks, "--resume", str(source / "ck"), "--max-steps", str(step),
                        "train.level_lrs=[0.0,0.0,0.0]")
    code, log = finish(launch(ranks, out, *args), out)
    assert code == 0, log[-4000:]
    assert losses(out).keys() == {step}
    return log


def test_elastic_four_to_two_to_four_and_three(setup, reference, tmp_path):
    saved = node_weights(reference / "ck")
    log = elastic(setup, reference, tmp_path / "two", 2, 5)
    line = [x for x in log.splitlines() if "[checkpoint] elastic resume" in x]
    assert len(line) == 1 and "written by 4 ranks, this run has 2" in line[0]
    assert "optimizer state reset" in line[0] and "9 experts re-placed by tree node" in line[0]
    assert "slots per level [1, 4, 8] -> [1, 4, 6]" in line[0]
    assert all(same(saved[n], w) for n, w in node_weights(tmp_path / "two" / "ck").items())
    for ranks, slots in ((4, "[1, 4, 6] -> [1, 4, 8]"), (3, "[1, 4, 6] -> [1, 3, 6]")):
        out = tmp_path / f"two_to_{ranks}"
        log = elastic(setup, tmp_path / "two", out, ranks, 6)
        assert f"written by 2 ranks, this run has {ranks}" in log and slots in log
        after = node_weights(out / "ck")
        assert sorted(after) == list(range(9)) and all(same(saved[n], after[n]) for n in after), ranks


def test_export_of_a_load_balanced_placement(reference, tmp_path):
    """The 4-rank run placed its experts by load (slot order != node order): the bundle still holds each node's
    own weights, found through the checkpoint's slot table."""
    from unirestorer.model.unirestorer import UniRestorer
    from unirestorer.train.export import export

    ck = read_checkpoint(reference / "ck")
    table = ck.dense["tree_moe.slot_nodes"]
    assert table[2].tolist() != [4, 5, 6, 7, 8, -1, -1, -1]  # the skewed tree was bin-packed
    export(reference / "ck", tmp_path / "bundle")
    model = UniRestorer.load_bundle(tmp_path / "bundle")
    for node, weights in node_weights(reference / "ck").items():
        assert same(model.expert(node).state_dict(), weights), node


def test_two_node_launch_equals_one_node(setup, reference, tmp_path):
    """What a hostfile launch runs on each node: launch/deepspeed_multi_node.sh with NODE_RANK 0 and 1 (deepspeed
    --no_ssh --node_rank, one master address), 2 ranks per "node", both on this machine. The same 4-rank run as
    the one-node reference: every loss and the final weights bit for bit."""
    (tmp_path / "hostfile").write_text("node-a slots=2\nnode-b slots=2\n")
    env = {**os.environ, "PATH": f"{os.environ['PATH']}:{REPO / '.venv' / 'bin'}", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           # as launch() does: DeepSpeed's CPU comm op built once into this venv, not into a shared cache
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))}
    args = experts_args(setup, tmp_path, 4, "--max-steps", "4", "--ckpt-every", "2")
    procs = []
    for node in (0, 1):
        log = (tmp_path / f"node{node}.log").open("w")
        procs.append(subprocess.Popen([str(REPO / "launch" / "deepspeed_multi_node.sh"), str(tmp_path / "hostfile"),
                                       *args], env={**env, "NODE_RANK": str(node)}, cwd=tmp_path, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    codes = [p.wait(timeout=400) for p in procs]
    logs = [(tmp_path / f"node{node}.log").read_text() for node in (0, 1)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "nnodes=2, num_local_procs=2, node_rank=1" in logs[1] and "[config] stage experts, 4 ranks" in logs[0]
    assert losses(tmp_path) == losses(reference)
    a, b = node_weights(reference / "ck"), node_weights(tmp_path / "ck")
    assert all(same(a[n], b[n]) for n in a)
