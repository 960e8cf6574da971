"""The paper recipes (configs/paper-*/): they load, validate, hang together across stages, and scale
from their reference global batch to 1, 8 and 64 ranks exactly as the printed line says."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from unirestorer.train.config import ConfigError, build_ds_config, load_config
from unirestorer.train.scaling import micro_batch_of, scale_to_world
from unirestorer.train.stage import lr_lambda

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = {"paper-3task": ["noise", "rain", "haze"], "paper-5task": ["noise", "rain", "haze", "blur", "lowlight"],
           "paper-7task": ["noise", "rain", "haze", "blur", "lowlight", "snow", "jpeg"]}
STAGES = ("extractor", "cluster", "experts", "router")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_loads_validates_and_its_stages_fit_together(recipe):
    from unirestorer.parallel.placement import plan_placement

    folder = CONFIGS / recipe
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.toml" for s in STAGES)
    cfg = {s: load_config(folder / f"{s}.toml") for s in STAGES}
    for stage, c in cfg.items():
        assert c.train.stage == stage
        assert [Path(p).name for p in c.data.train_shards] == RECIPES[recipe]
        assert "gpus" not in (folder / f"{stage}.toml").read_text().lower().replace("--num_gpus", "")
        ds = build_ds_config(c, "cuda")  # gradient clipping explicit, ZeRO <= 2, bf16 on for CUDA
        assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0
        lr_lambda(0, c.train.warmup_steps, c.train.max_steps, 0.0, c.train.schedule)  # a known schedule
    assert cfg["cluster"].tree.levels == [1, 7, 19]  # the paper's tree for single degradations
    assert cfg["cluster"].train.init_ckpt == cfg["experts"].train.init_ckpt == cfg["extractor"].ckpt.dir
    assert cfg["experts"].tree.path == cfg["cluster"].tree.path and cfg["router"].train.init_ckpt == cfg["experts"].ckpt.dir
    assert cfg["experts"].data.val_shards and cfg["router"].data.val_shards
    e, r = cfg["experts"].train, cfg["router"].train
    assert (e.lr, e.schedule, e.loss, cfg["experts"].data.patch_size, cfg["experts"].model.preset) == (
        3e-4, "cosine", "l1", 128, "paper")
    assert (r.lr, r.schedule, cfg["router"].data.patch_size) == (1e-3, "constant", 256)
    for world in (1, 8, 64):  # no GPU count in the config: the tree places on any of these
        plan_placement(cfg["cluster"].tree.levels, world, list(cfg["experts"].tree.ep_sizes) or None)


def test_paper_expert_is_the_papers_restormer():
    from unirestorer.model.experts import create_expert
    from unirestorer.train.stage_experts import expert_spec

    spec = expert_spec(load_config(CONFIGS / "paper-3task" / "experts.toml"))
    n = sum(p.numel() for p in create_expert(**spec).parameters())
    assert spec == {"name": "restormer", "preset": "paper", "stat_window": 128} and n == pytest.approx(26.1e6, rel=0.01)


# (stage, world) -> (line, lr, max_steps, warmup_steps); the extractor's reference is 1 rank × 64
EXPECTED = {
    ("experts", 1): ("global batch 8 = 1 rank × 8; lr 3.00e-04 = 3.00e-04 × √(8/8) (sqrt rule, reference global "
                     "batch 8); max_steps 300000 = ⌈300000 × 8/8⌉", 3e-4, 300000, 0),
    ("experts", 8): ("global batch 64 = 8 ranks × 8; lr 8.49e-04 = 3.00e-04 × √(64/8) (sqrt rule, reference global "
                     "batch 8); max_steps 37500 = ⌈300000 × 8/64⌉", 3e-4 * math.sqrt(8), 37500, 0),
    ("experts", 64): ("global batch 512 = 64 ranks × 8; lr 2.40e-03 = 3.00e-04 × √(512/8) (sqrt rule, reference "
                      "global batch 8); max_steps 4688 = ⌈300000 × 8/512⌉", 2.4e-3, 4688, 0),
    ("router", 8): ("global batch 64 = 8 ranks × 8; lr 2.83e-03 = 1.00e-03 × √(64/8) (sqrt rule, reference global "
                    "batch 8); max_steps 6250 = ⌈50000 × 8/64⌉", 1e-3 * math.sqrt(8), 6250, 0),
    ("extractor", 1): ("global batch 64 = 1 rank × 64; lr 1.00e-03 = 1.00e-03 × √(64/64) (sqrt rule, reference "
                       "global batch 64); max_steps 20000 = ⌈20000 × 64/64⌉", 1e-3, 20000, 500),
    ("extractor", 64): ("global batch 4096 = 64 ranks × 64; lr 8.00e-03 = 1.00e-03 × √(4096/64) (sqrt rule, "
                        "reference global batch 64); max_steps 313 = ⌈20000 × 64/4096⌉", 8e-3, 313, 8),
}


@pytest.mark.parametrize("stage,world", sorted(EXPECTED))
def test_recipes_scale_to_the_printed_values(stage, world):
    line, lr, steps, warmup = EXPECTED[(stage, world)]
    for recipe in RECIPES:
        cfg, written = (load_config(CONFIGS / recipe / f"{stage}.toml") for _ in range(2))
        printed = scale_to_world(cfg, world, micro_batch_of(cfg))
        assert printed.startswith(f"[scale] {line}"), printed
        t = cfg.train
        assert (t.lr, t.max_steps, t.warmup_steps) == (pytest.approx(lr, rel=1e-12), steps, warmup)
        assert t.min_lr == pytest.approx(written.train.min_lr * lr / written.train.lr)


def test_scaling_rules_and_every_step_key():
    cfg = load_config(None, ["train.reference_batch=16", "train.lr_scaling=linear", "train.lr=1e-3",
                             "train.max_steps=1000", "train.warmup_steps=10", "train.level_lrs=[1e-3,5e-4]",
                             "train.level_start_steps=[0,101]", "train.level_end_steps=[101,899]",
                             "train.root_polish_steps=101"])  # fmt: skip
    line = scale_to_world(cfg, 4, 8)
    assert "global batch 32 = 4 ranks × 8; lr 2.00e-03 = 1.00e-03 × 32/16 (linear rule" in line
    t = cfg.train
    assert (t.lr, t.level_lrs, t.max_steps, t.warmup_steps, t.level_start_steps, t.level_end_steps) == (
        2e-3, [2e-3, 1e-3], 500, 5, [0, 51], [51, 450])  # steps rounded up: never fewer images than the recipe
    assert t.root_polish_steps == 50  # its start, step 899, scaled as the levels' ends: the last level ends there
    none = load_config(None, ["train.reference_batch=8", "train.lr_scaling=none", "train.max_steps=80"])
    assert "lr 3.00e-04 = 3.00e-04 × 1 (none rule" in scale_to_world(none, 2, 8) and none.train.max_steps == 40
    untouched = load_config(None, ["train.max_steps=80"])
    assert "as written" in scale_to_world(untouched, 64, 8) and (untouched.train.max_steps, untouched.train.lr) == (80, 3e-4)
    with pytest.raises(ConfigError, match="train.lr_scaling must be one of sqrt, linear, none"):
        scale_to_world(load_config(None, ["train.reference_batch=8", "train.lr_scaling=cube"]), 2, 8)


@pytest.mark.slow
def test_a_real_run_prints_the_line_and_trains_the_scaled_steps(tmp_path):
    """`python -m unirestorer.train extractor` on one CPU rank: reference batch 1, micro batch 2 -> half the
    steps at √2 × the LR, printed once, and the run ends at the scaled step."""
    from unirestorer.data_shards.writer import write_synthetic

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import TINY_EXTRACTOR

    import cv2
    import numpy as np

    clean = tmp_path / "clean"
    clean.mkdir()
    for i in range(2):
        cv2.imwrite(str(clean / f"{i}.png"), (np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8))
    write_synthetic(clean, tmp_path / "shards", tasks=["noise", "blur"], per_image=2, patch=32, workers=1)
    m = TINY_EXTRACTOR
    args = ["extractor", f"data.train_shards=[{tmp_path / 'shards'}]", "data.patch_size=32", "data.num_workers=0",
            "data.batches_per_epoch=4", f"model.extractor_backbone={m['backbone']}", f"model.embed_dim={m['embed_dim']}",
            f"model.extractor_proj_dim={m['proj_dim']}", "model.extractor_crop=32",
            f"model.extractor_max_crops={m['max_crops']}", "deepspeed.micro_batch=2", "train.max_steps=4", "train.lr=1e-3",
            "train.reference_batch=1", "log.val_every=0", "--ckpt-dir", str(tmp_path / "ckpt"),
            "--log-dir", str(tmp_path / "log")]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")}
    run = subprocess.run([sys.executable, "-m", "unirestorer.train", *args], capture_output=True, text=True, env=env,
                         timeout=240, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("[scale]")]
    assert lines == ["[scale] global batch 2 = 1 rank × 2; lr 1.41e-03 = 1.00e-03 × √(2/1) (sqrt rule, reference "
                     "global batch 1); max_steps 2 = ⌈4 × 1/2⌉ (the recipe's images)"]  # fmt: skip
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000002"
