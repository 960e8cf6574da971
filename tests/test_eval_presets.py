"""`unirestorer eval --preset`: standard test layouts found and paired, the papers' table shape, the
stated conventions, and numbers that match hand computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unirestorer.cli import main
from unirestorer.eval_presets import RAIN, SOTS, BenchmarkSet, convention, load_set
from unirestorer.metrics import Convention, psnr

pytestmark = pytest.mark.usefixtures("one_thread")


def save(path: Path, seed: int, size: tuple[int, int] = (40, 36)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    px = np.clip(np.random.default_rng(seed).normal(120, 50, (*size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(px).save(path)
    return px.astype(np.float32) / 255


def crop16(a: np.ndarray) -> np.ndarray:  # 40x36 -> 32x32, centred: rows 4..36, cols 2..34
    return a[4:36, 2:34]


@pytest.fixture
def promptir_test(tmp_path: Path) -> tuple[Path, dict]:
    """PromptIR's test/ tree: denoise/bsd68, derain/Rain100L/{input,target}, dehaze/{input,target}."""
    root, px = tmp_path / "test", {}
    for i in range(2):
        save(root / "denoise" / "bsd68" / f"{i}.png", i)
    px["rain_in"], px["rain_gt"] = save(root / "derain/Rain100L/input/1.png", 10), save(root / "derain/Rain100L/target/1.png", 11)
    px["haze_in"] = save(root / "dehaze/input/0001_0.8_0.2.png", 12)
    px["haze_gt"] = save(root / "dehaze/target/0001.png", 13)
    return root, px


def cell(table: str, row: str, column: int) -> tuple[float, float]:
    line = next(l for l in table.splitlines() if l.startswith(f"| {row} |"))
    p, s = line.split("|")[column + 2].strip().split("/")
    return float(p), float(s)


def test_promptir_3task_table_shape_conventions_and_numbers(tiny_bundle, promptir_test, tmp_path, capsys):
    root, px = promptir_test
    rc = main(["eval", "--weights", tiny_bundle, "--preset", "promptir-3task", str(root), "--out", str(tmp_path / "o"),
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert ("| Method | Dehazing SOTS | Deraining Rain100L | Denoising CBSD68 σ=15 | Denoising CBSD68 σ=25 | "
            "Denoising CBSD68 σ=50 | Average |") in out
    rows = [l.split("|")[1].strip() for l in out.splitlines() if l.startswith("| ") and "Method" not in l]
    assert rows == ["Input (no restoration)", "Root expert only", "Estimated leaf only", "UniRestorer (routed)",
                    "Oracle node on the path"]  # fmt: skip
    assert out.count("Convention: RGB, float, no rounding, centre crop to a multiple of 16") == 5
    assert "Gaussian σ=25 added after the crop, seed 0 per image, noisy input uint8-truncated" in out
    # the input row by hand: SOTS pairs 0001_0.8_0.2 with 0001, RGB float on the ×16 crop
    assert cell(out, "Input (no restoration)", 0)[0] == pytest.approx(
        psnr(crop16(px["haze_in"]), crop16(px["haze_gt"])), abs=0.005)
    assert cell(out, "Input (no restoration)", 1)[0] == pytest.approx(
        psnr(crop16(px["rain_in"]), crop16(px["rain_gt"])), abs=0.005)
    ps = [cell(out, "UniRestorer (routed)", c)[0] for c in range(5)]
    assert cell(out, "UniRestorer (routed)", 5)[0] == pytest.approx(np.mean(ps), abs=0.01)
    assert (tmp_path / "o" / "table.md").read_text() in out
    assert (tmp_path / "o" / "SOTS" / "results.csv").is_file() and (tmp_path / "o" / "sigma50" / "results.md").is_file()


def test_basicsr_5task_finds_release_layouts_and_leaves_missing_sets_blank(tiny_bundle, tmp_path, capsys):
    root = tmp_path / "data"
    rain_in, rain_gt = save(root / "Rain100L/input/3.png", 1), save(root / "Rain100L/target/3.png", 2)
    for seq, n in (("GOPR0384_11_00", "000001"), ("GOPR0410_11_00", "000007")):
        save(root / f"GoPro/test/{seq}/blur/{n}.png", 3)
        save(root / f"GoPro/test/{seq}/sharp/{n}.png", 4)
    save(root / "LOL/eval15/low/1.png", 5)
    save(root / "LOL/eval15/high/1.png", 6)
    rc = main(["eval", "--weights", tiny_bundle, "--preset", "basicsr-5task", str(root), "--out", str(tmp_path / "o"),
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert ("| Method | Denoising CBSD68 σ=25 | Dehazing SOTS | Deraining Rain100L | Deblurring GoPro | Low-light LOL "
            "| Average |") in out
    line = next(l for l in out.splitlines() if l.startswith("| Input (no restoration) |"))
    assert line.split("|")[2].strip() == "—" and line.split("|")[3].strip() == "—"
    assert f"Not found under {root} (left blank): Denoising CBSD68 σ=25, Dehazing SOTS" in out
    assert "Deraining Rain100L: 1 images" in out and "Deblurring GoPro: 2 images" in out
    rain_conv = "Convention: Y (BT.601), uint8-rounded, centre crop to a multiple of 1"
    assert rain_conv in next(l for l in out.splitlines() if l.startswith("- Deraining"))
    assert "Convention: RGB, uint8-rounded" in next(l for l in out.splitlines() if l.startswith("- Low-light"))
    expected = psnr(rain_in, rain_gt, Convention(y_channel=True, uint8=True, multiple=1))
    assert cell(out, "Input (no restoration)", 2)[0] == pytest.approx(expected, abs=0.005)


def test_noise_inputs_follow_each_convention(tmp_path):
    clean = tmp_path / "bsd68"
    for i in range(2):
        save(clean / f"{i}.png", i, size=(32, 48))  # a multiple of 16: both conventions see the same pixels
    ts = BenchmarkSet("σ=25", "noise", (), 25.0)
    promptir, basicsr = load_set(ts, clean, "", "", "promptir", 0, None), load_set(ts, clean, "", "", "basicsr", 0, None)
    for p, b in zip(promptir, basicsr):
        assert np.array_equal(p.gt, b.gt)
        assert np.allclose(p.lq * 255, np.round(p.lq * 255), atol=1e-3)  # stored as uint8
        assert np.array_equal(p.lq, np.floor(b.lq * np.float32(255)) / np.float32(255))  # truncated, as PromptIR
        assert np.std(b.lq - b.gt) * 255 == pytest.approx(25, rel=0.1)
    assert convention("promptir", "rain") == Convention(False, False, 0, 16)
    assert convention("basicsr", "rain") == Convention(True, True, 0, 1)


def test_preset_errors(tiny_bundle, tmp_path, capsys):
    assert main(["eval", "--weights", tiny_bundle, "--preset", "promptir-9task", str(tmp_path)]) == 2
    assert "choose one of promptir-3task, promptir-5task, basicsr-3task, basicsr-5task" in capsys.readouterr().err
    assert main(["eval", "--weights", tiny_bundle, "--preset", "promptir-3task", str(tmp_path)]) == 2
    assert "none of the 3task test sets found" in capsys.readouterr().err
    save(tmp_path / "dehaze/input/0009_1_0.1.png", 1)
    save(tmp_path / "dehaze/target/0001.png", 2)
    assert main(["eval", "--weights", tiny_bundle, "--preset", "promptir-3task", str(tmp_path)]) == 2
    assert "1 input(s) have no ground truth" in capsys.readouterr().err
    assert SOTS.gt_key == "id" and RAIN.gt_key == "same"
