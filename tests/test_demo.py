"""`unirestorer demo`: its data split, stage configs, logging and table, then the whole run end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unirestorer import demo, demo_data, demo_report, demo_stages
from unirestorer.evaluate import METHODS
from unirestorer.restore import load_model
from unirestorer.train.config import load_config

REPO = Path(__file__).resolve().parent.parent


def test_photo_folder_splits_into_disjoint_heldout_validation_and_training_photos(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(src / f"p{i:02d}.png")
    train, val, heldout, what = demo_data.demo_photos(src, tmp_path / "out", demo_data.FULL)
    pixels = lambda paths: {int(np.asarray(Image.open(p))[0, 0, 0]) for p in paths}  # noqa: E731
    test_ids, val_ids, train_ids = pixels(heldout), pixels(val.iterdir()), pixels(train.iterdir())
    assert (len(test_ids), len(val_ids), len(train_ids)) == (12, 13, 15)  # 12 held out, at most a third validates
    assert not (test_ids & val_ids) and not (test_ids & train_ids) and not (val_ids & train_ids)
    assert test_ids | val_ids | train_ids == set(range(40))
    assert "12 held out, 13 for validation, 15 for training" in what


def test_heldout_crops_come_only_from_heldout_photos_and_every_task_degrades_them(tmp_path: Path) -> None:
    assert not set(demo_data.FALLBACK_PHOTOS) & set(demo_data.HELDOUT_PHOTOS)
    photos = demo_data.save_photos(tmp_path / "photos", demo_data.HELDOUT_PHOTOS)
    crops = demo_data.save_crops(photos, tmp_path / "clean", 64, 3)
    assert len(crops) == 6 and {p.name.split("_")[0] for p in crops} == {"chelsea", "stereo"}
    for crop in crops:  # the crop is the photo's pixels at the grid cell its name gives
        y, x = map(int, crop.stem.rsplit("_", 2)[1:])
        photo = np.asarray(Image.open(tmp_path / "photos" / f"{crop.stem.rsplit('_', 2)[0]}.png"))
        assert np.array_equal(np.asarray(Image.open(crop)), photo[y * 64 : (y + 1) * 64, x * 64 : (x + 1) * 64])
    samples = demo_data.degrade_heldout(tmp_path / "clean", tmp_path / "lq", ("noise", "lowlight"))
    for task, group in samples.items():
        folder = tmp_path / "lq" / task
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in crops)
        for s in group:  # the evaluated LQ is exactly the saved PNG, and it is really degraded
            saved = np.asarray(Image.open(folder / f"{s.name}.png"), dtype=np.float32) / 255
            assert np.array_equal(saved, s.lq) and s.label["task"] == task
            assert np.abs(s.lq - s.gt).mean() > 2 / 255, task
    demo_data.degrade_heldout(tmp_path / "clean", tmp_path / "lq2", ("noise",))
    name = crops[0].name
    assert (tmp_path / "lq2" / "noise" / name).read_bytes() == (tmp_path / "lq" / "noise" / name).read_bytes()  # seed


def test_stage_configs_fit_the_schema_and_chain_the_stages(tmp_path: Path) -> None:
    configs = demo_stages.stage_configs(tmp_path, ["a/{000000..000001}.tar", "b/shard-000000.tar"], ["v/shard-000000.tar"],
                                 demo_data.FULL, 0.5)
    assert list(configs) == list(demo_stages.STAGES)
    loaded = {}
    for stage, config in configs.items():
        demo_stages.write_toml(tmp_path / f"{stage}.toml", config)
        loaded[stage] = load_config(tmp_path / f"{stage}.toml")  # unknown keys or wrong types would raise
    ck = tmp_path / "checkpoints"
    assert loaded["extractor"].train.init_ckpt is None
    assert [loaded[s].train.init_ckpt for s in demo_stages.STAGES[1:]] == [str(ck / s) for s in ("extractor", "extractor", "experts")]
    assert {loaded[s].ckpt.dir for s in demo_stages.STAGES} == {str(ck / s) for s in demo_stages.STAGES}
    steps = demo_data.FULL.steps["experts"] // 2  # --steps-scale 0.5
    e = loaded["experts"]
    assert e.train.level_start_steps == [0, steps // 5, 3 * steps // 5]  # the root a fifth, each level two fifths
    assert e.train.level_end_steps == [steps // 5, 3 * steps // 5, steps]  # one level at a time, root first
    assert e.train.level_lrs == [1e-3, 2e-3, 2e-3]  # the root, the fallback, at half
    # then the root's polish, with a checkpoint and validation at the very end
    assert (e.train.max_steps, e.train.root_polish_steps) == (steps + steps // 6, steps // 6)
    assert e.ckpt.every == e.log.val_every == e.train.max_steps
    assert e.train.loss == "psnr" and loaded["router"].train.loss == "l1"  # the experts' PSNR loss (quality bench)
    assert loaded["router"].deepspeed.micro_batch == demo_data.FULL.micro_batch["router"]
    assert "max_steps" not in configs["cluster"]["train"]  # not a training loop
    assert e.tree.levels == [] and loaded["router"].tree.path == str(ck / "tree")  # sized from the data
    assert e.data.train_shards == ["a/{000000..000001}.tar", "b/shard-000000.tar"] and e.data.online
    assert all(loaded[s].data.val_shards == ["v/shard-000000.tar"] for s in demo_stages.STAGES)
    assert loaded["extractor"].data.patch_size == loaded["extractor"].model.extractor_crop
    assert (e.model.arch, e.model.preset) == ("nafnet", "tiny")
    assert {loaded[s].train.seed for s in demo_stages.STAGES} == {0}  # `unirestorer demo --seed S` seeds every stage
    seeded = demo_stages.stage_configs(tmp_path, ["a.tar"], [], demo_data.FULL, 1.0, seed=3)
    assert [seeded[s]["train"]["seed"] for s in demo_stages.STAGES] == [3, 3, 3, 3]


def test_out_folder_is_reused_only_when_an_earlier_demo_made_it(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match="not an earlier demo's folder"):
        demo.prepare_out(tmp_path / "mine")
    out = tmp_path / "demo"
    demo.prepare_out(out)
    (out / "checkpoints" / "experts").mkdir(parents=True)
    (out / "notes.txt").write_text("kept")
    demo.prepare_out(out)  # a second demo run starts clean but leaves other files alone
    assert not (out / "checkpoints").exists() and (out / "notes.txt").read_text() == "kept"


def test_out_folder_never_leads_a_write_through_a_link(tmp_path: Path) -> None:
    """A link planted among an earlier demo's outputs is removed, not followed (rmtree refuses links, and that
    refusal was ignored: the demo then wrote eval/summary.json into the link's target); a link at --out itself,
    or as the marker, is refused."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "summary.json").write_text("theirs")
    out = tmp_path / "demo"
    assert demo.prepare_out(out) == out
    (out / "eval").symlink_to(elsewhere)
    demo.prepare_out(out)
    assert not (out / "eval").exists() and (elsewhere / "summary.json").read_text() == "theirs"

    (tmp_path / "link").symlink_to(out)
    with pytest.raises(OSError, match="is a symbolic link"):
        demo.prepare_out(tmp_path / "link")
    assert demo.prepare_out(tmp_path / "via" / ".." / "demo") == out  # a path with a parent link or '..' resolves

    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "thesis.tex").write_text("x")
    (planted / demo.MARKER).symlink_to(out / demo.MARKER)  # looks like a demo folder through the link only
    with pytest.raises(FileExistsError, match="not an earlier demo's folder"):
        demo.prepare_out(planted)
    assert (planted / "thesis.tex").read_text() == "x"


