"""Physics and bookkeeping of the degradation synthesis (data_shards.degradations / weather / kernels)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from unirestorer.data_shards import degradations as dg
from unirestorer.data_shards import kernels, weather


def _textured(h: int = 96, w: int = 96, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus mid-frequency texture, in (0, 1)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    base = np.stack([x / w, y / h, 0.5 + 0.3 * np.sin(x / 5) * np.cos(y / 7)], axis=2)
    return np.clip(0.1 + 0.8 * base + 0.05 * rng.standard_normal((h, w, 3)), 0, 1).astype(np.float32)


def _flat(value: float, size: int = 256) -> np.ndarray:
    return np.full((size, size, 3), value, np.float32)


@pytest.mark.parametrize("sigma", [5.0, 15.0, 25.0, 50.0])
def test_gaussian_noise_sigma_on_flat_image(sigma: float) -> None:
    out = dg.gaussian_noise(_flat(0.5), {"sigma": sigma}, np.random.default_rng(1))
    measured = (out - 0.5).std() * 255
    assert abs(measured / sigma - 1) < 0.03
    assert abs(out.mean() - 0.5) < 0.01


def test_poisson_noise_variance_is_signal_over_peak() -> None:
    for value, peak in [(0.2, 50.0), (0.5, 200.0), (0.8, 1000.0)]:
        out = dg.poisson_noise(_flat(value), {"peak": peak}, np.random.default_rng(2))
        assert abs(out.mean() / value - 1) < 0.01
        assert abs(out.var() / (value / peak) - 1) < 0.05


def test_blur_kernels_sum_to_one_and_are_centred() -> None:
    rng = np.random.default_rng(3)
    ks = [kernels.gaussian_kernel(s) for s in (0.5, 1.7, 4.0)]
    ks += [kernels.disk_kernel(r) for r in (1.0, 2.5, 6.0)]
    ks += [dg.blur_kernel("motion_blur", dg.sample_motion_blur(rng)[0]) for _ in range(20)]
    ks += [kernels.line_kernel(20, a) for a in (0, 33, 90)]
    for k in ks:
        assert k.dtype == np.float32 and k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
        assert abs(float(k.sum(dtype=np.float64)) - 1) < 1e-5 and k.min() >= 0
        c = k.shape[0] // 2
        yy, xx = np.mgrid[-c : c + 1, -c : c + 1]
        assert abs((k * xx).sum()) < 1e-3 and abs((k * yy).sum()) < 1e-3  # no image shift


def test_defocus_disk_has_the_requested_radius() -> None:
    k = kernels.disk_kernel(5.0)
    c = k.shape[0] // 2
    yy, xx = np.mgrid[-c : c + 1, -c : c + 1]
    area = k.sum() / k.max()  # pixels fully inside count 1, rim pixels their covered fraction
    assert abs(area / (np.pi * 25) - 1) < 0.01
    assert (k[np.hypot(xx, yy) > 5.8] == 0).all()


def test_motion_path_has_the_requested_length() -> None:
    path = kernels.shake_path(25.0, 30.0, 0.4, np.random.default_rng(4))
    assert np.hypot(*np.diff(path, axis=0).T).sum() == pytest.approx(25.0)


def test_blur_keeps_flat_images_and_removes_detail_more_with_larger_sigma() -> None:
    rng = np.random.default_rng(5)
    flat = _flat(0.3, 64)
    for kind, p in [("gaussian_blur", {"sigma": 2.0}), ("defocus_blur", {"radius": 3.0}),
                    ("motion_blur", dg.sample_motion_blur(rng)[0])]:  # fmt: skip
        assert np.allclose(dg.DEGRADATIONS[kind].apply(flat, p, rng), 0.3, atol=1e-5)
    img = _textured()
    detail = [np.abs(np.diff(dg.gaussian_blur(img, {"sigma": s}, rng), axis=1)).mean() for s in (0.5, 1.5, 4.0)]
    assert detail[0] > detail[1] > detail[2]


def test_jpeg_error_grows_as_quality_falls() -> None:
    img = _textured(128, 128)
    err = [np.abs(dg.jpeg(img, {"quality": q}, None) - img).mean() for q in (95, 70, 40, 10)]
    assert all(a < b for a, b in zip(err, err[1:], strict=False)), err


def test_haze_transmission_and_contrast() -> None:
    img = _textured()
    for beta in (0.4, 1.0, 2.0):
        t = weather.transmission(img, beta)
        assert t.shape == img.shape[:2] and t.min() > 0 and t.max() <= 1
        assert t.min() >= np.exp(-beta) - 1e-6
    light, heavy = (weather.haze(img, {"beta": b, "airlight": 0.9}, None) for b in (0.4, 2.0))
    assert img.std() > light.std() > heavy.std()
    assert abs(heavy.mean() - 0.9) < abs(light.mean() - 0.9) < abs(img.mean() - 0.9)
    # atmospheric scattering exactly: I = J t + A (1 - t)
    t = weather.transmission(img, 2.0)[..., None]
    assert np.allclose(heavy, img * t + 0.9 * (1 - t), atol=1e-6)


def test_haze_depth_proxy_puts_bright_grey_sky_farther() -> None:
    img = np.zeros((64, 64, 3), np.float32)
    img[:32] = 0.9  # grey, bright: sky
    img[32:] = [0.6, 0.2, 0.1]  # saturated, darker: foreground
    d = weather.depth_proxy(img)
    assert d.min() >= 0.1 and d.max() <= 1
    assert d[:16].mean() > d[48:].mean() + 0.3


def test_lowlight_lowers_mean_by_the_sampled_factor() -> None:
    img = _textured(128, 128)
    rng = np.random.default_rng(6)
    for _ in range(5):
        p, _ = dg.sample_lowlight(rng)
        p["exposure"] = max(p["exposure"], 0.15)  # keep the signal clear of the clip at 0
        out = dg.lowlight(img, p, rng)
        expected = p["exposure"] * np.power(img, p["gamma"]).mean()
        assert abs(out.mean() / expected - 1) < 0.02, p
    gamma1 = dg.lowlight(img, {"exposure": 0.3, "gamma": 1.0, "shot": 0.001, "read": 0.005}, rng)
    assert abs(gamma1.mean() / img.mean() - 0.3) < 0.3 * 0.02


def test_rain_and_snow_only_add_light_and_grow_with_density() -> None:
    img = _textured()
    for fn, ranges in [(weather.rain, dg.RAIN), (weather.snow, dg.SNOW)]:
        p = {k: (lo + hi) / 2 for k, (lo, hi) in ranges.items()}
        changed = []
        for density in ranges["density"]:
            out = fn(img, {**p, "density": density}, np.random.default_rng(7))
            assert (out >= img - 1e-6).all() and out.max() <= 1
            changed.append((out - img > 0.05).mean())
        assert changed[0] < changed[1]


def test_intensity_is_in_unit_range_and_monotone() -> None:
    rng = np.random.default_rng(8)
    for kind, d in dg.DEGRADATIONS.items():
        for _ in range(30):
            _, intensity = d.sample(rng)
            assert 0 <= intensity <= 1, kind
    sig = [dg.sample_gaussian_noise(rng) for _ in range(50)]
    sig.sort(key=lambda s: s[0]["sigma"])
    assert [s[1] for s in sig] == sorted(s[1] for s in sig)
    jp = sorted((dg.sample_jpeg(rng) for _ in range(50)), key=lambda s: -s[0]["quality"])
    assert [s[1] for s in jp] == sorted(s[1] for s in jp)


@pytest.mark.parametrize("task", [t for t in dg.TASKS if t != "clean"])  # clean: test_camera_noise.py
def test_synthesize_is_deterministic_and_in_range(task: str) -> None:
    img = _textured(48, 64)
    a, la = dg.synthesize(img, task, np.random.default_rng(9))
    b, lb = dg.synthesize(img, task, np.random.default_rng(9))
    assert a.dtype == np.float32 and a.shape == img.shape
    assert a.min() >= 0 and a.max() <= 1
    assert la == lb and np.array_equal(a, b)
    outs = [dg.synthesize(img, task, np.random.default_rng(s))[0] for s in range(10, 14)]
    assert any(not np.array_equal(a, o) for o in outs)
    assert not np.array_equal(a, img)


@pytest.mark.parametrize("task", [t for t in dg.TASKS if t != "clean"])  # clean: test_camera_noise.py
def test_label_json_round_trip_reproduces_the_image(task: str) -> None:
    img = _textured(48, 48)
    lq, label = dg.synthesize(img, task, np.random.default_rng(10))
    restored = json.loads(json.dumps(label))
    assert restored == label
    assert label["task"] == task and label["intensity"] == max(c["intensity"] for c in label["components"])
    rng = np.random.default_rng(10)
    dg.sample_label(task, rng)  # advance to where synthesize began the realisation
    assert np.array_equal(dg.apply_label(img, restored, rng), lq)


def test_mixtures_have_distinct_families_in_physical_order() -> None:
    rng = np.random.default_rng(11)
    sizes = set()
    for _ in range(200):
        label = dg.sample_label("mixed", rng)
        fams = [c["family"] for c in label["components"]]
        sizes.add(len(fams))
        assert len(set(fams)) == len(fams)
        assert fams == sorted(fams, key=dg.PHYSICAL_ORDER.index)
        for c in label["components"]:
            assert c["type"] in dg.TYPES_OF[c["family"]]
        p = {c["family"]: c["params"] for c in label["components"]}
        for family, key in dg.LIT_BY_SCENE_LIGHT.items():  # weather in the dark is dim too
            if "lowlight" in p and family in p:
                assert p[family][key] <= p["lowlight"]["exposure"]
    assert sizes == {2, 3, 4}


def test_fixed_mixture_has_exactly_its_families_in_physical_order() -> None:
    assert dg.task_name("noise+blur") == "blur+noise" and dg.task_name("rain") == "rain"
    for seed in range(5):
        rng = np.random.default_rng(seed)
        label = dg.sample_label("noise+haze+lowlight", rng)
        assert label["task"] == "lowlight+haze+noise"
        assert [c["family"] for c in label["components"]] == ["lowlight", "haze", "noise"]
        assert label["components"][1]["params"]["airlight"] <= label["components"][0]["params"]["exposure"]
    for bad in ("blur+blur", "blur+fog", "noise+blur+rain+haze+snow"):
        with pytest.raises(ValueError, match=re.escape(f"unknown degradation task {bad!r}")):
            dg.task_name(bad)


def test_blur_of_black_areas_stays_in_range_so_poisson_noise_can_follow() -> None:
    img = np.zeros((128, 128, 3), np.float32)
    img[40:80, 40:80] = 1.0  # black around a white square: the DFT path of cv2 rang below 0 there
    rng = np.random.default_rng(1)
    for _ in range(60):
        out = dg.apply_component(img.copy(), dg.sample_component("blur", rng), rng)
        assert out.min() >= 0 and out.max() <= 1
        noise = {"type": "poisson_noise", "params": {"peak": 30.0}}
        assert np.isfinite(dg.apply_component(out, noise, rng)).all()


def test_bad_tasks_and_types_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown degradation task 'fog'"):
        dg.sample_label("fog", np.random.default_rng(0))
    real = {"task": "rain", "intensity": None,
            "components": [{"family": "rain", "type": "real", "params": {}, "intensity": None}]}  # fmt: skip
    with pytest.raises(ValueError, match="'real'"):
        dg.apply_label(_textured(8, 8), real, np.random.default_rng(0))
    with pytest.raises(ValueError, match="HxWx3"):
        dg.synthesize(np.zeros((8, 8), np.float32), "noise", np.random.default_rng(0))
