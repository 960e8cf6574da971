"""Image files for restore and eval: decode at full precision, write back in the input's own format.

`data_shards.imageio.read_rgb` makes training data (8-bit RGB, alpha composited away). Restoring a
user's photo must keep what the model does not touch: the bit depth (8 or 16), grayscale-ness, the
alpha channel and the ICC colour profile. Pillow decodes every file and is the one authority on
orientation: some of its decoders (TIFF) turn the image upright themselves and drop the tag, the others
leave it to `exif_transpose`, so "upright" is always what `exif_transpose` returns after `load()`.
Only 16-bit colour, which Pillow reduces to 8 bits, is decoded by OpenCV as well, and OpenCV's array
is matched to Pillow's upright image (OpenCV rotates TIFFs itself but not PNGs). The image is
restored in its own colour space and written back with its profile, without EXIF.

What an output format cannot hold (16 bits or alpha in JPEG, a profile in a 16-bit TIFF, the frames
after the first of an animation) is listed by `losses`; restore refuses such a write without --force.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageCms, ImageOps

from unirestorer.data_shards.imageio import DEFAULT_MAX_PIXELS, ImageReadError
from unirestorer.safe_files import atomic_write

# Suffixes written back as themselves; anything else (bmp, webp, gif...) is written as NAME.SUFFIX.png.
KEEP_SUFFIX = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
JPEG_QUALITY = 95
PIL_FORMAT = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}


class ImageWriteError(ValueError):
    """A restored image that must not be written (non-finite values); the message names the file."""


@dataclass
class Picture:
    """An upright image: RGB float32 HxWx3 in [0, 1] for the model, plus what restore must put back."""

    rgb: np.ndarray
    bits: int  # 8 or 16: the sample depth of the file
    gray: bool  # written back with one colour channel
    alpha: np.ndarray | None  # HxW in the file's dtype, returned untouched
    icc: bytes | None = None  # the colour profile of `rgb` (the file's own, or sRGB after a conversion)
    frames: int = 1  # frames or pages in the file; only the first is restored
    notes: list[str] = field(default_factory=list)  # conversions done on reading, to be reported


def _dihedral(a: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations and mirror images of an HxW[xC] array."""
    return [np.rot90(b, k) for b in (a, a[:, ::-1]) for k in range(4)]


def _align(data: np.ndarray, upright: np.ndarray, path: Path) -> np.ndarray:
    """OpenCV's 16-bit array turned like Pillow's upright 8-bit one (decoders differ on orientation)."""
    best = min(_dihedral(data), key=lambda c: np.inf if c.shape != upright.shape else
               np.abs((c >> 8).astype(np.int32) - upright).mean())  # fmt: skip
    if best.shape != upright.shape or np.abs((best >> 8).astype(np.int32) - upright).mean() > 1:
        raise ImageReadError(f"{path}: OpenCV and Pillow decode this 16-bit image differently; refusing to guess")
    return np.ascontiguousarray(best)


def _to_srgb(im: Image.Image, icc: bytes, path: Path) -> Image.Image:
    """A non-RGB/gray profile (CMYK, Lab...) cannot go back on an RGB file: convert to sRGB instead."""
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        mode = "RGBA" if "A" in im.mode else "RGB"
        return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode=mode)
    except (ImageCms.PyCMSError, OSError, ValueError) as e:
        raise ImageReadError(f"{path}: its ICC profile cannot be applied ({e})") from None


def _profile_space(icc: bytes) -> str:
    """The colour space an ICC profile describes: 'RGB ', 'GRAY', 'CMYK'... (header bytes 16..20)."""
    return icc[16:20].decode("latin-1") if len(icc) >= 20 else ""


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
            frames, icc = getattr(im, "n_frames", 1), im.info.get("icc_profile") or None
            deep = im.mode in ("RGB", "RGBA", "LA") and any(";16" in str(t.args) for t in im.tile)
            im.load()
            up = ImageOps.exif_transpose(im)  # after load(): a decoder that turned it upright dropped the tag
            pic = _from_pillow(up, path, icc)
    except ImageReadError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... on non-images
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    finally:
        Image.MAX_IMAGE_PIXELS = cap
    pic.frames = frames
    if deep:
        data = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
        if data is None or data.dtype != np.uint16 or data.ndim != 3 or data.shape[2] not in (3, 4):
            raise ImageReadError(f"{path}: not a decodable 16-bit colour image (truncated or unsupported)")
        data = _align(data[..., [2, 1, 0, *range(3, data.shape[2])]], (pic.rgb * 255 + 0.5).astype(np.uint8)
                      if pic.alpha is None else np.dstack([(pic.rgb * 255 + 0.5).astype(np.uint8), pic.alpha]), path)
        pic.rgb = data[..., :3].astype(np.float32) * np.float32(1 / 65535)
        pic.alpha, pic.bits = (data[..., 3].copy() if data.shape[2] == 4 else None), 16
    return pic


