import io

import numpy as np
import pytest
from PIL import Image

from skinlab.errors import ImageError
from skinlab.images import MAX_FILE_BYTES, prepare_image, sniff_format


def _jpeg(w=640, h=800, exif=None, color=(180, 140, 120)) -> bytes:
    img = Image.new("RGB", (w, h), color)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


def _exif(orientation=1, gps=True, serial="SN-998877"):
    ex = Image.Exif()
    ex[0x0112] = orientation
    ex[0xA431] = serial  # BodySerialNumber
    if gps:
        ex[0x8825] = {1: "N", 2: (52.0, 22.0, 1.0)}
    return ex


@pytest.mark.parametrize("head, fmt", [
    (b"\xff\xd8\xff\xe0", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"\x00\x00\x00\x18ftypheic", "heic"),
    (b"\x00\x00\x00\x18ftypavif", "avif"), (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"), (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"), (b"BM", "bmp"), (b"%PDF-1.4", "pdf"), (b'<?xml version="1.0"?><svg>', "svg"),
    (b"", "empty"), (b"hello", "unknown"),
])
def test_sniff(head, fmt):
    assert sniff_format(head) == fmt


def test_plain_jpeg_passes_unchanged():
    data = _jpeg()
    prep = prepare_image(data)
    assert prep.data == data and prep.changes == []
    assert prep.content_type == "image/jpeg" and (prep.width, prep.height) == (640, 800)
    assert prep.upload_name.endswith(".jpg") and prep.sha256 in prep.upload_name + prep.sha256


def test_gps_and_serial_removed_losslessly():
    data = _jpeg(exif=_exif(1))
    assert b"SN-998877" in data
    prep = prepare_image(data)
    assert b"SN-998877" not in prep.data and b"Exif" not in prep.data
    assert prep.changes == ["removed metadata before upload: EXIF (with GPS position and camera serial number)"]
    # pixels are untouched: same decoded array
    a = np.asarray(Image.open(io.BytesIO(data)))
    b = np.asarray(Image.open(io.BytesIO(prep.data)))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("orientation, size", [(1, (600, 800)), (2, (600, 800)), (3, (600, 800)), (4, (600, 800)),
                                               (5, (800, 600)), (6, (800, 600)), (7, (800, 600)), (8, (800, 600))])
def test_all_exif_orientations_applied(orientation, size):
    # A 600x800 stored image with a red block at the stored top-left corner.
    img = Image.new("RGB", (600, 800), (120, 120, 120))
    img.paste((255, 0, 0), (0, 0, 100, 100))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=_exif(orientation, gps=False))
    prep = prepare_image(buf.getvalue())
    assert (prep.width, prep.height) == size
    out = np.asarray(prep.to_pil())
    assert out.shape[:2] == (size[1], size[0])
    assert Image.open(io.BytesIO(prep.data)).getexif().get(0x0112, 1) == 1
    if orientation != 1:
        assert any(f"EXIF orientation {orientation}" in c for c in prep.changes)
    # The red block moved where the orientation says; find it.
    red = (out[..., 0] > 200) & (out[..., 1] < 60)
    ys, xs = np.nonzero(red)
    corner = (ys.mean() < out.shape[0] / 2, xs.mean() < out.shape[1] / 2)
    expected = {1: (True, True), 2: (True, False), 3: (False, False), 4: (False, True),
                5: (True, True), 6: (True, False), 7: (False, False), 8: (False, True)}[orientation]
    assert corner == expected


def test_png_text_chunks_removed():
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("Author", "Jane Subject 017")
    buf = io.BytesIO()
    Image.new("RGB", (600, 800), (200, 150, 130)).save(buf, "PNG", pnginfo=meta)
    prep = prepare_image(buf.getvalue())
    assert b"Jane Subject" not in prep.data and prep.content_type == "image/png"
    assert prep.changes == ["removed metadata before upload: PNG text (Author)"]


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "TIFF", "BMP"])
def test_other_formats_refused_with_conversion_hint(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (600, 800)).save(buf, fmt)
    with pytest.raises(ImageError, match=rf"{fmt if fmt != 'TIFF' else 'TIFF'} file.*Convert it to JPEG or PNG"):
        prepare_image(buf.getvalue())


def test_heic_refused():
    with pytest.raises(ImageError, match="HEIC.*pillow-heif"):
        prepare_image(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 100)


def test_text_and_empty_and_truncated():
    with pytest.raises(ImageError, match="not an image"):
        prepare_image(b"just some text, renamed to .jpg")
    with pytest.raises(ImageError, match="empty"):
        prepare_image(b"")
    with pytest.raises(ImageError, match="truncated"):
        prepare_image(_jpeg()[:300])


