"""Weather degradations: rain streaks, haze (atmospheric scattering) and snow.

Each is `fn(img, params, rng) -> img` on float32 HxWx3 in [0, 1]; the parameter samplers and labels
live in `degradations`. `params` hold what a label records; `rng` draws only the random realisation
(where streaks and flakes fall), so a label plus a generator reproduces an image.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from unirestorer.data_shards.kernels import line_kernel

_BORDER = cv2.BORDER_REFLECT_101


def _screen(img: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """Add a bright layer HxW in [0, 1] the way light adds: 1 - (1-img)(1-layer), stays in [0, 1]."""
    return img + layer[..., None] * (1.0 - img)


def _sparse_seeds(shape: tuple[int, int], density: float, rng: np.random.Generator) -> np.ndarray:
    """Seed image: a `density` fraction of pixels gets a brightness in [0.5, 1), the rest 0."""
    r = rng.random(shape, dtype=np.float32)
    return np.where(r < density, 0.5 + 0.5 * r / np.float32(density), np.float32(0)).astype(np.float32)


# ---- rain ---------------------------------------------------------------------------------------
def rain(img: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Rain streaks: sparse seeds smeared along a line at `angle` degrees from vertical, screen-added.

    The line kernel is scaled by its length so a streak keeps the seed's brightness along its body.
    """
    seeds = _sparse_seeds(img.shape[:2], p["density"], rng)
    k = line_kernel(p["length"], 90.0 + p["angle"]) * np.float32(p["length"])
    streaks = cv2.filter2D(seeds, -1, k, borderType=_BORDER)
    layer = np.clip(streaks, 0.0, 1.0) * np.float32(p["brightness"])
    return _screen(img, layer)


# ---- haze ---------------------------------------------------------------------------------------
_DEPTH_WIDTH = 64  # the depth proxy is smooth: compute it on a small copy


def depth_proxy(img: np.ndarray) -> np.ndarray:
    """Relative scene depth HxW in [0.1, 1] estimated from the image itself (no depth sensor).

    Half the colour attenuation prior (Zhu et al., TIP 2015: depth grows with brightness minus
    saturation, d = 0.122 + 0.960 v - 0.780 s; bright, grey regions such as sky are far), half a
    vertical ramp (the top of a photo is usually farther than the bottom). Computed on a 64-px-wide
    copy, smoothed so that haze does not follow texture, and offset so nothing is at distance 0.
    """
    h, w = img.shape[:2]
    sw = min(w, _DEPTH_WIDTH)
    sh = max(1, round(h * sw / w))
    small = cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA) if (sw, sh) != (w, h) else img
    v = small.max(axis=2)
    s = (v - small.min(axis=2)) / (v + 1e-6)
    cap = np.clip(0.121779 + 0.959710 * v - 0.780245 * s, 0.0, 1.0)
    ramp = np.linspace(1.0, 0.0, sh, dtype=np.float32)[:, None]
    d = cv2.GaussianBlur(0.5 * cap + 0.5 * ramp, (0, 0), sigmaX=max(1.0, sw / 16), borderType=_BORDER)
    if (sw, sh) != (w, h):
        d = cv2.resize(d, (w, h), interpolation=cv2.INTER_LINEAR)
    return (0.1 + 0.9 * np.clip(d, 0.0, 1.0)).astype(np.float32)


def transmission(img: np.ndarray, beta: float) -> np.ndarray:
    """t = exp(-beta * depth), in (0, 1]."""
    return np.exp(-np.float32(beta) * depth_proxy(img))


def haze(img: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Atmospheric scattering I = J t + A (1 - t); deterministic given the params."""
    t = transmission(img, p["beta"])[..., None]
    return img * t + np.float32(p["airlight"]) * (1.0 - t)


# ---- snow ---------------------------------------------------------------------------------------
def flake_kernel(size: float, length: float, angle: float) -> np.ndarray:
    """A Gaussian flake of std `size` px, smeared over `length` px of fall; peak 1 (a seed's brightness)."""
    r = math.ceil(3 * size)
    x = np.arange(-r, r + 1, dtype=np.float32)
    g = np.exp(-(x**2) / (2 * size**2))
    flake = np.outer(g, g)
    fall = line_kernel(length, 90.0 + angle)
    pad = fall.shape[0] // 2
    k = cv2.filter2D(np.pad(flake, pad), -1, fall, borderType=cv2.BORDER_CONSTANT)
    return (k / k.max()).astype(np.float32)


def snow(img: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Snowflakes: sparse seeds drawn as soft, slightly motion-smeared flakes, screen-added."""
    seeds = _sparse_seeds(img.shape[:2], p["density"], rng)
    flakes = cv2.filter2D(seeds, -1, flake_kernel(p["size"], p["length"], p["angle"]), borderType=_BORDER)
    return _screen(img, np.clip(flakes, 0.0, 1.0) * np.float32(p["brightness"]))