def test_a_failing_command_returns_its_code_and_its_output_is_logged(tmp_path: Path, capfd) -> None:
    cmd = [sys.executable, "-c", "import sys; print('step 1'); print('boom', file=sys.stderr); sys.exit(3)"]
    assert demo_stages.run_logged(cmd, dict(os.environ), tmp_path / "logs" / "x.log") == 3
    log = (tmp_path / "logs" / "x.log").read_text()
    assert "step 1" in log and "boom" in log and "step 1" in capfd.readouterr().out


def test_terminal_hides_deepspeed_info_and_the_config_json_but_keeps_bars_live(tmp_path: Path, capfdbinary) -> None:
    t = demo_stages.Terminal(tmp_path / "x.log")
    t.feed(b"[2026-11-26 13:28:48,133] [INFO] [launch.py:152:main] WORLD INFO DICT\n[config] stage x\n{\n")
    t.feed(b'  "data": 1\n}\nkept\n\rexperts:  10%')
    assert capfdbinary.readouterr().out == f"[config] stage x (full config in {tmp_path / 'x.log'})\nkept\n".encode() + b"\rexperts:  10%"
    t.feed(b"\rexperts:  20%|\n[2026-11-26 13:28:48,133] [WARNING] [runner.py] no hostfile\n")
    assert capfdbinary.readouterr().out == b"\rexperts:  20%|\n[2026-11-26 13:28:48,133] [WARNING] [runner.py] no hostfile\n"


