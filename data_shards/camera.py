"""Realistic camera noise: an sRGB image taken back to raw, given sensor noise, and developed again.

Real photo noise is not i.i.d. in sRGB. In raw space it is heteroscedastic, variance = shot·x + read²
per Bayer site (Poisson photon noise plus Gaussian read noise); demosaicing spreads it over
neighbouring pixels and across channels; white balance and the colour matrix mix the channels; the
tone curve compresses it in highlights; JPEG reshapes it again. A restorer trained only on i.i.d.
Gaussian/Poisson sRGB noise does not recognise it (DESIGN §10).

Two pipelines share the pieces below (after "Unprocessing images for learned raw denoising", Brooks et
al. CVPR 2019, and CBDNet's in-camera model, Guo et al. CVPR 2019):
- `camera_noise` (a type of the noise family, trained on): gamma 2.2 + smoothstep tone curve,
  bilinear demosaicing, read noise log-linear in shot noise (Brooks' fit), optional JPEG (libjpeg
  4:2:0 through OpenCV).
- `camera_noise_eval` (never trained on; bench/robustness.py's `camera_noise` set): the sRGB transfer
  curve, OpenCV's edge-aware demosaicing, an unsharp mask as camera sharpening, read noise drawn
  independently of shot noise, JPEG through Pillow with 4:4:4 chroma. Its statistics differ from the
  training model's on purpose, so the benchmark measures recognition of camera noise, not of one model.

Images are float32 HxWx3 in [0, 1]; `params` hold what a label records, `rng` draws only the noise.
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np

SHOT = (1e-4, 1.2e-2)  # raw shot-noise variance per unit signal (Brooks' range: ISO ~100 to ~6400)
RED_GAIN, BLUE_GAIN = (1.9, 2.4), (1.5, 1.9)
CAMERA_JPEG = (70, 95)
_BILINEAR_RB = np.array([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]], np.float32)
_BILINEAR_G = np.array([[0.0, 0.25, 0.0], [0.25, 1.0, 0.25], [0.0, 0.25, 0.0]], np.float32)


def read_from_shot(shot: float, jitter: float) -> float:
    """Brooks et al.'s log-linear fit of read-noise std to shot-noise variance (jitter ~ N(0, 0.26))."""
    return math.exp(2.18 * math.log(shot) + 1.20 + jitter) ** 0.5


def random_ccm(rng: np.random.Generator) -> list[list[float]]:
    """A camera→sRGB colour matrix: identity plus negative cross-talk, each row summing to 1 (grey stays grey)."""
    off = rng.uniform(-0.35, 0.0, size=(3, 3)) * (1 - np.eye(3))
    m = off + np.diag(1.0 - off.sum(1))
    return np.round(m, 4).tolist()


def sample_camera_noise(rng: np.random.Generator) -> tuple[dict, float]:
    """Parameters of the training pipeline; intensity grows with the raw noise std at mid-grey (log scale)."""
    shot = round(float(math.exp(rng.uniform(math.log(SHOT[0]), math.log(SHOT[1])))), 6)
    read = round(read_from_shot(shot, float(rng.normal(0.0, 0.26))), 6)
    p = {"shot": shot, "read": read, "red_gain": round(float(rng.uniform(*RED_GAIN)), 4),
         "blue_gain": round(float(rng.uniform(*BLUE_GAIN)), 4), "ccm": random_ccm(rng),
         "jpeg": int(rng.integers(CAMERA_JPEG[0], CAMERA_JPEG[1] + 1)) if rng.random() < 0.5 else 0}
    return p, noise_intensity(shot, read)


def noise_intensity(shot: float, read: float) -> float:
    """Raw noise std at mid-grey on a log scale, 0 at the quietest sensor of SHOT, 1 at the loudest."""
    lo, hi = (math.log(math.sqrt(s * 0.5 + read_from_shot(s, 0.0) ** 2)) for s in SHOT)
    x = (math.log(math.sqrt(shot * 0.5 + read**2)) - lo) / (hi - lo)
    return round(min(max(x, 0.0), 1.0), 4)


# ---- the pieces of a camera pipeline -----------------------------------------------------------
def smoothstep(x: np.ndarray) -> np.ndarray:
    return x * x * (3 - 2 * x)


def inverse_smoothstep(y: np.ndarray) -> np.ndarray:
    y = np.clip(y, 0.0, 1.0)
    return (0.5 - np.sin(np.arcsin(1.0 - 2.0 * y) / 3.0)).astype(np.float32)


def srgb_encode(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055).astype(np.float32)


def srgb_decode(y: np.ndarray) -> np.ndarray:
    y = np.clip(y, 0.0, 1.0)
    return np.where(y <= 0.04045, y / 12.92, np.power((y + 0.055) / 1.055, 2.4)).astype(np.float32)


