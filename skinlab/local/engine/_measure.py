"""Per-concern measurements. Each function takes a :class:`Context` and returns a
:class:`ConcernMeasurement`. All values are measured from the pixels; the score mappings are
the documented monotone functions :func:`decreasing` / :func:`increasing`."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from skinlab.actions import CATALOGUE, SKIN_TYPES

from ._context import Context, robust_std, smooth
from ._types import ConcernMeasurement

# --------------------------------------------------------------------------------------------
# score mappings


def decreasing(x: float, mid: float, scale: float) -> float:
    """Logistic mapping for a measurement where more is worse:
    raw = 1 + 99 / (1 + exp((x - mid) / scale)).
    Anchors: x = mid -> 50.5; x = mid - 2*scale -> 88.4; x = mid + 2*scale -> 12.6.
    Strictly decreasing, always inside (1, 100)."""
    z = max(-60.0, min(60.0, (x - mid) / scale))
    return 1.0 + 99.0 / (1.0 + math.exp(z))


def increasing(x: float, mid: float, scale: float) -> float:
    """Logistic mapping for a measurement where more is better (mirror of :func:`decreasing`)."""
    return decreasing(-x, -mid, scale)


def _regions_of(concern: str) -> tuple[str, ...]:
    return CATALOGUE["hd_" + concern].regions


def _mean(v: np.ndarray) -> float:
    return float(v.mean()) if v.size else float("nan")


def _median(v: np.ndarray) -> float:
    return float(np.median(v)) if v.size else float("nan")


def _finite(x: float, default: float = 0.0) -> float:
    return float(x) if x == x and abs(x) != float("inf") else default


def _bbox(m: np.ndarray, pad: int, shape) -> tuple[slice, slice] | None:
    rows = np.flatnonzero(m.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(0))
    return (slice(max(0, rows[0] - pad), min(shape[0], rows[-1] + pad + 1)),
            slice(max(0, cols[0] - pad), min(shape[1], cols[-1] + pad + 1)))


def _masked_blur(ctx: Context, img: np.ndarray, where: np.ndarray, mm: float) -> np.ndarray:
    """Normalised convolution: the Gaussian blur (std ``mm``) of ``img`` using only the pixels
    in ``where``; outside the support the image itself is returned."""
    s = max(0.5, ctx.mm(mm))
    key = ("den", id(where), round(mm, 3))
    if key not in ctx.cache:
        ctx.cache[key] = (where, smooth(where.astype(np.float32), s))   # keep `where` alive
    den = ctx.cache[key][1]
    num = smooth(np.where(where, img, 0).astype(np.float32), s)
    return np.where(den > 1e-3, num / np.maximum(den, 1e-3), img)


# --------------------------------------------------------------------------------------------
# shared maps


def _highlights(ctx: Context):
    """Specular highlights (dichromatic model): L* >= 5 above its 3 mm shading and >= 5 above
    the cheek median, with chroma below 0.8 x the cheek median chroma."""
    if "highlights" in ctx.cache:
        return ctx.cache["highlights"]
    L = ctx.L
    shading = _masked_blur(ctx, L, ctx.loose_skin, 3.0)
    C = np.hypot(ctx.a, ctx.b)
    c_ref = math.hypot(ctx.ref["a"], ctx.ref["b"])
    lift = L - shading
    hl = ctx.loose_skin & (lift >= 5.0) & (L >= ctx.ref["L"] + 5.0) & (C < 0.8 * c_ref)
    strength = np.where(hl, np.clip((lift - 2.0) / 12.0, 0.25, 1.0), 0.0)
    ctx.cache["highlights"] = (hl, strength)
    return hl, strength


def _hessian(img: np.ndarray, sigma: float):
    hrr = ndi.gaussian_filter(img, sigma, order=(2, 0), mode="nearest")
    hcc = ndi.gaussian_filter(img, sigma, order=(0, 2), mode="nearest")
    hrc = ndi.gaussian_filter(img, sigma, order=(1, 1), mode="nearest")
    tmp = np.sqrt((hrr - hcc) ** 2 + 4 * hrc ** 2)
    l1 = (hrr + hcc + tmp) / 2          # largest eigenvalue (across a dark line: positive)
    l2 = (hrr + hcc - tmp) / 2
    return l1, l2


def _valley(ctx: Context, sigmas_mm: tuple[float, ...], where: np.ndarray, key: str) -> np.ndarray:
    """Sato-style dark-ridge (valley) response in L* units: max over scales of
    sigma^2 * (lambda1 - |lambda2|), clipped at 0, computed on the bounding box of ``where``."""
    if key in ctx.cache:
        return ctx.cache[key]
    out = np.zeros_like(ctx.L)
    rows = np.flatnonzero(where.any(1))
    cols = np.flatnonzero(where.any(0))
    if rows.size:
        pad = int(3 * ctx.mm(max(sigmas_mm))) + 2
        i0, i1 = max(0, rows[0] - pad), min(out.shape[0], rows[-1] + pad + 1)
        j0, j1 = max(0, cols[0] - pad), min(out.shape[1], cols[-1] + pad + 1)
        sub = ctx.L[i0:i1, j0:j1]
        best = np.zeros_like(sub)
        for smm in sigmas_mm:
            s = max(0.8, ctx.mm(smm))
            l1, l2 = _hessian(sub, s)
            np.maximum(best, s * s * np.clip(l1 - np.abs(l2), 0, None), out=best)
        out[i0:i1, j0:j1] = best
    ctx.cache[key] = out
    return out


def _eroded_skin(ctx: Context, mm: float) -> np.ndarray:
    """The gap-closed skin mask eroded by ``mm`` (keeps filters away from hair, brows, frames)."""
    key = ("eroded_skin", mm)
    if key not in ctx.cache:
        n = max(1, int(round(ctx.mm(mm))))
        ctx.cache[key] = ndi.binary_erosion(ctx.skin_filled, iterations=n)
    return ctx.cache[key]


# --------------------------------------------------------------------------------------------
# concerns

METHODS: dict[str, str] = {   # + FINE_METHODS (wrinkle, pore, texture, age_spot, acne) below
    "oiliness": "Specular highlight fraction (L* >= 5 above 3 mm shading and the cheek median, low "
                "chroma) in the T-zone and U-zone, weighted 0.6/0.4.",
    "radiance": "Mean skin L*, evenness (robust std of L* minus its 5 mm shading) and colour "
                "uniformity (std of 2 mm-smoothed a*, b*), combined 0.5/0.3/0.2; ITA reported.",
    "eye_bag": "Vertical L* profile below each measured lower-lid edge: depth of the shadow dip "
               "below the lighter skin on both sides, and trough depth below the cheek (shading proxy).",
    "dark_circle": "Infraorbital skin band (lower lid to the lid-cheek junction) vs malar cheek, "
                   "white-balanced: delta L* (darkness), delta a* / delta b* for the type (Roh & Chung 2009).",
    "droopy_upper_eyelid": "MRD1: iris centre to the upper-lid margin above it, in mm via the iris "
                           "(11.7 mm); fallback without landmarks: a colour-edge proxy scaled by a 63 mm IPD.",
    "droopy_lower_eyelid": "MRD2: iris centre to the lower-lid margin below it, in mm via the iris, "
                           "plus scleral show; fallback without landmarks: a colour-edge proxy.",
    "firmness": "Proxy: depth of the nasolabial/marionette folds (L* valley response at 1.5-2.5 mm) "
                "and lower-face shading at the jowls.",
    "moisture": "Proxy: flaking (whitish low-chroma micro-patches, non-specular) and fine-scale "
                "roughness (0.3 mm high-pass L*, noise removed) on skin.",
    "redness": "Mean CIELAB a* (sclera white-balanced) of cheek, nose and chin skin (Dawson erythema "
               "index, red area fraction a* > 18 and per-region a* incl. forehead reported).",
    "tear_trough": "L* valley (Hessian, 1-1.8 mm) along the infraorbital groove from the inner "
                   "canthus downwards-outwards: groove depth and the length where it exceeds 1 L*.",
    "skin_type": "Rules over T/U-zone highlight fractions, the moisture proxy and mean a*: Oily / "
                 "Combination / Dry / Normal, '& Redness' when a* is high.",
}

PROXY = {"firmness", "moisture", "eye_bag", "tear_trough", "skin_type"}
#: Proxies only in the cascade fallback (with landmarks they are the clinical geometric measure).
FALLBACK_PROXY = {"droopy_upper_eyelid", "droopy_lower_eyelid"}


def _result(ctx, concern, scores, masks, meas, skin_types=None) -> ConcernMeasurement:
    return ConcernMeasurement(
        concern=concern, scores={k: float(min(100.0, max(1.0, v))) for k, v in scores.items()},
        skin_types=skin_types or {}, masks=masks,
        measurements={k: _finite(float(v)) for k, v in meas.items()},
        method=METHODS[concern],
        proxy=concern in PROXY or (concern in FALLBACK_PROXY and getattr(ctx, "landmarks", None) is None))


def _wb_report(ctx: Context, area: np.ndarray) -> dict:
    """White-balance facts for colour measurements: applied or not, the gains, and the
    uncorrected mean a*, b* of ``area`` (identical to the corrected ones when not applied)."""
    wb = getattr(ctx, "wb", None) or {}
    raw = getattr(ctx, "raw_lab", None) or (ctx.L, ctx.a, ctx.b)
    out = {"wb_applied": float(wb.get("wb_applied", 0.0))}
    for k in ("wb_gain_r", "wb_gain_g", "wb_gain_b"):
        out[k] = float(wb.get(k, 1.0))
    out["a_star_mean_uncorrected"] = _mean(raw[1][area])
    out["b_star_mean_uncorrected"] = _mean(raw[2][area])
    return out


def m_redness(ctx: Context) -> ConcernMeasurement:
    R = ctx.regions
    # the central face, where erythema shows (rosacea, flushing); the forehead is reported
    # apart (hairline shadow and bangs drive its colour)
    area = ctx.skin & (R["cheek"] | R["nose"] | R["chin"])
    if area.sum() < 20:
        area = ctx.skin
    a = ctx.a[area]
    lin = ctx.lin
    ei = 100 * np.log10(np.maximum(lin[..., 0][area], 1e-4) / np.maximum(lin[..., 1][area], 1e-4))
    a_mean = _mean(a)
    red_frac = float((a > 18.0).mean()) if a.size else 0.0
    raw = decreasing(a_mean, 16.0, 4.0)
    alpha = np.where(ctx.skin, np.clip((ctx.a - 12.0) / 12.0, 0, 1), 0)
    meas = {"a_star_mean": a_mean, "a_star_p90": float(np.percentile(a, 90)) if a.size else 0,
            "erythema_index_mean": _mean(ei), "red_area_fraction_pct": 100 * red_frac,
            "skin_area_cm2": ctx.area_cm2(area)}
    for name in ("cheek", "nose", "chin", "forehead"):
        m = ctx.skin & R[name]
        meas[f"a_star_{name}"] = _mean(ctx.a[m]) if m.any() else a_mean
    meas.update(_wb_report(ctx, area))
    return _result(ctx, "redness", {"whole": raw}, {"whole": ctx.to_mask(alpha)}, meas)


def _under_eye_band(ctx: Context) -> np.ndarray:
    """Infraorbital band per eye: from just below the measured lower-lid edge (the aperture's
    lower edge, clamped to 0.04-0.16 IPD below the eye centre) down 0.22 IPD (~14 mm), 0.30
    IPD either side of the eye centre; falls back to the geometric band."""
    if "under_eye_band" in ctx.cache:
        return ctx.cache["under_eye_band"]
    R = ctx.regions
    if getattr(ctx, "landmarks", None) is not None:
        # landmark band: 2.5 mm below the lower-lid margin to mesh ring 3 (~9 mm), lashes out
        band = R["under_eye"]
        skin_band = band & ctx.skin
        band = skin_band if skin_band.sum() >= 0.3 * max(1, band.sum()) else band & (ctx.L >= ctx.ref["L"] - 30)
        ctx.cache["under_eye_band"] = band
        return band
    ap = _eye_aperture(ctx)
    band = np.zeros_like(ctx.skin)
    for (top, bot, _, _), side, sg in zip(ap, ("l", "r"), (-1, 1)):
        edge = float(np.clip(bot, 0.04, 0.16))
        dx = ctx.X - sg * 0.5
        # follow the lid's curve: the band's top rises towards the canthi
        b = ((np.abs(dx) <= 0.30) & (ctx.Y >= edge + 0.02 - 0.35 * dx ** 2) & (ctx.Y <= edge + 0.24)
             & R["oval"] & ~R[f"eye_{side}"])
        band |= b
    # skin only (drops lashes, glasses rims); a dark circle of up to ~20 L* stays skin
    skin_band = band & ctx.skin
    band = skin_band if skin_band.sum() >= 0.3 * max(1, band.sum()) else band & (ctx.L >= ctx.ref["L"] - 30)
    if band.sum() < 10:
        band = R["under_eye"] & (ctx.L >= ctx.ref["L"] - 30)
    ctx.cache["under_eye_band"] = band
    return band


def m_dark_circle(ctx: Context) -> ConcernMeasurement:
    R = ctx.regions
    band = _under_eye_band(ctx)
    ref = R["cheek_ref"] & ctx.skin
    if ref.sum() < 10:
        ref = ctx.skin
    l_ref = _median(ctx.L[ref])
    dL = l_ref - _median(ctx.L[band])
    da = _median(ctx.a[band]) - _median(ctx.a[ref])
    db = _median(ctx.b[band]) - _median(ctx.b[ref])
    per_side = {}
    for side, sg in (("l", -1), ("r", 1)):
        bs = band & (np.sign(ctx.X) == sg)
        per_side[side] = l_ref - _median(ctx.L[bs]) if bs.any() else dL
    raw = decreasing(dL, 6.0, 2.0)
    alpha = np.where(band, np.clip((l_ref - ctx.L - 1.0) / 12.0, 0, 1), 0)
    meas = {"delta_l_star": dL, "delta_a_star": da, "delta_b_star": db,
            "delta_l_star_image_left": per_side["l"], "delta_l_star_image_right": per_side["r"],
            "pigmented_type": float(db > 1.0), "vascular_type": float(da > 1.0)}
    return _result(ctx, "dark_circle", {"whole": raw}, {"whole": ctx.to_mask(alpha)}, meas)


def _shine(ctx: Context):
    R = ctx.regions
    hl, strength = _highlights(ctx)
    t = R["t_zone"] & ctx.loose_skin
    u = R["u_zone"] & ctx.loose_skin
    ft = 100 * float(hl[t].mean()) if t.any() else 0.0
    fu = 100 * float(hl[u].mean()) if u.any() else 0.0
    return hl, strength, ft, fu


def m_oiliness(ctx: Context) -> ConcernMeasurement:
    hl, strength, ft, fu = _shine(ctx)
    x = 0.6 * ft + 0.4 * fu
    raw = decreasing(x, 3.0, 1.2)
    meas = {"highlight_fraction_t_zone_pct": ft, "highlight_fraction_u_zone_pct": fu,
            "highlight_index_pct": x}
    return _result(ctx, "oiliness", {"whole": raw}, {"whole": ctx.to_mask(strength)}, meas)


def m_radiance(ctx: Context) -> ConcernMeasurement:
    R = ctx.regions
    area = ctx.skin & (R["cheek"] | R["forehead"] | R["nose"] | R["chin"])
    if area.sum() < 20:
        area = ctx.skin
    L = ctx.L
    l_mean = _mean(L[area])
    detr = L - _masked_blur(ctx, L, ctx.skin, 5.0)
    even = robust_std(detr[area])
    a2 = _masked_blur(ctx, ctx.a, ctx.skin, 2.0)
    b2 = _masked_blur(ctx, ctx.b, ctx.skin, 2.0)
    col = math.hypot(robust_std(a2[area]), robust_std(b2[area]))
    b_mean = _mean(ctx.b[area])
    ita = math.degrees(math.atan2(l_mean - 50.0, b_mean))
    raw = (0.5 * increasing(l_mean, 60.0, 6.0) + 0.3 * decreasing(even, 3.5, 1.0)
           + 0.2 * decreasing(col, 3.0, 1.0))
    alpha = np.where(area, np.clip((L - (ctx.ref["L"] - 8.0)) / 20.0, 0, 1), 0)
    meas = {"l_star_mean": l_mean, "l_star_detrended_std": even, "colour_nonuniformity_ab": col,
            "b_star_mean": b_mean, "ita_deg": ita}
    return _result(ctx, "radiance", {"whole": raw}, {"whole": ctx.to_mask(alpha)}, meas)


# wrinkle, pore, texture, age_spot and acne: the fine-structure measurements live in _fine.py
from ._fine import FINE_METHODS, m_acne, m_age_spot, m_pore, m_texture, m_wrinkle  # noqa: E402

METHODS.update(FINE_METHODS)


def _row_profile(ctx: Context, where: np.ndarray, y_from: float, y_to: float, step: float = 0.03,
                 img: np.ndarray | None = None):
    """Median of ``img`` (default L*) in bins of face-frame Y, gaps interpolated, lightly smoothed."""
    img = ctx.L if img is None else img
    ys = np.arange(y_from, y_to + 1e-9, step)
    sel = where & (ctx.Y >= y_from - step / 2) & (ctx.Y < y_to + step / 2)
    vals = img[sel]
    idx = np.clip(np.rint((ctx.Y[sel] - y_from) / step).astype(int), 0, len(ys) - 1)
    order = np.argsort(idx, kind="stable")
    idx, vals = idx[order], vals[order]
    starts = np.searchsorted(idx, np.arange(len(ys)))
    ends = np.searchsorted(idx, np.arange(len(ys)), side="right")
    prof = np.array([np.median(vals[a:b]) if b - a >= 3 else np.nan for a, b in zip(starts, ends)])
    if np.isnan(prof).all():
        return ys, prof
    i = np.arange(len(ys)); ok = ~np.isnan(prof)
    prof = np.interp(i, i[ok], prof[ok])
    return ys, ndi.gaussian_filter1d(prof, 1.0, mode="nearest")


def m_eye_bag(ctx: Context) -> ConcernMeasurement:
    R = ctx.regions
    ref = ctx.ref["L"]
    amps, depths = [], []
    alpha = np.zeros_like(ctx.L)
    ap = _eye_aperture(ctx)
    for (_, bot, _, _), side, sg in zip(ap, ("l", "r"), (-1, 1)):
        edge = float(np.clip(bot, 0.04, 0.16))          # measured lower-lid edge
        # gap-closed skin: no lashes or thick rims, but thin shadow lines stay in
        strip = (R["oval"] & ~R[f"eye_dil_{side}"] & (np.abs(ctx.X - sg * 0.5) <= 0.22)
                 & ctx.skin_filled & (ctx.L >= ref - 30))
        ys, prof = _row_profile(ctx, strip, edge + 0.05, edge + 0.56)
        if np.isnan(prof).all():
            continue
        lower = (ys >= edge + 0.15) & (ys <= edge + 0.45)
        it = int(np.flatnonzero(lower)[np.argmin(prof[lower])])
        bulge = float(prof[: it + 1].max())
        below = float(prof[it:].max())
        trough = float(prof[it])
        dip = min(bulge, below) - trough                # a real dip: lighter on both sides
        amps.append(dip)
        depths.append(ref - trough)
        # mask: the shadow line under the bag, where darker than the lighter sides
        y_t = float(ys[it])
        wide = (R["oval"] & ~R[f"eye_dil_{side}"] & (np.abs(ctx.X - sg * 0.5) <= 0.30)
                & (np.abs(ctx.Y - y_t) <= 0.08) & ctx.skin_filled)
        level = min(bulge, below)
        alpha = np.where(wide, np.clip((level - ctx.L) / max(4.0, 2 * dip), 0, 1), alpha)
    amp = float(np.mean(amps)) if amps else 0.0
    depth = float(np.mean(depths)) if depths else 0.0
    x = amp + 0.25 * max(depth, 0.0)
    raw = decreasing(x, 4.0, 1.5)
    meas = {"shadow_dip_l_star": amp, "trough_depth_l_star": depth, "eye_bag_index": x}
    return _result(ctx, "eye_bag", {"whole": raw}, {"whole": ctx.to_mask(alpha)}, meas)


def m_tear_trough(ctx: Context) -> ConcernMeasurement:
    R = ctx.regions
    X, Y = ctx.X, ctx.Y
    band = R["tear_trough"] & (ctx.L >= ctx.ref["L"] - 30)
    V = _valley(ctx, (1.0, 1.8), band, "valley_trough")
    depths, lengths = [], []
    for side, sg in (("l", -1), ("r", 1)):
        if getattr(ctx, "landmarks", None) is not None:
            # the landmark groove polyline (work px): arc-length position of each pixel
            from ._geometry import polyline_coords
            from ._regions import TEAR_TROUGH

            yy, xx = np.nonzero(R[f"tear_trough_{side}"])
            t = np.full(ctx.L.shape, -1.0)
            t[yy, xx], _, ln_px = polyline_coords(ctx.landmarks[TEAR_TROUGH[side]], xx, yy)
            ln = ln_px / ctx.ipd
        else:
            p0 = np.array([sg * 0.26, 0.12]); p1 = np.array([sg * 0.50, 0.46])
            v = p1 - p0; ln = float(np.hypot(*v))
            t = ((X - p0[0]) * v[0] + (Y - p0[1]) * v[1]) / (ln * ln)
        b = band & R[f"tear_trough_{side}"]
        seg = []
        for k in range(8):
            sl = b & (t >= k / 8) & (t < (k + 1) / 8)
            if sl.sum() >= 2:
                seg.append(float(np.percentile(V[sl], 75)))
        if seg:
            depths.append(float(np.mean(seg)))
            lengths.append(sum(1 for d in seg if d > 1.0) * ln * (ctx.ipd / ctx.ppmm) / 8)
    depth = float(np.mean(depths)) if depths else 0.0
    length = float(np.mean(lengths)) if lengths else 0.0
    x = depth + 0.05 * length
    raw = decreasing(x, 2.5, 0.8)
    alpha = np.where(band, np.clip(V / 4.0, 0, 1), 0)
    meas = {"groove_depth_l_star": depth, "groove_length_mm": length}
    return _result(ctx, "tear_trough", {"whole": raw}, {"whole": ctx.to_mask(alpha)}, meas)


def _eye_aperture(ctx: Context):
    """Per eye: (upper, lower) edges in face-frame Y of the non-skin aperture through the eye
    centre, from the Lab colour distance to the cheek skin along a central column strip."""
    if "aperture" in ctx.cache:
        return ctx.cache["aperture"]
    if getattr(ctx, "landmarks", None) is not None:
        from ._geometry import eyelid_geometry

        g = eyelid_geometry(ctx)
        ctx.cache["aperture"] = [(g[s]["upper"], g[s]["lower"], None, None) for s in ("l", "r")]
        return ctx.cache["aperture"]
    dE = np.sqrt((ctx.L - ctx.ref["L"]) ** 2 + (ctx.a - ctx.ref["a"]) ** 2 + (ctx.b - ctx.ref["b"]) ** 2)
    out = []
    for sg in (-1, 1):
        strip = np.abs(ctx.X - sg * 0.5) <= 0.07
        ys, prof = _row_profile(ctx, strip, -0.30, 0.36, 0.015, img=dE)
        if np.isnan(prof).all():
            out.append((-0.07, 0.08, prof, ys)); continue
        centre = int(np.argmin(np.abs(ys)))
        skin_lvl = float(np.median(prof[ys >= 0.22]))
        peak = float(prof[np.abs(ys) <= 0.05].max())
        thr = skin_lvl + 0.5 * (peak - skin_lvl)
        inside = prof >= thr
        top = centre
        while top > 0 and inside[top - 1]:
            top -= 1
        bot = centre
        while bot < len(ys) - 1 and inside[bot + 1]:
            bot += 1
        # sub-bin edges: linear interpolation of the threshold crossing
        def cross(i_in: int, i_out: int) -> float:
            if i_out < 0 or i_out >= len(ys) or i_out == i_in:
                return float(ys[i_in])
            p_in, p_out = prof[i_in], prof[i_out]
            f = (p_in - thr) / (p_in - p_out) if p_in != p_out else 0.5
            return float(ys[i_in] + np.clip(f, 0, 1) * (ys[i_out] - ys[i_in]))
        out.append((cross(top, top - 1), cross(bot, bot + 1), prof, ys))
    ctx.cache["aperture"] = out
    return out


def _mm_per_unit(ctx: Context) -> float:
    return ctx.ipd / ctx.ppmm


def _lid_extras(ctx: Context, keys: tuple[str, ...]) -> dict:
    """Landmark eyelid facts (mean of both eyes and per side) and the eye-closure score; {} in
    the cascade fallback."""
    if getattr(ctx, "landmarks", None) is None:
        return {}
    from ._geometry import BLINK_CLOSED, eyelid_geometry

    g = eyelid_geometry(ctx)
    out = {}
    for k in keys:
        out[k] = 0.5 * (g["l"][k] + g["r"][k])
        out[k + "_image_left"] = g["l"][k]
        out[k + "_image_right"] = g["r"][k]
    out["eye_closure_max"] = max(g["l"]["blink"], g["r"]["blink"])
    out["eyes_closed"] = float(out["eye_closure_max"] > BLINK_CLOSED)
    return out


def m_droopy_upper(ctx: Context) -> ConcernMeasurement:
    ap = _eye_aperture(ctx)
    u = _mm_per_unit(ctx)
    mrd1 = [-top * u for top, _, _, _ in ap]
    x = float(np.mean(mrd1))
    raw = increasing(x, 2.5, 0.6)
    alpha = np.zeros_like(ctx.L)
    for (top, _, _, _), sg in zip(ap, (-1, 1)):
        dx = ctx.X - sg * 0.5
        yl = top + 0.5 * dx ** 2                      # the upper lid arches over the eye
        lid = (np.abs(dx) <= 0.28) & (ctx.Y >= yl - 0.10) & (ctx.Y <= yl + 0.02)
        alpha = np.where(lid & ctx.regions["oval"], np.clip(1.0 - (yl - ctx.Y) / 0.12, 0.3, 1.0), alpha)
    meas = {"mrd1_mm": x, "mrd1_mm_image_left": mrd1[0], "mrd1_mm_image_right": mrd1[1]}
    meas.update(_lid_extras(ctx, ("brow_to_lid_mm", "palpebral_fissure_mm")))
    return _result(ctx, "droopy_upper_eyelid", {"whole": raw}, {"whole": ctx.to_mask(alpha)}, meas)


def m_droopy_lower(ctx: Context) -> ConcernMeasurement:
    ap = _eye_aperture(ctx)
    u = _mm_per_unit(ctx)
    mrd2 = [bot * u for _, bot, _, _ in ap]
    x = float(np.mean(mrd2))
    raw = decreasing(x, 6.5, 0.8)
    alpha = np.zeros_like(ctx.L)
    for (_, bot, _, _), sg in zip(ap, (-1, 1)):
        dx = ctx.X - sg * 0.5
        yl = bot - 0.35 * dx ** 2                     # the lower lid sags in the middle
        lid = (np.abs(dx) <= 0.28) & (ctx.Y >= yl - 0.02) & (ctx.Y <= yl + 0.10)
        alpha = np.where(lid & ctx.regions["oval"], np.clip(1.0 - (ctx.Y - yl) / 0.12, 0.3, 1.0), alpha)
    meas = {"mrd2_mm": x, "mrd2_mm_image_left": mrd2[0], "mrd2_mm_image_right": mrd2[1]}
    meas.update(_lid_extras(ctx, ("scleral_show_mm", "canthal_tilt_deg")))
    return _result(ctx, "droopy_lower_eyelid", {"whole": raw}, {"whole": ctx.to_mask(alpha)}, meas)


def m_firmness(ctx: Context) -> ConcernMeasurement:
    R = ctx.regions
    folds = (R["nasolabial"] | R["marionette"]) & (ctx.L >= ctx.ref["L"] - 30)
    V = _valley(ctx, (1.5, 2.5), folds, "valley_coarse")
    fold = float(np.percentile(V[folds], 75)) if folds.any() else 0.0
    jowl = R["jowl"] & ctx.skin
    ref = R["cheek_ref"] & ctx.skin
    shade = (_median(ctx.L[ref]) - _median(ctx.L[jowl])) if jowl.any() and ref.any() else 0.0
    # jaw shading is mostly lighting (the jaw turns away from the lamp): a small, capped term
    x = fold + 0.08 * min(max(shade, 0.0), 10.0)
    raw = decreasing(x, 4.0, 1.5)
    alpha = np.where(folds, np.clip(V / 8.0, 0, 1), 0)
    meas = {"fold_depth_l_star": fold, "jowl_shading_l_star": shade, "firmness_index": x}
    return _result(ctx, "firmness", {"whole": raw}, {"whole": ctx.to_mask(alpha)}, meas)


def _moisture_parts(ctx: Context):
    if "moisture" in ctx.cache:
        return ctx.cache["moisture"]
    R = ctx.regions
    area = ctx.skin & (R["cheek"] | R["forehead"] | R["chin"])
    if area.sum() < 20:
        area = ctx.skin
    L = ctx.L
    hp1 = L - ndi.gaussian_filter(L, max(0.7, ctx.mm(1.0)), mode="nearest")
    C = np.hypot(ctx.a, ctx.b)
    c_ref = math.hypot(ctx.ref["a"], ctx.ref["b"])
    hl, _ = _highlights(ctx)
    flake = area & (hp1 > max(4.0, 3 * ctx.noise_l)) & (C < 0.85 * c_ref) & ~hl & (L <= ctx.ref["L"] + 12)
    flake_pct = 100.0 * float(flake.sum()) / max(1, int(area.sum()))
    s = max(0.7, ctx.mm(0.3))
    hp = L - ndi.gaussian_filter(L, s, mode="nearest")
    fine = robust_std(hp[area])
    gain = math.sqrt(max(1e-9, 1 - 1 / (math.pi * s * s) + 1 / (4 * math.pi * s * s)))
    fine_c = math.sqrt(max(fine ** 2 - (ctx.noise_l * gain) ** 2, 0.0))
    ctx.cache["moisture"] = (area, flake, flake_pct, fine_c)
    return ctx.cache["moisture"]


def m_moisture(ctx: Context) -> ConcernMeasurement:
    area, flake, flake_pct, fine = _moisture_parts(ctx)
    x = flake_pct + 0.8 * fine
    raw = decreasing(x, 2.5, 0.8)
    alpha = np.where(flake, 0.9, 0.0)
    meas = {"flaking_fraction_pct": flake_pct, "fine_roughness_l_star": fine, "dryness_index": x}
    return _result(ctx, "moisture", {"whole": raw}, {"whole": ctx.to_mask(alpha)}, meas)


OILY_T_PCT = 2.0
OILY_U_PCT = 1.5
DRY_MOISTURE_RAW = 40.0
RED_A_STAR = 18.0


def m_skin_type(ctx: Context, moisture_raw: float) -> ConcernMeasurement:
    R = ctx.regions
    hl, strength, ft, fu = _shine(ctx)
    a_t = _mean(ctx.a[R["t_zone"] & ctx.skin]) if (R["t_zone"] & ctx.skin).any() else ctx.ref["a"]
    a_u = _mean(ctx.a[R["u_zone"] & ctx.skin]) if (R["u_zone"] & ctx.skin).any() else ctx.ref["a"]
    a_w = _mean(ctx.a[(R["t_zone"] | R["u_zone"]) & ctx.skin]) if ctx.skin.any() else ctx.ref["a"]
    dry = moisture_raw < DRY_MOISTURE_RAW
    oily_t, oily_u = ft >= OILY_T_PCT, fu >= OILY_U_PCT

    def name(base: str, a_mean: float) -> str:
        if a_mean >= RED_A_STAR:
            return "Redness" if base == "Normal" else f"{base} & Redness"
        return base

    if oily_t and oily_u:
        whole = "Oily"
    elif oily_t or oily_u:
        whole = "Combination"
    elif dry:
        whole = "Dry"
    else:
        whole = "Normal"
    t_base = "Oily" if oily_t else ("Dry" if dry else "Normal")
    u_base = "Oily" if oily_u else ("Dry" if dry else "Normal")
    types = {"whole": name(whole, a_w), "t_zone": name(t_base, a_t), "u_zone": name(u_base, a_u)}
    for v in types.values():
        assert v in SKIN_TYPES, v
    masks = {}
    for region, key in (("whole", None), ("t_zone", "t_zone"), ("u_zone", "u_zone")):
        reg = (R["t_zone"] | R["u_zone"]) if key is None else R[key]
        reg = reg & ctx.loose_skin
        masks[region] = ctx.to_mask(np.where(reg, np.maximum(0.5, strength), 0))
    meas = {"highlight_fraction_t_zone_pct": ft, "highlight_fraction_u_zone_pct": fu,
            "moisture_raw": moisture_raw, "a_star_t_zone": a_t, "a_star_u_zone": a_u,
            "a_star_whole": a_w}
    return _result(ctx, "skin_type", {}, masks, meas, skin_types=types)


FUNCS = {
    "wrinkle": m_wrinkle, "pore": m_pore, "texture": m_texture, "acne": m_acne,
    "oiliness": m_oiliness, "radiance": m_radiance, "eye_bag": m_eye_bag,
    "age_spot": m_age_spot, "dark_circle": m_dark_circle,
    "droopy_upper_eyelid": m_droopy_upper, "droopy_lower_eyelid": m_droopy_lower,
    "firmness": m_firmness, "moisture": m_moisture, "redness": m_redness,
    "tear_trough": m_tear_trough,
}
