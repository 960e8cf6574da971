"""Stages `experts` and `router`, elastic resume and export, on 2 real CPU ranks (gloo, real DeepSpeed).

One spawn runs the whole pipeline through the spine (extractor → cluster → experts → router) on tiny
shards; the tests then judge its checkpoints and logs, export it, resume the experts stage on 1 rank
through the real entry (`python -m unirestorer.train`), and check the ep_size error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import train_stages_worker  # noqa: E402

from conftest import TINY_EXTRACTOR, free_port  # noqa: E402

LEVELS = [1, 2, 4]


def write_shards(root: Path) -> dict[str, str]:
    """One single-task shard set per task (so balanced sampling has sets to weigh) and a validation set."""
    from unirestorer.data_shards.writer import write_synthetic

    rng = np.random.default_rng(0)
    clean = root / "clean"
    clean.mkdir()
    for i in range(4):
        img = cv2.GaussianBlur(rng.random((40, 40, 3)), (0, 0), 2) * 200 + 30
        cv2.imwrite(str(clean / f"{i}.png"), img.astype(np.uint8))
    specs = {}
    for name, tasks in {"noise": ["noise"], "blur": ["blur"], "val": ["noise", "blur"]}.items():
        write_synthetic(clean, root / name, tasks=tasks, per_image=2, patch=32, workers=1, shard_size=8,
                        seed=len(name))
        specs[name] = str(root / name / "shard-000000.tar")
    return specs


def configs(root: Path, shards: dict[str, str]) -> dict[str, dict]:
    m = TINY_EXTRACTOR
    common = {
        "data": {"train_shards": [shards["noise"], shards["blur"]], "val_shards": [shards["val"]], "patch_size": 32,
                 "num_workers": 0, "shuffle_buffer": 4, "batches_per_epoch": 4},
        "model": {"arch": "nafnet", "preset": "tiny", "extractor_backbone": m["backbone"], "embed_dim": m["embed_dim"],
                  "extractor_proj_dim": m["proj_dim"], "extractor_crop": 32, "extractor_max_crops": m["max_crops"]},
        "deepspeed": {"micro_batch": 2},
    }

    def stage(name: str, steps: int, train: dict, log: dict | None = None, **sections) -> dict:
        return {**common, **sections, "train": {"stage": name, "max_steps": steps, "lr": 1e-3, **train},
                "log": {"dir": str(root / "logs" / name), "every": 1, "val_every": 0, "val_batches": 1, **(log or {})},
                "ckpt": {"dir": str(root / "ckpt" / name), "every": steps, "resume": "auto"}}

    tree = {"levels": LEVELS, "num_samples": 16, "path": str(root / "tree"), "ep_sizes": [1, 2, 2]}
    return {
        "extractor": stage("extractor", 2, {}),
        "cluster": stage("cluster", 0, {"init_ckpt": str(root / "ckpt" / "extractor")}, tree=tree),
        # levels 1 and 2 start at step 2 as copies of their parents, with LR 0: they must stay exact copies
        "experts": stage("experts", 3, {"init_ckpt": str(root / "ckpt" / "extractor"), "warmup_steps": 1,
                                        "level_lrs": [1e-3, 0.0, 0.0], "level_start_steps": [0, 2, 2]},
                         log={"val_every": 3}, tree=tree),
        # resume: A runs 4 steps (checkpoints at 2 and 4); B resumes A's step 2 where level 2 starts from level 1
        **{run: {**stage("experts", 4, {"init_ckpt": str(root / "ckpt" / "extractor"), "level_start_steps": [0, 0, 2],
                                        "loss": "psnr"}, tree=tree), "log": {"dir": str(root / "logs" / run), "every": 1, "val_every": 0},
                 "ckpt": {"dir": str(root / "ckpt" / run), "every": 2, "resume": "auto"}}
           for run in ("experts_a", "experts_b")},
        # A with one more step, in which the root alone trains again at its polish floor
        "experts_p": {**stage("experts", 5, {"init_ckpt": str(root / "ckpt" / "extractor"), "level_start_steps": [0, 0, 2],
                                             "loss": "psnr", "root_polish_steps": 1}, tree=tree),
                      "log": {"dir": str(root / "logs" / "experts_p"), "every": 1, "val_every": 0},
                      "ckpt": {"dir": str(root / "ckpt" / "experts_p"), "every": 2, "resume": "auto"}},
        "router": stage("router", 2, {"init_ckpt": str(root / "ckpt" / "experts"), "schedule": "constant"},
                        log={"val_every": 2}, tree={**tree, "path": ""}),
    }


def spawn_stage_workers(run, cfgs: dict, root: Path) -> None:
    """`run(rank, 2, port, cfgs, root)` on 2 spawned CPU ranks (DeepSpeed's CPU accelerator); env restored after."""
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.start_processes(run, args=(2, free_port(), cfgs, str(root)), nprocs=2, start_method="spawn")
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    cfgs = configs(root, write_shards(root))
    spawn_stage_workers(train_stages_worker.run, cfgs, root)
    return root, cfgs


def metrics(root: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (root / "logs" / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_all_stages_finish(pipeline):
    root, _ = pipeline
    for rank in range(2):
        assert json.loads((root / f"codes_rank{rank}.json").read_text()) == {
            "extractor": 0, "cluster": 0, "experts": 0, "experts_a": 0, "experts_p": 0, "experts_b": 0, "router": 0}


@pytest.mark.slow
def test_experts_stage_metrics_files_and_parent_copy(pipeline):
    from unirestorer.parallel.placement import plan_placement
    from unirestorer.parallel.tree_moe import expected_checkpoint_files
    from unirestorer.train.weights import read_checkpoint

    root, _ = pipeline
    step_dir = root / "ckpt" / "experts" / "step_00000003"
    files = {p.name for p in step_dir.iterdir()}
    assert set(expected_checkpoint_files(plan_placement(LEVELS, 2, [1, 2, 2]))) <= files
    lines = metrics(root, "experts")
    last = [m for m in lines if "train/expert0/images_seen" in m][-1]
    # 3 steps x 2 ranks x 2 images reach the root; levels 1 and 2 only train in step 2 (4 images each)
    assert last["train/expert0/images_seen"] == 12
    assert sum(last[f"train/expert{n}/images_seen"] for n in (1, 2)) == 4
    assert sum(last[f"train/expert{n}/images_seen"] for n in (3, 4, 5, 6)) == 4
    assert {"train/loss/level0", "train/loss/level1", "train/loss/level2", "train/a2a_time_share"} <= set(last)
    assert [m["train/loss/level1"] for m in lines if "train/loss/level1" in m] and "train/loss/level1" not in lines[0]
    val = [m for m in lines if m.get("step") == 3 and any(k.startswith("val/psnr_leaf/") for k in m)]
    assert val and {k.split("/")[1] for k in val[0] if k.startswith("val/")} == {"psnr_root", "psnr_leaf", "psnr_input"}

    ckpt = read_checkpoint(step_dir)
    state = ckpt.client_state["stage_state"]
    parents = json.loads(state["tree_meta"])["parents"]
    w = {(lv, slot): sd for (lv, slot), sd in ckpt.experts.items()}
    node = {n: w[(0, 0)] if n == 0 else w[(1, n - 1)] if n <= 2 else w[(2, n - 3)] for n in range(7)}
    same = lambda a, b: all(torch.equal(node[a][k], node[b][k]) for k in node[a])  # noqa: E731
    # at step 2 level 1 copied the root (broadcast from rank 0) and level 2 its level-1 parent (node 2 lives
    # on rank 1); with LR 0 they stayed exact copies while the root trained on
    assert same(1, 2) and not same(0, 1)
    assert all(same(n, parents[n]) for n in range(3, 7)) and {parents[n] for n in range(3, 7)} == {1, 2}

@pytest.mark.slow
def test_experts_resume_is_exact(pipeline):
    """B = A's step-2 checkpoint resumed to step 4: the same losses and bit-identical weights as A."""
    from unirestorer.train.weights import read_checkpoint

    root, _ = pipeline
    a, b = (read_checkpoint(root / "ckpt" / run / "step_00000004") for run in ("experts_a", "experts_b"))
    assert a.experts.keys() == b.experts.keys() and len(a.experts) == 7
    for key in a.experts:
        assert all(torch.equal(a.experts[key][k], b.experts[key][k]) for k in a.experts[key]), key
    losses = [{m["step"]: m["train/loss"] for m in metrics(root, run) if "train/loss" in m}
              for run in ("experts_a", "experts_b")]
    assert losses[1] == {s: losses[0][s] for s in (3, 4)}
    assert torch.equal(a.client_state["stage_state"]["images_seen"], b.client_state["stage_state"]["images_seen"])


@pytest.mark.slow
def test_root_polish_changes_the_root_alone(pipeline):
    """P = A plus one polish step: equal to A up to A's end, then only the root moves and only it sees images."""
    from unirestorer.train.weights import read_checkpoint

    root, _ = pipeline
    a, p4, p5 = (read_checkpoint(root / "ckpt" / run / step) for run, step in
                 (("experts_a", "step_00000004"), ("experts_p", "step_00000004"), ("experts_p", "step_00000005")))
    assert a.experts.keys() == p5.experts.keys() and len(a.experts) == 7
    equal = lambda x, y: all(torch.equal(x[k], y[k]) for k in x)  # noqa: E731
    assert all(equal(a.experts[key], p4.experts[key]) for key in a.experts)  # nothing before the polish differs
    assert all(equal(a.experts[key], p5.experts[key]) for key in a.experts if key != (0, 0))  # the children stay
    assert not equal(a.experts[(0, 0)], p5.experts[(0, 0)])  # the root moved
    last = metrics(root, "experts_p")[-1]
    assert last["step"] == 5 and "train/loss/level0" in last and "train/loss/level1" not in last
    assert last["train/lr1"] == last["train/lr2"] == 0.0 < last["train/lr"]
    seen = [p4.client_state["stage_state"]["images_seen"], p5.client_state["stage_state"]["images_seen"]]
    assert (seen[1] - seen[0]).tolist() == [4, 0, 0, 0, 0, 0, 0]  # 2 ranks x 2 images, all to the root


@pytest.mark.slow
def test_router_stage_reports_routing(pipeline):
    root, _ = pipeline
    lines = metrics(root, "router")
    train = [m for m in lines if "train/route/leaf_accuracy" in m]
    assert len(train) == 2
    for m in train:
        assert 0.0 <= m["train/route/leaf_accuracy"] <= 1.0
        assert sum(m[f"train/route/level{l}_share"] for l in range(3)) == pytest.approx(1.0)
        assert {"train/loss/l1", "train/loss/dg", "train/loss/aux"} <= set(m)
    val = [m for m in lines if "val/route/leaf_accuracy" in m][-1]
    assert {k.split("/")[1] for k in val if k.startswith("val/psnr")} == {"psnr_routed", "psnr_oracle_leaf",
                                                                           "psnr_input"}
    assert "val/route/on_path" in val


@pytest.mark.slow
def test_router_validation_writes_image_grids_to_tensorboard(pipeline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = pipeline
    events = EventAccumulator(str(root / "logs" / "router" / "tb"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()["images"]
    assert tags and all(t.startswith("router/val_images/") and "/routed_node" in t for t in tags)
    image = events.Images(tags[0])[-1]
    assert image.width == 3 * image.height  # LQ | output | GT side by side


@pytest.mark.slow
def test_export_matches_distributed_model(pipeline, tmp_path):
    from unirestorer.model.unirestorer import UniRestorer
    from unirestorer.train.export import export

    root, _ = pipeline
    note = export(root / "ckpt" / "router", tmp_path / "bundle")
    assert "router stage" in note
    model = UniRestorer.load_bundle(tmp_path / "bundle")
    bundle = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert bundle["source"]["stage"] == "router" and bundle["training_config"]["train"]["stage"] == "router"
    for rank in range(2):
        dist = torch.load(root / f"dist_rank{rank}.pt", weights_only=True)
        out, info = model.restore(dist["images"])
        assert [i["node"] for i in info] == dist["node"].tolist()
        torch.testing.assert_close(out, dist["out"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_calibrate_measures_the_exported_bundle_on_its_training_shards(pipeline, tmp_path):
    """The real command on the real shards export named: the bank holds every path expert's PSNR."""
    from unirestorer.data_shards.loader import StreamConfig, make_loader
    from unirestorer.model.unirestorer import UniRestorer
    from unirestorer.train.export import export

    root, cfgs = pipeline
    export(root / "ckpt" / "router", tmp_path / "bundle")
    res = subprocess.run([sys.executable, "-m", "unirestorer.cli", "calibrate", str(tmp_path / "bundle"), "--samples",
                          "6"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "calibrated" in res.stdout and "6 samples of 2 shard set(s), 32-px patches" in res.stdout
    model = UniRestorer.load_bundle(tmp_path / "bundle")
    bank = model.calibration
    assert len(bank) == 6 and bank.shards == cfgs["router"]["data"]["train_shards"]
    # the same stored samples, streamed here: the bank holds exactly this bundle's path experts' PSNRs on them
    stream = make_loader(StreamConfig(sources=bank.shards, patch=32, batch_size=6, num_workers=0, shuffle_buffer=0,
                                      batches_per_epoch=1, augment=False, pin_memory=False, persistent_workers=False))
    batch = next(iter(stream))
    paths = model.tree.path(model.embed(batch["lq"]))
    assert torch.equal(bank.paths, paths)
    torch.testing.assert_close(bank.psnr, model.level_psnr(batch["lq"], batch["gt"], paths).clamp(max=50))
    res = subprocess.run([sys.executable, "-m", "unirestorer.cli", "calibrate", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and f"{tmp_path / 'nowhere'}: no bundle.json (not a bundle folder)" in res.stderr


@pytest.mark.slow
def test_export_from_experts_checkpoint_routes_to_root(pipeline, tmp_path, capsys):
    root, _ = pipeline
    res = subprocess.run([sys.executable, "-m", "unirestorer.cli", "export", str(root / "ckpt" / "experts"),
                          "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "experts-stage checkpoint" in res.stdout and "root expert" in res.stdout
    from unirestorer.model.unirestorer import UniRestorer

    _, info = UniRestorer.load_bundle(tmp_path / "b").restore(torch.rand(2, 3, 32, 32))
    assert [i["node"] for i in info] == [0, 0]
    from unirestorer.cli import main

    assert main(["export", str(root / "ckpt" / "extractor"), "--out", str(tmp_path / "c")]) == 2
    assert "export needs one of the experts or router stage" in capsys.readouterr().err


def entry(args: list[str], root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")}
    return subprocess.run([sys.executable, "-m", "unirestorer.train", *args], capture_output=True, text=True,
                          env=env, timeout=240, cwd=root)


@pytest.mark.slow
def test_elastic_resume_on_one_rank_and_ep_size_error(pipeline, tmp_path):
    """2 → 1 ranks: all experts re-placed on the one rank, weights as saved, fresh optimizer, one more step;
    tree.ep_sizes [1, 2, 2] cannot be placed on 1 rank: exit 2 with the reason, before any step."""
    from unirestorer.train.weights import read_checkpoint

    root, cfgs = pipeline
    cfg = cfgs["experts"]
    ckpt_dir = tmp_path / "experts"
    (ckpt_dir).mkdir()
    src = root / "ckpt" / "experts"
    subprocess.run(["cp", "-r", str(src / "step_00000003"), str(src / "latest"), str(ckpt_dir)], check=True)
    config = tmp_path / "experts.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k not in ("ckpt", "log")}))
    common = ["--config", str(config), "--ckpt-dir", str(ckpt_dir), "--max-steps", "4", "--log-dir",
              str(tmp_path / "log"), "--ckpt-every", "4", "log.val_every=0"]
    bad = entry(["experts", *common, "tree.ep_sizes=[1,2,2]"], tmp_path)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "tree.ep_sizes=[1, 2, 2] cannot be placed on 1 rank(s)" in bad.stderr
    assert not (ckpt_dir / "step_00000004").exists()

    ok = entry(["experts", *common, "tree.ep_sizes=[]"], tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "elastic resume" in ok.stderr and "written by 2 ranks" in ok.stderr
    assert "placement of 7 experts on 1 ranks" in ok.stderr and "[experts] balanced shard-set weights" in ok.stderr
    before, after = read_checkpoint(ckpt_dir / "step_00000003"), read_checkpoint(ckpt_dir / "step_00000004")
    assert set(after.experts) == {(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3)}  # no padding on 1 rank
    for key in after.experts:  # levels 1, 2 have LR 0: exactly as loaded; the root moved on
        same = all(torch.equal(after.experts[key][k], before.experts[key][k]) for k in after.experts[key])
        assert same == (key[0] != 0), key
    seen = [c.client_state["stage_state"]["images_seen"].sum() for c in (before, after)]
    assert seen[1] > seen[0]
    # the fresh LR schedule was moved to optimizer step 3: after step 4 of 4 the cosine is at its floor (min_lr)
    last = json.loads((tmp_path / "log" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["train/lr"] == pytest.approx(1e-6)


def test_balanced_weights_give_each_leaf_an_equal_share():
    from unirestorer.model.tree import DegradationTree
    from unirestorer.train.stage_experts import balanced_weights

    # leaves 3, 4, 5 hold only noise, leaf 6 only blur (whatever their k-means sizes)
    task_counts = torch.tensor([[10, 90], [10, 0], [0, 90], [0, 60], [0, 20], [0, 10], [10, 0]])
    tree = DegradationTree(torch.zeros(7, 2), [-1, 0, 0, 2, 2, 2, 1], LEVELS, task_counts.sum(1).tolist(),
                           ["blur", "noise"], task_counts)
    assert balanced_weights(tree, ["noise", "noise", "blur"]) == pytest.approx([0.375, 0.375, 0.25])
    assert balanced_weights(tree, ["noise", "snow"]) is None  # a set of a task the tree never saw: no rule
    assert balanced_weights(tree, ["noise"]) is None


def test_level_schedule():
    from unirestorer.train.stage import lr_lambda

    f = lr_lambda(start=2, warmup=2, total=10, floor=0.1, schedule="cosine")
    assert [f(s) for s in (0, 1, 2, 3)] == [0.0, 0.0, 0.5, 1.0]
    assert f(4) == pytest.approx(1.0) and f(10) == pytest.approx(0.1) and f(7) == pytest.approx(0.55)
    assert lr_lambda(0, 0, 10, 0.0, "constant")(9) == 1.0


def test_root_polish_schedule_and_its_errors():
    from unirestorer.train.config import ConfigError, load_config
    from unirestorer.train.stage_experts import LevelLR, check_lora_tree, level_schedule

    def schedule(*overrides: str) -> tuple:
        cfg = load_config(None, ["train.max_steps=12", "train.loss=psnr", "train.root_polish_steps=3", *overrides])
        return cfg, *level_schedule(cfg, 3)[1:]

    # default windows end where the polish starts (step 9), level l starting at l * 9 / 3
    assert schedule()[1:] == ([0, 3, 6], [9, 9, 9])
    assert schedule("train.level_end_steps=[3,6,9]")[1:] == ([0, 3, 6], [3, 6, 9])
    with pytest.raises(ConfigError, match=r"every level must end by step 9, where the root's polish starts"):
        schedule("train.level_end_steps=[3,6,12]")
    with pytest.raises(ConfigError, match=r"one must train until train.max_steps=12 - train.root_polish_steps=3"):
        schedule("train.level_end_steps=[3,6,8]")
    with pytest.raises(ConfigError, match=r"train.root_polish_steps=12: must lie in \[0, train.max_steps=12\)"):
        schedule("train.root_polish_steps=12")
    with pytest.raises(ConfigError, match=r"root_polish_steps=3 needs train.loss = \"psnr\".*got 'l1'"):
        schedule("train.loss=l1")
    with pytest.raises(ConfigError, match=r"model.lora_rank=8: train.root_polish_steps must be 0"):
        check_lora_tree(*schedule("model.lora_rank=8", "train.level_end_steps=[3,6,9]"))
    # the root's LR: its window [0, 3), nothing until the polish, then a warmup + cosine of its own over [9, 12)
    root = LevelLR(0, 1, 3, 0.0, "cosine", True, 9, 12)
    assert [round(root(s), 3) for s in range(12)] == [1.0, 1.0, 0.5, 0, 0, 0, 0, 0, 0, 1.0, 1.0, 0.5]
    assert [LevelLR(6, 1, 9, 0.0, "cosine", True)(s) for s in (8, 9, 11)] == [0.5, 0.0, 0.0]  # a leaf stays done
