"""Blur kernels: Gaussian, defocus disk, and motion along a camera-shake path (float32, sum 1)."""

from __future__ import annotations

import math

import numpy as np


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Isotropic Gaussian, radius 3 sigma."""
    r = max(1, math.ceil(3 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(x**2) / (2 * sigma**2))
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


def disk_kernel(radius: float, supersample: int = 8) -> np.ndarray:
    """Defocus point-spread function: a uniform disk, its rim antialiased by supersampling."""
    n = 2 * math.ceil(radius) + 1
    c = (np.arange(n * supersample) + 0.5) / supersample - n / 2
    inside = (c[:, None] ** 2 + c[None, :] ** 2) <= radius**2
    k = inside.reshape(n, supersample, n, supersample).mean(axis=(1, 3))
    return (k / k.sum()).astype(np.float32)


def shake_path(length: float, angle: float, shake: float, rng: np.random.Generator, steps: int = 16) -> np.ndarray:
    """A camera-shake trajectory (steps+1)x2 of total arc `length` px, mean heading `angle` degrees.

    The heading does a random walk with step std `shake` radians: 0 gives a straight line, larger
    values bend the path, as a hand-held camera does during exposure.
    """
    turns = np.concatenate([[0.0], np.cumsum(rng.normal(0.0, shake, steps - 1))])
    heading = math.radians(angle) + turns - turns.mean()
    steps_xy = np.stack([np.cos(heading), np.sin(heading)], axis=1) * (length / steps)
    return np.concatenate([np.zeros((1, 2)), np.cumsum(steps_xy, axis=0)])


def path_kernel(path: np.ndarray) -> np.ndarray:
    """Rasterise a polyline (x, y points) into a kernel: equal exposure per unit length, bilinear
    splatting, centred on the path's centroid so blurring does not shift the image."""
    path = np.asarray(path, dtype=np.float64)
    seg = np.diff(path, axis=0)
    seg_len = np.hypot(seg[:, 0], seg[:, 1])
    n = np.maximum(1, np.ceil(seg_len * 4).astype(int))  # 4 samples per pixel of path
    t = np.concatenate([(np.arange(k) + 0.5) / k for k in n])
    idx = np.repeat(np.arange(len(seg)), n)
    pts = path[idx] + seg[idx] * t[:, None]
    w = np.repeat(seg_len / n, n) if seg_len.sum() > 0 else np.ones(len(pts))
    pts -= (pts * w[:, None]).sum(0) / w.sum()
    r = math.ceil(np.abs(pts).max()) + 1
    x, y = pts[:, 0] + r, pts[:, 1] + r
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    k = np.zeros((2 * r + 1, 2 * r + 1))
    for dy, dx, wt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(k, (y0 + dy, x0 + dx), w * wt)
    return (k / k.sum()).astype(np.float32)


def line_kernel(length: float, angle: float) -> np.ndarray:
    """Straight linear motion of `length` px at `angle` degrees (0 = rightwards, 90 = downwards)."""
    a = math.radians(angle)
    half = np.array([math.cos(a), math.sin(a)]) * max(length, 1e-3) / 2
    return path_kernel(np.stack([-half, half]))
