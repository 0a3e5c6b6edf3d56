"""Eye and lid geometry from landmarks: lid margins at the iris centre (MRD1, MRD2), scleral
show, brow height, canthal tilt, and polyline coordinates for band-shaped regions.

All positions are in the face frame of the context (origin between the iris centres, X along
the eye line, Y down, unit = IPD), so each iris centre sits at X = -0.5 / +0.5, Y = 0, and a
distance in frame units times ``ctx.ipd / ctx.ppmm`` is millimetres.
"""

from __future__ import annotations

import math

import numpy as np

from ._regions import BROW_PEAK, INNER_CANTHUS, IRIS, LOWER_LID, OUTER_CANTHUS, UPPER_LID

#: Eyes count as closed (the lid measurements are then unreliable) above this blendshape score.
BLINK_CLOSED = 0.5


def to_frame(ctx, xy: np.ndarray) -> np.ndarray:
    """Work (x, y) points -> face-frame (X, Y)."""
    (xa, ya), (xb, yb) = ctx.eyes
    mx, my = (xa + xb) / 2, (ya + yb) / 2
    th = math.atan2(yb - ya, xb - xa)
    c, s = math.cos(th), math.sin(th)
    d = np.asarray(xy, float)[..., :2] - (mx, my)
    return np.stack([(d[..., 0] * c + d[..., 1] * s) / ctx.ipd, (-d[..., 0] * s + d[..., 1] * c) / ctx.ipd], -1)


def _lid_y_at(F: np.ndarray, idx: list[int], x: float) -> float:
    """Y of the lid polyline through landmarks ``idx`` at frame abscissa ``x`` (linear
    interpolation between the two landmarks around ``x``)."""
    pts = F[idx]
    order = np.argsort(pts[:, 0])
    xs, ys = pts[order, 0], pts[order, 1]
    return float(np.interp(x, xs, ys))


def eyelid_geometry(ctx) -> dict:
    """Per side ("l" = image left, the subject's right eye): frame Y of the upper and lower lid
    margins straight above/below the iris centre, iris radius, scleral show, brow height,
    canthal tilt and the eye-closure score; plus ``mm_per_unit``."""
    if "eyelids" in ctx.cache:
        return ctx.cache["eyelids"]
    F = to_frame(ctx, ctx.landmarks)
    u = ctx.ipd / ctx.ppmm
    blink = {"l": ctx.blendshapes.get("eyeBlinkRight", 0.0) if ctx.blendshapes else 0.0,
             "r": ctx.blendshapes.get("eyeBlinkLeft", 0.0) if ctx.blendshapes else 0.0}
    out: dict = {"mm_per_unit": u}
    for s in ("l", "r"):
        c = F[IRIS[s][0]]
        r_iris = 0.5 * float(np.hypot(*(F[IRIS[s][1]] - F[IRIS[s][3]])))
        top = _lid_y_at(F, UPPER_LID[s], c[0]) - c[1]
        bot = _lid_y_at(F, LOWER_LID[s], c[0]) - c[1]
        brow = float(F[BROW_PEAK[s], 1] - _lid_y_at(F, UPPER_LID[s], F[BROW_PEAK[s], 0]))
        o, i = F[OUTER_CANTHUS[s]], F[INNER_CANTHUS[s]]
        # canthal tilt: outer canthus above the inner one = positive
        tilt = math.degrees(math.atan2(i[1] - o[1], abs(o[0] - i[0])))
        out[s] = {"upper": top, "lower": bot, "iris_radius": r_iris,
                  "mrd1_mm": -top * u, "mrd2_mm": bot * u,
                  "scleral_show_mm": max(0.0, bot - r_iris) * u,
                  "brow_to_lid_mm": -brow * u, "canthal_tilt_deg": tilt,
                  "palpebral_fissure_mm": (bot - top) * u, "blink": float(blink[s])}
    ctx.cache["eyelids"] = out
    return out


def polyline_coords(xy: np.ndarray, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """For points (X, Y) (arrays, any shape): arc-length fraction t in [0, 1] of the nearest
    point on the polyline ``xy`` (n x 2, same units), the distance to it, and the length."""
    P = np.asarray(xy, float)
    seg = P[1:] - P[:-1]
    lens = np.hypot(seg[:, 0], seg[:, 1])
    cum = np.concatenate([[0.0], np.cumsum(lens)])
    total = float(cum[-1]) or 1.0
    best_d = np.full(np.shape(X), np.inf)
    best_t = np.zeros(np.shape(X))
    for k in range(len(seg)):
        L2 = max(lens[k] ** 2, 1e-12)
        tt = np.clip(((X - P[k, 0]) * seg[k, 0] + (Y - P[k, 1]) * seg[k, 1]) / L2, 0, 1)
        d = np.hypot(X - P[k, 0] - tt * seg[k, 0], Y - P[k, 1] - tt * seg[k, 1])
        better = d < best_d
        best_d = np.where(better, d, best_d)
        best_t = np.where(better, (cum[k] + tt * lens[k]) / total, best_t)
    return best_t, best_d, total
