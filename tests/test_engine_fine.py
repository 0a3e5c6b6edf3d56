"""Fine-structure measurements of the local engine (issue 5): wrinkles, pores, texture, age spots
and acne, validated against the known answers of synthetic phantoms at several resolutions and
by metamorphic edits of real portraits; and many photos through executors and Dask.

The precision/recall table is printed to the terminal (and documented in
docs/engine-methods.md). Photos and analyses are module fixtures; the engine caches its
measurements per image, so nothing is measured twice."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("scipy")

from PIL import Image, ImageFilter  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import skinlab.local.engine as engine  # noqa: E402
from skinlab.actions import CONCERNS  # noqa: E402
from skinlab.local.engine import _fine as F  # noqa: E402
from skinlab.local.engine import analyze  # noqa: E402
from skinlab.local.engine.phantoms import (  # noqa: E402
    line_precision_recall, make_phantom, match_points,
)

RESOLUTIONS = (3, 4, 5, 6, 8, 10, 12, 16)        # px/mm
SEEDS = (0, 1)


# ---------------------------------------------------------------------------------------------
# phantoms: known answers at several resolutions


def _pore_tol(ppmm: float) -> float:
    return max(1.5, 0.25 * ppmm)                  # 0.25 mm, at least 1.5 px


def _line_tol(ppmm: float) -> float:
    return max(1.5, 0.3 * ppmm)                   # 0.3 mm, at least 1.5 px


@pytest.fixture(scope="module")
def phantom_table():
    """Per resolution: detections of every fine detector on phantoms of SEEDS, scored against
    the truth (counts pooled over the seeds)."""
    rows = {}
    for p in RESOLUTIONS:
        acc = {"pore": [0, 0, 0], "spot": [0, 0, 0], "red": [0, 0, 0]}    # tp, fp, fn
        line_p, line_r, len_err, depth_pairs, diam_pairs = [], [], [], [], []
        resolvable = []
        for seed in SEEDS:
            ph = make_phantom(p, seed=seed)
            m = F.measure_patch(ph.rgb, p)
            resolvable.append(m["pore_resolvable"])
            lp = line_precision_recall(m["line_points"], ph, _line_tol(p))
            line_p.append(lp["precision"]); line_r.append(lp["recall"])
            len_err.append(m["line_length_mm"] / ph.core_wrinkle_length_mm() - 1)
            # per-line depth: the skeleton's depth estimate near each true line's core
            fv = F.view_from_rgb(ph.rgb, p, F.WRINKLE_MAX_PX_PER_MM)
            lines = F.find_lines(fv)
            r, c = np.nonzero(lines.skeleton)
            if r.size:
                y, x = fv.to_full(r, c)
                tree = cKDTree(np.column_stack([y, x]))
                for w in ph.wrinkles:
                    core = ph.to_px(w.points_mm)[w.taper() >= 0.9]
                    near = sorted({i for lst in tree.query_ball_point(core, _line_tol(p)) for i in lst})
                    if near:
                        depth_pairs.append((float(np.median(lines.depth[r[near], c[near]])), w.depth))
            if m["pores"] is not None:
                mp = match_points(m["pores"], ph.pore_px(), _pore_tol(p))
                for k, key in enumerate(("tp", "fp", "fn")):
                    acc["pore"][k] += mp[key]
                dist, j = cKDTree(ph.pore_px()).query(m["pores"])
                ok = dist <= _pore_tol(p)
                diam_pairs += list(zip(m["pore_diam_mm"][ok], ph.pores[j[ok], 2]))
            for name, found, truth, tol in (
                    ("spot", m["spots"], ph.spots, ph.spots[:, 2] * p),
                    ("red", m["red_blobs"], ph.red_blobs, 2 * ph.red_blobs[:, 2] * p)):
                mm = match_points(found, ph.to_px(truth[:, :2]), tol)
                for k, key in enumerate(("tp", "fp", "fn")):
                    acc[name][k] += mm[key]

        def pr(tp, fp, fn):
            return (tp / (tp + fp) if tp + fp else 1.0, tp / (tp + fn) if tp + fn else 1.0)

        rows[p] = {"resolvable": all(resolvable), "any_resolvable": any(resolvable),
                   "line_p": min(line_p), "line_r": min(line_r), "len_err": max(len_err, key=abs),
                   "pore": pr(*acc["pore"]) if all(resolvable) else None,
                   "n_pores": acc["pore"][0] + acc["pore"][2],
                   "spot": pr(*acc["spot"]), "red": pr(*acc["red"]),
                   "depth_pairs": depth_pairs, "diam_pairs": diam_pairs}
    return rows


def _format_table(rows) -> str:
    out = ["", "Phantom validation (2 seeds x 40x40 mm, 240 pores, 16 wrinkles, 10 spots, 10 red blobs",
           "per resolution; wrinkles: worst seed; others pooled)",
           f"{'px/mm':>5} | {'wrinkle P':>9} {'R':>5} {'len err':>8} | {'pore P':>7} {'R':>5} | "
           f"{'spot P':>6} {'R':>5} | {'acne P':>6} {'R':>5}"]
    for p, r in rows.items():
        pore = f"{r['pore'][0]:>7.2f} {r['pore'][1]:>5.2f}" if r["pore"] else f"{'n/r':>7} {'n/r':>5}"
        out.append(f"{p:>5} | {r['line_p']:>9.2f} {r['line_r']:>5.2f} {r['len_err']:>+8.0%} | {pore} | "
                   f"{r['spot'][0]:>6.2f} {r['spot'][1]:>5.2f} | {r['red'][0]:>6.2f} {r['red'][1]:>5.2f}")
    out.append("n/r = not resolvable (< 8 px/mm): no pore count, the proxy instead")
    return "\n".join(out)


def test_phantom_precision_recall_per_resolution(phantom_table, capsys):
    with capsys.disabled():
        print(_format_table(phantom_table))
    for p, r in phantom_table.items():
        # pores: counted exactly where resolvable, never below 8 px/mm
        assert r["resolvable"] == (p >= F.PORE_MIN_PX_PER_MM) == r["any_resolvable"]
        if r["resolvable"]:
            assert r["n_pores"] == 240
            assert r["pore"][0] >= 0.9 and r["pore"][1] >= 0.9, (p, r["pore"])
        # wrinkles: resolvable at >= 4 px/mm for these lines (0.25-0.7 mm wide)
        if p >= F.FINE_LINE_MIN_PX_PER_MM:
            assert r["line_p"] >= 0.9 and r["line_r"] >= 0.9, (p, r["line_p"], r["line_r"])
            assert abs(r["len_err"]) <= 0.15, (p, r["len_err"])
        else:
            assert r["line_p"] >= 0.9 and r["line_r"] >= 0.6, (p, r["line_p"], r["line_r"])
        # spots and red blobs (1-6 mm) at every resolution
        assert min(r["spot"]) >= 0.9 and min(r["red"]) >= 0.9, (p, r["spot"], r["red"])


def test_phantom_depth_and_size_estimates(phantom_table):
    """Line depth (L*) and pore diameter (mm) estimates follow the truth: they rank the objects
    right and are on the right scale (the blur of the pixel and the optics makes the visible
    depth of thin lines ~0.8 x the drawn depth)."""
    for p, r in phantom_table.items():
        if p < F.FINE_LINE_MIN_PX_PER_MM:
            continue
        est, true = np.array(r["depth_pairs"]).T
        assert len(est) >= 14
        assert spearmanr(est, true)[0] >= 0.85, p
        assert 0.6 <= float(np.median(est / true)) <= 1.1, p
        if r["resolvable"]:
            d_est, d_true = np.array(r["diam_pairs"]).T
            assert spearmanr(d_est, d_true)[0] >= 0.7, p
            assert 0.8 <= float(np.median(d_est / d_true)) <= 1.4, p


def test_phantoms_are_deterministic_and_scale_free():
    a, b = make_phantom(8, seed=3), make_phantom(8, seed=3)
    assert np.array_equal(a.rgb, b.rgb)
    c = make_phantom(12, seed=3)
    # the same skin at another resolution: the same objects in mm, more pixels
    assert np.array_equal(a.pores, c.pores) and len(a.wrinkles) == len(c.wrinkles) == 8
    assert c.rgb.shape[0] == round(40 * 12) and a.rgb.shape[0] == round(40 * 8)
    assert not np.array_equal(make_phantom(8, seed=4).pores, a.pores)


def test_noise_alone_gives_no_pores_or_lines():
    """A patch of skin with texture, shading and sensor noise but no objects: the detectors
    find (almost) nothing; texture is small and the pore proxy low."""
    for p in (6, 12):
        ph = make_phantom(p, seed=5, n_pores=0, n_wrinkles=0, n_spots=0, n_red=0)
        m = F.measure_patch(ph.rgb, p)
        assert m["line_length_mm"] <= 6.0, p          # < 0.4 mm per cm2 (wrinkled skin: ~10-20)
        assert len(m["spots"]) == 0 and len(m["red_blobs"]) == 0
        if m["pores"] is not None:
            assert len(m["pores"]) <= 3
        assert m["texture"] < 1.0


def test_pore_proxy_follows_pore_density_below_8_px_per_mm():
    """Below 8 px/mm there is no count; the documented proxy (dark-blob contrast at 0.25 mm)
    still grows with the number of pores, at every resolution."""
    for p in (3, 4, 6):
        vals = []
        for n in (0, 120, 240):
            ph = make_phantom(p, seed=2, n_pores=n, n_wrinkles=0, n_spots=0, n_red=0)
            m = F.measure_patch(ph.rgb, p)
            assert m["pores"] is None and m["pore_resolvable"] is False
            vals.append(m["pore_proxy"])
        assert vals[0] < vals[1] < vals[2], (p, vals)
        assert vals[2] > 1.5 * vals[0]


# ---------------------------------------------------------------------------------------------
# real portraits


def _portrait(name: str, long_side: int) -> np.ndarray:
    from skinlab.samples import sample_portrait

    img = sample_portrait(name, "hd")
    s = long_side / max(img.size)
    return np.asarray(img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS))


@pytest.fixture(scope="module")
def photos():
    return {"astronaut": _portrait("astronaut", 1440), "grace_hopper": _portrait("grace_hopper", 1440)}


@pytest.fixture(scope="module")
def base(photos):
    return {k: analyze(v, CONCERNS) for k, v in photos.items()}


def _ctx(img):
    res = analyze(img, ["redness"])
    return engine._context(engine._digest(img), img, res.face.faces[0])


def _region_points(ctx, name: str, n: int, seed: int, min_gap_mm: float, inset_mm: float = 2.0):
    """``n`` full-image (x, y) points on ``name``'s skin, at least ``inset_mm`` inside it and
    ``min_gap_mm`` apart (deterministic)."""
    from scipy import ndimage as ndi

    k = max(1, int(round(inset_mm * ctx.ppmm)))
    m = ndi.binary_erosion(ctx.regions[name] & ctx.skin_filled, iterations=k)
    ys, xs = np.nonzero(m)
    assert ys.size, name
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(ys.size):
        fy, fx = ctx.full_res_pixel(float(ys[i]), float(xs[i]))
        if all(math.hypot(fx - x, fy - y) >= min_gap_mm * ctx.ppmm_full for x, y in out):
            out.append((fx, fy))
        if len(out) == n:
            break
    assert len(out) == n, (name, len(out))
    return out


def _paint(img, centres, radius_px, factor, soft=True):
    """Multiply pixels by a per-channel factor around each centre: a Gaussian bump of sigma
    radius_px / 1.5 (soft) or a disc with a 1 px soft edge."""
    out = img.astype(np.float32)
    half = int(3 * radius_px) + 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    d = np.hypot(xx, yy)
    w = np.exp(-d ** 2 / (2 * (radius_px / 1.5) ** 2)) if soft else np.clip(radius_px + 0.5 - d, 0, 1)
    k = 1 + w[..., None] * (np.asarray(factor, np.float32) - 1)
    for x, y in centres:
        x, y = int(round(x)), int(round(y))
        out[y - half:y + half + 1, x - half:x + half + 1] *= k
    return np.clip(out, 0, 255).astype(np.uint8)


def _paint_lines(img, segments, sigma_px, factor):
    """Darken along segments ((x0, y0), (x1, y1)) with a Gaussian cross-section."""
    out = img.astype(np.float32)
    for (x0, y0), (x1, y1) in segments:
        i0, i1 = int(min(y0, y1) - 4 * sigma_px), int(max(y0, y1) + 4 * sigma_px) + 1
        j0, j1 = int(min(x0, x1) - 4 * sigma_px), int(max(x0, x1) + 4 * sigma_px) + 1
        yy, xx = np.mgrid[i0:i1, j0:j1].astype(np.float32)
        vx, vy = x1 - x0, y1 - y0
        t = np.clip(((xx - x0) * vx + (yy - y0) * vy) / (vx * vx + vy * vy), 0, 1)
        d2 = (xx - x0 - t * vx) ** 2 + (yy - y0 - t * vy) ** 2
        w = np.exp(-d2 / (2 * sigma_px ** 2))[..., None]
        out[i0:i1, j0:j1] *= 1 - w * (1 - factor)
    return np.clip(out, 0, 255).astype(np.uint8)


#: how far a concern's score may move when an unrelated feature is painted (raw score points).
#: Not zero: the landmarks, and so the regions and the skin gate, are re-detected on the edited
#: photo and shift by a pixel or two.
UNRELATED_BOUND = 4.0
#: narrow bands (a few mm wide) move more when the landmarks shift by a pixel
NARROW_BOUND = 8.0
NARROW = {"nasolabial", "marionette", "glabellar"}


def _assert_unrelated(before, after, concerns):
    for c in concerns:
        for r, v in before.concerns[c].scores.items():
            bound = NARROW_BOUND if r in NARROW else UNRELATED_BOUND
            assert abs(after.concerns[c].scores[r] - v) <= bound, (c, r, v, after.concerns[c].scores[r])


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_blurring_improves_texture_and_wrinkles(photos, base, name):
    img = photos[name]
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(2.5)))
    b, a = base[name], analyze(blurred, ["texture", "wrinkle"])
    assert a.concerns["texture"].measurements["roughness_l_star"] < b.concerns["texture"].measurements["roughness_l_star"]
    assert a.concerns["texture"].scores["whole"] > b.concerns["texture"].scores["whole"]
    wb, wa = b.concerns["wrinkle"], a.concerns["wrinkle"]
    assert wa.measurements["wrinkle_len_mm_per_cm2_whole"] < wb.measurements["wrinkle_len_mm_per_cm2_whole"]
    assert wa.scores["whole"] > wb.scores["whole"]


def test_painted_forehead_lines_worsen_wrinkles_only(photos, base):
    img = photos["astronaut"]
    ctx = _ctx(img)
    fh = ctx.regions["forehead"] & ctx.skin_filled
    rows = np.flatnonzero(fh.any(1))
    segs = []
    for q in (0.3, 0.5, 0.7):                         # three horizontal lines across the forehead
        i = int(rows[0] + q * (rows[-1] - rows[0]))
        cols = np.flatnonzero(fh[i])
        j0, j1 = cols[0] + 0.15 * (cols[-1] - cols[0]), cols[-1] - 0.15 * (cols[-1] - cols[0])
        y0, x0 = ctx.full_res_pixel(i, j0)
        y1, x1 = ctx.full_res_pixel(i, j1)
        segs.append(((x0, y0), (x1, y1)))
    lined = _paint_lines(img, segs, sigma_px=0.15 * ctx.ppmm_full, factor=0.86)
    b, a = base["astronaut"], analyze(lined, CONCERNS)
    wb, wa = b.concerns["wrinkle"], a.concerns["wrinkle"]
    # the length of painted line on forehead skin (the astronaut's fringe covers part of it)
    allowed = fh & ctx.skin
    total_mm = 0.0
    for (x0, y0), (x1, y1) in segs:
        n = 400
        seg_mm = math.hypot(x1 - x0, y1 - y0) / ctx.ppmm_full
        for t in np.linspace(0, 1, n):
            x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
            i = int(round((y + 0.5 - ctx.box[0]) * ctx.sy - 0.5)); j = int(round((x + 0.5 - ctx.box[1]) * ctx.sx - 0.5))
            total_mm += seg_mm / n * bool(allowed[i, j])
    assert total_mm >= 30
    # the painted lines lie under the wrinkle mask (a point counts when a mask pixel is within 1 mm)
    mask = wa.masks["forehead"].full(img.shape[:2]) > 0 if "forehead" in wa.masks else \
        wa.masks["whole"].full(img.shape[:2]) > 0
    near = ndi.binary_dilation(mask, iterations=max(1, int(round(ctx.ppmm_full))))
    on_skin = covered = 0
    for (x0, y0), (x1, y1) in segs:
        for t in np.linspace(0.05, 0.95, 60):
            x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
            i = int(round((y + 0.5 - ctx.box[0]) * ctx.sy - 0.5)); j = int(round((x + 0.5 - ctx.box[1]) * ctx.sx - 0.5))
            if allowed[i, j]:
                on_skin += 1
                covered += bool(near[int(y), int(x)])
    assert on_skin >= 60 and covered >= 0.8 * on_skin, (covered, on_skin)
    added = (wa.measurements["wrinkle_len_mm_per_cm2_forehead"] - wb.measurements["wrinkle_len_mm_per_cm2_forehead"]) \
        * wa.measurements["skin_area_cm2_forehead"]
    assert 0.7 * total_mm <= added <= 1.2 * total_mm, (added, total_mm)
    assert wa.measurements["wrinkle_count_forehead"] >= wb.measurements["wrinkle_count_forehead"] + 2
    assert wa.scores["forehead"] < wb.scores["forehead"] - 10
    assert wa.scores["whole"] < wb.scores["whole"]
    # the lines are on the forehead: other wrinkle regions and unrelated concerns barely move
    assert abs(wa.scores["nasolabial"] - wb.scores["nasolabial"]) <= NARROW_BOUND
    _assert_unrelated(b, a, ["redness", "age_spot", "acne", "dark_circle", "eye_bag", "droopy_upper_eyelid",
                             "droopy_lower_eyelid", "radiance", "oiliness", "tear_trough"])


def test_painted_spots_worsen_age_spots_only(photos, base):
    img = photos["astronaut"]
    ctx = _ctx(img)
    pts = _region_points(ctx, "cheek_l", 3, seed=1, min_gap_mm=8) + _region_points(ctx, "cheek_r", 3, seed=2, min_gap_mm=8)
    spotted = _paint(img, pts, 1.6 * ctx.ppmm_full, (0.78, 0.75, 0.66), soft=False)    # 3.2 mm brown discs
    b, a = base["astronaut"], analyze(spotted, CONCERNS)
    sb, sa = b.concerns["age_spot"], a.concerns["age_spot"]
    # a painted spot can leave the skin gate (it is no longer skin-coloured) near a region edge
    assert sa.measurements["spot_count"] >= sb.measurements["spot_count"] + 4
    assert sa.measurements["spot_area_fraction_pct"] > sb.measurements["spot_area_fraction_pct"] + 0.2
    assert sa.scores["whole"] < sb.scores["whole"] - 3
    # the painted spots lie under the age-spot mask
    full = sa.masks["whole"].full(img.shape[:2])
    assert sum(full[int(y), int(x)] > 0 for x, y in pts) >= 5
    _assert_unrelated(b, a, ["wrinkle", "acne", "redness", "dark_circle", "eye_bag", "droopy_upper_eyelid",
                             "droopy_lower_eyelid", "oiliness", "tear_trough"])


def test_painted_red_bumps_worsen_acne_only(photos, base):
    img = photos["astronaut"]
    ctx = _ctx(img)
    pts = _region_points(ctx, "cheek_l", 3, seed=3, min_gap_mm=8) + _region_points(ctx, "cheek_r", 3, seed=4, min_gap_mm=8)
    bumpy = _paint(img, pts, 1.3 * ctx.ppmm_full, (1.03, 0.82, 0.86))
    b, a = base["astronaut"], analyze(bumpy, CONCERNS)
    ab, aa = b.concerns["acne"], a.concerns["acne"]
    assert aa.measurements["lesion_count"] >= ab.measurements["lesion_count"] + 5
    assert aa.scores["whole"] < ab.scores["whole"] - 10
    _assert_unrelated(b, a, ["wrinkle", "age_spot", "dark_circle", "eye_bag", "droopy_upper_eyelid",
                             "droopy_lower_eyelid", "oiliness", "tear_trough", "pore"])


# ---------------------------------------------------------------------------------------------
# pores: the resolution gate on photos


def test_pores_not_resolvable_below_8_px_per_mm(base):
    for name, res in base.items():
        assert res.px_per_mm < F.PORE_MIN_PX_PER_MM, (name, res.px_per_mm)
        m = res.concerns["pore"]
        assert m.measurements["pore_resolvable"] == 0.0 and m.proxy is True
        # no invented count: no count, density or size is returned at all
        assert not [k for k in m.measurements if k.startswith(("pore_count", "pore_density", "pore_mean"))]
        for region in ("whole", "forehead", "nose", "cheek"):
            assert f"pore_proxy_dark_blob_contrast_l_star_{region}" in m.measurements
            assert 1.0 <= m.scores[region] <= 100.0
        assert "not resolvable" in m.method and "proxy" in m.method
    # the proxy measures something real: the grainy, older skin has far more dark speckle
    a, h = base["astronaut"].concerns["pore"], base["grace_hopper"].concerns["pore"]
    key = "pore_proxy_dark_blob_contrast_l_star_whole"
    assert h.measurements[key] > 2 * a.measurements[key]
    assert h.scores["whole"] < a.scores["whole"] - 20


def test_pore_proxy_responds_to_painted_pits(photos, base):
    """Below 8 px/mm, 80 dark pits on the cheeks raise the cheek proxy and lower its score;
    the forehead's proxy barely moves."""
    img = photos["astronaut"]
    ctx = _ctx(img)
    pts = _region_points(ctx, "cheek_l", 40, seed=5, min_gap_mm=1.5, inset_mm=1.0) \
        + _region_points(ctx, "cheek_r", 40, seed=6, min_gap_mm=1.5, inset_mm=1.0)
    pitted = _paint(img, pts, 0.25 * ctx.ppmm_full, (0.8, 0.8, 0.8))
    b, a = base["astronaut"].concerns["pore"], analyze(pitted, ["pore"]).concerns["pore"]
    key = "pore_proxy_dark_blob_contrast_l_star_"
    assert a.measurements[key + "cheek"] > 1.5 * b.measurements[key + "cheek"]
    assert a.scores["cheek"] < b.scores["cheek"] - 10
    assert abs(a.scores["forehead"] - b.scores["forehead"]) <= UNRELATED_BOUND


