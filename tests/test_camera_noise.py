"""Camera noise (data_shards/camera.py): its statistics against the model's formulas, and its place in the
degradation library (trained pipeline registered, evaluation pipeline not)."""

from __future__ import annotations

import numpy as np
import pytest

from unirestorer.data_shards import camera
from unirestorer.data_shards import degradations as dg


def test_raw_noise_variance_is_shot_times_signal_plus_read_squared() -> None:
    rng = np.random.default_rng(0)
    shot, read = 4e-3, 1e-2
    for x in (0.05, 0.2, 0.6):
        raw = np.full((400, 400), x, np.float32)
        noisy = camera.add_sensor_noise(raw, shot, read, rng)
        assert noisy.mean() == pytest.approx(x, abs=2e-3)
        assert noisy.var() == pytest.approx(shot * x + read**2, rel=0.03)


def test_bilinear_demosaicing_spreads_noise_as_its_formula_says() -> None:
    """i.i.d. raw noise of variance s²: the red channel keeps s² at red sites, s²/2 at green sites (mean of two
    reds), s²/4 at blue sites (mean of four); horizontal neighbours red site → green site correlate 1/√2."""
    rng = np.random.default_rng(1)
    s = 0.05
    raw = (0.5 + s * rng.standard_normal((512, 512))).astype(np.float32)
    red = camera.demosaic_bilinear(raw)[2:-2, 2:-2, 0] - 0.5  # borders normalise over fewer sites
    at_red, at_green, at_blue = red[0::2, 0::2], red[0::2, 1::2], red[1::2, 1::2]
    assert at_red.var() == pytest.approx(s**2, rel=0.05)
    assert at_green.var() == pytest.approx(s**2 / 2, rel=0.05)
    assert at_blue.var() == pytest.approx(s**2 / 4, rel=0.05)
    corr = np.corrcoef(at_red.ravel(), at_green.ravel())[0, 1]  # (y, 2x) with its right neighbour (y, 2x+1)
    assert corr == pytest.approx(1 / np.sqrt(2), abs=0.02)
    far = np.corrcoef(red[:, :-4:].ravel(), red[:, 4:].ravel())[0, 1]  # 4 px apart: no shared raw site
    assert abs(far) < 0.02


def test_colour_matrix_correlates_the_channels_as_m_sigma_m_transposed() -> None:
    rng = np.random.default_rng(2)
    ccm = camera.random_ccm(rng)
    m = np.asarray(ccm)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-3)  # grey stays grey
    noise = 0.01 * rng.standard_normal((300, 300, 3)).astype(np.float32)
    out = camera._to_srgb_linear(0.3 + noise, ccm, 2.0, 1.5) - camera._to_srgb_linear(
        np.full_like(noise, 0.3), ccm, 2.0, 1.5)
    gains = np.diag([2.0, 1.0, 1.5])
    expected = m @ gains @ (0.01**2 * np.eye(3)) @ gains @ m.T
    np.testing.assert_allclose(np.cov(out.reshape(-1, 3).T), expected, rtol=0.06, atol=2e-6)


def test_noise_free_pipelines_return_the_image_exactly() -> None:
    """Without sensor noise (and JPEG) both pipelines give the input back: the pair's ground truth is the clean
    image, and demosaicing's loss of detail is not part of the degradation."""
    rng = np.random.default_rng(3)
    img = rng.random((32, 32, 3)).astype(np.float32)
    p = {"shot": 0.0, "read": 0.0, "red_gain": 2.0, "blue_gain": 1.7, "ccm": camera.random_ccm(rng), "jpeg": 0}
    assert np.array_equal(camera.camera_noise(img, p, rng), img)
    p_eval = {**camera.sample_camera_noise_eval(rng), "shot": 0.0, "read": 0.0}
    smooth = camera.cv2.GaussianBlur(img, (0, 0), 3.0)  # its JPEG (quality >= 75) is all that is left
    assert np.mean((camera.camera_noise_eval(smooth, p_eval, rng) - smooth) ** 2) < 10 ** -3.5


def test_noise_is_signal_dependent_in_srgb_too() -> None:
    """Shot noise: a bright flat patch is noisier in raw than a dark one, before the tone curve."""
    rng = np.random.default_rng(4)
    p, _ = camera.sample_camera_noise(np.random.default_rng(5))
    p |= {"shot": 8e-3, "read": 1e-3, "jpeg": 0, "ccm": np.eye(3).tolist(), "red_gain": 1.0, "blue_gain": 1.0}
    raw_dark = camera.add_sensor_noise(np.full((300, 300), 0.05, np.float32), p["shot"], p["read"], rng)
    raw_bright = camera.add_sensor_noise(np.full((300, 300), 0.5, np.float32), p["shot"], p["read"], rng)
    assert raw_bright.var() / raw_dark.var() == pytest.approx((8e-3 * 0.5 + 1e-6) / (8e-3 * 0.05 + 1e-6), rel=0.08)


def test_camera_noise_is_a_noise_type_and_the_evaluation_pipeline_is_not_trained_on() -> None:
    assert dg.DEGRADATIONS["camera_noise"].family == "noise"
    assert "camera_noise" in dg.TYPES_OF["noise"]
    assert all(d.apply is not camera.camera_noise_eval for d in dg.DEGRADATIONS.values())
    params, intensity = camera.sample_camera_noise(np.random.default_rng(6))
    assert 0.0 <= intensity <= 1.0 and camera.SHOT[0] <= params["shot"] <= camera.SHOT[1]
    quiet = camera.noise_intensity(camera.SHOT[0], camera.read_from_shot(camera.SHOT[0], 0.0))
    loud = camera.noise_intensity(camera.SHOT[1], camera.read_from_shot(camera.SHOT[1], 0.0))
    assert (quiet, loud) == (0.0, 1.0)


def test_camera_noise_label_reproduces_the_image() -> None:
    img = np.random.default_rng(7).random((40, 48, 3)).astype(np.float32)
    label = {"task": "noise", "components": [{"family": "noise", "type": "camera_noise",
                                              "params": camera.sample_camera_noise(np.random.default_rng(8))[0]}]}
    a = dg.apply_label(img, label, np.random.default_rng(9))
    b = dg.apply_label(img, label, np.random.default_rng(9))
    assert np.array_equal(a, b) and not np.array_equal(a, img) and a.dtype == np.float32


def test_evaluation_pipeline_differs_from_the_trained_one() -> None:
    import skimage.data

    img = skimage.data.astronaut()[100:164, 200:264].astype(np.float32) / 255
    p = camera.sample_camera_noise_eval(np.random.default_rng(11))
    out = camera.camera_noise_eval(img, p, np.random.default_rng(12))
    assert out.shape == img.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    assert 20 < 10 * np.log10(1 / np.mean((out - img) ** 2)) < 45  # noisy, not destroyed


def test_clean_task_is_the_image_itself() -> None:
    img = np.random.default_rng(13).random((16, 16, 3)).astype(np.float32)
    out, label = dg.synthesize(img, "clean", np.random.default_rng(0))
    assert np.array_equal(out, img) and label == {"task": "clean", "intensity": 0.0, "components": []}
