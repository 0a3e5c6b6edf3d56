"""Synthetic skin patches with known pores, wrinkles, spots and red blobs (ground truth).

A phantom is a square of skin described in millimetres: a CIELAB base colour with a shading
ramp, a smooth skin-texture field, and objects placed by a seeded random generator:

* **pores**: Gaussian pits, diameter (FWHM) 0.22-0.5 mm, 6-12 L* deep;
* **wrinkles**: gently curved lines (quadratic Bezier, 6-18 mm long), width (FWHM)
  0.3-0.7 mm, 5-10 L* deep, tapering over the last 15 % of their length at each end;
* **spots** (age spots): soft-edged discs 1.2-3 mm in radius, 8-14 L* darker, half that in b*
  browner (+4-7 b*), +1 a*;
* **red blobs** (acne papules): Gaussian bumps of a* (sigma 0.6-1.2 mm), +8-14 a*, 3 L* darker.

Objects keep clear of each other (pores >= 1 mm apart and >= 1.2 mm from a wrinkle centreline,
nothing within 0.8 mm of a spot or red blob), so each pixel has one true answer.

:func:`make_phantom` renders the *same* physical patch at any resolution (px/mm): positions and
sizes are in mm, each object is drawn analytically and blurred by the pixel footprint and a
0.5 px optical blur (Gaussian profiles widen by sqrt(1/12 + 0.25) px, volume preserved), the
texture field lives on a fixed 5 px/mm grid and is interpolated, and sensor noise (std
``noise`` L*, i.i.d. per pixel) is drawn per resolution. The result is 8-bit sRGB, like a
photo. Everything is deterministic (``numpy.random.default_rng(seed)``).

Used by the engine's validation tests and benchmarks: the detectors of
:mod:`skinlab.local.engine._fine` are run on phantoms at several resolutions and scored against
the truth with :func:`match_points` and :func:`line_precision_recall`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

__all__ = ["Phantom", "Wrinkle", "make_phantom", "lab_to_srgb8", "match_points",
           "line_precision_recall"]

#: variance (px^2) added to every Gaussian profile: pixel footprint (1/12) + 0.5 px optical blur
PIXEL_BLUR_VAR = 1.0 / 12.0 + 0.25
FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))      # FWHM of a Gaussian / its sigma


@dataclass
class Wrinkle:
    """A line: centreline samples (N x 2, mm, (y, x)), width (FWHM, mm), depth (L*)."""

    points_mm: np.ndarray
    width_mm: float
    depth: float

    @property
    def length_mm(self) -> float:
        return float(np.hypot(*np.diff(self.points_mm, axis=0).T).sum())

    def taper(self) -> np.ndarray:
        """Depth factor along the samples: 1 in the middle, a cosine ramp to 0 over the last 15 %."""
        s = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(self.points_mm, axis=0).T))])
        u = s / max(s[-1], 1e-9)
        e = np.minimum(u, 1 - u) / 0.15
        return np.where(e >= 1, 1.0, 0.5 - 0.5 * np.cos(np.pi * np.clip(e, 0, 1)))


@dataclass
class Phantom:
    """A rendered phantom: ``rgb`` (H x W x 3 uint8) at ``ppmm`` pixels per mm, and the truth.

    ``pores``: rows (y_mm, x_mm, fwhm_mm, depth_l); ``spots``: rows (y_mm, x_mm, radius_mm,
    delta_l); ``red_blobs``: rows (y_mm, x_mm, sigma_mm, delta_a); ``wrinkles``: list of
    :class:`Wrinkle`. ``lab`` holds the noise-free CIELAB planes (3 x H x W, float32).
    """

    rgb: np.ndarray
    ppmm: float
    size_mm: tuple[float, float]
    pores: np.ndarray
    wrinkles: list[Wrinkle]
    spots: np.ndarray
    red_blobs: np.ndarray
    noise: float
    seed: int
    lab: np.ndarray = field(repr=False, default=None)

    def to_px(self, yx_mm: np.ndarray) -> np.ndarray:
        """(y, x) in mm -> (row, col) pixel coordinates (pixel centres at integers)."""
        return np.asarray(yx_mm, float) * self.ppmm - 0.5

    def pore_px(self) -> np.ndarray:
        """Pore centres in pixels, N x 2 (row, col)."""
        return self.to_px(self.pores[:, :2]) if len(self.pores) else np.zeros((0, 2))

    def wrinkle_centrelines_px(self, core: bool = False, step_px: float = 0.5) -> np.ndarray:
        """Centreline points in pixels, about ``step_px`` apart. ``core=True`` keeps only the
        part at least half as deep as the line (the tapered tips are left out)."""
        out = []
        for w in self.wrinkles:
            pts = self.to_px(w.points_mm)
            seg = np.hypot(*np.diff(pts, axis=0).T)
            s = np.concatenate([[0.0], np.cumsum(seg)])
            ss = np.arange(0.0, s[-1] + 1e-9, step_px)
            p = np.column_stack([np.interp(ss, s, pts[:, 0]), np.interp(ss, s, pts[:, 1])])
            if core:
                tp = np.interp(ss, s, w.taper())
                p = p[tp >= 0.5]
            out.append(p)
        return np.concatenate(out) if out else np.zeros((0, 2))

    def core_wrinkle_length_mm(self) -> float:
        return float(sum(w.length_mm * float((w.taper() >= 0.5).mean()) for w in self.wrinkles))

    def area_cm2(self) -> float:
        return self.size_mm[0] * self.size_mm[1] / 100.0


# --------------------------------------------------------------------------------------------
# colour


def lab_to_srgb8(L: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CIELAB (D65) -> 8-bit sRGB, clipped (the inverse of the engine's conversion)."""
    fy = (L + 16.0) / 116.0
    fx = fy + a / 500.0
    fz = fy - b / 200.0
    d = 6.0 / 29.0

    def finv(f):
        return np.where(f > d, f ** 3, 3 * d * d * (f - 4.0 / 29.0))

    xyz = np.stack([finv(fx) * 0.95047, finv(fy) * 1.0, finv(fz) * 1.08883], axis=-1)
    m = np.array([[3.2404542, -1.5371385, -0.4985314],
                  [-0.9692660, 1.8760108, 0.0415560],
                  [0.0556434, -0.2040259, 1.0572252]])
    lin = np.clip(xyz @ m.T, 0.0, 1.0)
    srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return np.clip(np.rint(srgb * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# layout (in mm, independent of the resolution)


def _bezier(p0, p1, p2, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _layout(rng: np.random.Generator, size_mm, n_pores, n_wrinkles, n_spots, n_red):
    H, W = size_mm
    margin = 2.0
    wrinkles: list[Wrinkle] = []
    line_pts = np.zeros((0, 2))
    tries = 0
    while len(wrinkles) < n_wrinkles and tries < 2000:
        tries += 1
        length = rng.uniform(6.0, 18.0)
        th = rng.uniform(0, np.pi)
        c = np.array([rng.uniform(margin, H - margin), rng.uniform(margin, W - margin)])
        d = np.array([math.sin(th), math.cos(th)]) * length / 2
        nrm = np.array([d[1], -d[0]]) / (length / 2)
        bend = rng.uniform(-0.15, 0.15) * length
        p0, p2 = c - d, c + d
        p1 = c + 2 * bend * nrm          # the curve's sagitta is half the control offset
        pts = _bezier(p0, p1, p2, max(20, int(length / 0.05)))
        if (pts.min(0) < margin).any() or pts[:, 0].max() > H - margin or pts[:, 1].max() > W - margin:
            continue
        if len(line_pts) and cKDTree(line_pts).query(pts)[0].min() < 2.5:
            continue
        wrinkles.append(Wrinkle(pts, float(rng.uniform(0.25, 0.7)), float(rng.uniform(4.0, 10.0))))
        line_pts = np.concatenate([line_pts, pts])

    def free(p, r, others, gap):
        for (q, rq) in others:
            if math.hypot(p[0] - q[0], p[1] - q[1]) < r + rq + gap:
                return False
        return True

    discs = []          # (centre, radius) of spots and red blobs, for spacing
    line_tree = cKDTree(line_pts) if len(line_pts) else None
    spots = []
    tries = 0
    while len(spots) < n_spots and tries < 5000:
        tries += 1
        r = rng.uniform(1.2, 3.0)
        p = (rng.uniform(margin + r, H - margin - r), rng.uniform(margin + r, W - margin - r))
        if line_tree is not None and line_tree.query(p)[0] < r + 1.5:
            continue
        if not free(p, r, discs, 1.5):
            continue
        discs.append((p, r))
        spots.append((p[0], p[1], r, -rng.uniform(8.0, 14.0)))
    red = []
    tries = 0
    while len(red) < n_red and tries < 5000:
        tries += 1
        s = rng.uniform(0.6, 1.2)
        r = 2.0 * s
        p = (rng.uniform(margin + r, H - margin - r), rng.uniform(margin + r, W - margin - r))
        if line_tree is not None and line_tree.query(p)[0] < r + 1.5:
            continue
        if not free(p, r, discs, 1.5):
            continue
        discs.append((p, r))
        red.append((p[0], p[1], s, rng.uniform(8.0, 14.0)))
    pores = []
    tries = 0
    pore_tree_pts: list[tuple[float, float]] = []
    while len(pores) < n_pores and tries < 50 * max(1, n_pores):
        tries += 1
        p = (rng.uniform(1.0, H - 1.0), rng.uniform(1.0, W - 1.0))
        if line_tree is not None and line_tree.query(p)[0] < 1.2:
            continue
        if not free(p, 0.0, discs, 0.8):
            continue
        if pore_tree_pts and min(math.hypot(p[0] - q[0], p[1] - q[1]) for q in pore_tree_pts) < 1.0:
            continue
        pore_tree_pts.append(p)
        pores.append((p[0], p[1], rng.uniform(0.22, 0.5), rng.uniform(5.0, 12.0)))
    as_arr = lambda rows, k: np.array(rows, float).reshape(-1, k)  # noqa: E731
    return as_arr(pores, 4), wrinkles, as_arr(spots, 4), as_arr(red, 4)


def _texture_field(rng: np.random.Generator, size_mm, std: float) -> np.ndarray:
    """Smooth skin texture on a fixed 5 px/mm grid (sigma 0.6 mm), std ``std`` L*."""
    g = 5.0
    h, w = int(math.ceil(size_mm[0] * g)) + 2, int(math.ceil(size_mm[1] * g)) + 2
    f = ndi.gaussian_filter(rng.standard_normal((h, w)), 0.6 * g, mode="wrap")
    return f * (std / max(float(f.std()), 1e-9))


# --------------------------------------------------------------------------------------------
# rendering


def _gauss_blob(acc, yy, xx, cy, cx, sigma_px, amp, radius=4.0):
    """Add amp * exp(-r^2 / 2 s^2), s^2 = sigma^2 + PIXEL_BLUR_VAR, volume preserved."""
    s2 = sigma_px * sigma_px + PIXEL_BLUR_VAR
    a = amp * sigma_px * sigma_px / s2
    r = radius * math.sqrt(s2)
    i0, i1 = max(0, int(cy - r)), min(acc.shape[0], int(cy + r) + 2)
    j0, j1 = max(0, int(cx - r)), min(acc.shape[1], int(cx + r) + 2)
    if i1 <= i0 or j1 <= j0:
        return
    dy = yy[i0:i1, None] - cy
    dx = xx[None, j0:j1] - cx
    acc[i0:i1, j0:j1] += a * np.exp(-(dy * dy + dx * dx) / (2 * s2))


def make_phantom(ppmm: float = 12.0, *, size_mm: tuple[float, float] = (40.0, 40.0), seed: int = 0,
                 n_pores: int = 120, n_wrinkles: int = 8, n_spots: int = 5, n_red: int = 5,
                 noise: float = 1.0, texture: float = 0.8, base_lab=(64.0, 13.0, 17.0),
                 shading: float = 4.0, jpeg_quality: int | None = None) -> Phantom:
    """Render the phantom of ``seed`` at ``ppmm`` pixels per mm (see the module docstring).

    The layout (object positions, sizes, depths and the texture field) depends only on
    ``seed`` and the counts, so phantoms of one seed at different resolutions show the same
    skin. ``noise`` is the per-pixel sensor noise (std, L*); ``texture`` the std of the smooth
    skin-texture field (L*); ``shading`` the L* range of a diagonal lighting ramp.
    """
    rng = np.random.default_rng(seed)
    pores, wrinkles, spots, red = _layout(rng, size_mm, n_pores, n_wrinkles, n_spots, n_red)
    tex = _texture_field(rng, size_mm, texture) if texture > 0 else None
    H = int(round(size_mm[0] * ppmm)); W = int(round(size_mm[1] * ppmm))
    yy = np.arange(H, dtype=np.float64)         # pixel centres: mm = (px + 0.5) / ppmm
    xx = np.arange(W, dtype=np.float64)
    L0, a0, b0 = base_lab
    ymm = (yy + 0.5) / ppmm
    xmm = (xx + 0.5) / ppmm
    L = np.full((H, W), L0, np.float64)
    L += shading * ((ymm[:, None] / size_mm[0] + xmm[None, :] / size_mm[1]) / 2 - 0.5)
    if tex is not None:
        gy, gx = np.meshgrid(ymm * 5.0, xmm * 5.0, indexing="ij")
        L += ndi.map_coordinates(tex, [gy, gx], order=1, mode="nearest")
    a = np.full((H, W), a0, np.float64)
    b = np.full((H, W), b0, np.float64)
    # pores
    for y, x, fw, dep in pores:
        _gauss_blob(L, yy, xx, y * ppmm - 0.5, x * ppmm - 0.5, fw / FWHM * ppmm, -dep)
    # wrinkles: Gaussian cross-section around the centreline (1-D volume preserved)
    for w in wrinkles:
        pts = w.points_mm * ppmm - 0.5
        sig = w.width_mm / FWHM * ppmm
        s2 = sig * sig + PIXEL_BLUR_VAR
        amp = w.depth * sig / math.sqrt(s2)
        r = 4.0 * math.sqrt(s2)
        i0 = max(0, int(pts[:, 0].min() - r)); i1 = min(H, int(pts[:, 0].max() + r) + 2)
        j0 = max(0, int(pts[:, 1].min() - r)); j1 = min(W, int(pts[:, 1].max() + r) + 2)
        gi, gj = np.mgrid[i0:i1, j0:j1]
        q = np.column_stack([gi.ravel(), gj.ravel()]).astype(float)
        dist, idx = cKDTree(pts).query(q, distance_upper_bound=r)
        ok = np.isfinite(dist)
        prof = np.zeros(len(q))
        prof[ok] = amp * w.taper()[idx[ok]] * np.exp(-dist[ok] ** 2 / (2 * s2))
        L[i0:i1, j0:j1] -= prof.reshape(gi.shape)
    # spots: soft discs (logistic edge, 0.25 mm)
    for y, x, rad, dl in spots:
        cy, cx = y * ppmm - 0.5, x * ppmm - 0.5
        rr = (rad + 1.5) * ppmm
        i0, i1 = max(0, int(cy - rr)), min(H, int(cy + rr) + 2)
        j0, j1 = max(0, int(cx - rr)), min(W, int(cx + rr) + 2)
        d = np.hypot(yy[i0:i1, None] - cy, xx[None, j0:j1] - cx) / ppmm
        m = 1.0 / (1.0 + np.exp((d - rad) / 0.25))
        L[i0:i1, j0:j1] += dl * m
        b[i0:i1, j0:j1] += -0.5 * dl * m          # browner: +4..+7 b*
        a[i0:i1, j0:j1] += 1.0 * m
    # red blobs
    for y, x, s, da in red:
        cy, cx = y * ppmm - 0.5, x * ppmm - 0.5
        _gauss_blob(a, yy, xx, cy, cx, s * ppmm, da)
        _gauss_blob(L, yy, xx, cy, cx, s * ppmm, -3.0)
        _gauss_blob(b, yy, xx, cy, cx, s * ppmm, 1.0)
    clean = np.stack([L, a, b]).astype(np.float32)
    nrng = np.random.default_rng([seed, int(round(ppmm * 1000))])
    Ln = L + noise * nrng.standard_normal(L.shape) if noise > 0 else L
    rgb = lab_to_srgb8(Ln, a, b)
    if jpeg_quality is not None:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=int(jpeg_quality))
        rgb = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return Phantom(rgb=rgb, ppmm=float(ppmm), size_mm=(float(size_mm[0]), float(size_mm[1])),
                   pores=pores, wrinkles=wrinkles, spots=spots, red_blobs=red, noise=float(noise),
                   seed=int(seed), lab=clean)


# --------------------------------------------------------------------------------------------
# scoring against the truth


def match_points(found: np.ndarray, truth: np.ndarray, tol: float | np.ndarray) -> dict[str, float]:
    """One-to-one matching of detected points to true points (both N x 2, same units), greedy
    by distance, within ``tol`` (scalar or one per true point). Returns tp, fp, fn, precision,
    recall."""
    found = np.asarray(found, float).reshape(-1, 2)
    truth = np.asarray(truth, float).reshape(-1, 2)
    tol_arr = np.broadcast_to(np.asarray(tol, float), (len(truth),))
    pairs = []
    if len(found) and len(truth):
        tree = cKDTree(found)
        for ti, (p, t) in enumerate(zip(truth, tol_arr)):
            for fi in tree.query_ball_point(p, t):
                pairs.append((math.hypot(*(found[fi] - p)), ti, fi))
    pairs.sort()
    used_t, used_f = set(), set()
    for _, ti, fi in pairs:
        if ti in used_t or fi in used_f:
            continue
        used_t.add(ti); used_f.add(fi)
    tp = len(used_t)
    fp = len(found) - tp
    fn = len(truth) - tp
    return {"tp": tp, "fp": fp, "fn": fn,
            "precision": tp / len(found) if len(found) else (1.0 if not len(truth) else 0.0),
            "recall": tp / len(truth) if len(truth) else 1.0}


def line_precision_recall(skeleton: np.ndarray, ph: Phantom, tol_px: float) -> dict[str, float]:
    """Centreline precision and recall of a detected skeleton, given as a bool image of the
    phantom's size or as N x 2 (row, col) points: precision = share of skeleton points within
    ``tol_px`` of a true centreline (tips included); recall = share of the true core centreline
    (tips left out) within ``tol_px`` of a skeleton point."""
    skeleton = np.asarray(skeleton)
    if skeleton.dtype == bool:
        sk = np.argwhere(skeleton).astype(float)
    else:
        sk = skeleton.astype(float).reshape(-1, 2)
    full = ph.wrinkle_centrelines_px(core=False)
    core = ph.wrinkle_centrelines_px(core=True)
    if len(sk) == 0:
        return {"precision": 1.0 if len(full) == 0 else 0.0, "recall": 0.0 if len(core) else 1.0,
                "skeleton_px": 0}
    prec = float((cKDTree(full).query(sk)[0] <= tol_px).mean()) if len(full) else 0.0
    rec = float((cKDTree(sk).query(core)[0] <= tol_px).mean()) if len(core) else 1.0
    return {"precision": prec, "recall": rec, "skeleton_px": int(len(sk))}