@pytest.fixture(scope="module")
def big_astronaut():
    return _portrait("astronaut", 2600)          # ~1950 x 2600: above 8 px/mm


def test_pores_counted_at_high_resolution(big_astronaut):
    """At >= 8 px/mm the count is returned. The bundled photo is upscaled (no real pores), so
    the engine finds (almost) none; a phantom's pores pasted into the cheek are found."""
    from skimage import color

    before = analyze(big_astronaut, ["pore"])
    m0 = before.concerns["pore"]
    assert before.px_per_mm >= F.PORE_MIN_PX_PER_MM
    assert m0.measurements["pore_resolvable"] == 1.0 and m0.proxy is False
    assert m0.measurements["pore_count_cheek"] <= 5
    ctx = _ctx(big_astronaut)
    # a 12 x 12 mm phantom of pores only, rendered at the photo's scale, added as L* change
    ph = make_phantom(ctx.ppmm_full, seed=7, size_mm=(12.0, 12.0), n_pores=40, n_wrinkles=0, n_spots=0,
                      n_red=0, noise=0.0, texture=0.0, shading=0.0)
    dL = ph.lab[0] - 64.0
    (cx, cy), = _region_points(ctx, "cheek_l", 1, seed=8, min_gap_mm=1, inset_mm=7.0)
    h, w = dL.shape
    y0, x0 = int(cy - h / 2), int(cx - w / 2)
    lab = color.rgb2lab(big_astronaut[y0:y0 + h, x0:x0 + w])
    lab[..., 0] += dL
    out = big_astronaut.copy()
    out[y0:y0 + h, x0:x0 + w] = np.clip(np.rint(color.lab2rgb(lab) * 255), 0, 255).astype(np.uint8)
    after = analyze(out, ["pore"]).concerns["pore"]
    cheek_mask = after.masks["cheek"].full(out.shape[:2])
    truth = ph.pore_px() + [y0, x0]
    inside = [(y, x) for y, x in truth if (ctx.regions["cheek"] & ctx.skin_filled)[
        tuple(int(round(v)) for v in ((y + 0.5 - ctx.box[0]) * ctx.sy - 0.5, (x + 0.5 - ctx.box[1]) * ctx.sx - 0.5))]]
    assert len(inside) >= 30
    hit = sum(cheek_mask[int(round(y)), int(round(x))] > 0 for y, x in inside)
    added = after.measurements["pore_count_cheek"] - m0.measurements["pore_count_cheek"]
    assert hit >= 0.9 * len(inside), (hit, len(inside))
    assert 0.9 * len(inside) <= added <= 1.1 * len(inside) + 2, (added, len(inside))
    assert after.scores["cheek"] < m0.scores["cheek"]
    assert 0.15 <= after.measurements["pore_mean_diameter_mm_cheek"] <= 0.6


