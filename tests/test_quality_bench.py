"""bench/quality.py --quick: the whole protocol end to end on 2 real CPU ranks (every model trained by the
stages, exported, evaluated on every test set), judged on the table's structure, conventions and costs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "bench"))


def test_full_plan_configs_are_valid_and_share_the_trees_schedule(tmp_path):
    """The default plan's step counts (a quick run is too short for the root's polish to exist)."""
    from quality_runs import plan

    from unirestorer.demo_data import FULL
    from unirestorer.demo_stages import stage_configs
    from unirestorer.train.config import from_dict
    from unirestorer.train.stage_experts import check_lora_tree, level_schedule

    runs = {name: (stage, from_dict(cfg)) for name, stage, cfg in
            plan(stage_configs(tmp_path, ["s.tar"], ["v.tar"], FULL, 1.0), tmp_path / "ck", 3)}
    for name, (stage, cfg) in runs.items():
        if stage == "experts":  # what the stage checks first: every schedule must pass
            check_lora_tree(cfg, *level_schedule(cfg, 1 if cfg.tree.levels == [1] else 3)[1:])
            assert cfg.ckpt.every == cfg.log.val_every == cfg.train.max_steps, name
    steps = {name: (cfg.train.max_steps, cfg.train.root_polish_steps) for name, (stage, cfg) in runs.items()
             if stage == "experts"}
    assert steps == {"experts": (1050, 150), "dense_inference": (300, 0), "dense_compute": (1050, 0),
                     "lora_experts": (900, 0)}


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "test" / "CBSD68").is_dir(), reason="needs ../shared/data beside the repository")
def test_quick_run_table_structure_conventions_and_costs(tmp_path):
    from quality import load_test_set, slug, test_sets
    from quality_report import CONVENTION, ROWS

    out = tmp_path / "q"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--quick", "--json", "--seed", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)  # --json: stdout is the document alone (the stages write to stderr)
    assert doc == json.loads((out / "quality.json").read_text()) and doc["seed"] == 1
    for model in ("tree", "dense_inference", "dense_compute", "lora"):  # the seed reached every model's stages
        bundle = json.loads((out / "bundles" / model / "bundle.json").read_text())
        assert bundle["training_config"]["train"]["seed"] == 1, model
    sets = test_sets(quick=True)
    assert list(doc["results"]) == [ts.name for ts in sets] and len(sets) == 9
    assert sum(v["group"] == "mixed/unseen" for v in doc["sets"].values()) == 3
    for ts in sets:
        rows = doc["results"][ts.name]
        assert set(rows) == set(ROWS)
        for row, v in rows.items():
            has_value = row != "classical" or ts.task in ("noise", "haze")  # BM3D/NL-means and the DCP only
            assert (v["psnr"] is not None) == has_value, (ts.name, row)
            if has_value:
                assert 0 < v["psnr"] < 100 and 0 <= v["ssim"] <= 1
        assert (out / "eval" / f"{slug(ts.name)}.png").stat().st_size > 1000
    # the input row is the PSNR of the loaded input itself (RGB, float, no rounding)
    s = load_test_set(sets[1], DATA, 64)[0]
    mse = np.mean((s.lq.astype(np.float64) - s.gt) ** 2)
    assert doc["results"]["CBSD68 σ25"]["input"]["psnr"] == pytest.approx(10 * np.log10(1 / mse), abs=1e-6)
    # costs as the checkpoints counted them: equal training compute = the tree's passes, equal inference = a level's
    c = doc["costs"]
    assert c["dense_compute"]["image_passes"] == c["tree"]["image_passes"] == 3 * c["dense_inference"]["image_passes"]
    assert c["lora"]["image_passes"] == c["tree"]["image_passes"]
    # tree [1, 9, 18] from 9 tasks (5 families, 3 mixtures, clean): 28 experts
    assert c["dense_inference"]["expert_params"] * 28 == c["tree"]["expert_params"]
    assert c["lora"]["expert_params"] < 0.5 * c["tree"]["expert_params"]
    assert c["lora"]["bundle_bytes"] < c["tree"]["bundle_bytes"]
    assert slug("Kodak24 haze+blur (unseen)") == "Kodak24_haze_blur_unseen" and slug("CBSD68 σ25") == "CBSD68_sigma25"
    assert [g["met"] for g in doc["goals"]] == [g["margin"] >= 0 for g in doc["goals"]] and len(doc["goals"]) == 5
    table = (out / "quality.md").read_text()
    assert CONVENTION in table and "| goal | measured | margin (dB) | |" in table
    header = table.splitlines()[0]
    assert all(ts.name in header for ts in sets) and "mean mixed/unseen" in header and "bundle MB" in header
