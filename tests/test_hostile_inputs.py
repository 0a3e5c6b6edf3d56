"""Hostile inputs: the catalogue of issue 11.

Every kind of bad input either fails with a clear error from :mod:`skinlab.errors` (its type, and
a message that says what is wrong and what to do) or is normalised, with the change reported and
pinned here. Either way nothing billable happens first, and nothing already in the ledger is lost:

* refusals are proved to send nothing at all: a :class:`RecordingSession` under the client logs
  every HTTP request, and the emulator's task list and unit balance for the test's own key stay
  as they were;
* problems only the service can see (face too small, two faces, no face, a wrong key, an expired
  task id) end in an unbilled error: the balance is unchanged and no successful task exists;
* every case runs against a ledger holding one earlier success, which must survive intact.

The catalogue is :data:`REFUSED` (refused before the network), :data:`NORMALISED` (changed and
reported) and the tests below them; ``test_catalogue_size`` counts the kinds.
"""

from __future__ import annotations

import io
import os
import re
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import requests
from PIL import Image

from skinlab import errors
from skinlab.client import Client, PollSchedule
from skinlab.errors import ImageError, InvalidParametersError
from skinlab.images import MAX_FILE_BYTES
from skinlab.ledger import Ledger
from skinlab.results import AnalysisResult, ScoreEntry
from skinlab.tags import TagError, TagSheet

QUICK = PollSchedule(first=0.0, factor=1.0, cap=0.02, minimum=0.0)


# ---------------------------------------------------------------------------- the rig

class RecordingSession(requests.Session):
    """A real session that logs (method, URL without query) of every request it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str]] = []
        self.bodies: list[Any] = []

    def request(self, method, url, *args, **kwargs):
        self.sent.append((method, str(url).split("?")[0]))
        self.bodies.append(kwargs.get("json"))
        return super().request(method, url, *args, **kwargs)


@dataclass
class Rig:
    server: Any
    client: Client
    session: RecordingSession
    ledger: Ledger
    key: str
    prior_id: int
    balance: float

    def assert_nothing_sent(self) -> None:
        assert self.session.sent == [], f"requests were sent: {self.session.sent}"
        self.assert_nothing_billed()

    def assert_nothing_billed(self) -> None:
        app = self.server.app
        assert app.balance(self.key) == self.balance
        billed = [t for t in app.task_ids(self.key) if app.task(t).state == "success"]
        assert billed == []
        self.assert_prior_intact()

    def assert_prior_intact(self) -> None:
        prior = self.ledger.get(self.prior_id)
        assert prior.status == "success" and prior.task_id == "prior-task"
        scores = self.ledger.scores(backend="local")
        row = scores[scores.submission_id == self.prior_id]
        assert list(row.raw_score) == [61.5] and list(row.ui_score) == [74]
        assert (self.ledger.root / prior.result_dir / "result.json").is_file()


def _prior_result() -> AnalysisResult:
    return AnalysisResult([ScoreEntry("wrinkle", raw_score=61.5, ui_score=74)], {"all": 74.0}, format="json",
                          task_id="prior-task", backend="local", engine="skinlab-local test")


def make_rig(server, tmp_path: Path, *, key: str | None = None, **client_kw) -> Rig:
    key = key or f"sk-hostile-{uuid.uuid4().hex}"
    session = RecordingSession()
    client = Client(key, base_url=server.url, session=session, rate_limiter=False, poll_schedule=QUICK,
                    **client_kw)
    ledger = Ledger(tmp_path / "study" / "ledger.sqlite", warn_location=False)
    prior = ledger.record(_prior_result(), image_name="earlier.jpg", image_sha256="ab" * 32)
    return Rig(server, client, session, ledger, key, prior.id, server.app.balance(key))


@pytest.fixture
def rig(local_server, tmp_path):
    r = make_rig(local_server, tmp_path)
    yield r
    r.ledger.close()
    r.client.close()


# ---------------------------------------------------------------------------- image makers

def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(w=480, h=640, color=(180, 140, 120), **kw) -> bytes:
    return encode(Image.new("RGB", (w, h), color), "JPEG", quality=90, **kw)


def png_raw(w: int, h: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    """A PNG built chunk by chunk (to declare sizes or bit depths Pillow would not write)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def heic_header() -> bytes:
    """The start of an HEIC file: an ISO-BMFF ``ftyp`` box with brand heic (no codec needed)."""
    ftyp = b"ftyp" + b"heic" + struct.pack(">I", 0) + b"mif1heic"
    return struct.pack(">I", len(ftyp) + 4) + ftyp + struct.pack(">I", 8) + b"meta" + b"\x00" * 64