def test_summary_table_and_json_have_every_task_and_method(tmp_path: Path, tiny_bundle: str, one_thread) -> None:
    photos = demo_data.save_photos(tmp_path / "photos", demo_data.HELDOUT_PHOTOS)
    demo_data.save_crops(photos, tmp_path / "clean", 32, 1)
    heldout = demo_data.degrade_heldout(tmp_path / "clean", tmp_path / "lq", ("noise", "jpeg"))
    model = load_model(tiny_bundle, "cpu")
    records, extractor, confusion = demo_report.evaluate_tasks(model, heldout, tmp_path / "eval", "cpu")
    rows = {line.split()[0]: sum(map(int, line.split()[1:])) for line in confusion.splitlines()[1:]}
    assert rows == {"noise": 2, "jpeg": 2}  # every held-out crop of a single family, counted once
    doc = demo_report.summary(records, extractor, {"leaf_purity": 0.5, "level1_purity": 0.75}, 12.0)
    assert set(doc) == {"tasks", "mean", "extractor", "tree", "seconds"}
    assert doc["tree"] == {"leaf_purity": 0.5, "level1_purity": 0.75} and doc["seconds"] == 12.0
    assert set(doc["tasks"]) == {"noise", "jpeg"} and set(doc["mean"]) == set(METHODS)
    for task, recs in records.items():
        row = doc["tasks"][task]
        assert set(row) == {"n", *METHODS} and row["n"] == len(recs) == 2
        for m in METHODS:
            values = [r[f"{m}_psnr"] for r in recs]
            assert row[m] == (None if None in values else pytest.approx(np.mean(values)))
        assert row["oracle"] >= max(row["root"], row["leaf"], row["routed"]) - 1e-9
    assert doc["tasks"]["noise"]["classical"] is not None and doc["tasks"]["jpeg"]["classical"] is None
    assert doc["mean"]["classical"] is None  # no classical row for JPEG
    assert doc["mean"]["routed"] == pytest.approx(np.mean([doc["tasks"][t]["routed"] for t in ("noise", "jpeg")]))
    assert set(extractor["per_family"]) == {"noise", "jpeg"} and 0 <= extractor["family_accuracy"] <= 1
    table = demo_report.summary_table(doc, {"noise": [1, 0, 1], "jpeg": [0, 2, 0]})
    assert table.splitlines()[0] == "| task | n | " + " | ".join(METHODS) + " | images routed to level 0/1/2 |"
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:5]}
    assert list(rows) == ["noise", "jpeg", "**mean**"]
    assert rows["jpeg"].split("|")[4].strip() == "—" and rows["noise"].endswith("| 1/0/1 |")
    assert "Extractor exact-match family accuracy" in table and "Tree purity: level 1 0.75, leaves 0.5." in table
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {
        "results.md", "noise.csv", "jpeg.csv", "noise_grid.png", "jpeg_grid.png"}

    shifts = demo_report.evaluate_shifts(model, tmp_path / "clean", tmp_path / "eval", "cpu")
    assert list(shifts) == ["clean", "mild", "camera_noise", "unseen_family"]  # the tiny tree never saw blur, ...
    for name, row in shifts.items():
        assert set(row) == set(demo_report.SHIFT_KEYS) and row["n"] == 2 and sum(row["levels"]) == 2
        assert row["oracle"] >= max(row["root"], row["leaf"], row["routed"]) - 1e-9 and 0 <= row["harm_rate"] <= 1
        assert (tmp_path / "eval" / f"shift_{name}_grid.png").is_file()
    assert shifts["clean"]["input"] == 50.0  # the clean input is its own ground truth (PSNR capped)
    assert shifts["clean"]["harm_rate"] == (1.0 if shifts["clean"]["routed"] < 49.5 else 0.0)  # 2 images: both or none
    table = demo_report.summary_table(doc | {"shifts": shifts}, {"noise": [1, 0, 1], "jpeg": [0, 2, 0]})
    assert "| shift | n | input | classical | root | leaf | router | routed | oracle | harm |" in table
    harmed = round(2 * shifts["camera_noise"]["harm_rate"])
    assert re.search(rf"^\| camera_noise \| 2 \|( [\d.]+ \|){{7}} [\d.]+ % \({harmed}/2\) \| \d/\d/\d \|$", table,
                     re.M), table  # the rate with its count


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_demo_runs_end_to_end(tmp_path: Path) -> None:
    """The real thing on tiny settings: shards, four stages on 2 CPU ranks through deepspeed, export,
    restore, eval."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "unirestorer.cli", "demo", "--out", str(out), "--quick"],
                          capture_output=True, text=True, timeout=580, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    for phase in range(1, 11):
        assert f"phase {phase}/10" in proc.stdout
    assert (out / "bundle" / "bundle.json").is_file() and (out / "bundle" / "weights.safetensors").is_file()
    bank = json.loads((out / "bundle" / "bundle.json").read_text())["calibration"]
    assert bank["samples"] == demo_data.QUICK.cluster_samples and (out / "bundle" / "calibration.safetensors").is_file()
    crops = sorted(p.name for p in (out / "heldout" / "clean").iterdir())
    for task in demo_data.DEMO_TASKS:
        assert sorted(p.name for p in (out / "restored" / task).iterdir()) == crops
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert list(summary["tasks"]) == list(demo_data.DEMO_TASKS)
    for task, row in summary["tasks"].items():
        assert row["n"] == len(crops) and row["oracle"] >= max(row["root"], row["leaf"], row["routed"]) - 1e-9
        assert re.search(rf"^\| {task} \| {len(crops)} \|( ([\d.]+|—) \|){{6}}", proc.stdout, re.M), task
    assert summary["tree"]["level1_purity"] is not None and summary["seconds"] > 0 and summary["seed"] == 0
    assert list(summary["shifts"]) == ["clean", "mild", "camera_noise", "unseen_family"]  # JPEG and snow
    for row in summary["shifts"].values():
        assert set(row) >= {"n", "input", "root", "leaf", "routed", "oracle", "harm_rate", "levels"}
        assert row["n"] == len(crops) and len(row["levels"]) == 3 and sum(row["levels"]) == len(crops)
    assert "| clean |" in proc.stdout and "| camera_noise |" in proc.stdout and "| unseen_family |" in proc.stdout
    assert "clean" in json.loads((out / "checkpoints" / "tree" / "tree_stats.json").read_text())["tasks"]
    assert "| **mean** |" in proc.stdout and f"Everything is in {out}" in proc.stdout
    assert f"unirestorer serve --weights {out / 'bundle'}" in proc.stdout
    assert any((out / "tensorboard" / "tb").glob("events.out.tfevents.*"))
    for log in (out / "logs").glob("*.log"):  # launch/env.py skip_shm_comm_op: no C++ op compiled or loaded
        assert "shm_comm_op" not in log.read_text(), log


def test_a_negative_seed_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "unirestorer.cli", "demo", "--out", str(out), "--seed", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--seed must be >= 0" in proc.stderr and not out.exists()


def test_clean_is_always_trained_never_a_table_task() -> None:
    assert demo.parse_tasks("all") == ("noise", "blur", "jpeg", "rain", "haze", "lowlight", "snow", "mixed")
    assert demo.parse_tasks("noise,clean,haze+blur") == ("noise", "haze+blur")
    with pytest.raises(ValueError, match="no degradation given.*clean is always trained"):
        demo.parse_tasks("clean")
    assert demo_data.ALWAYS_TRAINED == ("clean",)


def test_shards_are_written_by_one_process_per_core_only_for_many_photos(tmp_path: Path) -> None:
    """Starting worker processes costs ~2 s: the quick demo's few photos are written in-process."""
    few, many = tmp_path / "few", tmp_path / "many"
    for folder, n in ((few, 99), (many, 100)):
        folder.mkdir()
        for i in range(n):
            (folder / f"{i:03d}.png").write_bytes(b"")  # only counted, never read
    (few / ".hidden.png").write_bytes(b"")
    assert demo_data.shard_workers(few) == 1
    assert demo_data.shard_workers(many) == min(os.cpu_count() or 1, 8)


def test_the_command_starts_without_torch() -> None:
    """Every subcommand imports torch in its handler only. `shards write` spawns worker processes that import
    the command's module again: with torch at the top they took 5 s each to start, and the demo's shards took
    42-46 s instead of 24-25 s (BENCHMARKS.md, "the demo's fixed costs cut")."""
    code = "import sys, unirestorer.cli; print(sorted({'torch', 'deepspeed', 'timm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
