"""PSNR / SSIM under an explicit convention (DESIGN §6), per image through scikit-image.

Default is the PromptIR family's: RGB, float (no rounding), both images centre-cropped to a multiple
of 16 before restoration, no border crop, `data_range=1`, SSIM with scikit-image's default 7x7
uniform window over the colour channels. Options give the BasicSR/UniRestorer variants: uint8
rounding, BT.601 Y channel, a border crop. Averages are means of per-image values (never pooled MSE).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ITU-R BT.601 luma for [0, 1] RGB, studio swing (16..235)/255: BasicSR's rgb2ycbcr(y_only=True).
BT601_Y = np.array([65.481, 128.553, 24.966], dtype=np.float64) / 255.0
BT601_OFFSET = 16.0 / 255.0


@dataclass(frozen=True)
class Convention:
    y_channel: bool = False
    uint8: bool = False
    border: int = 0
    multiple: int = 16

    def describe(self) -> str:
        return (f"{'Y (BT.601)' if self.y_channel else 'RGB'}, {'uint8-rounded' if self.uint8 else 'float, no rounding'}, "
                f"centre crop to a multiple of {self.multiple}, border {self.border} px, "
                "scikit-image PSNR/SSIM (data_range 1, SSIM 7x7 uniform window), per-image mean")


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """HxWx3 RGB in [0, 1] -> HxW BT.601 luma in [16/255, 235/255]."""
    return img.astype(np.float64) @ BT601_Y + BT601_OFFSET


def crop_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
    """Centre crop both sides to a multiple of `multiple` (PromptIR's crop_img)."""
    h, w = img.shape[:2]
    dh, dw = h % multiple, w % multiple
    return img[dh // 2 : h - dh + dh // 2, dw // 2 : w - dw + dw // 2]


def _prepare(img: np.ndarray, conv: Convention) -> np.ndarray:
    x = np.clip(img.astype(np.float64), 0.0, 1.0)
    if conv.uint8:
        x = np.round(x * 255.0) / 255.0
    if conv.y_channel:
        x = rgb_to_y(x)
    if conv.border:
        x = x[conv.border : -conv.border, conv.border : -conv.border]
    return x


def psnr(pred: np.ndarray, gt: np.ndarray, conv: Convention = Convention()) -> float:
    """PSNR in dB of one image pair (HxWx3 in [0, 1]); inf for identical images."""
    from skimage.metrics import peak_signal_noise_ratio  # imported here: scipy.stats takes ~1 s

    p, g = _prepare(pred, conv), _prepare(gt, conv)
    if np.array_equal(p, g):
        return float("inf")
    return float(peak_signal_noise_ratio(g, p, data_range=1.0))


def ssim(pred: np.ndarray, gt: np.ndarray, conv: Convention = Convention()) -> float:
    """SSIM of one image pair; colour channels averaged (channel_axis) unless on Y."""
    from skimage.metrics import structural_similarity

    p, g = _prepare(pred, conv), _prepare(gt, conv)
    win = min(7, *(s - (1 - s % 2) for s in p.shape[:2]))  # largest odd window <= 7 that fits
    return float(structural_similarity(g, p, data_range=1.0, win_size=win,
                                       channel_axis=None if conv.y_channel else 2))  # fmt: skip


def mean(values: list[float]) -> float:
    """Average of per-image values; any inf (a perfect image) makes the mean inf, stated as such."""
    return float(np.mean(values)) if values else float("nan")
