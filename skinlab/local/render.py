"""Rendering of the emulator's result files: masks, the working image and the ZIP archive.

Pure functions over numpy arrays and bytes (contract §7.2, §7.5):

- a mask without overlay is an 8-bit RGBA PNG at the size of the resized image; its alpha is the
  engine's detection map and its colour is fixed per concern (:data:`CONCERN_COLOURS`);
- with ``enable_dark_background_<c>``, the mask is composited *over* a background of the
  requested colour at the requested opacity, so pixels outside the detected area get
  RGB = colour and alpha = ``round(255 × opacity)``;
- with ``enable_mask_overlay``, the mask (and the background, if any) is blended over the image
  and the result is a JPEG;
- the ZIP stores every entry uncompressed (STORED), made on Unix, with no directory entry and
  no comment.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from typing import Iterable

import numpy as np
from PIL import Image

__all__ = [
    "CONCERN_COLOURS",
    "Background",
    "build_zip",
    "encode_jpeg",
    "encode_mask",
    "parse_hex_colour",
    "score_info_bytes",
]

#: The fixed RGB colour of each concern's mask, by tier-free concern key.
CONCERN_COLOURS: dict[str, tuple[int, int, int]] = {
    "wrinkle": (0, 170, 255),
    "pore": (255, 214, 0),
    "texture": (255, 128, 0),
    "acne": (230, 25, 75),
    "oiliness": (0, 230, 200),
    "radiance": (255, 250, 180),
    "eye_bag": (145, 30, 180),
    "age_spot": (170, 110, 40),
    "dark_circle": (70, 60, 200),
    "droopy_upper_eyelid": (240, 50, 230),
    "droopy_lower_eyelid": (200, 100, 255),
    "firmness": (60, 180, 75),
    "moisture": (0, 130, 200),
    "redness": (255, 40, 40),
    "tear_trough": (128, 128, 255),
    "skin_type": (250, 190, 212),
}

#: A dark background: (RGB colour, opacity in [0, 1]).
Background = tuple[tuple[int, int, int], float]

JPEG_QUALITY = 92
PNG_COMPRESS_LEVEL = 1  # masks are mostly flat; level 1 is several times faster than the default


def parse_hex_colour(text: str) -> tuple[int, int, int]:
    """``"3D3D3D"`` → ``(61, 61, 61)``."""
    return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Encode an ``H×W×3`` uint8 array as a baseline JPEG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _rgba(alpha: np.ndarray, colour: tuple[int, int, int], background: Background | None) -> np.ndarray:
    h, w = alpha.shape
    out = np.empty((h, w, 4), dtype=np.uint8)
    if background is None:
        out[..., :3] = colour
        out[..., 3] = alpha
        return out
    # Porter-Duff "over": the mask (colour, alpha a) over the background (bg, opacity b).
    bg, opacity = background
    a = alpha.astype(np.float32) / 255.0
    b = np.float32(opacity)
    out_a = a + b * (1.0 - a)
    safe = np.where(out_a > 0, out_a, 1.0)
    for ch in range(3):
        value = (colour[ch] * a + bg[ch] * b * (1.0 - a)) / safe
        value = np.where(out_a > 0, value, colour[ch])
        out[..., ch] = np.clip(np.rint(value), 0, 255).astype(np.uint8)
    out[..., 3] = np.clip(np.rint(out_a * 255.0), 0, 255).astype(np.uint8)
    return out


def _overlay(image: np.ndarray, alpha: np.ndarray, colour: tuple[int, int, int],
             background: Background | None) -> np.ndarray:
    base = image.astype(np.float32)
    if background is not None:
        bg, opacity = background
        base = base * (1.0 - opacity) + np.asarray(bg, dtype=np.float32) * opacity
    a = (alpha.astype(np.float32) / 255.0)[..., None]
    out = base * (1.0 - a) + np.asarray(colour, dtype=np.float32) * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def encode_mask(alpha: np.ndarray, colour: tuple[int, int, int], *, background: Background | None = None,
                overlay_on: np.ndarray | None = None) -> bytes:
    """Encode one mask file.

    Parameters
    ----------
    alpha : ndarray, uint8, H×W
        The detection map at the size of the resized image.
    colour : (r, g, b)
        The concern's colour.
    background : ((r, g, b), opacity), optional
        The dark background of ``enable_dark_background_<c>``.
    overlay_on : ndarray, uint8, H×W×3, optional
        The resized image. When given, the mask is blended over it and a JPEG is returned;
        otherwise an RGBA PNG.
    """
    if overlay_on is not None:
        return encode_jpeg(_overlay(overlay_on, alpha, colour, background))
    buf = io.BytesIO()
    Image.fromarray(_rgba(alpha, colour, background), "RGBA").save(
        buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def score_info_bytes(info: dict) -> bytes:
    """``score_info.json`` as the service writes it: UTF-8, indent 2, no trailing newline."""
    return json.dumps(info, indent=2, ensure_ascii=False).encode("utf-8")


def build_zip(members: Iterable[tuple[str, bytes]], when: float | None = None) -> bytes:
    """A ZIP of ``(name, bytes)`` members in the given order, each STORED, ``create_system`` 3.

    ``when`` (epoch seconds, UTC) sets the entries' modification time; the ZIP format cannot
    express dates before 1980, which are clamped.
    """
    stamp = time.gmtime(time.time() if when is None else when)
    date_time = max((1980, 1, 1, 0, 0, 0), tuple(stamp[:6]))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=date_time)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            zf.writestr(info, data)
    return buf.getvalue()