# ---------------------------------------------------------------------------------------------
# many photos


def _same(a, b) -> None:
    assert a.skin_age == b.skin_age and a.px_per_mm == b.px_per_mm
    assert list(a.concerns) == list(b.concerns)
    for c in a.concerns:
        x, y = a.concerns[c], b.concerns[c]
        assert x.scores == y.scores and x.skin_types == y.skin_types, c
        assert x.measurements == y.measurements, c
        assert set(x.masks) == set(y.masks)
        for r in x.masks:
            assert (x.masks[r].y0, x.masks[r].x0) == (y.masks[r].y0, y.masks[r].x0)
            assert np.array_equal(x.masks[r].alpha, y.masks[r].alpha), (c, r)


@pytest.fixture(scope="module")
def small_batch():
    from skinlab.samples import sample_portrait

    imgs = [np.asarray(sample_portrait(n, "sd")) for n in ("astronaut", "grace_hopper")]
    return imgs, [analyze(i, CONCERNS) for i in imgs]


def test_executors_give_the_serial_results(small_batch, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from skinlab.local.engine.parallel import ImageFailed, analyze_many

    imgs, serial = small_batch
    path = tmp_path / "grace.png"
    Image.fromarray(imgs[1]).save(path)
    engine.clear_cache()              # the threads must measure, not read the serial results
    with ThreadPoolExecutor(2) as ex:
        threaded = analyze_many([imgs[0], path], executor=ex)
    for s, t in zip(serial, threaded):
        _same(s, t)
    pooled = analyze_many(imgs, max_workers=2)            # the default: a process pool
    for s, p in zip(serial, pooled):
        _same(s, p)
    # failures: raised by default, or returned in place
    flat = np.full((480, 360, 3), 128, np.uint8)
    with ThreadPoolExecutor(2) as ex:
        with pytest.raises(ValueError, match="error_no_face"):
            analyze_many([flat], ["redness"], executor=ex)
        mixed = analyze_many([imgs[0], flat], ["redness"], executor=ex, on_error="return", keep_masks=False)
    assert isinstance(mixed[1], ImageFailed) and mixed[1].index == 1 and "error_no_face" in mixed[1].cause
    assert mixed[0].concerns["redness"].scores == serial[0].concerns["redness"].scores
    assert mixed[0].concerns["redness"].masks == {}


def test_dask_local_cluster(small_batch):
    pytest.importorskip("dask")
    distributed = pytest.importorskip("distributed")
    from skinlab.local.engine.parallel import analyze_many, analyze_on_dask

    imgs, serial = small_batch
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        on_dask = analyze_on_dask(client, imgs)
        via_executor = analyze_many(imgs[:1], ["wrinkle", "pore"], executor=client.get_executor())
    for s, d in zip(serial, on_dask):
        _same(s, d)
    assert via_executor[0].concerns["pore"].scores == serial[0].concerns["pore"].scores


def test_texture_discounts_the_measured_sensor_noise(photos):
    """Sensor noise added to a portrait is measured on the working image, and texture removes
    its share of the band-pass energy: the corrected roughness rises less than the raw one."""
    img = photos["astronaut"]
    rng = np.random.default_rng(0)
    rows = []
    for sigma in (0.0, 3.0, 6.0):
        noisy = np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8) if sigma else img
        rows.append(analyze(noisy, ["texture"]).concerns["texture"].measurements)
    noise = [r["noise_l_star"] for r in rows]
    assert noise[0] < noise[1] < noise[2] and noise[2] > 0.3, noise
    assert rows[2]["roughness_l_star"] < rows[2]["bandpass_l_star_std"]
    raw_rise = rows[2]["bandpass_l_star_std"] - rows[0]["bandpass_l_star_std"]
    corrected_rise = rows[2]["roughness_l_star"] - rows[0]["roughness_l_star"]
    assert 0 <= corrected_rise < raw_rise, (raw_rise, corrected_rise)


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_acne_score_is_steady_under_small_exposure_changes(photos, base, name):
    """Lesions at the detection threshold are tipped in or out by a few % of exposure; the score
    weighs them by how clearly they clear it, so it moves little (it moved up to 14 points)."""
    from PIL import ImageEnhance

    b = base[name].concerns["acne"]
    for factor in (0.92, 1.04, 1.08):
        img = np.asarray(ImageEnhance.Brightness(Image.fromarray(photos[name])).enhance(factor))
        a = analyze(img, ["acne"]).concerns["acne"]
        assert abs(a.scores["whole"] - b.scores["whole"]) < 6, (factor, a.scores, b.scores, a.measurements)
        assert a.measurements["lesion_weighted_count"] <= a.measurements["lesion_count"]


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_age_spot_score_is_steady_under_exposure_and_mirroring(photos, base, name):
    """Less exposure makes every spot shallower in L*, so spots near the threshold dropped out;
    the darkness is exposure-normalised, so the spots and the score stay (before engine 0.2.3,
    8 % less brightness moved Grace Hopper's raw score by 8.7 and dropped 7 of her 63 spots)."""
    from PIL import ImageEnhance

    b = base[name].concerns["age_spot"]
    variants = {f: np.asarray(ImageEnhance.Brightness(Image.fromarray(photos[name])).enhance(f))
                for f in (0.92, 1.04, 1.08)}
    variants["mirrored"] = photos[name][:, ::-1].copy()
    for label, img in variants.items():
        a = analyze(img, ["age_spot"]).concerns["age_spot"]
        assert abs(a.scores["whole"] - b.scores["whole"]) < 5, (label, a.scores, b.scores, a.measurements)
        n, n0 = a.measurements["spot_count"], b.measurements["spot_count"]
        assert abs(n - n0) <= max(2, 0.06 * n0), (label, n, n0)

