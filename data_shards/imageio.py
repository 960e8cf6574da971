"""Robust image reading and PNG encoding shared by the shard writer and (later) restore.

`read_rgb` turns whatever a user's folder holds into float32 RGB in [0, 1] or raises
`ImageReadError` naming the file and the problem. Grayscale, palette, 16-bit, RGBA and EXIF-rotated
images are converted (and the conversion noted); truncated, non-image and over-large files are refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 50_000_000
PNG_COMPRESSION = 1  # fixed, so the same pixels give the same bytes; higher levels gain ~1% size at 2x the time


class ImageReadError(ValueError):
    """An input image cannot be used; the message names the file."""


def _to_float_rgb(im: Image.Image, notes: list[str]) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        notes.append(f"16-bit {'grayscale' if im.mode != 'I' else 'integer'} converted to RGB")
        g = np.asarray(im).astype(np.float32) / 65535.0
        return np.repeat(np.clip(g, 0.0, 1.0)[..., None], 3, axis=2)
    if im.mode == "F":
        notes.append("float grayscale (assumed in [0, 1]) converted to RGB")
        return np.repeat(np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("transparency composited over white")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgba = Image.alpha_composite(white, rgba)
        else:
            notes.append("opaque alpha channel dropped")
        im = rgba.convert("RGB")
    elif im.mode != "RGB":
        notes.append(f"mode {im.mode} converted to RGB")
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.float32) * np.float32(1 / 255)


def read_rgb(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
             notes: list[str] | None = None) -> np.ndarray:  # fmt: skip
    """Decode an image file to float32 HxWx3 RGB in [0, 1], upright per its EXIF orientation.

    Raises ImageReadError for missing, truncated or non-image files and for images of more than
    `max_pixels` pixels (checked from the header, before decoding). Conversions done are appended
    to `notes` when a list is given. 16-bit colour files are decoded at 8-bit precision by Pillow.
    """
    path = Path(path)
    notes = [] if notes is None else notes
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels and w * h > max_pixels:
                raise ImageReadError(f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
            if any(";16" in str(t.args) for t in im.tile) and im.mode in ("RGB", "RGBA"):
                notes.append("16-bit colour read at 8-bit precision")
            im.load()
            orientation = im.getexif().get(0x0112, 1)
            if orientation not in (1, None):
                notes.append(f"rotated upright (EXIF orientation {orientation})")
                im = ImageOps.exif_transpose(im)
            img = _to_float_rgb(im, notes)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: too many pixels ({e})") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, zlib errors...
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    if min(img.shape[:2]) < 1:
        raise ImageReadError(f"{path}: empty image")
    return np.ascontiguousarray(img)


def input_files(folder: str | os.PathLike, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """(regular non-hidden files of `folder`, sorted; the entries passed over: hidden names, and what is
    neither a file nor, when recursive, a folder such as FIFOs and devices). Every command that reads a
    folder lists it here, so it can say how many entries it did not read instead of skipping them unseen."""
    root = Path(folder)
    files, passed = [], []
    for p in sorted(root.rglob("*") if recursive else root.iterdir()):
        rel = p.relative_to(root).parts
        if any(s.startswith(".") for s in rel[:-1]):
            continue  # inside a hidden folder, counted once as that folder
        if rel[-1].startswith(".") or not (p.is_file() or (recursive and p.is_dir())):
            passed.append(p)
        elif p.is_file():
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix()), passed


def passed_over_note(folder: str | os.PathLike, passed: list[Path]) -> str:
    """One line naming what `input_files` passed over (empty when nothing was)."""
    if not passed:
        return ""
    names = ", ".join(p.name for p in passed[:3]) + (", ..." if len(passed) > 3 else "")
    return f"note: {len(passed)} entries of {folder} not read (hidden names or not regular files): {names}"


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint8 with rounding (what PNG and JPEG store); NaN/Inf is refused, never stored
    as black."""
    if not np.isfinite(img).all():
        raise ValueError("image holds NaN/Inf values; refusing to store it")
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_png(img: np.ndarray) -> bytes:
    """float32 RGB in [0, 1] (or uint8) -> PNG bytes, deterministic (fixed compression level)."""
    u8 = img if img.dtype == np.uint8 else to_uint8(img)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(u8, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise RuntimeError("OpenCV failed to PNG-encode an image")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes (as written by encode_png) -> uint8 HxWx3 RGB."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not a decodable PNG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