def twenty_mb_png() -> bytes:
    # stored (compress_level=0) 8-bit RGB: about 3 bytes a pixel, quick to write
    return encode(Image.new("RGB", (2600, 2600), (150, 120, 100)), "PNG", compress_level=0)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


# ---------------------------------------------------------------------------- refused before the network

@dataclass
class Case:
    id: str
    source: Callable[[Path], Any]         # tmp_path -> source
    exc: type
    match: str                            # what is wrong ... and how to fix it
    actions: Any = ("redness",)
    options: dict | None = None


REFUSED = [
    # files
    Case("empty-file", lambda t: write(t, "empty.jpg", b""), ImageError, r"empty \(0 bytes\).*copied or downloaded"),
    Case("truncated-jpeg", lambda t: write(t, "cut.jpg", jpeg()[:400]), ImageError,
         r"'cut.jpg' looks like JPEG but cannot be decoded.*truncated.*Export it again"),
    Case("heic", lambda t: write(t, "IMG_0001.HEIC", heic_header()), ImageError,
         r"HEIC file; the service accepts only JPEG and PNG.*pillow-heif"),
    Case("heic-named-jpg", lambda t: write(t, "IMG_0002.jpg", heic_header()), ImageError, r"'IMG_0002.jpg' is a HEIC"),
    Case("webp", lambda t: write(t, "a.webp", encode(Image.new("RGB", (480, 640)), "WEBP")), ImageError,
         r"WEBP file.*Convert it to JPEG or PNG"),
    Case("gif", lambda t: write(t, "a.gif", encode(Image.new("RGB", (480, 640)), "GIF")), ImageError,
         r"GIF file.*Convert it to JPEG or PNG"),
    Case("svg", lambda t: write(t, "face.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="480" height="640">'
                                               b'<circle r="9"/></svg>'), ImageError, r"is an SVG file.*Convert"),
    Case("tiff", lambda t: write(t, "scan.tif", encode(Image.new("RGB", (480, 640)), "TIFF")), ImageError,
         r"TIFF file.*Convert"),
    Case("bmp", lambda t: write(t, "a.bmp", encode(Image.new("RGB", (480, 640)), "BMP")), ImageError, r"BMP file"),
    Case("pdf", lambda t: write(t, "scan.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"), ImageError, r"PDF file"),
    Case("text-named-jpg", lambda t: write(t, "notes.jpg", b"Subject 17, left cheek, visit 2\n"), ImageError,
         r"'notes.jpg' is not an image.*a text or web page saved under an image name.*Use the original "
         r"photo, as a JPEG or PNG file\.$"),
    Case("html-named-jpg", lambda t: write(t, "download.jpg", b"<!DOCTYPE html><html><body>Sign in</body></html>"),
         ImageError, r"not an image \(it starts with b'<!DOCTYPE"),
    Case("directory", lambda t: (t / "photos").mkdir() or t / "photos", ImageError,
         r"is a folder, not an image.*analyze_many"),
    Case("missing-path", lambda t: t / "nope" / "face.jpg", ImageError, r"No such file: .*face.jpg.*Check the path"),
    Case("missing-non-ascii-path", lambda t: t / "Ünïcødé 顔写真.jpg", ImageError, r"No such file: .*顔写真"),
    Case("text-mode-file", lambda t: open(write(t, "f.jpg", jpeg()), "r", encoding="latin-1"), ImageError,
         r"text mode.*open\(path, 'rb'\)"),
    Case("not-a-source", lambda t: 3.14, ImageError, r"Cannot read an image from float.*Pass a path"),
    Case("decompression-bomb", lambda t: write(t, "bomb.png", png_raw(30000, 30000, 8, 0, zlib.compress(b"\0" * 64))),
         ImageError, r"too large to decode safely.*decompression bomb"),
    Case("decompression-bomb-below-pillow-limit",
         lambda t: write(t, "bomb2.png", png_raw(10000, 10000, 8, 2, zlib.compress(b"\0" * 64))), ImageError,
         r"declares 10000x10000 pixels \(100 megapixels\).*decompression bomb.*downscale it first"),
    Case("twenty-mb", lambda t: write(t, "big.png", twenty_mb_png()), ImageError,
         r"'big.png' is 20\.\d MB; the service accepts at most 10 MB\. Pass downscale=True.*re-encode as JPEG quality 90"),
    Case("one-pixel", lambda t: write(t, "dot.jpg", jpeg(1, 1)), ImageError,
         r"'dot.jpg' is 1x1; SD analysis needs a short side of at least 480 px\. Use a larger photo"),
    Case("too-small-for-hd", lambda t: write(t, "sd.jpg", jpeg(600, 800)), ImageError,
         r"HD analysis needs a short side of at least 1080 px\. Use SD actions", actions=("hd_redness",)),
    # sources given as URLs
    Case("ftp-url", lambda t: "ftp://example.com/face.jpg", InvalidParametersError,
         r"Only http\(s\) image URLs.*ftp: URL.*Download the image"),
    Case("file-url", lambda t: "file:///home/me/face.jpg", InvalidParametersError, r"file: URL.*Pass the file's path"),
    Case("data-url", lambda t: "data:image/jpeg;base64,/9j/4AAQSkZJRg==", InvalidParametersError,
         r"data: URL.*base64.b64decode"),
    Case("javascript-url", lambda t: "javascript:alert(1)", InvalidParametersError, r"javascript: URL"),
    Case("url-without-host", lambda t: "https:///face.jpg", InvalidParametersError, r"has no host name.*https://"),
    # actions
    Case("actions-empty", lambda t: jpeg(), InvalidParametersError, r"No actions given.*e\.g\.", actions=[]),
    Case("actions-unknown", lambda t: jpeg(), InvalidParametersError, r"Unknown action 'wrinkles'.*'wrinkle'",
         actions=["wrinkles"]),
    Case("actions-mixed-tiers", lambda t: jpeg(), InvalidParametersError, r"Cannot mix HD and SD.*all hd_\* names",
         actions=["hd_pore", "pore"]),
    Case("actions-not-strings", lambda t: jpeg(), InvalidParametersError, r"must be strings, got 7", actions=[7]),
    Case("actions-not-a-list", lambda t: jpeg(), InvalidParametersError, r"list of action names, not int",
         actions=5),
    Case("actions-hd-dark-circle-v2", lambda t: jpeg(), InvalidParametersError, r"Did you mean 'hd_dark_circle'",
         actions=["hd_dark_circle_v2"]),
    Case("format-unknown", lambda t: jpeg(), InvalidParametersError, r"format must be 'zip' or 'json'",
         options={"format": "xml"}),
    Case("pf-camera-kit-on-v20", lambda t: jpeg(), InvalidParametersError, r"v2.1.*api_version='v2.1'",
         options={"pf_camera_kit": True}),
    # miniserver_args
    Case("colour-short", lambda t: jpeg(), InvalidParametersError, r"6 hex digits such as '3D3D3D', got '#12345'",
         actions=["hd_pore"], options={"miniserver_args": {"color_dark_background_hd_pore": "#12345"}}),
    Case("colour-not-hex", lambda t: jpeg(), InvalidParametersError, r"6 hex digits.*'GGGGGG'",
         actions=["hd_pore"], options={"miniserver_args": {"color_dark_background_hd_pore": "GGGGGG"}}),
    Case("colour-as-int", lambda t: jpeg(), InvalidParametersError, r"6 hex digits.*got 4013373",
         actions=["hd_pore"], options={"miniserver_args": {"color_dark_background_hd_pore": 0x3D3D3D}}),
    Case("opacity-above-one", lambda t: jpeg(), InvalidParametersError, r"number from 0 to 1, got 1.5",
         actions=["hd_pore"], options={"miniserver_args": {"opacity_dark_background_hd_pore": 1.5}}),
    Case("opacity-negative", lambda t: jpeg(), InvalidParametersError, r"number from 0 to 1, got -0.1",
         actions=["hd_pore"], options={"miniserver_args": {"opacity_dark_background_hd_pore": -0.1}}),
    Case("opacity-nan", lambda t: jpeg(), InvalidParametersError, r"number from 0 to 1, got nan",
         actions=["hd_pore"], options={"miniserver_args": {"opacity_dark_background_hd_pore": float("nan")}}),
    Case("opacity-percent-string", lambda t: jpeg(), InvalidParametersError, r"number from 0 to 1, got '40%'",
         actions=["hd_pore"], options={"miniserver_args": {"opacity_dark_background_hd_pore": "40%"}}),
    Case("miniserver-unknown-key", lambda t: jpeg(), InvalidParametersError,
         r"Unknown miniserver_args key 'enable_mask_overlayy'.*Did you mean 'enable_mask_overlay'",
         options={"miniserver_args": {"enable_mask_overlayy": True}}),
    Case("miniserver-unknown-concern", lambda t: jpeg(), InvalidParametersError,
         r"Unknown miniserver_args key 'enable_dark_background_hd_eye_bag'", actions=["hd_eye_bag"],
         options={"miniserver_args": {"enable_dark_background_hd_eye_bag": True}}),
    Case("miniserver-not-a-dict", lambda t: jpeg(), InvalidParametersError, r"miniserver_args must be a dict",
         options={"miniserver_args": [("enable_mask_overlay", True)]}),
    Case("miniserver-flag-as-string", lambda t: jpeg(), InvalidParametersError, r"must be True or False, got 'yes'",
         options={"miniserver_args": {"enable_mask_overlay": "yes"}}),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_refused_before_any_request(rig, tmp_path, case):
    source = case.source(tmp_path)
    options = dict(case.options or {})
    try:
        with pytest.raises(case.exc, match=case.match) as info:
            rig.ledger.submit(rig.client, source, case.actions, **options)
        assert isinstance(info.value, errors.SkinlabError)
        assert info.value.retry_safe is False  # retrying the same input cannot help
        # the plain client refuses it the same way
        if hasattr(source, "seek"):
            source.seek(0)
        with pytest.raises(case.exc, match=case.match):
            rig.client.submit(source, case.actions, **options)
    finally:
        if hasattr(source, "close"):
            source.close()
    rig.assert_nothing_sent()
    assert len(rig.ledger) == 1  # nothing recorded for a refused input, nothing lost


# ---------------------------------------------------------------------------- normalised and reported

def _exif_jpeg(orientation: int) -> bytes:
    img = Image.new("RGB", (480, 640), (130, 130, 130))
    img.paste((250, 10, 10), (0, 0, 60, 60))
    ex = Image.Exif()
    ex[0x0112] = orientation
    ex[0x8825] = {1: "N", 2: (52.0, 22.0, 1.0)}  # a GPS position, which must not leave the machine
    return encode(img, "JPEG", quality=95, exif=ex)


def _png16_grey() -> bytes:
    return encode(Image.fromarray(np.full((640, 480), 40000, np.uint16)), "PNG")


def _png16_rgb() -> bytes:
    row = b"\x00" + struct.pack(">HHH", 50000, 30000, 20000) * 480
    return png_raw(480, 640, 16, 2, zlib.compress(row * 640))


NORMALISED = [
    # id, bytes maker, file name, the reported changes (regexes, in order), expected content type
    ("cmyk-jpeg", lambda: encode(Image.new("CMYK", (480, 640), (20, 60, 70, 10)), "JPEG"), "print.jpg",
     [r"^converted CMYK colour to RGB$"], "image/jpeg"),
    ("greyscale-jpeg", lambda: encode(Image.new("L", (480, 640), 120), "JPEG"), "grey.jpg",
     [r"^converted greyscale to RGB: colour concerns \(redness.*cannot be measured"], "image/jpeg"),
    ("greyscale-alpha-png", lambda: encode(Image.new("LA", (480, 640), (120, 255)), "PNG"), "grey.png",
     [r"^converted greyscale to RGB"], "image/png"),
    ("bilevel-png", lambda: encode(Image.new("1", (480, 640), 1), "PNG"), "fax.png",
     [r"^converted greyscale to RGB"], "image/png"),
    ("16-bit-grey-png", _png16_grey, "deep.png",
     [r"^reduced 16-bit greyscale to 8 bits$", r"^converted greyscale to RGB"], "image/png"),
    ("16-bit-rgb-png", _png16_rgb, "deep_rgb.png", [r"^reduced 16 bits per channel to 8$"], "image/png"),
    ("palette-png-transparent", lambda: encode(_palette_with_hole(), "PNG", transparency=0), "cutout.png",
     [r"^converted the palette", r"^flattened transparency onto white \(25% of the pixels"], "image/png"),
    ("palette-png-opaque", lambda: encode(Image.new("RGB", (480, 640), (200, 100, 50)).convert("P"), "PNG"),
     "indexed.png", [r"^converted the palette \(indexed-colour\) image to RGB$"], "image/png"),
    ("rgba-png-transparent", lambda: encode(_rgba_with_hole(), "PNG"), "cutout_rgba.png",
     [r"^flattened transparency onto white \(25% of the pixels"], "image/png"),
    ("grey-stored-as-rgb-jpeg", lambda: encode(Image.linear_gradient("L").resize((480, 640)).convert("RGB"), "JPEG"),
     "bw_scan.jpg", [r"^found no colour: every pixel is grey although the file stores RGB, so colour concerns"],
     "image/jpeg"),
    ("png-named-jpg", lambda: encode(Image.new("RGB", (480, 640), (10, 20, 30)), "PNG"), "really_png.jpg", [],
     "image/png"),
    ("exif-orientation-invalid", lambda: _exif_jpeg(9), "o9.jpg",
     [r"^ignored the invalid EXIF orientation 9 \(valid values are 1 to 8\): the photo is used as stored$",
      r"^removed metadata before upload: EXIF \(with GPS position\)$"], "image/jpeg"),
    ("jpeg-with-gps", lambda: _exif_jpeg(1), "gps.jpg", [r"^removed metadata before upload: EXIF \(with GPS position\)$"],
     "image/jpeg"),
]


def _palette_with_hole() -> Image.Image:
    img = Image.new("P", (480, 640), 1)
    img.putpalette([0, 0, 0, 200, 150, 130] + [0] * 762)
    img.paste(0, (0, 0, 240, 320))  # a quarter of the image is palette entry 0: transparent
    return img


def _rgba_with_hole() -> Image.Image:
    img = Image.new("RGBA", (480, 640), (200, 150, 130, 255))
    img.paste((0, 0, 0, 0), (0, 0, 240, 320))
    return img


@pytest.mark.parametrize("kind, make, name, changes, ctype", NORMALISED, ids=[n[0] for n in NORMALISED])
def test_normalised_and_reported(rig, tmp_path, kind, make, name, changes, ctype):
    path = write(tmp_path, name, make())
    plan = rig.client.plan(path, ["wrinkle"] if "gr" in kind or "bilevel" in kind else ["redness"])
    prep = plan.prepared
    assert len(prep.changes) == len(changes), prep.changes
    for pattern, text in zip(changes, prep.changes):
        assert re.search(pattern, text), (pattern, text)
    assert prep.content_type == ctype and prep.upload_name.endswith(".png" if ctype == "image/png" else ".jpg")
    out = Image.open(io.BytesIO(prep.data))
    assert out.mode == "RGB" and out.size == (480, 640)  # 8-bit RGB, upright
    assert b"GPS" not in prep.data and out.getexif().get(0x0112, 1) == 1
    if "transparent" in kind:  # the transparent corner became white, the rest kept its colour
        px = np.asarray(out)
        assert (px[:300, :200] == 255).all() and tuple(px[600, 400]) == (200, 150, 130)
    if kind == "16-bit-grey-png":  # scaled, not clipped: 40000/65535 of full scale
        assert abs(int(np.asarray(out)[0, 0, 0]) - round(40000 * 255 / 65535)) <= 1
    rig.assert_nothing_sent()  # planning is local


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_recorded_by_the_ledger(rig, tmp_path, orientation):
    """The upload is upright and stripped; the ledger records what pre-flight did. (A grey card has no
    face, so the task fails unbilled: see test_images.py for where each corner lands.)"""
    path = write(tmp_path, f"o{orientation}.jpg", _exif_jpeg(orientation))
    sub = rig.ledger.submit(rig.client, path, ["redness"])
    assert sub.status == "error" and sub.error_code == "error_no_face"
    row = rig.ledger.submissions().set_index("submission_id").loc[sub.id]
    upright = (480, 640) if orientation <= 4 else (640, 480)
    assert (row.image_width, row.image_height) == upright
    assert ("EXIF orientation" in row.preflight) == (orientation != 1)
    if orientation != 1:
        assert f"rotated upright from EXIF orientation {orientation}" in row.preflight
    assert "removed metadata" in row.preflight
    rig.assert_nothing_billed()


def test_non_ascii_file_name_is_kept_locally_and_never_sent(rig, tmp_path):
    path = write(tmp_path, "Ünïcødé/Zoë Ångström – 顔写真 🙂.jpg", jpeg())
    sub = rig.ledger.submit(rig.client, path, ["redness"])
    assert sub.error_code == "error_no_face"  # it reached the service, as a neutral name
    row = rig.ledger.submissions().set_index("submission_id").loc[sub.id]
    assert row.image_name == "Zoë Ångström – 顔写真 🙂.jpg"
    slots = [b for (m, u), b in zip(rig.session.sent, rig.session.bodies) if u.endswith("/s2s/v2.0/file")]
    assert len(slots) == 1
    assert re.fullmatch(r"[0-9a-f]{16}\.jpg", slots[0]["files"][0]["file_name"])  # neutral, ASCII
    # the name's parts, as sent raw or percent-encoded (not "Zo" alone: a random file id may hold it)
    parts = ("Zoë", "Zo%C3%AB", "Ångström", "%C3%85ngstr", "顔写真", "Ünïcødé", "%C3%9Cn")
    for (_, url), body in zip(rig.session.sent, rig.session.bodies):
        assert not any(p in url or p in repr(body) or p in str(body) for p in parts), (url, body)
    rig.assert_nothing_billed()


# ---------------------------------------------------------------------------- what only the service can see

@pytest.fixture(scope="module")
def portrait_jpeg():
    from skinlab.samples import sample_portrait

    return encode(sample_portrait("astronaut", "sd"), "JPEG", quality=95)


@pytest.fixture(scope="module")
def strict_server():
    """An emulator that knows one key, and counts a face of 0.3 of the width as big enough (so two
    faces side by side reach the multiple-people check)."""
    from skinlab.local import LocalServer

    server = LocalServer(task_duration_s=0.0, rate_limit=None, api_keys={"sk-the-right-key-0001"},
                         min_face_width_fraction=0.3)
    server.start()
    yield server
    server.stop()


def test_face_too_small(rig, tmp_path):
    from skinlab.samples import load_original

    path = write(tmp_path, "uncropped.jpg", encode(load_original("astronaut"), "JPEG", quality=95))
    with pytest.raises(errors.FaceTooSmallError, match=r"Crop the photo so the face fills 60-80% of the image width"):
        rig.ledger.submit(rig.client, path, ["redness"], raise_on_error=True)
    sub = rig.ledger.get(rig.prior_id + 1)
    assert sub.status == "error" and sub.error_code == "error_src_face_too_small" and sub.units_charged == 0
    rig.assert_nothing_billed()


def test_no_face(rig, tmp_path):
    noise = np.random.default_rng(7).integers(0, 255, (640, 480, 3), dtype=np.uint8)
    path = write(tmp_path, "wall.jpg", encode(Image.fromarray(noise), "JPEG"))
    with pytest.raises(errors.NoFaceError, match=r"one clearly visible face") as info:
        rig.client.analyze(path, ["redness"], timeout=60)
    assert info.value.task_id and info.value.code == "error_no_face"
    sub = rig.ledger.submit(rig.client, path, ["redness"])
    assert sub.status == "error" and sub.units_charged == 0 and "face" in sub.next_step.lower()
    rig.assert_nothing_billed()


def test_two_faces(strict_server, tmp_path, portrait_jpeg):
    r = make_rig(strict_server, tmp_path, key="sk-the-right-key-0001")
    face = np.asarray(Image.open(io.BytesIO(portrait_jpeg)))
    two = np.concatenate([face, face[:, ::-1]], axis=1)
    path = write(tmp_path, "pair.jpg", encode(Image.fromarray(two), "JPEG", quality=95))
    with pytest.raises(errors.MultiplePeopleError, match=r"exactly one face"):
        r.ledger.submit(r.client, path, ["redness"], raise_on_error=True)
    assert r.ledger.get(r.prior_id + 1).error_code == "error_multiple_people"
    r.assert_nothing_billed()


def test_wrong_key(strict_server, tmp_path, portrait_jpeg):
    r = make_rig(strict_server, tmp_path, key="sk-a-wrong-key-0002")
    path = write(tmp_path, "face.jpg", portrait_jpeg)
    with pytest.raises(errors.AuthenticationError, match=r"API key was refused.*SKINLAB_API_KEY.*without 'Bearer'"):
        r.ledger.submit(r.client, path, ["redness"])
    # only the free upload-slot call was made: no PUT of the photo, no task
    assert r.session.sent == [("POST", f"{strict_server.url}/s2s/v2.0/file")]
    row = r.ledger.get(r.prior_id + 1)
    assert row.status == "error" and row.units_charged == 0 and "No task was created" in row.error_message
    assert "sk-a-wrong-key" not in row.error_message
    r.assert_nothing_billed()


def test_expired_task_id(tmp_path, portrait_jpeg):
    from skinlab.local import LocalServer

    now = [1_700_000_000.0]
    server = LocalServer(task_duration_s=0.0, rate_limit=None, clock=lambda: now[0])
    server.start()
    try:
        r = make_rig(server, tmp_path)
        path = write(tmp_path, "face.jpg", portrait_jpeg)
        sub = r.ledger.submit(r.client, path, ["redness"], wait=False)  # created, not yet collected
        task_id = sub.task_id
        for _ in range(400):  # let the engine finish at the present time
            if r.client.task(task_id).status().done:
                break
            time.sleep(0.05)
        now[0] += 2 * 86400  # two days later: finished tasks live 24 h
        with pytest.raises(errors.InvalidTaskIdError, match=r"expired \(tasks live 24 h after completion\)"):
            r.client.task(task_id).wait(timeout=5)
        with pytest.raises(errors.InvalidTaskIdError, match=r"invalid task ID"):
            r.client.task("made-up-" + "x" * 99).status()
        report = r.ledger.resume(r.client, timeout=5)
        row = r.ledger.get(sub.id)
        assert row.status == "error" and row.error_code == "task_lost" and row.task_id == task_id
        assert list(report.status) == ["error"]
        r.assert_prior_intact()
        r.ledger.close()
    finally:
        server.stop()


# ---------------------------------------------------------------------------- tag sheets

def test_tag_sheet_missing_row_stops_before_any_request(rig, tmp_path):
    photo = write(tmp_path, "photos/S02_T0.jpg", jpeg())
    sheet = TagSheet.from_csv(write(tmp_path, "tags.csv", b"filename,subject\nS01_T0.jpg,S01\n"))
    with pytest.raises(TagError, match=r"has no row for 'S02_T0.jpg' \(column 'filename'\)\. Add a row"):
        rig.ledger.submit(rig.client, photo, ["redness"], tags=sheet)
    with pytest.raises(TagError, match=r"no row for 1 file\(s\): S02_T0.jpg"):
        sheet.check([photo])
    rig.assert_nothing_sent()
    assert len(rig.ledger) == 1


def test_tag_sheet_with_duplicate_rows_refused_by_the_cli(tmp_path, monkeypatch, capsys, local_server):
    from skinlab.cli import main

    from fakes import ScriptedServer

    write(tmp_path, "photos/a.jpg", jpeg())
    write(tmp_path, "photos/b.jpg", jpeg())
    write(tmp_path, "dup.csv", b"filename,subject\na.jpg,S1\nb.jpg,S2\na.jpg,S3\n")
    write(tmp_path, "missing.csv", b"filename,subject\na.jpg,S1\n")
    monkeypatch.setenv("SKINLAB_API_KEY", "sk-cli-hostile-0003")
    with ScriptedServer() as srv:
        for sheet, message in [("dup.csv", r"rows 2 and 4 both name 'a.jpg'.*one row per image"),
                               ("missing.csv", r"no row for 1 file\(s\): b.jpg")]:
            code = main(["analyze", str(tmp_path / "photos"), "--actions", "redness", "--tags",
                         str(tmp_path / sheet), "--base-url", srv.url, "--out", str(tmp_path / "out")])
            out = capsys.readouterr().out
            assert code == 2 and re.search(message, out), out
        assert srv.requests == []
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- the count

def test_catalogue_size():
    kinds = ({c.id for c in REFUSED} | {n[0] for n in NORMALISED}
             | {f"exif-orientation-{i}" for i in range(1, 9)}
             | {"non-ascii-name", "face-too-small", "no-face", "two-faces", "wrong-key", "expired-task-id",
                "tag-sheet-missing-row", "tag-sheet-duplicate-rows"})
    assert len(kinds) >= 40, len(kinds)


@pytest.mark.parametrize("kind", ["greyscale-jpeg", "greyscale-alpha-png", "bilevel-png", "16-bit-grey-png",
                                  "grey-stored-as-rgb-jpeg"])
def test_colour_concerns_on_a_greyscale_photo_are_refused_before_anything_is_sent(rig, tmp_path, kind):
    make, name = next((m, n) for k, m, n, _, _ in NORMALISED if k == kind)
    path = write(tmp_path, name, make())
    with pytest.raises(errors.ImageError, match=r"greyscale photo, and redness, dark_circle_v2 measure colour.*"
                                                r"Drop those actions"):
        rig.client.plan(path, ["wrinkle", "redness", "dark_circle_v2"])
    assert rig.client.plan(path, ["wrinkle", "pore"]).prepared.greyscale is True
    rig.assert_nothing_sent()
    # a colour photo of a grey card with a red patch is not a greyscale file: nothing is refused
    assert rig.client.plan(write(tmp_path, "card.jpg", _exif_jpeg(1)), ["redness"]).prepared.greyscale is False


def test_a_faintly_coloured_portrait_is_not_taken_for_grey(rig, tmp_path):
    """The grey test looks at channel differences: a real portrait with only 10 % of its colour
    left still holds colour, and its colour concerns are planned."""
    from skimage import data

    rgb = data.astronaut().astype(float)
    grey = rgb.mean(axis=-1, keepdims=True)
    faint = Image.fromarray(np.clip(grey + 0.1 * (rgb - grey), 0, 255).astype(np.uint8))
    plan = rig.client.plan(write(tmp_path, "faint.jpg", encode(faint, "JPEG", quality=90)), ["redness"])
    assert plan.prepared.greyscale is False
    assert not any("no colour" in c for c in plan.prepared.changes)
    rig.assert_nothing_sent()