def test_sources(tmp_path):
    data = _jpeg()
    p = tmp_path / "face.jpg"
    p.write_bytes(data)
    assert prepare_image(p).source_name == "face.jpg"
    assert prepare_image(str(p)).data == data
    with open(p, "rb") as fh:
        assert prepare_image(fh).data == data
    with open(p, "r", encoding="latin-1") as fh:
        with pytest.raises(ImageError, match="text mode"):
            prepare_image(fh)
    with pytest.raises(ImageError, match="No such file"):
        prepare_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        prepare_image(tmp_path)
    with pytest.raises(ImageError, match="Cannot read an image from int"):
        prepare_image(42)
    pil = Image.new("RGB", (640, 800), (10, 200, 30))
    prep = prepare_image(pil)
    assert prep.content_type == "image/jpeg" and "encoded the in-memory image" in prep.changes[0]
    rgba = Image.new("RGBA", (640, 800))
    assert prepare_image(rgba).content_type == "image/png"


def test_minimum_short_side_per_tier():
    data = _jpeg(640, 1000)
    assert prepare_image(data, tier="sd").width == 640
    with pytest.raises(ImageError, match="HD analysis needs a short side of at least 1080.*Use SD actions"):
        prepare_image(data, tier="hd")
    with pytest.raises(ImageError, match="at least 480"):
        prepare_image(_jpeg(400, 600))
    assert prepare_image(_jpeg(400, 600), check_size=False).width == 400


def test_downscale_only_when_allowed():
    data = _jpeg(3000, 4000)
    assert prepare_image(data).height == 4000
    prep = prepare_image(data, downscale=True)
    assert (prep.width, prep.height) == (1920, 2560)
    assert any("downscaled from 3000x4000 to 1920x2560" in c for c in prep.changes)


def test_over_10_mb_refused_before_upload():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (2400, 2400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    assert len(buf.getvalue()) > MAX_FILE_BYTES
    with pytest.raises(ImageError, match="at most 10 MB"):
        prepare_image(buf.getvalue())


def _with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """``data`` (a JPEG) with one more APPn/COM segment right after SOI."""
    return data[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


@pytest.mark.parametrize("make, note", [
    (lambda: _with_segment(_jpeg(), 0xFE, b"taken at the clinic"), "JPEG comment"),
    (lambda: _jpeg(exif=_exif(1, gps=False, serial="")), "EXIF"),
    (lambda: _jpeg(exif=_exif(1, gps=True, serial="")), "EXIF (with GPS position)"),
    (lambda: _jpeg(exif=_exif(1, gps=False)), "EXIF (with camera serial number)"),
    (lambda: _with_segment(_jpeg(), 0xE1, b"Exif\x00\x00not a TIFF header"),
     "EXIF (which can hold GPS position and camera serial)"),
    (lambda: _with_segment(_jpeg(), 0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"), "XMP"),
    (lambda: _with_segment(_jpeg(), 0xED, b"Photoshop 3.0\x00"), "IPTC"),
    (lambda: _with_segment(_with_segment(_jpeg(), 0xFE, b"one"), 0xFE, b"two"), "JPEG comment"),
])
def test_removed_metadata_named_exactly(make, note):
    """The note says what was removed, and names GPS or a serial only when the EXIF held one."""
    prep = prepare_image(make())
    assert prep.changes == [f"removed metadata before upload: {note}"]


def test_exif_in_a_serial_only_exif_ifd_and_png_chunks_named():
    from PIL.PngImagePlugin import PngInfo

    exif = Image.Exif()
    exif[0x8769] = {0xA431: "SN-1"}  # BodySerialNumber where cameras write it: the Exif IFD
    meta = PngInfo()
    meta.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta/>")
    buf = io.BytesIO()
    Image.new("RGB", (600, 800), (200, 150, 130)).save(buf, "PNG", pnginfo=meta, exif=exif)
    prep = prepare_image(buf.getvalue())
    assert prep.changes == ["removed metadata before upload: XMP, EXIF (with camera serial number)"]


def test_no_change_note_contains_a_semicolon():
    """The ledger joins the notes with '; ' (its preflight column), and the CLI splits them again."""
    rgba = Image.new("RGBA", (600, 800), (200, 150, 130, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 300, 400))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    grey = io.BytesIO()
    Image.new("L", (600, 800), 100).save(grey, "JPEG", exif=_exif(6))
    changes = prepare_image(buf.getvalue()).changes + prepare_image(grey.getvalue()).changes
    assert len(changes) == 4 and not any(";" in c for c in changes), changes