def _from_pillow(im: Image.Image, path: Path, icc: bytes | None) -> Picture:
    """A loaded, upright Pillow image as a Picture (8-bit, or 16-bit grayscale)."""
    notes = []
    if icc and _profile_space(icc) not in ("RGB ", "GRAY"):
        im = _to_srgb(im.convert("RGBA" if "A" in im.getbands() else im.mode), icc, path)
        notes.append(f"colour converted from its {_profile_space(icc).strip()} ICC profile to sRGB")
        icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        g = np.asarray(im)
        if g.min() < 0 or g.max() > 65535:
            raise ImageReadError(f"{path}: {im.mode} samples outside 0..65535 are not supported")
        g = g.astype(np.uint16)
        rgb = np.repeat(g[..., None].astype(np.float32) * np.float32(1 / 65535), 3, axis=2)
        return Picture(rgb, 16, True, None, icc, notes=notes)
    if im.mode == "F":
        raise ImageReadError(f"{path}: float samples are not supported (8- or 16-bit integer only)")
    has_alpha = "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info)
    gray = im.mode in ("1", "L", "LA", "La")
    target = ("LA" if has_alpha else "L") if gray else ("RGBA" if has_alpha else "RGB")
    data = np.asarray(im.convert(target))
    if data.ndim == 2:
        data = data[..., None]
    alpha = data[..., -1].copy() if has_alpha else None
    colour = data[..., :1] if gray else data[..., :3]
    rgb = np.ascontiguousarray(np.broadcast_to(colour, (*colour.shape[:2], 3)), dtype=np.float32) * np.float32(1 / 255)
    return Picture(rgb, 8, gray, alpha, icc, notes=notes)


def output_name(path: Path) -> str:
    """Output file name for an input: the same name where we write its format, else NAME.png."""
    return path.name if path.suffix.lower() in KEEP_SUFFIX else path.name + ".png"


def losses(pic: Picture, dest: Path) -> list[str]:
    """What writing `pic` to `dest` (format from its suffix) would drop; empty when nothing is lost."""
    suffix, lost = dest.suffix.lower(), []
    if suffix in (".jpg", ".jpeg"):
        lost += ["16-bit samples (JPEG holds 8)"] * (pic.bits == 16) + ["the alpha channel (JPEG has none)"] * (
            pic.alpha is not None)
    if pic.icc and pic.bits == 16 and suffix in (".tif", ".tiff"):
        lost.append("the ICC profile (not written into 16-bit TIFF)")
    if pic.frames > 1:
        lost.append(f"{pic.frames - 1} frame(s) after the first (only the first is restored)")
    return lost


def _iccp_chunk(icc: bytes) -> bytes:
    """A PNG iCCP chunk holding `icc` (what Pillow writes, for OpenCV's 16-bit PNGs)."""
    body = b"ICC profile\0\0" + zlib.compress(icc)
    return struct.pack(">I", len(body)) + b"iCCP" + body + struct.pack(">I", zlib.crc32(b"iCCP" + body))


def save_picture(path: str | Path, rgb: np.ndarray, like: Picture) -> None:
    """Write restored RGB float [0, 1] at `like`'s bit depth, gray-ness, alpha and ICC profile; format from
    the suffix. Non-finite values are refused (ImageWriteError). The file is replaced atomically; a symlink
    at `path` is refused (safe_files.UnsafePathError)."""
    path = Path(path)
    if not np.isfinite(rgb).all():
        raise ImageWriteError(f"{path}: the restored image holds NaN/Inf values; not written")
    suffix = path.suffix.lower()
    fmt = PIL_FORMAT.get(suffix, "PNG")
    rgb = np.clip(rgb, 0.0, 1.0)
    colour = rgb.mean(axis=2, keepdims=True) if like.gray else rgb
    if like.bits == 16 and fmt != "JPEG":  # Pillow cannot write 16-bit colour: OpenCV does
        pixels = (colour[..., ::-1] * 65535 + 0.5).astype(np.uint16)
        if like.alpha is not None:
            pixels = np.dstack([np.repeat(pixels, 3, axis=2) if like.gray else pixels, like.alpha.astype(np.uint16)])
        ok, buf = cv2.imencode(".tif" if fmt == "TIFF" else ".png", pixels)
        if not ok:
            raise OSError(f"{path}: OpenCV could not encode the restored image")
        data = buf.tobytes()
        if like.icc and fmt == "PNG":  # after IHDR (8-byte signature + 25-byte chunk)
            data = data[:33] + _iccp_chunk(like.icc) + data[33:]
        atomic_write(path, data)  # temp + rename, never through a symlink
        return
    u8 = (colour * 255 + 0.5).astype(np.uint8)
    alpha = like.alpha if like.alpha is None or like.bits == 8 else (like.alpha // 257).astype(np.uint8)
    if alpha is not None and fmt != "JPEG":
        u8 = np.dstack([u8, alpha])
    buf = io.BytesIO()
    extra = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
    Image.fromarray(u8[..., 0] if u8.shape[2] == 1 else u8).save(buf, format=fmt, icc_profile=like.icc, **extra)
    atomic_write(path, buf.getvalue())  # temp + rename, never through a symlink