def mosaic(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 → HxW RGGB Bayer samples."""
    raw = rgb[..., 1].copy()
    raw[0::2, 0::2] = rgb[0::2, 0::2, 0]
    raw[1::2, 1::2] = rgb[1::2, 1::2, 2]
    return raw


def bayer_masks(shape: tuple[int, int]) -> np.ndarray:
    """HxWx3 float32: 1 where the RGGB mosaic samples that channel."""
    m = np.zeros((*shape, 3), np.float32)
    m[0::2, 0::2, 0] = 1
    m[0::2, 1::2, 1] = m[1::2, 0::2, 1] = 1
    m[1::2, 1::2, 2] = 1
    return m


def demosaic_bilinear(raw: np.ndarray) -> np.ndarray:
    """Bilinear interpolation: a missing sample is the mean of its 2 or 4 nearest same-colour sites.
    (Normalised convolution: exact at the borders too.)"""
    masks = bayer_masks(raw.shape)
    out = np.empty((*raw.shape, 3), np.float32)
    for c, k in enumerate((_BILINEAR_RB, _BILINEAR_G, _BILINEAR_RB)):
        num = cv2.filter2D(raw * masks[..., c], -1, k, borderType=cv2.BORDER_CONSTANT)
        den = cv2.filter2D(masks[..., c], -1, k, borderType=cv2.BORDER_CONSTANT)
        out[..., c] = num / den
    return out


def demosaic_edge_aware(raw: np.ndarray) -> np.ndarray:
    """OpenCV's edge-aware demosaicing (8-bit only in OpenCV: 16-bit fixed point here)."""
    u16 = np.round(np.clip(raw, 0.0, 1.0) * 65535).astype(np.uint16)
    # OpenCV names a pattern by the 2x2 block starting at (1, 1): RGGB from (0, 0) is its BayerBG
    rgb = cv2.cvtColor(u16, cv2.COLOR_BayerBG2RGB_EA) if min(raw.shape) >= 4 else cv2.cvtColor(u16, cv2.COLOR_BayerBG2RGB)
    return rgb.astype(np.float32) / 65535


def add_sensor_noise(raw: np.ndarray, shot: float, read: float, rng: np.random.Generator) -> np.ndarray:
    """y = x + N(0, shot·x + read²), independently per Bayer site."""
    std = np.sqrt(np.clip(raw, 0.0, None) * np.float32(shot) + np.float32(read**2))
    return raw + std * rng.standard_normal(raw.shape, dtype=np.float32)


def _jpeg_cv2(img: np.ndarray, quality: int) -> np.ndarray:
    from unirestorer.data_shards.imageio import to_uint8

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(to_uint8(img), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV failed to JPEG-encode an image")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255


def _jpeg_pillow_444(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    from unirestorer.data_shards.imageio import to_uint8

    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, "JPEG", quality=quality, subsampling=0)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32) / 255


def _to_camera(img: np.ndarray, ccm: list[list[float]], red_gain: float, blue_gain: float) -> np.ndarray:
    """Linear sRGB → camera RGB before white balance (inverse CCM, then inverse gains)."""
    cam = img @ np.linalg.inv(np.asarray(ccm, np.float32)).T.astype(np.float32)
    return np.clip(cam / np.array([red_gain, 1.0, blue_gain], np.float32), 0.0, 1.0)


def _to_srgb_linear(cam: np.ndarray, ccm: list[list[float]], red_gain: float, blue_gain: float) -> np.ndarray:
    wb = cam * np.array([red_gain, 1.0, blue_gain], np.float32)
    return np.clip(wb @ np.asarray(ccm, np.float32).T, 0.0, 1.0).astype(np.float32)


# ---- the two pipelines -------------------------------------------------------------------------
# Each develops the raw image twice, with and without sensor noise, and adds the difference to the input:
# the noise keeps every trait the pipeline gives it (signal dependence, demosaicing's spatial and the colour
# matrix's cross-channel correlation, the tone curve's shaping), while the noise-free image is exactly the
# input, so the pair's ground truth is the clean image (demosaicing detail loss is not part of the task).
def camera_noise(img: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """The training pipeline (see the module doc)."""
    raw = mosaic(_to_camera(np.power(inverse_smoothstep(img), np.float32(2.2)), p["ccm"], p["red_gain"], p["blue_gain"]))

    def develop(r: np.ndarray) -> np.ndarray:
        lin = _to_srgb_linear(demosaic_bilinear(r), p["ccm"], p["red_gain"], p["blue_gain"])
        return smoothstep(np.power(lin, np.float32(1 / 2.2)))

    noisy = develop(add_sensor_noise(raw, p["shot"], p["read"], rng)) - develop(raw)
    out = np.clip(img + noisy, 0.0, 1.0).astype(np.float32)
    return _jpeg_cv2(out, int(p["jpeg"])) if p["jpeg"] else out


def sample_camera_noise_eval(rng: np.random.Generator) -> dict:
    """Parameters of the evaluation pipeline: another parameter law, sharpening and a 4:4:4 JPEG."""
    return {"shot": float(math.exp(rng.uniform(math.log(5e-5), math.log(4e-3)))),
            "read": float(math.exp(rng.uniform(math.log(3e-4), math.log(3e-3)))),
            "red_gain": float(rng.uniform(1.6, 2.6)), "blue_gain": float(rng.uniform(1.3, 2.1)),
            "ccm": random_ccm(rng), "sharpen": float(rng.uniform(0.3, 1.0)),
            "jpeg": int(rng.integers(75, 96))}


def camera_noise_eval(img: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """The evaluation pipeline (see the module doc); never a training degradation."""
    raw = mosaic(_to_camera(srgb_decode(img), p["ccm"], p["red_gain"], p["blue_gain"]))

    def develop(r: np.ndarray) -> np.ndarray:
        out = srgb_encode(_to_srgb_linear(demosaic_edge_aware(r), p["ccm"], p["red_gain"], p["blue_gain"]))
        return out + np.float32(p["sharpen"]) * (out - cv2.GaussianBlur(out, (0, 0), 1.0))

    noisy = develop(np.clip(add_sensor_noise(raw, p["shot"], p["read"], rng), 0.0, 1.0)) - develop(raw)
    return _jpeg_pillow_444(np.clip(img + noisy, 0.0, 1.0).astype(np.float32), int(p["jpeg"]))
