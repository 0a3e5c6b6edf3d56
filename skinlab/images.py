"""Image pre-flight: what is checked and changed before a photo leaves the machine.

:func:`prepare_image` turns a path, bytes, a binary file object or a PIL image into the exact
bytes to upload. In order it:

1. reads the bytes in binary (a text-mode file is an error);
2. identifies the format from the bytes, not the file name: JPEG and PNG pass; HEIC, WebP,
   GIF, TIFF, BMP, SVG and PDF get an error saying how to convert;
3. refuses images declaring more than :data:`MAX_PIXELS` pixels before decoding them
   (decompression bombs), then decodes;
4. applies the EXIF orientation (the image is re-encoded upright);
5. brings unusual pixel formats to 8-bit RGB: CMYK, greyscale (with a warning that colour
   concerns cannot be measured), 16-bit, palette; transparency is flattened onto white; an RGB
   file whose pixels are all grey is flagged as greyscale too;
6. removes metadata (EXIF, which can hold the GPS position and camera serial, XMP, IPTC,
   comments, PNG text) without touching the pixels where possible, and says exactly what it
   removed;
7. optionally downscales images whose long side exceeds 2560 px (the service would resize
   them anyway);
8. checks the tier's minimum short side (480 px SD, 1080 px HD) and the 10 MB limit.

Every change is listed in :attr:`PreparedImage.changes`; nothing is changed silently. The
notes contain no ``;`` (the ledger's ``preflight`` column joins them with ``"; "``).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Union

from .errors import ImageError

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_LONG_SIDE",
    "MAX_PIXELS",
    "MIN_SHORT_SIDE",
    "PreparedImage",
    "prepare_image",
    "sniff_format",
]

#: The service's file-size limit: 10 MB (contract §5.4, check 2).
MAX_FILE_BYTES = 10 * 1024 * 1024
#: The service resizes anything longer than this on the long side (§5.4).
MAX_LONG_SIDE = 2560
#: Images declaring more pixels than this are refused before decoding (decompression bombs).
MAX_PIXELS = 90_000_000
#: Minimum short side per tier (§5.4, check 4).
MIN_SHORT_SIDE = {"sd": 480, "hd": 1080}

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Any]

_CONVERT_HINT = ("Convert it to JPEG or PNG first, e.g. `PIL.Image.open(path).convert('RGB')"
                 ".save('photo.jpg', quality=95)` (HEIC needs the pillow-heif package).")


def sniff_format(data: bytes) -> str:
    """Name the image format of ``data`` from its first bytes.

    Returns one of ``"jpeg"``, ``"png"``, ``"heic"``, ``"avif"``, ``"webp"``, ``"gif"``,
    ``"tiff"``, ``"bmp"``, ``"svg"``, ``"pdf"``, ``"empty"`` or ``"unknown"``.
    """
    head = bytes(data[:64])
    if not head:
        return "empty"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "avif"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "heic"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"%PDF"):
        return "pdf"
    text = head.lstrip().lower()
    if text.startswith((b"<?xml", b"<svg")) and b"<svg" in bytes(data[:4096]).lower():
        return "svg"
    return "unknown"


@dataclass
class PreparedImage:
    """The bytes that will be uploaded, and what pre-flight did to get them.

    Attributes
    ----------
    data : bytes
        Exactly the bytes to PUT.
    content_type : str
        ``"image/jpeg"`` or ``"image/png"``, from the bytes.
    width, height : int
        Pixel size of ``data`` (upright).
    sha256 : str
        SHA-256 of ``data``; the ledger identifies sources by it.
    source_name : str or None
        The original file name, kept locally; it is not sent to the service.
    changes : list of str
        Every change made, in plain words (empty when the bytes are the original).
    greyscale : bool
        The file held no colour (greyscale, bilevel or 16-bit grey pixels, or RGB pixels that are
        grey in 99 % of the image, as a black-and-white scan saved as RGB), so the colour
        concerns (:data:`skinlab.actions.COLOUR_CONCERNS`) cannot be measured on it.
    """

    data: bytes
    content_type: str
    width: int
    height: int
    sha256: str
    source_name: str | None = None
    changes: list[str] = field(default_factory=list)
    greyscale: bool = False

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def extension(self) -> str:
        return ".png" if self.content_type == "image/png" else ".jpg"

    @property
    def upload_name(self) -> str:
        """The neutral file name sent to the service (no personal information)."""
        return f"{self.sha256[:16]}{self.extension}"

    def to_pil(self):
        from PIL import Image

        img = Image.open(io.BytesIO(self.data))
        img.load()
        return img

    def __repr__(self) -> str:
        return (f"PreparedImage({self.source_name or 'image'!r}, {self.content_type}, "
                f"{self.width}x{self.height}, {self.size} bytes, changes={len(self.changes)})")


def _read_source(source: ImageSource) -> tuple[bytes, str | None, Any]:
    """Return (bytes, name, pil_image_or_None)."""
    try:
        from PIL import Image
        if isinstance(source, Image.Image):
            return b"", getattr(source, "filename", None) or None, source
    except ImportError:  # pragma: no cover - pillow is a core dependency
        pass
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), None, None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if isinstance(source, str) and source.startswith(("http://", "https://")):
            raise ImageError("A URL is not a local image; pass it to Client.submit(), which sends it as src_file_url.")
        if not path.exists():
            raise ImageError(f"No such file: {str(path)!r}. Check the path (relative paths start at {os.getcwd()!r}).")
        if path.is_dir():
            raise ImageError(f"{str(path)!r} is a folder, not an image. Pass one file, or use analyze_many() for a folder.")
        return path.read_bytes(), path.name, None
    if hasattr(source, "read"):
        if isinstance(source, io.TextIOBase) or "b" not in getattr(source, "mode", "b"):
            raise ImageError("The file was opened in text mode; open it with open(path, 'rb').")
        data = source.read()
        if isinstance(data, str):
            raise ImageError("The file object returned text; open the image with open(path, 'rb').")
        name = getattr(source, "name", None)
        return bytes(data), (Path(name).name if isinstance(name, str) else None), None
    raise ImageError(
        f"Cannot read an image from {type(source).__name__}. Pass a path, bytes, a binary file object, "
        "a PIL image, an http(s) URL or a file id."
    )


_JPEG_KEEP_APP = {0xE0, 0xE2, 0xEE}  # JFIF, ICC profile, Adobe (colour transform)

#: EXIF tags naming the camera or lens copy: BodySerialNumber, LensSerialNumber, CameraSerialNumber
#: (DNG), looked for in IFD0 and in the Exif IFD.
_SERIAL_TAGS = (0xA431, 0xA435, 0xC62F)


def _exif_label(tiff: bytes) -> str:
    """Name removed EXIF by what it held: GPS position and camera serial only when present."""
    from PIL import Image

    try:
        exif = Image.Exif()
        exif.load(tiff)
        gps = bool(exif.get_ifd(0x8825)) or bool(exif.get(0x8825))
        sub = exif.get_ifd(0x8769)
        serial = any(exif.get(t) or sub.get(t) for t in _SERIAL_TAGS)
    except Exception:  # unreadable EXIF: it may hold anything
        return "EXIF (which can hold GPS position and camera serial)"
    held = [what for what, present in (("GPS position", gps), ("camera serial number", serial)) if present]
    return "EXIF" + (f" (with {' and '.join(held)})" if held else "")


def _app_label(marker: int, payload: bytes) -> str:
    """What a removed JPEG APPn or COM segment was."""
    if marker == 0xFE:
        return "JPEG comment"
    if marker == 0xE1:
        if payload.startswith(b"Exif\x00"):
            return _exif_label(payload[6:])
        if payload.startswith((b"http://ns.adobe.com/xap/", b"http://ns.adobe.com/xmp/")):
            return "XMP"
        return "APP1 segment"
    if marker == 0xED:
        return "IPTC"
    return f"APP{marker - 0xE0} segment"


def _describe_removed(removed: list[str]) -> str:
    """The pre-flight note for removed metadata, saying exactly what was removed."""
    return "removed metadata before upload: " + ", ".join(dict.fromkeys(removed))


def _strip_jpeg_metadata(data: bytes) -> tuple[bytes, list[str]]:
    """Remove APPn (except JFIF/ICC/Adobe) and COM segments; pixels untouched."""
    out = bytearray(data[:2])
    removed: list[str] = []
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: copy the rest verbatim
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            out += data[i:i + 2]
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        segment = data[i:i + 2 + length]
        if (0xE1 <= marker <= 0xEF and marker not in _JPEG_KEEP_APP) or marker == 0xFE:
            removed.append(_app_label(marker, segment[4:]))
        else:
            out += segment
        i += 2 + length
    out += data[i:]
    return bytes(out), removed


_PNG_DROP = {b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"tIME"}


def _png_label(ctype: bytes, payload: bytes) -> str:
    """What a removed PNG chunk was (its keyword for text chunks; EXIF by what it held)."""
    if ctype == b"eXIf":
        return _exif_label(payload)
    if ctype == b"tIME":
        return "PNG modification time"
    keyword = payload.split(b"\x00", 1)[0].decode("latin-1", "replace").replace(";", ",")  # no ';' in notes
    if keyword == "XML:com.adobe.xmp":
        return "XMP"
    if keyword.lower().startswith("raw profile type exif"):
        return "EXIF (which can hold GPS position and camera serial)"
    return f"PNG text ({keyword})" if keyword.isprintable() and 0 < len(keyword) <= 79 else "PNG text"


def _strip_png_metadata(data: bytes) -> tuple[bytes, list[str]]:
    out = bytearray(data[:8])
    removed: list[str] = []
    i = 8
    while i + 8 <= len(data):
        (length,) = struct.unpack(">I", data[i:i + 4])
        ctype = data[i + 4:i + 8]
        chunk = data[i:i + 12 + length]
        if ctype in _PNG_DROP:
            removed.append(_png_label(ctype, data[i + 8:i + 8 + length]))
        else:
            out += chunk
        i += 12 + length
        if ctype == b"IEND":
            break
    return bytes(out), removed


#: a photo whose channels differ by at most this much (8-bit levels) in 99 % of its pixels is
#: grey stored as RGB (a grey JPEG decodes with channel differences of 0-2; 10 % of the colour of
#: a real portrait already gives about 16)
GREY_SPREAD_LEVELS = 3


def _holds_no_colour(img) -> bool:
    """True when an RGB image is grey throughout (judged on a copy of at most 256 px)."""
    import numpy as np

    if img.mode != "RGB":
        return False
    small = img.copy()
    small.thumbnail((256, 256))
    a = np.asarray(small, dtype=np.int16)
    spread = a.max(axis=-1) - a.min(axis=-1)
    return bool(np.percentile(spread, 99) <= GREY_SPREAD_LEVELS)


def _normalise_mode(img, *, sixteen_bit: bool = False):
    """Bring an unusual pixel format to 8-bit RGB (or opaque RGBA); return (image, changes).

    CMYK, greyscale, 16-bit, palette and transparent images decode differently from one engine
    to the next, so they are converted here, and each conversion is reported.
    """
    from PIL import Image

    notes: list[str] = []
    mode = img.mode
    if mode.startswith("I") or mode == "F":  # 16-bit (or wider) greyscale
        import numpy as np

        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(np.round(arr * 255.0 / top), 0, 255).astype(np.uint8), "L")
        notes.append("reduced 16-bit greyscale to 8 bits")
        mode = "L"
    elif sixteen_bit:
        notes.append("reduced 16 bits per channel to 8")
    if mode == "CMYK":
        img = img.convert("RGB")
        notes.append("converted CMYK colour to RGB")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        notes.append("converted the palette (indexed-colour) image to RGB")
    elif mode in ("L", "LA", "1"):
        img = img.convert("LA" if mode == "LA" else "RGB")
        notes.append("converted greyscale to RGB: colour concerns (redness, acne, age spots, dark circles, "
                     "radiance) cannot be measured on a greyscale photo")
    elif mode not in ("RGB", "RGBA", "LA"):
        img = img.convert("RGB")
        notes.append(f"converted {mode} pixels to RGB")
    if img.mode in ("RGBA", "LA"):
        alpha = img.getchannel("A")
        if alpha.getextrema()[0] < 255:
            share = sum(alpha.histogram()[:255]) / (img.width * img.height)
            flat = Image.new("RGB", img.size, (255, 255, 255))
            flat.paste(img.convert("RGBA"), mask=alpha)
            img = flat
            notes.append(f"flattened transparency onto white ({share:.0%} of the pixels were not opaque, and the "
                         "analysis does not use transparency)")
        elif img.mode == "LA":
            img = img.convert("RGB")
    return img, notes


def _encode(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.convert("RGB").save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def prepare_image(source: ImageSource, *, tier: str = "sd", downscale: bool = False,
                  check_size: bool = True) -> PreparedImage:
    """Run the pre-flight checks and return the bytes to upload.

    Parameters
    ----------
    source : path, bytes, binary file object or PIL.Image.Image
    tier : {"sd", "hd"}
        Sets the minimum short side (480 or 1080 px).
    downscale : bool
        Allow downscaling an image whose long side exceeds 2560 px to exactly 2560 (what the
        service would do). Off by default: the original is sent and the service resizes it.
    check_size : bool
        Check the tier's minimum short side. Turn off only to test the service's own check.

    Raises
    ------
    ImageError
        For an unreadable source, a format other than JPEG/PNG, a too-small image, or a
        file over 10 MB. Raised before anything is sent.
    """
    from PIL import Image, ImageOps

    data, name, pil = _read_source(source)
    changes: list[str] = []
    if pil is not None:
        has_alpha = "A" in pil.getbands() or (pil.mode == "P" and "transparency" in pil.info)
        fmt = "png" if has_alpha else "jpeg"
        data = _encode(pil.convert("RGBA" if has_alpha else "RGB"), fmt)
        changes.append(f"encoded the in-memory image as {fmt.upper()}" + (" (quality 95)" if fmt == "jpeg" else ""))
    label = repr(name) if name else "the image"
    fmt = sniff_format(data)
    if fmt == "empty":
        raise ImageError(f"{label} is empty (0 bytes). Check that the file was copied or downloaded completely.")
    if fmt not in ("jpeg", "png"):
        if fmt == "unknown":
            raise ImageError(f"{label} is not an image (it starts with {bytes(data[:12])!r}; a text or web page "
                             "saved under an image name?). Use the original photo, as a JPEG or PNG file.")
        article = "an" if fmt.upper() in ("SVG", "HEIF", "AVIF") else "a"  # as the names are said
        raise ImageError(f"{label} is {article} {fmt.upper()} file; the service accepts only JPEG and PNG. "
                         f"{_CONVERT_HINT}")
    try:
        # (Pillow may warn of a bomb here too; catch_warnings is not thread-safe, and batches
        # prepare photos in worker threads, so its warning is left alone)
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_PIXELS:
            raise ImageError(
                f"{label} declares {img.width}x{img.height} pixels ({img.width * img.height / 1e6:.0f} megapixels), "
                f"more than the {MAX_PIXELS / 1e6:.0f} MP skinlab decodes; it may be a decompression bomb. If it "
                f"is a real photo, downscale it first (the service works at {MAX_LONG_SIDE} px at most anyway).")
        img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label} is too large to decode safely ({exc}); it may be a decompression bomb.") from None
    except Exception as exc:
        raise ImageError(f"{label} looks like {fmt.upper()} but cannot be decoded ({exc}); it may be truncated. "
                         "Export it again from the original.") from None

    orientation = img.getexif().get(0x0112, 1)
    reencode = False
    if orientation not in (1, None) and not (isinstance(orientation, int) and 2 <= orientation <= 8):
        changes.append(f"ignored the invalid EXIF orientation {orientation!r} (valid values are 1 to 8): the photo "
                       "is used as stored")
    elif orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        reencode = True
        changes.append(f"rotated upright from EXIF orientation {orientation} and re-encoded as {fmt.upper()}"
                       + (" (quality 95)" if fmt == "jpeg" else ""))
    greyscale = img.mode in ("L", "LA", "1", "F") or img.mode.startswith("I")
    img, notes = _normalise_mode(img, sixteen_bit=fmt == "png" and len(data) > 24 and data[24] == 16)
    if notes:
        reencode = True
        changes.extend(notes)
    if not greyscale and _holds_no_colour(img):
        greyscale = True
        changes.append("found no colour: every pixel is grey although the file stores RGB, so colour concerns "
                       "(redness, acne, age spots, dark circles, radiance) cannot be measured on it")
    stripper = _strip_jpeg_metadata if fmt == "jpeg" else _strip_png_metadata
    if reencode:  # re-encoding drops the metadata too: report what the original carried
        _, removed = stripper(data)
        data = _encode(img, fmt)
    else:
        removed = []
    data, more = stripper(data)
    removed += more
    if removed:
        changes.append(_describe_removed(removed))
    width, height = img.size
    if max(width, height) > MAX_LONG_SIDE and downscale:
        scale = MAX_LONG_SIDE / max(width, height)
        size = (MAX_LONG_SIDE, round(height * scale)) if width >= height else (round(width * scale), MAX_LONG_SIDE)
        img = img.resize(size, Image.LANCZOS)
        data = _encode(img, fmt)
        changes.append(f"downscaled from {width}x{height} to {size[0]}x{size[1]} (long side {MAX_LONG_SIDE})")
        width, height = size
    tier = tier.lower()
    if tier not in MIN_SHORT_SIDE:
        raise ImageError(f"tier must be 'sd' or 'hd', got {tier!r}")
    if check_size and min(width, height) < MIN_SHORT_SIDE[tier]:
        need = MIN_SHORT_SIDE[tier]
        raise ImageError(
            f"{label} is {width}x{height}; {tier.upper()} analysis needs a short side of at least {need} px. "
            + ("Use SD actions (480 px minimum) or " if tier == "hd" and min(width, height) >= 480 else "")
            + ("use" if tier == "hd" and min(width, height) >= 480 else "Use")
            + " a larger photo (upscaling does not add detail)."
        )
    if len(data) > MAX_FILE_BYTES:
        hint = (" Pass downscale=True to resize it to a 2560 px long side, or re-encode as JPEG quality 90."
                if max(width, height) > MAX_LONG_SIDE and not downscale else " Re-encode it as JPEG at quality 90.")
        raise ImageError(f"{label} is {len(data) / 1e6:.1f} MB; the service accepts at most 10 MB.{hint}")
    return PreparedImage(
        data=data,
        content_type="image/png" if fmt == "png" else "image/jpeg",
        width=width, height=height,
        sha256=hashlib.sha256(data).hexdigest(),
        source_name=name, changes=changes, greyscale=greyscale,
    )
