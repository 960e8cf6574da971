"""Image files for restore and eval: decode at full precision, write back in the input's own format.

`data_shards.imageio.read_rgb` makes training data (8-bit RGB, alpha composited away). Restoring a
user's photo must keep what the model does not touch: the bit depth (8 or 16), grayscale-ness and the
alpha channel. Pixels are decoded by OpenCV (16-bit colour included), the header, the size limit and
the EXIF orientation come from Pillow; the image is turned upright and written back without EXIF.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import io

import cv2
import numpy as np
from PIL import Image

from unirestorer.data_shards.imageio import DEFAULT_MAX_PIXELS, ImageReadError
from unirestorer.safe_files import atomic_write

GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Suffixes written back as themselves; anything else (bmp, webp, gif...) is written as NAME.SUFFIX.png.
KEEP_SUFFIX = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
JPEG_QUALITY = 95


@dataclass
class Picture:
    """An upright image: RGB float32 HxWx3 in [0, 1] for the model, plus what restore must put back."""

    rgb: np.ndarray
    bits: int  # 8 or 16: the sample depth of the file
    gray: bool  # written back with one colour channel
    alpha: np.ndarray | None  # HxW in the file's dtype, returned untouched


# EXIF orientation tag value -> how to make the pixel array upright (same as PIL.ImageOps.exif_transpose).
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an HxW[xC] array."""
    return np.ascontiguousarray(_UPRIGHT.get(orientation, lambda a: a)(pixels))


def load_picture(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Picture:
    """Decode `path` upright at full precision; ImageReadError names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    # Our own limit replaces Pillow's decompression-bomb cap, so --max-pixels can go above it; the size
    # comes from the header and is checked before anything (getexif included) decodes pixel data.
    cap = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels and w * h > max_pixels:
                raise ImageReadError(f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
            mode, orientation = im.mode, int(im.getexif().get(0x0112, 1) or 1)
    except ImageReadError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... on non-images
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    finally:
        Image.MAX_IMAGE_PIXELS = cap
    data = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if data is None or data.shape[:2] != (h, w):
        raise ImageReadError(f"{path}: not a decodable image (truncated or unsupported encoding)")
    if data.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(f"{path}: {data.dtype} samples are not supported (8- or 16-bit integer only)")
    data = upright(data, orientation)
    scale = np.float32(1 / np.iinfo(data.dtype).max)
    if data.ndim == 2:
        data = data[..., None]
    alpha = data[..., -1].copy() if data.shape[2] in (2, 4) else None
    colour = data[..., :1] if data.shape[2] in (1, 2) else data[..., 2::-1]  # BGR(A) -> RGB
    rgb = np.ascontiguousarray(np.broadcast_to(colour, (*colour.shape[:2], 3)), dtype=np.float32) * scale
    return Picture(rgb, 16 if data.dtype == np.uint16 else 8, mode in GRAY_MODES or data.shape[2] == 1, alpha)


def output_name(path: Path) -> str:
    """Output file name for an input: the same name where we write its format, else NAME.png."""
    return path.name if path.suffix.lower() in KEEP_SUFFIX else path.name + ".png"


def save_picture(path: str | Path, rgb: np.ndarray, like: Picture) -> None:
    """Write restored RGB float [0, 1] at `like`'s bit depth, gray-ness and alpha; format from the suffix.
    The file is replaced atomically; a symlink at `path` is refused (safe_files.UnsafePathError)."""
    path = Path(path)
    top = 65535 if like.bits == 16 else 255
    dtype = np.uint16 if like.bits == 16 else np.uint8
    rgb = np.clip(rgb, 0.0, 1.0)
    if like.gray:
        pixels = (rgb.mean(axis=2) * top + 0.5).astype(dtype)[..., None]
    else:
        pixels = (rgb[..., ::-1] * top + 0.5).astype(dtype)  # RGB -> BGR for OpenCV
    suffix = path.suffix.lower()
    if like.alpha is not None and suffix not in (".jpg", ".jpeg"):
        if like.gray and like.bits == 8:  # OpenCV cannot encode 2 channels: Pillow writes gray + alpha
            buf, fmt = io.BytesIO(), Image.registered_extensions().get(suffix, "PNG")
            Image.fromarray(np.dstack([pixels, like.alpha]), "LA").save(buf, format=fmt)
            atomic_write(path, buf.getvalue())
            return
        if like.gray:
            pixels = np.repeat(pixels, 3, axis=2)
        pixels = np.dstack([pixels, like.alpha.astype(dtype)])
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if suffix in (".jpg", ".jpeg") else []
    if suffix in (".jpg", ".jpeg") and dtype == np.uint16:
        pixels = (pixels // 257).astype(np.uint8)
    ok, buf = cv2.imencode(suffix if suffix in KEEP_SUFFIX else ".png", pixels, params)
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the restored image")
    atomic_write(path, buf.tobytes())  # temp + rename, never through a symlink
