"""Colour: linear RGB -> CIELAB, and white balance from the sclera.

White balance (von Kries-style diagonal gains in linear RGB): the sclera - the white of the
eye, between the iris and the eye corners, found from the landmarks - is the one part of every
face that is close to achromatic, so its colour estimates the illuminant's. Gains make the
sclera's median colour neutral while keeping its luminance Y, so grey stays grey and lightness
barely moves; colour measurements (a*, b*, hue) are then comparable across cameras and lamps.

Limits, stated in the results: the sclera is not perfectly white (it is slightly yellow and
reddish with age and vessels), so corrected a*, b* read a few units lower than instrument
colorimetry under D65; tinted lenses and glare bias it. The correction is skipped
(``wb_applied = 0``) when the sclera cannot be trusted (eyes nearly closed or in shadow, tiny
faces, implausible casts) and always in the cascade fallback, which has no landmarks.
"""

from __future__ import annotations

import numpy as np

__all__ = ["lin_to_lab", "sclera_white_balance", "MAX_GAIN", "MIN_SCLERA_PX"]

_M_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                   [0.2126729, 0.7151522, 0.0721750],
                   [0.0193339, 0.1191920, 0.9503041]], np.float32)
_WHITE = np.array([0.95047, 1.0, 1.08883], np.float32)
_Y = _M_XYZ[1]

#: Largest per-channel gain (and smallest 1/gain) the correction may apply.
MAX_GAIN = 2.0
#: Fewest usable sclera pixels (both eyes, working image) for a correction.
MIN_SCLERA_PX = 12


def lin_to_lab(lin: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear RGB (HxWx3, float) -> (L*, a*, b*) float32, D65."""
    lin = np.asarray(lin, np.float32)
    xyz = lin @ _M_XYZ.T / _WHITE
    d = np.float32(6 / 29)
    f = np.where(xyz > d ** 3, np.cbrt(xyz), xyz / (3 * d * d) + np.float32(4 / 29))
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return L.astype(np.float32), a.astype(np.float32), b.astype(np.float32)


def sclera_white_balance(lin: np.ndarray, L: np.ndarray, sclera: np.ndarray,
                         skin_lab: tuple[float, float, float] | None = None) -> tuple[np.ndarray, dict]:
    """Gains (3,) and a report from the sclera pixels ``sclera`` (bool mask) of ``lin``.

    Usable pixels: in the mask, not clipped (every channel below sRGB 0.98), L* between the
    40th and the 97th percentile of the mask's L* (drops lashes, the iris edge and shadow
    below, and the specular glint above), and the less chromatic half of those (drops lid skin
    and vessels). Their chromaticity (20 %-trimmed means of R/G and B/G) at their median G gives
    the sclera colour m, and the gains are Y(m) / m.

    The correction is skipped (gains 1, ``wb_applied = 0``, ``wb_skipped`` says why) when fewer
    than MIN_SCLERA_PX pixels are usable, when the "sclera" is not plausibly the white of the
    eye - L* below 45 or more than 15 below the cheek skin (``skin_lab``), chroma C* above 40
    or not below the skin's: eyes in shadow, squinting, lid skin taken for sclera - or when a
    gain would leave [1/MAX_GAIN, MAX_GAIN]."""
    info = {"wb_applied": 0.0, "wb_sclera_px": 0.0, "wb_gain_r": 1.0, "wb_gain_g": 1.0, "wb_gain_b": 1.0,
            "sclera_l_star": float("nan"), "sclera_a_star": float("nan"), "sclera_b_star": float("nan"),
            "wb_skipped": ""}
    ones = np.ones(3, np.float32)
    if sclera is None or sclera.sum() < MIN_SCLERA_PX:
        info["wb_skipped"] = "no sclera visible"
        return ones, info
    lv = L[sclera]
    lo, hi = np.percentile(lv, [40, 97])
    px = lin[sclera]
    ok = (lv >= lo) & (lv <= hi) & (px.max(axis=1) < 0.955)   # sRGB 0.98
    if ok.sum() >= 2 * MIN_SCLERA_PX:
        _, pa, pb = lin_to_lab(px[None, :, :])
        chroma = np.hypot(pa[0], pb[0])
        ok &= chroma <= np.median(chroma[ok])
    info["wb_sclera_px"] = float(ok.sum())
    if ok.sum() < MIN_SCLERA_PX:
        info["wb_skipped"] = "too few usable sclera pixels"
        return ones, info
    sel = px[ok].astype(np.float64)
    # chromaticity of the sclera: 20 %-trimmed means of R/G and B/G (steadier than per-channel
    # medians when landmarks or resampling shift which pixels are sampled)
    rg, bg = (_trimmed_mean(sel[:, c] / np.maximum(sel[:, 1], 1e-6), 0.2) for c in (0, 2))
    g_med = float(np.median(sel[:, 1]))
    m = np.array([rg * g_med, g_med, bg * g_med], np.float32)
    Ls, as_, bs = (float(v.ravel()[0]) for v in lin_to_lab(m[None, None, :]))
    info.update(sclera_l_star=Ls, sclera_a_star=as_, sclera_b_star=bs)
    cs = float(np.hypot(as_, bs))
    implausible = Ls < 45 or cs > 40 or (m <= 1e-4).any()
    if skin_lab is not None:
        implausible |= Ls < skin_lab[0] - 15 or cs >= float(np.hypot(skin_lab[1], skin_lab[2]))
    if implausible:
        info["wb_skipped"] = "sclera too dark or too colourful to be the white of the eye"
        return ones, info
    y = float(_Y @ m)
    g = (y / m).astype(np.float32)
    if (g > MAX_GAIN).any() or (g < 1 / MAX_GAIN).any():
        info["wb_skipped"] = "implausibly strong cast"
        return ones, info
    info.update(wb_applied=1.0, wb_gain_r=float(g[0]), wb_gain_g=float(g[1]), wb_gain_b=float(g[2]))
    return g, info


def _trimmed_mean(v: np.ndarray, cut: float) -> float:
    v = np.sort(np.asarray(v, np.float64))
    k = int(len(v) * cut)
    core = v[k:len(v) - k] if len(v) - 2 * k > 0 else v
    return float(core.mean())
