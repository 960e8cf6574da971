"""The classical floor every table carries: what a learned restorer must beat to be worth its cost.

- noise: BM3D (the `bm3d` package, a dependency) where it is installed, else scikit-image's NL-means
  (h = 0.8·σ, 5×5 patches, search distance 6), or the one `denoiser` names (BM3D costs ~16 s per
  481×321 image on one CPU core, NL-means ~1 s); σ is the known synthetic σ, else estimated from the
  image (scikit-image's wavelet estimate), as for real noise. BM3D runs one thread per image, so its
  result is reproducible (bm4d's threaded runs differ in the last bits); evaluate() restores several
  images at once instead (`WORKERS`);
- haze: the dark channel prior (He, Sun and Tang, CVPR 2009) with a guided-filter refined transmission;
- other tasks: none.
"""

from __future__ import annotations

import importlib.util
import os

import cv2
import numpy as np

DENOISERS = ("auto", "bm3d", "nlmeans")
# images evaluate() restores at once: one per core, at most 4 (BM3D's memory grows with the image)
WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def has_bm3d() -> bool:
    return importlib.util.find_spec("bm3d") is not None


def pick_denoiser(denoiser: str = "auto") -> str:
    if denoiser not in DENOISERS:
        raise ValueError(f"denoiser {denoiser!r}: choose from {', '.join(DENOISERS)}")
    if denoiser == "bm3d" and not has_bm3d():
        raise ValueError("denoiser 'bm3d': the bm3d package is not installed (pip install bm3d)")
    return ("bm3d" if has_bm3d() else "nlmeans") if denoiser == "auto" else denoiser


def method_name(task: str | None, denoiser: str = "auto") -> str | None:
    """What the classical row of a `task` set runs, or None where there is none."""
    if task == "noise":
        return {"bm3d": "BM3D", "nlmeans": "NL-means"}[pick_denoiser(denoiser)]
    if task == "haze":
        return "dark channel prior"
    return None


def estimate_sigma(img: np.ndarray) -> float:
    """Noise std of an HxWx3 image in [0, 1] (scikit-image's robust wavelet estimate, channels averaged)."""
    from skimage.restoration import estimate_sigma as wavelet_sigma

    return float(wavelet_sigma(img, channel_axis=-1, average_sigmas=True))


def denoise(img: np.ndarray, sigma: float | None, denoiser: str = "auto") -> np.ndarray:
    """BM3D or NL-means with noise std `sigma` (in [0, 1] units; None = estimated)."""
    sigma = estimate_sigma(img) if sigma is None else sigma
    img = img.astype(np.float32)
    if sigma <= 0:
        return img
    if pick_denoiser(denoiser) == "bm3d":
        import bm3d

        profile = bm3d.BM3DProfile()
        profile.num_threads = 1
        return np.clip(bm3d.bm3d_rgb(img, sigma, profile=profile), 0, 1).astype(np.float32)
    from skimage.restoration import denoise_nl_means

    out = denoise_nl_means(img, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True,
                           channel_axis=-1)
    return np.clip(out, 0, 1).astype(np.float32)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter (gray guide), from box means."""
    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, (2 * radius + 1, 2 * radius + 1), borderType=cv2.BORDER_REFLECT)

    mean_i, mean_p = box(guide), box(src)
    a = (box(guide * src) - mean_i * mean_p) / (box(guide * guide) - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    return box(a) * guide + box(b)


def dehaze(img: np.ndarray, omega: float = 0.95, t_min: float = 0.1) -> np.ndarray:
    """Dark channel prior: airlight from the brightest 0.1 % of the dark channel, t = 1 − ω·dark(I/A)
    refined by a guided filter, J = (I − A) / max(t, t_min) + A. Window sizes follow the image size
    (15 px at 500 px, as in the paper)."""
    img = img.astype(np.float32)
    h, w = img.shape[:2]
    patch = int(np.clip(min(h, w) // 32, 1, 7)) * 2 + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (patch, patch))
    dark = cv2.erode(img.min(axis=2), kernel)
    top = np.argsort(dark.ravel())[-max(1, h * w // 1000):]
    candidates = img.reshape(-1, 3)[top]
    airlight = np.maximum(candidates[candidates.sum(1).argmax()], 1e-3)
    transmission = 1 - omega * cv2.erode((img / airlight).min(axis=2), kernel)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    transmission = guided_filter(gray, transmission.astype(np.float32), 4 * patch, 1e-3)
    out = (img - airlight) / np.maximum(transmission, t_min)[..., None] + airlight
    return np.clip(out, 0, 1).astype(np.float32)


def restore(img: np.ndarray, task: str | None, sigma: float | None = None, denoiser: str = "auto"
            ) -> np.ndarray | None:  # fmt: skip
    """The classical restoration of an HxWx3 float image in [0, 1] for `task`, or None where there is none."""
    if task == "noise":
        return denoise(img, sigma, denoiser)
    if task == "haze":
        return dehaze(img)
    return None
