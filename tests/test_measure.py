"""``skinlab.local.measure``: the engine's physical measurements as a tidy DataFrame (issue 4).

Every number the engine emits must come out with a declared quantity, region and unit, on both
bundled portraits, at SD and HD, with pores resolvable and not, and in the cascade fallback.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("scipy")
pd = pytest.importorskip("pandas")

from PIL import Image  # noqa: E402

import skinlab.local as local  # noqa: E402
import skinlab.local.engine as engine  # noqa: E402
from skinlab.actions import CATALOGUE, CONCERNS, HD_ACTIONS, SD_ACTIONS  # noqa: E402
from skinlab.errors import ImageError, InvalidParametersError  # noqa: E402
from skinlab.local.engine import KINDS, UNITS, describe_measurement  # noqa: E402
from skinlab.local.engine import _model  # noqa: E402
from skinlab.local.engine._quantities import ALIASES, NOT_RESOLVABLE, QUANTITIES  # noqa: E402
from skinlab.samples import load_original, sample_portrait  # noqa: E402

NAMES = ("astronaut", "grace_hopper")
LANDMARKS = "mediapipe-face-landmarker"
COLUMNS = ["concern", "action", "quantity", "region", "value", "unit", "kind", "proxy", "resolvable",
           "category", "key", "method", "backend", "engine_version", "face_backend", "px_per_mm"]


@pytest.fixture(scope="module")
def portraits(landmark_model):
    return {(n, t): np.asarray(sample_portrait(n, t)) for n in NAMES for t in ("sd", "hd")}


@pytest.fixture(scope="module")
def tables(portraits):
    out = {}
    for (n, t), img in portraits.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)      # an undeclared unit would warn
            out[(n, t)] = local.measure(img, "all", hd=(t == "hd"))
    return out


@pytest.fixture(scope="module")
def resolvable(landmark_model):
    """The astronaut at a 2000 px long side: about 8.9 px/mm, so pores are counted."""
    base = sample_portrait("astronaut", "hd")
    s = 2000 / max(base.size)
    img = np.asarray(base.resize((round(base.width * s), round(base.height * s)), Image.LANCZOS))
    return img, local.measure(img, ["hd_pore", "hd_wrinkle"])


def _check_declared(df: pd.DataFrame) -> None:
    assert list(df.columns) == COLUMNS
    assert df["unit"].notna().all() and df["unit"].isin(list(UNITS)).all(), df[~df["unit"].isin(list(UNITS))]
    assert df["kind"].isin(list(KINDS)).all()
    assert df["region"].notna().all() and (df["region"].str.len() > 0).all()
    assert df["quantity"].notna().all() and (df["quantity"].str.len() > 0).all()
    # tidy: one row per (action, quantity, region)
    dup = df.duplicated(["action", "quantity", "region"], keep=False)
    assert not dup.any(), df.loc[dup, ["action", "quantity", "region", "key"]]


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tier", ["sd", "hd"])
def test_every_measurement_has_a_unit_and_region(tables, portraits, name, tier):
    df = tables[(name, tier)]
    _check_declared(df)
    assert set(df["concern"]) == set(CONCERNS) and len(CONCERNS) == 16
    assert set(df["action"]) == set(HD_ACTIONS if tier == "hd" else SD_ACTIONS)
    # the rows are the engine's numbers, one for one (aliases aside), never re-computed
    res = engine.analyze(portraits[(name, tier)], CONCERNS)
    for concern, m in res.concerns.items():
        rows = df[(df["concern"] == concern) & df["resolvable"] & (df["unit"] != "category")]
        expected = {k: v for k, v in m.measurements.items() if k not in ALIASES.get(concern, {})}
        assert dict(zip(rows["key"], rows["value"])) == pytest.approx(expected), concern
        assert (rows["proxy"] == m.proxy).all() and (rows["method"] == m.method).all()
        for key in m.measurements:
            assert describe_measurement(concern, key) is not None, (concern, key)
    # the image-level identity on every row, so these are never pooled with cloud scores
    assert (df["backend"] == "skinlab-local-engine").all()
    assert (df["engine_version"] == res.engine_version).all() and res.engine_version.endswith("+landmarks")
    assert (df["face_backend"] == LANDMARKS).all()
    assert df["px_per_mm"].iloc[0] == pytest.approx(res.px_per_mm)
    assert df.attrs["tier"] == tier and df.attrs["skin_age_years_proxy"] == res.skin_age
    assert df.loc[df["resolvable"] & (df["unit"] != "category"), "value"].map(math.isfinite).all()


def test_units_say_what_the_numbers_are(tables):
    df = tables[("grace_hopper", "hd")]

    def row(concern, quantity, region):
        sel = df[(df["concern"] == concern) & (df["quantity"] == quantity) & (df["region"] == region)]
        assert len(sel) == 1, (concern, quantity, region)
        return sel.iloc[0]

    r = row("droopy_upper_eyelid", "mrd1", "eyes")
    assert r["unit"] == "mm" and 3 < r["value"] < 6 and r["key"] == "mrd1_mm"
    assert row("droopy_upper_eyelid", "mrd1", "eye_image_left")["unit"] == "mm"
    assert row("dark_circle", "under_eye_darkness", "under_eye")["unit"] == "ΔL*"
    assert row("dark_circle", "under_eye_darkness", "under_eye_image_right")["key"] == "delta_l_star_image_right"
    r = row("wrinkle", "wrinkle_length_density", "forehead")
    assert r["unit"] == "mm/cm²" and r["key"] == "wrinkle_len_mm_per_cm2_forehead"
    assert row("wrinkle", "skin_area", "forehead")["unit"] == "cm²"
    assert row("oiliness", "highlight_fraction", "t_zone")["unit"] == "%"
    assert row("redness", "a_star_mean", "cheek")["unit"] == "a*"
    assert row("redness", "erythema_index", "central_face")["unit"] == "EI"
    assert row("droopy_lower_eyelid", "canthal_tilt", "eyes")["unit"] == "°"
    assert row("age_spot", "spot_density", "whole")["unit"] == "1/10 cm²"
    assert row("pore", "image_scale", "whole")["unit"] == "px/mm"
    # the skin types are categories of the service, in their own column
    st = df[(df["concern"] == "skin_type") & (df["quantity"] == "skin_type")]
    assert set(st["region"]) == {"whole", "t_zone", "u_zone"} and (st["unit"] == "category").all()
    assert st["value"].isna().all() and st["category"].notna().all()
    # proxies say so: firmness and moisture always, the pores below 8 px/mm
    for concern in ("firmness", "moisture", "pore"):
        assert df.loc[df["concern"] == concern, "proxy"].all(), concern
    assert not df.loc[df["concern"] == "droopy_upper_eyelid", "proxy"].any()


def test_pores_below_8_px_per_mm_have_no_value(tables):
    for key, df in tables.items():
        pore = df[df["concern"] == "pore"]
        assert pore["px_per_mm"].iloc[0] < 8, key
        missing = pore[~pore["resolvable"]]
        # no invented count: the counts are rows without a value, flagged not resolvable
        assert set(missing["key"]) == set(NOT_RESOLVABLE["pore"])
        assert missing["value"].isna().all()
        assert {"pore_count", "pore_density", "pore_mean_diameter"} <= set(missing["quantity"])
        proxy = pore[pore["quantity"] == "pore_proxy_dark_blob_contrast"]
        assert len(proxy) == 4 and proxy["resolvable"].all() and proxy["value"].notna().all()
        assert pore["proxy"].all()


def test_pores_counted_when_resolvable(resolvable):
    _, df = resolvable
    _check_declared(df)
    pore = df[df["concern"] == "pore"]
    assert pore["px_per_mm"].iloc[0] >= 8
    assert pore["resolvable"].all() and not pore["proxy"].any()
    dens = pore[pore["quantity"] == "pore_density"]
    assert set(dens["region"]) == {"whole", "forehead", "nose", "cheek"}
    assert (dens["unit"] == "1/cm²").all() and dens["value"].map(math.isfinite).all()
    assert "pore_proxy_dark_blob_contrast" not in set(pore["quantity"])
    # wrinkles at this scale: regions and units as before
    w = df[df["concern"] == "wrinkle"]
    assert set(w.loc[w["quantity"] == "wrinkle_length_density", "region"]) == set(CATALOGUE["hd_wrinkle"].regions)


def test_every_name_the_fallback_emits_is_declared(landmark_model, portraits):
    img = portraits[("astronaut", "sd")]
    try:
        assert engine.use_landmark_model(None).startswith("skimage-lbp-cascade(FALLBACK")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            df = local.measure(img, "all")
    finally:
        assert engine.use_landmark_model(landmark_model) == LANDMARKS
    _check_declared(df)
    assert set(df["concern"]) == set(CONCERNS)
    # the fallback is named on every row
    assert df["face_backend"].str.contains("FALLBACK").all()
    assert df["engine_version"].str.endswith("+cascade-fallback").all()
    # without landmarks the eyelid distances are proxies, and say so
    assert df.loc[df["concern"] == "droopy_upper_eyelid", "proxy"].all()


def test_declarations_are_consistent():
    for concern, table in QUANTITIES.items():
        assert concern in CONCERNS
        for key, q in table.items():
            assert q.key == key and q.unit in UNITS and q.kind in KINDS
        for alias, target in ALIASES.get(concern, {}).items():
            assert target in table and alias not in table
    assert set(QUANTITIES) == set(CONCERNS)


# ---------------------------------------------------------------------------------------------
# inputs and actions


def _exif_rotated_png(img: np.ndarray) -> bytes:
    """The image stored turned a quarter, with EXIF orientation 6 ("rotate 90 CW to view")."""
    turned = Image.fromarray(img).transpose(Image.Transpose.ROTATE_90)     # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    turned.save(buf, format="PNG", exif=exif)
    return buf.getvalue()


def test_inputs_path_bytes_pil_array_and_exif(portraits, tables, tmp_path):
    img = portraits[("grace_hopper", "sd")]
    ref = tables[("grace_hopper", "sd")]
    want = pd.concat([ref[ref["action"] == a] for a in ("redness", "droopy_upper_eyelid")], ignore_index=True)
    path = tmp_path / "g.png"
    Image.fromarray(img).save(path)
    rotated = _exif_rotated_png(img)
    assert Image.open(io.BytesIO(rotated)).size == (img.shape[0], img.shape[1])     # stored sideways
    for source in (path, str(path), path.read_bytes(), Image.fromarray(img), img, rotated,
                   io.BytesIO(rotated), Image.open(io.BytesIO(rotated))):
        got = local.measure(source, ["redness", "droopy_upper_eyelid"])
        pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_actions_are_validated_and_tiers_named(portraits):
    img = portraits[("astronaut", "sd")]
    df = local.measure(img, ["dark_circle"])
    assert set(df["action"]) == {"dark_circle_v2"} and set(df["concern"]) == {"dark_circle"}
    df = local.measure(img, "wrinkle, redness", hd=True)
    assert list(dict.fromkeys(df["action"])) == ["hd_wrinkle", "hd_redness"]
    assert df.attrs["tier"] == "hd"
    with pytest.raises(InvalidParametersError, match="mix"):
        local.measure(img, ["hd_wrinkle", "redness"])
    with pytest.raises(InvalidParametersError, match="wrinkle"):
        local.measure(img, ["wrinkles"])
    with pytest.raises(InvalidParametersError):
        local.measure(img, [])
    with pytest.raises(ImageError):
        local.measure(np.zeros((20, 20), np.uint8), ["redness"])
    with pytest.raises(ImageError):
        local.measure(b"not an image", ["redness"])


def test_a_failed_image_check_names_the_error(landmark_model):
    with pytest.raises(ValueError, match="error_src_face_too_small"):
        local.measure(load_original("astronaut"), ["redness"])
    # configurable gates, as the engine's
    img = np.asarray(sample_portrait("astronaut", "sd"))
    with pytest.raises(ValueError, match="error_src_face_too_small"):
        local.measure(img, ["redness"], gates=engine.GateConfig(min_face_width_fraction=0.9))


def test_import_stays_light():
    code = ("import sys, skinlab.local; "
            "print(json.dumps([m for m in ('skinlab.local.engine', 'pandas', 'scipy', 'skimage', 'mediapipe') "
            "if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == []
    assert callable(local.measure) and "measure" in local.__all__


def test_large_images_are_resized_as_the_service_does():
    from skinlab.local import _load_upright_rgb

    wide = np.zeros((300, 3000, 3), np.uint8)
    wide[:, ::2] = 200
    assert _load_upright_rgb(wide).shape == (256, 2560, 3)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    assert _load_upright_rgb(buf.getvalue()).shape == (256, 2560, 3)
    small = np.full((100, 80, 3), 7, np.uint8)
    assert np.array_equal(_load_upright_rgb(small), small)
    buf = io.BytesIO()
    Image.fromarray(small).save(buf, format="GIF")
    with pytest.raises(ImageError, match="error_decode_image"):
        _load_upright_rgb(buf.getvalue())
