"""Degradation synthesis: a clean image in, a degraded image and its label out.

Every degradation type has a sampler `rng -> (params, intensity)` and a function
`(img, params, rng) -> img` on float32 HxWx3 images in [0, 1]. The label records the params, so
`apply_label` re-applies them; `rng` then only draws the random realisation (noise values, where
rain and snow fall). Floats are rounded when sampled so the label reproduces them exactly.

Label (JSON-able, same shape for single and mixed degradations)::

    {"task": "noise", "intensity": 0.31,
     "components": [{"family": "noise", "type": "gaussian_noise", "params": {"sigma": 15.5},
                     "intensity": 0.31}]}

`intensity` is in [0, 1] and grows with severity (per type: see the samplers); for a mixture it is
the maximum over its components, i.e. the severity of its worst part. A mixture has 2-4 components
of distinct families, applied in the order light meets them (PHYSICAL_ORDER).

Tasks: a family (one component), "mixed" (2-4 families drawn per image), a fixed mixture named by
its families joined with "+" ("blur+noise": exactly those, fresh parameters per image), or "clean"
(no component, intensity 0: the image as it is, so every stage learns that some photos need nothing
done). `task_name` checks a task and spells a fixed mixture in physical order, the name its labels carry.

The noise family includes `camera_noise` (camera.py): raw-space shot + read noise through a camera
pipeline, what real photos carry, beside i.i.d. Gaussian and Poisson noise in sRGB.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import cv2
import numpy as np
from unirestorer.data_shards import weather
from unirestorer.data_shards.camera import camera_noise, sample_camera_noise
from unirestorer.data_shards.imageio import to_uint8
from unirestorer.data_shards.kernels import disk_kernel, gaussian_kernel, path_kernel, shake_path

FAMILIES: tuple[str, ...] = ("noise", "blur", "jpeg", "rain", "haze", "lowlight", "snow")
TASKS: tuple[str, ...] = FAMILIES + ("mixed", "clean")
# The order light meets them: illumination, scattering, optics, precipitation, sensor, codec.
PHYSICAL_ORDER: tuple[str, ...] = ("lowlight", "haze", "blur", "rain", "snow", "noise", "jpeg")
MIX_SIZES = (2, 3, 4)
LIT_BY_SCENE_LIGHT = {"haze": "airlight", "rain": "brightness", "snow": "brightness"}

_BORDER = cv2.BORDER_REFLECT_101


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return round(float(rng.uniform(lo, hi)), 4)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return round(float(math.exp(rng.uniform(math.log(lo), math.log(hi)))), 4)


def _severity(x: float, lo: float, hi: float) -> float:
    """Position of x in [lo, hi] as a number in [0, 1]."""
    return round(min(max((x - lo) / (hi - lo), 0.0), 1.0), 4)


def _clip(img: np.ndarray) -> np.ndarray:
    return np.clip(img, 0.0, 1.0, out=img)


# ---- noise --------------------------------------------------------------------------------------
SIGMA = (1.0, 50.0)  # Gaussian std in 0..255 units
PEAK = (20.0, 1000.0)  # Poisson photons at full scale; the std at mid-grey is sqrt(0.5 / peak)


def sample_gaussian_noise(rng: np.random.Generator) -> tuple[dict, float]:
    sigma = round(float(rng.uniform(*SIGMA)), 2)
    return {"sigma": sigma}, _severity(sigma, 0.0, SIGMA[1])


def gaussian_noise(img: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise of std sigma/255, then clipped to [0, 1]."""
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= np.float32(p["sigma"] / 255.0)
    return _clip(noise + img)


def sample_poisson_noise(rng: np.random.Generator) -> tuple[dict, float]:
    peak = _log_uniform(rng, *PEAK)
    return {"peak": peak}, _severity(math.log(PEAK[1] / peak), 0.0, math.log(PEAK[1] / PEAK[0]))


