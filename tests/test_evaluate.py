"""`unirestorer eval`: metrics against hand computations, the baselines, and the written reports."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from unirestorer.cli import main
from unirestorer.evaluate import METHODS, evaluate, load_pairs, load_synthetic, synth_label
from unirestorer.metrics import Convention, crop_to_multiple, psnr, rgb_to_y, ssim
from unirestorer.model.unirestorer import UniRestorer


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs on 2 shared cores (tests/conftest.py)


def pair(seed: int = 0, shape=(32, 40, 3)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = rng.random(shape, dtype=np.float32)
    return np.clip(gt + rng.normal(0, 0.1, shape).astype(np.float32), 0, 1), gt


def test_psnr_matches_the_formula_under_each_convention():
    pred, gt = pair()
    mse = np.mean((pred.astype(np.float64) - gt) ** 2)
    assert psnr(pred, gt) == pytest.approx(10 * math.log10(1 / mse), abs=1e-9)
    r8 = lambda a: np.round(a.astype(np.float64) * 255) / 255
    assert psnr(pred, gt, Convention(uint8=True)) == pytest.approx(10 * math.log10(1 / np.mean((r8(pred) - r8(gt)) ** 2)))
    b = pred[3:-3, 3:-3].astype(np.float64) - gt[3:-3, 3:-3]
    assert psnr(pred, gt, Convention(border=3)) == pytest.approx(10 * math.log10(1 / np.mean(b**2)))
    assert psnr(gt, gt) == math.inf


def test_ssim_is_skimage_with_the_stated_arguments():
    pred, gt = pair(1)
    ref = structural_similarity(gt.astype(np.float64), pred.astype(np.float64), data_range=1.0, channel_axis=2)
    assert ssim(pred, gt) == pytest.approx(ref, abs=1e-12)
    assert 0.0 < ssim(pred, gt) < 0.99 and ssim(gt, gt) == pytest.approx(1.0)
    y = structural_similarity(rgb_to_y(gt), rgb_to_y(pred), data_range=1.0)
    assert ssim(pred, gt, Convention(y_channel=True)) == pytest.approx(y, abs=1e-12)


def test_y_channel_is_bt601():
    rgb = np.array([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.2, 0.5, 0.9]]])
    expected = [235 / 255, 16 / 255, (16 + 65.481 * 0.2 + 128.553 * 0.5 + 24.966 * 0.9) / 255]
    assert rgb_to_y(rgb)[0] == pytest.approx(expected, abs=1e-12)


def test_crop_to_multiple_is_centred():
    img = np.arange(481 * 321).reshape(481, 321)
    out = crop_to_multiple(img, 16)
    assert out.shape == (480, 320) and out[0, 0] == img[0, 0] and out[-1, -1] == img[479, 319]
    assert crop_to_multiple(np.zeros((40, 50)), 16).shape == (32, 48)
    assert crop_to_multiple(np.arange(50)[None, :].repeat(16, 0), 16)[0, 0] == 1  # 2 px cut: one each side


@pytest.fixture
def clean_dir(tmp_path):
    d = tmp_path / "clean"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        smooth = np.kron(rng.random((3, 4, 3)), np.ones((16, 16, 1)))  # blocks: a clean image
        Image.fromarray((smooth * 200 + 20).astype(np.uint8)).save(d / f"img{i}.png")
    return d


def test_synthetic_noise_is_seeded_and_has_the_stated_sigma(clean_dir):
    a = load_synthetic(clean_dir, "noise:25", seed=3)
    assert [s.name for s in a] == ["img0", "img1", "img2", "img3"] and a[0].gt.shape == (48, 64, 3)
    b, c = load_synthetic(clean_dir, "noise:25", seed=3), load_synthetic(clean_dir, "noise:25", seed=4)
    assert all(np.array_equal(x.lq, y.lq) for x, y in zip(a, b)) and not np.array_equal(a[0].lq, c[0].lq)
    assert np.std(a[0].lq - a[0].gt) == pytest.approx(25 / 255, rel=0.05)
    assert synth_label("rain") == ("rain", None)
    with pytest.raises(ValueError, match="--synth 'fog': unknown degradation task 'fog'"):
        synth_label("fog")


def test_oracle_is_the_best_node_on_each_path(tiny_bundle, clean_dir):
    model = UniRestorer.load_bundle(tiny_bundle)
    samples = load_synthetic(clean_dir, "noise:25")
    records, outputs = evaluate(model, samples, progress=False)
    assert len(records) == 4 and outputs[0].shape == samples[0].gt.shape
    for r in records:
        assert len(r["path"]) == model.tree.n_levels and r["path"][r["level"]] == r["node"]
        assert r["oracle_psnr"] == max(r["path_psnr"]) and all(r["oracle_psnr"] >= p for p in r["path_psnr"])
        assert r["oracle_psnr"] >= max(r["root_psnr"], r["leaf_psnr"], r["routed_psnr"])
        assert r["root_psnr"] == r["path_psnr"][0] and r["leaf_psnr"] == r["path_psnr"][-1]
        assert r["routed_psnr"] == r["path_psnr"][r["level"]]
        assert r["input_psnr"] == pytest.approx(psnr(samples[records.index(r)].lq, samples[records.index(r)].gt))


def test_eval_cli_writes_table_csv_json_grid(tiny_bundle, clean_dir, tmp_path, capsys):
    out, summary = tmp_path / "ev", tmp_path / "summary.md"
    rc = main(["eval", "--weights", tiny_bundle, "--clean", str(clean_dir), "--synth", "noise:25", "--seed", "1",
               "--out", str(out), "--json", "--summary", str(summary), "--device", "cpu", "--grid", "1"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "Convention: RGB, float, no rounding, centre crop to a multiple of 16" in printed
    table = (out / "results.md").read_text()
    for m in METHODS:
        assert f"\n| {m} | " in table or (m == "classical" and "\n| classical (BM3D) | " in table)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["name"] for r in rows] == ["img0", "img1", "img2", "img3"]
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["summary"]) == set(METHODS)
    assert doc["summary"]["routed"]["psnr"] == pytest.approx(np.mean([float(r["routed_psnr"]) for r in rows]))
    with Image.open(out / "grid.png") as grid:
        assert grid.size[1] == 2 * (128 + 2)  # worst and best row
    lines = summary.read_text().splitlines()
    assert lines[0].startswith("| set | metric on | n | input PSNR") and lines[2].startswith("| noise:25 | RGB | 4 |")


def test_eval_pairs_and_their_errors(tiny_bundle, clean_dir, tmp_path, capsys):
    lq = tmp_path / "lq"
    lq.mkdir()
    for s in load_synthetic(clean_dir, "noise:15")[:2]:
        Image.fromarray((s.lq * 255 + 0.5).astype(np.uint8)).save(lq / f"{s.name}.png")
    samples = load_pairs(lq, clean_dir)
    assert [s.name for s in samples] == ["img0", "img1"]
    rc = main(["eval", "--weights", tiny_bundle, "--pairs", str(lq), str(clean_dir), "--task", "noise", "--instruct",
               "--y-channel", "--uint8", "--border", "2", "--out", str(tmp_path / "p"), "--device", "cpu"])
    assert rc == 0 and "Y (BT.601), uint8-rounded" in capsys.readouterr().out
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(lq / "extra.png")
    assert main(["eval", "--weights", tiny_bundle, "--pairs", str(lq), str(clean_dir), "--task", "noise"]) == 2
    assert "have no ground truth" in capsys.readouterr().err


DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "test"


@pytest.mark.skipif(not (DATA / "LOL").is_dir(), reason="real test sets not present (../shared/data/test)")
def test_no_restoration_psnr_matches_the_published_reference_numbers():
    """../shared/data/README.md: Rain100L 26.90 dB (Y), LOL eval15 7.77 dB (RGB) for the inputs themselves."""
    rain = load_pairs(DATA / "Rain100L" / "input", DATA / "Rain100L" / "target")
    assert len(rain) == 100
    assert np.mean([psnr(s.lq, s.gt, Convention(y_channel=True)) for s in rain]) == pytest.approx(26.90, abs=0.005)
    lol = load_pairs(DATA / "LOL" / "low", DATA / "LOL" / "high", multiple=1)
    assert np.mean([psnr(s.lq, s.gt) for s in lol]) == pytest.approx(7.77, abs=0.005)


def test_classical_row_is_the_library_called_directly(tiny_bundle, clean_dir, monkeypatch):
    """BM3D (bm3d.bm3d_rgb) and NL-means (scikit-image, h = 0.8σ, patch 5, distance 6) with the known σ for
    noise, the dark channel prior for haze, none for the other tasks."""
    import bm3d
    from skimage.restoration import denoise_nl_means

    from unirestorer import classical

    model = UniRestorer.load_bundle(tiny_bundle)
    samples = load_synthetic(clean_dir, "noise:25")
    assert samples[0].sigma == pytest.approx(25 / 255)
    records, _ = evaluate(model, samples, progress=False, set_task="noise")
    one_thread = bm3d.BM3DProfile()
    one_thread.num_threads = 1  # reproducible to the bit, so the images evaluate() restores at once are too
    for s, r in zip(samples, records):
        ref = np.clip(bm3d.bm3d_rgb(s.lq, 25 / 255, profile=one_thread), 0, 1)
        assert r["classical_psnr"] == psnr(ref.astype(np.float32), s.gt)
        assert r["classical_psnr"] > r["input_psnr"] + 3  # it really denoises
    records, _ = evaluate(model, samples[:1], progress=False, set_task="noise", denoiser="nlmeans")
    s = samples[0]
    ref = denoise_nl_means(s.lq, h=0.8 * 25 / 255, sigma=25 / 255, patch_size=5, patch_distance=6, fast_mode=True,
                           channel_axis=-1)
    assert records[0]["classical_psnr"] == pytest.approx(psnr(np.clip(ref, 0, 1).astype(np.float32), s.gt), abs=1e-6)
    # unknown sigma (a real noisy pair): estimated by scikit-image's wavelet estimator, close to the truth
    assert classical.estimate_sigma(s.lq) == pytest.approx(25 / 255, rel=0.15)
    monkeypatch.setattr(classical, "has_bm3d", lambda: False)  # where bm3d is not installed: NL-means
    assert classical.method_name("noise") == "NL-means" and classical.pick_denoiser() == "nlmeans"
    with pytest.raises(ValueError, match="bm3d package is not installed"):
        classical.pick_denoiser("bm3d")
    haze = load_synthetic(clean_dir, "haze")
    records, _ = evaluate(model, haze, progress=False, set_task="haze")
    assert np.mean([r["classical_psnr"] - r["input_psnr"] for r in records]) > 1  # the dark channel prior dehazes
    records, _ = evaluate(model, haze[:1], progress=False, set_task="rain")
    assert records[0]["classical_psnr"] is None and classical.method_name("rain") is None
    # one task per sample (the shift sets): each image gets its own task's floor, as evaluated alone
    mixed, _ = evaluate(model, [haze[0], haze[1]], progress=False, set_task=["haze", "rain"])
    alone = [evaluate(model, [haze[i]], progress=False, set_task=t)[0][0] for i, t in ((0, "haze"), (1, "rain"))]
    assert mixed == alone and mixed[0]["classical_psnr"] is not None
    with pytest.raises(ValueError, match="1 tasks for 2 samples"):
        evaluate(model, haze[:2], progress=False, set_task=["haze"])


def test_dark_channel_prior_inverts_the_scattering_model_it_assumes():
    """A haze image made with the DCP's own model (constant airlight, transmission from a smooth depth that
    reaches far enough to show the airlight) comes back much closer to the clean image."""
    from unirestorer.classical import dehaze

    rng = np.random.default_rng(0)
    clean = np.kron(rng.random((12, 12, 3)), np.ones((8, 8, 1))).astype(np.float32) * 0.6 + 0.1
    clean[..., 2] *= 0.2  # a dark channel near zero everywhere, the prior's assumption
    depth = np.linspace(2.0, 0.2, 96, dtype=np.float32)[:, None, None]  # the top rows are mostly airlight
    t = np.exp(-1.2 * depth)
    hazy = clean * t + 0.9 * (1 - t)
    out = dehaze(hazy)
    assert psnr(out, clean) > psnr(hazy, clean) + 4  # measured +5.2
    assert psnr(out[32:], clean[32:]) > psnr(hazy[32:], clean[32:]) + 8  # +10.0 where t > 0.2
