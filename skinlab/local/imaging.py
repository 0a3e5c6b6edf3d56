"""Decoding and resizing of source images for the emulator (contract §5.4, checks 2 to 5).

The emulator reads the source bytes, applies the EXIF orientation, decodes JPEG or PNG only,
and scales images whose long side exceeds 2560 px so that the long side is exactly 2560, with
``short = round(short × 2560 / long)``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ..images import MAX_FILE_BYTES, MAX_LONG_SIDE, MIN_SHORT_SIDE

__all__ = [
    "MAX_FILE_BYTES",
    "MIN_SHORT_SIDE",
    "OUTPUT_LONG_SIDE",
    "STRICT_MAX_LONG_SIDE",
    "DecodedImage",
    "ImageRejected",
    "decode_image",
    "resized_size",
]

# The service limits are shared with the client's pre-flight (skinlab.images).
OUTPUT_LONG_SIDE = MAX_LONG_SIDE
STRICT_MAX_LONG_SIDE = 4096  # the emulator's strict mode only (§5.4, check 5)


class ImageRejected(Exception):
    """The source fails one of the checks; ``code`` is the engine error code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class DecodedImage:
    """An upright source image: its original size, and its pixels after resizing."""

    width: int           # upright original width
    height: int          # upright original height
    rgb: np.ndarray      # H×W×3 uint8, long side at most OUTPUT_LONG_SIDE

    @property
    def short_side(self) -> int:
        return min(self.width, self.height)

    @property
    def long_side(self) -> int:
        return max(self.width, self.height)


def resized_size(width: int, height: int, long_side: int = OUTPUT_LONG_SIDE) -> tuple[int, int]:
    """The (width, height) after scaling the long side down to ``long_side`` (contract rounding)."""
    longest = max(width, height)
    if longest <= long_side:
        return width, height
    if width >= height:
        return long_side, max(1, round(height * long_side / width))
    return max(1, round(width * long_side / height)), long_side


def decode_image(data: bytes) -> DecodedImage:
    """Decode JPEG or PNG bytes, apply the EXIF orientation, and resize to a 2560 px long side.

    Raises
    ------
    ImageRejected
        ``error_decode_image`` when the bytes are not a decodable JPEG or PNG;
        ``error_exceed_max_image_size`` when Pillow refuses the pixel count as a decompression bomb.
    """
    try:
        # No warnings.catch_warnings() here: it is not thread-safe, and this runs in worker threads.
        with Image.open(io.BytesIO(data), formats=["JPEG", "PNG"]) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            if upright.mode != "RGB":
                if upright.mode == "P" or upright.mode.startswith("I") or upright.mode == "F":
                    upright = upright.convert("RGBA")
                upright = upright.convert("RGB")
    except Image.DecompressionBombError:
        raise ImageRejected("error_exceed_max_image_size") from None
    except Exception:  # UnidentifiedImageError, truncated data, broken EXIF, ...
        raise ImageRejected("error_decode_image") from None
    width, height = upright.size
    size = resized_size(width, height)
    if size != (width, height):
        upright = upright.resize(size, Image.Resampling.LANCZOS)
    return DecodedImage(width=width, height=height, rgb=np.asarray(upright, dtype=np.uint8).copy())