def poisson_noise(img: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Shot noise: photon counts Poisson(peak * x), divided back by peak (variance x / peak)."""
    return _clip(rng.poisson(img * np.float32(p["peak"])).astype(np.float32) / np.float32(p["peak"]))


# ---- blur ---------------------------------------------------------------------------------------
BLUR_SIGMA = (0.5, 4.0)
DEFOCUS_RADIUS = (1.0, 6.0)
MOTION_LENGTH = (5.0, 31.0)
MOTION_SHAKE = (0.0, 0.6)


def sample_gaussian_blur(rng: np.random.Generator) -> tuple[dict, float]:
    sigma = _uniform(rng, *BLUR_SIGMA)
    return {"sigma": sigma}, _severity(sigma, *BLUR_SIGMA)


def sample_defocus_blur(rng: np.random.Generator) -> tuple[dict, float]:
    radius = _uniform(rng, *DEFOCUS_RADIUS)
    return {"radius": radius}, _severity(radius, *DEFOCUS_RADIUS)


def sample_motion_blur(rng: np.random.Generator) -> tuple[dict, float]:
    """A random shake trajectory, recorded point by point so the label alone rebuilds the kernel."""
    length = _uniform(rng, *MOTION_LENGTH)
    path = shake_path(length, float(rng.uniform(0.0, 180.0)), float(rng.uniform(*MOTION_SHAKE)), rng)
    return {"length": length, "path": np.round(path, 3).tolist()}, _severity(length, *MOTION_LENGTH)


def blur_kernel(blur_type: str, p: dict) -> np.ndarray:
    """The point-spread function a blur label describes (float32, sums to 1)."""
    if blur_type == "gaussian_blur":
        return gaussian_kernel(p["sigma"])
    if blur_type == "defocus_blur":
        return disk_kernel(p["radius"])
    return path_kernel(np.asarray(p["path"]))


def _convolve(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    # cv2 correlates; flipping the kernel makes it a true convolution (matters for asymmetric paths). cv2 runs
    # large kernels through the DFT, whose rounding leaves values like -5e-16 in black areas: clipped, so that
    # Poisson noise after a blur (a mixture) gets valid rates
    return _clip(cv2.filter2D(img, -1, np.ascontiguousarray(k[::-1, ::-1]), borderType=_BORDER))


def gaussian_blur(img: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    return _convolve(img, blur_kernel("gaussian_blur", p))


def defocus_blur(img: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    return _convolve(img, blur_kernel("defocus_blur", p))


def motion_blur(img: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    return _convolve(img, blur_kernel("motion_blur", p))


# ---- JPEG ---------------------------------------------------------------------------------------
QUALITY = (10, 95)


def sample_jpeg(rng: np.random.Generator) -> tuple[dict, float]:
    q = int(rng.integers(QUALITY[0], QUALITY[1] + 1))
    return {"quality": q}, _severity(QUALITY[1] - q, 0, QUALITY[1] - QUALITY[0])


def jpeg(img: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Encode to JPEG at `quality` (libjpeg via OpenCV, 4:2:0 chroma) and decode again."""
    u8 = cv2.cvtColor(to_uint8(img), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, int(p["quality"])])
    if not ok:
        raise RuntimeError("OpenCV failed to JPEG-encode an image")
    out = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return out.astype(np.float32) * np.float32(1 / 255)


# ---- low light ----------------------------------------------------------------------------------
EXPOSURE = (0.05, 0.6)
GAMMA = (1.0, 1.6)
SHOT = (0.0005, 0.01)  # sensor shot-noise variance per unit signal
READ = (0.002, 0.02)  # sensor read-noise std
_MID_GREY = 0.5


def sample_lowlight(rng: np.random.Generator) -> tuple[dict, float]:
    """Intensity follows how much mid-grey is darkened: exposure * 0.5**(gamma - 1), on a log scale."""
    p = {
        "exposure": _log_uniform(rng, *EXPOSURE),
        "gamma": _uniform(rng, *GAMMA),
        "shot": _log_uniform(rng, *SHOT),
        "read": _log_uniform(rng, *READ),
    }
    factor = p["exposure"] * _MID_GREY ** (p["gamma"] - 1)
    darkest = EXPOSURE[0] * _MID_GREY ** (GAMMA[1] - 1)
    return p, _severity(math.log(EXPOSURE[1] / factor), 0.0, math.log(EXPOSURE[1] / darkest))


def lowlight(img: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Under-exposure y = exposure * x**gamma plus signal-dependent sensor noise
    N(0, shot * y + read**2); the noise has zero mean, so the mean drops by `exposure` (for gamma 1)."""
    y = np.float32(p["exposure"]) * (img if p["gamma"] == 1 else np.power(img, np.float32(p["gamma"])))
    std = np.sqrt(y * np.float32(p["shot"]) + np.float32(p["read"] ** 2))
    return _clip(y + std * rng.standard_normal(img.shape, dtype=np.float32))


# ---- weather (physics in weather.py) ------------------------------------------------------------
RAIN = {"density": (0.001, 0.01), "length": (8.0, 35.0), "angle": (-30.0, 30.0), "brightness": (0.4, 0.9)}
HAZE = {"beta": (0.4, 2.0), "airlight": (0.7, 1.0)}
SNOW = {"density": (0.001, 0.008), "size": (0.5, 2.0), "length": (1.0, 8.0), "angle": (-30.0, 30.0),
        "brightness": (0.6, 1.0)}  # fmt: skip


def _sample_ranges(rng: np.random.Generator, ranges: dict, severe: tuple[str, ...]) -> tuple[dict, float]:
    """Uniform params; intensity is the mean position of the `severe` params in their ranges."""
    p = {k: _uniform(rng, *r) for k, r in ranges.items()}
    return p, round(sum(_severity(p[k], *ranges[k]) for k in severe) / len(severe), 4)


def sample_rain(rng: np.random.Generator) -> tuple[dict, float]:
    return _sample_ranges(rng, RAIN, ("density", "length", "brightness"))


def sample_haze(rng: np.random.Generator) -> tuple[dict, float]:
    return _sample_ranges(rng, HAZE, ("beta",))


def sample_snow(rng: np.random.Generator) -> tuple[dict, float]:
    return _sample_ranges(rng, SNOW, ("density", "size", "brightness"))


# ---- registry, labels ---------------------------------------------------------------------------
class Degradation(NamedTuple):
    family: str
    sample: Callable[[np.random.Generator], tuple[dict, float]]
    apply: Callable[[np.ndarray, dict, np.random.Generator], np.ndarray]


DEGRADATIONS: dict[str, Degradation] = {
    "gaussian_noise": Degradation("noise", sample_gaussian_noise, gaussian_noise),
    "poisson_noise": Degradation("noise", sample_poisson_noise, poisson_noise),
    "camera_noise": Degradation("noise", sample_camera_noise, camera_noise),
    "gaussian_blur": Degradation("blur", sample_gaussian_blur, gaussian_blur),
    "defocus_blur": Degradation("blur", sample_defocus_blur, defocus_blur),
    "motion_blur": Degradation("blur", sample_motion_blur, motion_blur),
    "jpeg": Degradation("jpeg", sample_jpeg, jpeg),
    "rain": Degradation("rain", sample_rain, weather.rain),
    "haze": Degradation("haze", sample_haze, weather.haze),
    "lowlight": Degradation("lowlight", sample_lowlight, lowlight),
    "snow": Degradation("snow", sample_snow, weather.snow),
}
TYPES_OF: dict[str, tuple[str, ...]] = {
    f: tuple(t for t, d in DEGRADATIONS.items() if d.family == f) for f in FAMILIES
}


def sample_component(family: str, rng: np.random.Generator) -> dict:
    """One label component: a type of the family (uniformly) and its sampled params."""
    types = TYPES_OF[family]
    kind = types[int(rng.integers(len(types)))] if len(types) > 1 else types[0]
    params, intensity = DEGRADATIONS[kind].sample(rng)
    return {"family": family, "type": kind, "params": params, "intensity": intensity}


def task_name(task: str) -> str:
    """`task` checked: a family, "mixed", or 2-4 distinct families joined by "+" (returned in physical order)."""
    if task in TASKS:
        return task
    parts = task.split("+")
    if len(parts) > 1 and all(p in FAMILIES for p in parts) and len(set(parts)) == len(parts) <= max(MIX_SIZES):
        return "+".join(f for f in PHYSICAL_ORDER if f in parts)
    raise ValueError(f"unknown degradation task {task!r}; expected one of {', '.join(TASKS)}, or 2-"
                     f"{max(MIX_SIZES)} distinct families joined by '+' (e.g. blur+noise)")


def sample_label(task: str, rng: np.random.Generator) -> dict:
    """A label for `task` (see `task_name`): one component, or a mixture's families in physical order."""
    task = task_name(task)
    if task == "clean":
        return {"task": "clean", "intensity": 0.0, "components": []}
    if task == "mixed":
        n = int(rng.choice(MIX_SIZES))
        picked = set(rng.choice(len(FAMILIES), size=n, replace=False).tolist())
        families = [f for f in PHYSICAL_ORDER if FAMILIES.index(f) in picked]
    else:
        families = task.split("+")
    components = [sample_component(f, rng) for f in families]
    params = {c["family"]: c["params"] for c in components}
    if "lowlight" in params:
        # air, rain and snow are lit by the same dim light as the scene: scale their brightness by the
        # exposure. Their contrast against the scene, hence their intensity, stays as sampled.
        for family, key in LIT_BY_SCENE_LIGHT.items():
            if family in params:
                params[family][key] = round(params[family][key] * params["lowlight"]["exposure"], 4)
    return {"task": task, "intensity": max(c["intensity"] for c in components), "components": components}


def apply_component(img: np.ndarray, component: dict, rng: np.random.Generator) -> np.ndarray:
    """Apply one label component ({"type": ..., "params": ...}) to a float32 image in [0, 1]."""
    kind = component["type"]
    if kind not in DEGRADATIONS:
        raise ValueError(f"cannot synthesise degradation type {kind!r} (real pairs cannot be re-applied)")
    return DEGRADATIONS[kind].apply(img, component["params"], rng)


def apply_label(clean: np.ndarray, label: dict, rng: np.random.Generator) -> np.ndarray:
    """Re-apply a recorded label; with the generator state synthesize used, the output is identical."""
    img = np.ascontiguousarray(clean, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
    for component in label["components"]:
        img = apply_component(img, component, rng)
    return img


def synthesize(clean: np.ndarray, task: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """clean float32 HxWx3 in [0, 1] -> (degraded float32 HxWx3 in [0, 1], label).

    Draws the label first, then the realisation, both from `rng`: the same generator state gives the
    same output, and `apply_label(clean, label, rng_after_sample_label)` reproduces it.
    """
    label = sample_label(task, rng)
    return apply_label(clean, label, rng), label
