"""Fine-structure measurements: wrinkles, pores, texture, age spots and acne.

Two layers:

* **Detectors** work on a :class:`View` — CIELAB planes of a patch at a known scale (px/mm),
  with a mask of where to measure — and know nothing of faces. The same functions run on the
  synthetic phantoms of :mod:`skinlab.local.engine.phantoms` (through :func:`measure_patch`) and
  on photos, so the phantom validation tests exactly the code that measures faces.
* **Concern functions** (``m_wrinkle``, ``m_pore``, ``m_texture``, ``m_age_spot``, ``m_acne``)
  take the engine's per-image :class:`~skinlab.local.engine._context.Context`, cut views out of the
  original pixels over the bounding boxes of the regions they need, at a capped working scale,
  and turn the detections into scores, masks and measurements.

Working scales (the expensive filters run only there): wrinkles and texture on one face view at
most :data:`WRINKLE_MAX_PX_PER_MM`; pores on per-region views at most :data:`PORE_MAX_PX_PER_MM`
when the photo has at least :data:`PORE_MIN_PX_PER_MM` (else a coarser proxy on the face view);
age spots and acne on the engine's working image (<= 3.5 px/mm).

See ``docs/engine-methods.md`` for the methods, the score mappings and the validation tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.morphology import skeletonize

from ._context import noise_sigma, robust_std
from ._types import ConcernMeasurement, Mask

__all__ = [
    "View", "view_from_rgb", "find_lines", "find_pores", "pore_proxy", "texture_index",
    "find_spots", "find_red_blobs", "measure_patch", "m_wrinkle", "m_pore", "m_texture",
    "m_age_spot", "m_acne", "FINE_METHODS", "FINE_FUNCS", "PORE_MIN_PX_PER_MM",
    "PORE_MAX_PX_PER_MM", "WRINKLE_MAX_PX_PER_MM", "FINE_LINE_MIN_PX_PER_MM",
]

#: Below this source scale pores are "not resolvable": no count, a documented proxy instead.
PORE_MIN_PX_PER_MM = 8.0
#: Pores are searched on views resampled to at most this scale.
PORE_MAX_PX_PER_MM = 10.0
#: Wrinkles and texture are measured on a face view at most this scale.
WRINKLE_MAX_PX_PER_MM = 6.0
#: Below this scale the finest lines (0.25 mm) are no longer resolved (coarser lines still are).
FINE_LINE_MIN_PX_PER_MM = 4.0
#: Age spots and acne use views at most this scale (the engine's working image).
SPOT_MAX_PX_PER_MM = 3.5

FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


# --------------------------------------------------------------------------------------------
# score mapping (the engine's documented logistic; identical to _measure.decreasing)


def decreasing(x: float, mid: float, scale: float) -> float:
    """raw = 1 + 99 / (1 + exp((x - mid) / scale)): more x is worse; x = mid -> 50.5."""
    z = max(-60.0, min(60.0, (x - mid) / scale))
    return 1.0 + 99.0 / (1.0 + math.exp(z))


def _finite(x: float, default: float = 0.0) -> float:
    x = float(x)
    return x if math.isfinite(x) else default


# --------------------------------------------------------------------------------------------
# views


@dataclass
class View:
    """CIELAB planes of a patch, its scale and its place in the full image.

    View pixel (i, j) has its centre at full-image pixel
    (``oy + (i + 0.5) / fy - 0.5``, ``ox + (j + 0.5) / fx - 0.5``).
    ``mask`` is where to measure; ``noise`` the per-pixel L* noise (Immerkaer estimate).
    """

    L: np.ndarray
    a: np.ndarray
    b: np.ndarray
    ppmm: float
    mask: np.ndarray
    noise: float
    oy: float = 0.0
    ox: float = 0.0
    fy: float = 1.0
    fx: float = 1.0
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.L.shape

    def to_full(self, rows, cols):
        """View pixel coordinates -> full-image pixel coordinates."""
        return (self.oy + (np.asarray(rows, float) + 0.5) / self.fy - 0.5,
                self.ox + (np.asarray(cols, float) + 0.5) / self.fx - 0.5)


_SRGB_LUT = None


def _srgb_lut() -> np.ndarray:
    global _SRGB_LUT
    if _SRGB_LUT is None:
        v = np.arange(256, dtype=np.float64) / 255.0
        _SRGB_LUT = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4).astype(np.float32)
    return _SRGB_LUT


_M_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                   [0.2126729, 0.7151522, 0.0721750],
                   [0.0193339, 0.1191920, 0.9503041]], np.float32)
_WHITE = np.array([0.95047, 1.0, 1.08883], np.float32)


def _f_lab(t: np.ndarray) -> np.ndarray:
    d = np.float32(6 / 29)
    return np.where(t > d ** 3, np.cbrt(t), t / (3 * d * d) + np.float32(4 / 29))


def lab_from_rgb8(rgb8: np.ndarray, gains=None, need_ab: bool = True):
    """8-bit sRGB -> CIELAB (D65) planes, float32, through a 256-entry linearisation table;
    ``gains`` (3,) are white-balance gains on linear RGB (as the engine's sclera correction).
    With ``need_ab=False`` only L* is computed (a, b are None)."""
    lut = _srgb_lut()
    g = np.ones(3, np.float32) if gains is None else np.asarray(gains, np.float32)
    M = (_M_XYZ * g[None, :]) / _WHITE[:, None]        # rows: X/Xn, Y/Yn, Z/Zn
    r, gch, b = (lut[rgb8[..., k]] for k in range(3))
    fy = _f_lab(M[1, 0] * r + M[1, 1] * gch + M[1, 2] * b)
    L = (116 * fy - 16).astype(np.float32)
    if not need_ab:
        return L, None, None
    fx = _f_lab(M[0, 0] * r + M[0, 1] * gch + M[0, 2] * b)
    fz = _f_lab(M[2, 0] * r + M[2, 1] * gch + M[2, 2] * b)
    return L, (500 * (fx - fy)).astype(np.float32), (200 * (fy - fz)).astype(np.float32)


def _resample(rgb: np.ndarray, f: float) -> np.ndarray:
    if f >= 0.999:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


def view_from_rgb(rgb: np.ndarray, ppmm: float, cap: float, mask: np.ndarray | None = None,
                  oy: float = 0.0, ox: float = 0.0) -> View:
    """An 8-bit sRGB patch at ``ppmm`` -> a :class:`View` at ``min(ppmm, cap)`` px/mm
    (antialiased downsampling, never upsampling). ``mask`` (the patch's shape) is resampled
    with nearest neighbours; default everywhere."""
    f = min(1.0, cap / ppmm)
    small = _resample(np.ascontiguousarray(rgb[..., :3]), f)
    h, w = small.shape[:2]
    fy, fx = h / rgb.shape[0], w / rgb.shape[1]
    L, a, b = lab_from_rgb8(small)
    if mask is None:
        m = np.ones((h, w), bool)
    elif (h, w) == mask.shape:
        m = mask.astype(bool)
    else:
        ri = np.clip(((np.arange(h) + 0.5) / fy).astype(int), 0, mask.shape[0] - 1)
        ci = np.clip(((np.arange(w) + 0.5) / fx).astype(int), 0, mask.shape[1] - 1)
        m = mask[np.ix_(ri, ci)].astype(bool)
    return View(L=L, a=a, b=b, ppmm=ppmm * fx, mask=m, noise=noise_sigma(L, m if m.any() else None),
                oy=oy, ox=ox, fy=fy, fx=fx)


# --------------------------------------------------------------------------------------------
# shared filters


def _smooth(img: np.ndarray, s: float) -> np.ndarray:
    return ndi.gaussian_filter(img, s, mode="nearest", truncate=3.5)


def _hessian_fd(S: np.ndarray):
    """Hessian of an already smoothed image by central differences: (hrr, hcc, hrc)."""
    P = np.pad(S, 1, mode="edge")
    c = P[1:-1, 1:-1]
    hrr = P[2:, 1:-1] + P[:-2, 1:-1] - 2 * c
    hcc = P[1:-1, 2:] + P[1:-1, :-2] - 2 * c
    hrc = (P[2:, 2:] - P[2:, :-2] - P[:-2, 2:] + P[:-2, :-2]) * 0.25
    return hrr, hcc, hrc


def _eig(hrr, hcc, hrc):
    tmp = np.sqrt((hrr - hcc) ** 2 + 4 * hrc * hrc)
    return (hrr + hcc + tmp) * 0.5, (hrr + hcc - tmp) * 0.5


_NOISE_GAIN: dict = {}


def _noise_gain(kind: str, s: float) -> float:
    """Std of a filter's response to unit white noise (measured once on a fixed 192^2 noise
    field; deterministic). kind 'ridge' = s^2 (lambda1 - |lambda2|)^+ upper tail scale, 'log' =
    s^2 * Laplacian."""
    key = (kind, round(s, 2))
    if key not in _NOISE_GAIN:
        z = np.random.default_rng(12345).standard_normal((192, 192)).astype(np.float32)
        S = _smooth(z, s)
        hrr, hcc, hrc = _hessian_fd(S)
        if kind == "log":
            r = s * s * (hrr + hcc)
        else:
            l1, l2 = _eig(hrr, hcc, hrc)
            r = s * s * (l1 - np.abs(l2))
        _NOISE_GAIN[key] = float(r[16:-16, 16:-16].std())
    return _NOISE_GAIN[key]


def component_stats(lab: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per-label area, moment-ellipse major/minor axes, eccentricity and ellipse fill for labels
    1..n (bincounts; no per-object loop)."""
    idx = lab.ravel()
    sel = idx > 0
    if n == 0 or not sel.any():
        z = np.zeros(0)
        return {"label": z.astype(int), "area": z, "major": z, "minor": z, "ecc": z, "fill": z,
                "cy": z, "cx": z}
    yy, xx = np.divmod(np.flatnonzero(sel), lab.shape[1])
    li = idx[sel]
    cnt = np.bincount(li, minlength=n + 1).astype(float)
    sy = np.bincount(li, yy, n + 1); sx = np.bincount(li, xx, n + 1)
    syy = np.bincount(li, yy * yy, n + 1); sxx = np.bincount(li, xx * xx, n + 1)
    sxy = np.bincount(li, xx * yy, n + 1)
    c = np.maximum(cnt, 1)
    my, mx = sy / c, sx / c
    vy = syy / c - my * my + 1 / 12; vx = sxx / c - mx * mx + 1 / 12; cxy = sxy / c - mx * my
    tr = vx + vy; det = np.sqrt(np.maximum((vx - vy) ** 2 + 4 * cxy ** 2, 0))
    l1 = np.maximum((tr + det) / 2, 1e-9); l2 = np.maximum((tr - det) / 2, 1e-9)
    major, minor = 4 * np.sqrt(l1), 4 * np.sqrt(l2)
    keep = cnt > 0
    keep[0] = False
    lbl = np.arange(n + 1)
    return {"label": lbl[keep], "area": cnt[keep], "major": major[keep], "minor": minor[keep],
            "ecc": np.sqrt(np.clip(1 - l2 / l1, 0, 1))[keep],
            "fill": (cnt / (math.pi * major * minor / 4))[keep], "cy": my[keep], "cx": mx[keep]}


def _skeleton_length(skel: np.ndarray) -> np.ndarray:
    """Per-pixel length contribution of a skeleton (px): half the sum of the steps to its
    8-neighbours on the skeleton (1 straight, sqrt 2 diagonal); an isolated pixel counts 1."""
    s = skel.astype(np.float32)
    straight = ndi.convolve(s, np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], np.float32), mode="constant")
    diag = ndi.convolve(s, np.array([[1, 0, 1], [0, 0, 0], [1, 0, 1]], np.float32), mode="constant")
    per = 0.5 * (straight + math.sqrt(2) * diag)
    return np.where(skel, np.maximum(per, 1.0), 0.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# wrinkles


#: Gaussian scales (mm) of the line filter; the response peaks at sigma = sqrt(2) x the line's
#: own sigma, so these cover lines of 0.3-1.0 mm width (FWHM).
LINE_SIGMAS_MM = (0.15, 0.25, 0.4)
#: Response of sigma^2 (lambda1 - |lambda2|) at its best scale for a Gaussian line of depth d:
#: 2 / (3 sqrt 3) d. Depth (L*) = response / LINE_GAIN.
LINE_GAIN = 2.0 / (3.0 * math.sqrt(3.0))
LINE_HI_ABS = 1.3        # hysteresis high threshold, response units (~3.4 L* deep line)
LINE_MIN_LENGTH_MM = 2.0
LINE_MAX_MINOR_RATIO = 0.35


@dataclass
class Lines:
    response: np.ndarray      # best ridge response (L* units)
    keep: np.ndarray          # kept line pixels
    skeleton: np.ndarray      # their skeleton
    seg_length: np.ndarray    # per-pixel length (px) on the skeleton
    depth: np.ndarray         # estimated line depth (L*) = response / LINE_GAIN
    hi: float
    sigmas_px: tuple


def ridge_response(L: np.ndarray, ppmm: float, sigmas_mm=LINE_SIGMAS_MM):
    """Sato-style dark-line response, max over scales of s^2 (lambda1 - |lambda2|)^+ (lambda1 the
    larger Hessian eigenvalue, across a dark valley), L* units. Scales below 0.8 px are raised."""
    sig = sorted({round(max(0.8, s * ppmm), 3) for s in sigmas_mm})
    best = np.zeros_like(L)
    for s in sig:
        l1, l2 = _eig(*_hessian_fd(_smooth(L, s)))
        np.maximum(best, s * s * (l1 - np.abs(l2)), out=best)
    return best, tuple(sig)


def find_lines(view: View, allowed: np.ndarray | None = None) -> Lines:
    """Wrinkle lines: ridge response -> hysteresis (high = max(LINE_HI_ABS, 4 x the response's
    noise std), low = high / 2) -> connected components kept when elongated (moment-ellipse major
    axis >= 2 mm and minor <= 0.35 x major) -> skeleton with per-pixel length."""
    if "lines" in view.cache:
        return view.cache["lines"]
    R, sig = ridge_response(view.L, view.ppmm)
    allowed = view.mask if allowed is None else allowed
    noise_r = view.noise * _noise_gain("ridge", sig[0])
    hi = max(LINE_HI_ABS, 4.0 * noise_r)
    lo = 0.5 * hi
    Ra = np.where(allowed, R, 0)
    low = Ra > lo
    lab, n = ndi.label(low, structure=np.ones((3, 3), bool))
    keep = np.zeros_like(low)
    if n:
        strong = np.zeros(n + 1, bool)
        strong[np.unique(lab[Ra > hi])] = True
        strong[0] = False
        lab = np.where(strong[lab], lab, 0)
        props = component_stats(lab, n)
        ok = ((props["major"] >= LINE_MIN_LENGTH_MM * view.ppmm)
              & (props["minor"] <= LINE_MAX_MINOR_RATIO * props["major"]))
        good = np.zeros(n + 1, bool)
        good[props["label"][ok]] = True
        keep = good[lab]
    skel = skeletonize(keep) if keep.any() else keep
    out = Lines(response=R, keep=keep, skeleton=skel, seg_length=_skeleton_length(skel),
                depth=R / LINE_GAIN, hi=hi, sigmas_px=sig)
    view.cache["lines"] = out
    return out


# --------------------------------------------------------------------------------------------
# pores


PORE_DIAM_MM = (0.15, 0.6)        # searched pore diameters (FWHM of a Gaussian pit)
PORE_MIN_DEPTH = 3.0             # L*
PORE_MIN_ROUNDNESS = 0.35        # Hessian eigenvalue ratio lambda2 / lambda1 at the blob scale


def _local_max_3d(stack: np.ndarray, cand: np.ndarray):
    """Indices (k, i, j) of candidates that are maxima of their 3x3x3 neighbourhood."""
    k, i, j = np.nonzero(cand)
    if k.size == 0:
        return k, i, j
    K, H, W = stack.shape
    v = stack[k, i, j]
    ok = np.ones(k.size, bool)
    for dk in (-1, 0, 1):
        kk = k + dk
        inside_k = (kk >= 0) & (kk < K)
        kk = np.clip(kk, 0, K - 1)
        for di in (-1, 0, 1):
            ii = np.clip(i + di, 0, H - 1)
            for dj in (-1, 0, 1):
                if dk == 0 and di == 0 and dj == 0:
                    continue
                jj = np.clip(j + dj, 0, W - 1)
                nb = stack[kk, ii, jj]
                ok &= ~inside_k | (v >= nb)
    return k[ok], i[ok], j[ok]


def blob_stack(L: np.ndarray, ppmm: float, diam_mm=PORE_DIAM_MM, n: int = 5, sign: float = 1.0,
               guard: bool = False):
    """Scale-normalised Laplacian of Gaussian, s^2 * lap(G_s * L), at ``n`` geometric scales
    s covering Gaussian blobs of the given FWHM diameters (s >= 0.8 px); with ``guard`` the last
    of the ``n`` scales lies one step beyond the range. ``sign`` = +1 responds to dark blobs
    (pits), -1 to bright ones. Returns (stack, scales, smoothed images)."""
    s0 = max(0.8, diam_mm[0] / FWHM * ppmm)
    s1 = max(s0 * 1.25, diam_mm[1] / FWHM * ppmm)
    if guard:
        sig = np.geomspace(s0, s1, n - 1)
        sig = np.append(sig, sig[-1] * sig[-1] / sig[-2])
    else:
        sig = np.geomspace(s0, s1, n)
    stack = np.empty((n,) + L.shape, np.float32)
    smooth = []
    for k, s in enumerate(sig):
        S = _smooth(L, s)
        hrr, hcc, _ = _hessian_fd(S)
        stack[k] = sign * s * s * (hrr + hcc)
        smooth.append(S)
    return stack, sig, smooth


def find_blobs(L: np.ndarray, mask: np.ndarray, ppmm: float, noise: float, diam_mm, min_depth: float,
               min_round: float, sign: float = 1.0, n_scales: int = 5, k_noise: float = 4.0):
    """Scale-space blobs: 3x3x3 maxima of the normalised LoG inside ``mask``; depth = 2 x the
    response (exact for a Gaussian blob at its own scale) >= max(min_depth, k_noise x the
    response's noise); roundness = lambda2 / lambda1 of the Hessian at the blob's scale >=
    ``min_round``; overlapping detections merged (the stronger kept). Rows (y, x, sigma_px,
    depth, roundness) in pixels of ``L``."""
    if not mask.any():
        return np.zeros((0, 5))
    stack, sig, smooth = blob_stack(L, ppmm, diam_mm, n_scales + 1, sign, guard=True)
    # noise floor per scale: the larger of the white-noise prediction and the robust spread of
    # the response itself (correlated noise from resampling, demosaicing or JPEG is not white)
    sub = mask[::3, ::3]
    thr = np.array([max(min_depth / 2, k_noise * noise * _noise_gain("log", s),
                        k_noise * robust_std(stack[k][::3, ::3][sub]))
                    for k, s in enumerate(sig)], np.float32)
    cand = (stack >= thr[:, None, None]) & mask[None]
    cand[-1] = False          # the guard scale only tells larger blobs apart; never a detection
    k, i, j = _local_max_3d(stack, cand)
    if k.size == 0:
        return np.zeros((0, 5))
    rnd = np.zeros(k.size)
    for kk in np.unique(k):
        sel = k == kk
        hrr, hcc, hrc = _hessian_fd(smooth[kk])
        ii, jj = i[sel], j[sel]
        l1, l2 = _eig(sign * hrr[ii, jj], sign * hcc[ii, jj], sign * hrc[ii, jj])
        rnd[sel] = l2 / np.maximum(l1, 1e-9)
    ok = rnd >= min_round
    k, i, j, rnd = k[ok], i[ok], j[ok], rnd[ok]
    depth = 2.0 * stack[k, i, j]
    s = sig[k]
    order = np.argsort(-depth, kind="stable")
    k, i, j, rnd, depth, s = k[order], i[order], j[order], rnd[order], depth[order], s[order]
    # merge overlaps: a weaker blob whose centre lies within the stronger one's radius goes
    pts = np.column_stack([i, j]).astype(float)
    keep = np.ones(len(pts), bool)
    if len(pts) > 1:
        tree = cKDTree(pts)
        rad = np.maximum(1.5, s * math.sqrt(2))
        for q in range(len(pts)):
            if not keep[q]:
                continue
            for o in tree.query_ball_point(pts[q], rad[q]):
                if o > q:
                    keep[o] = False
    return np.column_stack([i, j, s, depth, rnd])[keep]


def find_pores(view: View, where: np.ndarray | None = None) -> np.ndarray:
    """Pores: dark round blobs of 0.15-0.6 mm (FWHM) at least PORE_MIN_DEPTH L* deep (and 4x
    the noise), roundness >= PORE_MIN_ROUNDNESS. Rows (y, x, sigma_px, depth, roundness)."""
    where = view.mask if where is None else where
    return find_blobs(view.L, where, view.ppmm, view.noise, PORE_DIAM_MM, PORE_MIN_DEPTH,
                      PORE_MIN_ROUNDNESS)


def on_lines(view: View, lines: Lines, y_full, x_full) -> np.ndarray:
    """True where a full-image point falls on a kept wrinkle line of ``view`` (grown by one view
    pixel): a dark dot on a line is part of the line, not a pore."""
    y_full = np.asarray(y_full, float); x_full = np.asarray(x_full, float)
    if y_full.size == 0 or not lines.keep.any():
        return np.zeros(y_full.shape, bool)
    if "keep_grown" not in view.cache:
        view.cache["keep_grown"] = ndi.binary_dilation(lines.keep, np.ones((3, 3), bool))
    grown = view.cache["keep_grown"]
    r = np.rint((y_full + 0.5 - view.oy) * view.fy - 0.5).astype(int)
    c = np.rint((x_full + 0.5 - view.ox) * view.fx - 0.5).astype(int)
    inside = (r >= 0) & (r < grown.shape[0]) & (c >= 0) & (c < grown.shape[1])
    out = np.zeros(y_full.shape, bool)
    out[inside] = grown[r[inside], c[inside]]
    return out


#: Proxy scale: the finest scale that is still meaningful below 8 px/mm.
PORE_PROXY_MM = 0.25


def pore_proxy_map(view: View) -> tuple[np.ndarray, float, float]:
    """Dark-blob response at the proxy scale s = max(1 px, PORE_PROXY_MM x px/mm): the positive
    part of s^2 lap(G_s * L*) (pits and dark speckle); returns (map, scale px, noise std of the
    response)."""
    if "pore_proxy" in view.cache:
        return view.cache["pore_proxy"]
    s = max(1.0, PORE_PROXY_MM * view.ppmm)
    hrr, hcc, _ = _hessian_fd(_smooth(view.L, s))
    r = np.maximum(s * s * (hrr + hcc), 0)
    out = (r, s, view.noise * _noise_gain("log", s))
    view.cache["pore_proxy"] = out
    return out


def pore_proxy(view: View, where: np.ndarray) -> float:
    """Coarser-scale pore proxy (L*): rms of the positive dark-blob response over ``where``
    with the noise's share (half the noise variance, for a symmetric response) removed."""
    r, _, nz = pore_proxy_map(view)
    v = r[where]
    if v.size == 0:
        return 0.0
    ms = float(np.mean(v.astype(np.float64) ** 2))
    return math.sqrt(max(ms - 0.5 * nz * nz, 0.0))


# --------------------------------------------------------------------------------------------
# texture


TEXTURE_BAND_MM = (0.25, 1.5)


def _dog_noise_gain(s1: float, s2: float) -> float:
    """Std of a difference of Gaussians (s1 < s2, px) applied to unit white noise."""
    return math.sqrt(max(1e-9, 1 / (4 * math.pi * s1 * s1) + 1 / (4 * math.pi * s2 * s2)
                         - 1 / (math.pi * (s1 * s1 + s2 * s2))))


def texture_index(view: View, where: np.ndarray) -> dict[str, float]:
    """Band-pass L* = G(0.25 mm) - G(1.5 mm) (s1 >= 0.7 px): robust std R over ``where``; the
    noise's share in that band (noise x the DoG's white-noise gain) removed in quadrature:
    T = sqrt(max(R^2 - N^2, 0)); also R / N (signal-to-noise)."""
    s1 = max(0.7, TEXTURE_BAND_MM[0] * view.ppmm)
    s2 = max(2 * s1, TEXTURE_BAND_MM[1] * view.ppmm)
    if "bandpass" not in view.cache:
        view.cache["bandpass"] = _smooth(view.L, s1) - _smooth(view.L, s2)
    bp = view.cache["bandpass"]
    rough = robust_std(bp[where])
    nz = view.noise * _dog_noise_gain(s1, s2)
    t = math.sqrt(max(rough * rough - nz * nz, 0.0))
    return {"bandpass": bp, "rough": rough, "noise_band": nz, "texture": t,
            "snr": rough / nz if nz > 0 else float("inf")}


# --------------------------------------------------------------------------------------------
# age spots


SPOT_DIAM_MM = (1.0, 8.0)
SPOT_BLOB_FWHM_MM = (1.0, 6.0)       # Gaussian-equivalent sizes searched (discs ~1-8 mm)
SPOT_MIN_DL = 6.0
#: spot depths are expressed for skin of this background L* (see find_spots)
SPOT_REF_L = 65.0


def _smooth_wide(img: np.ndarray, s: float) -> np.ndarray:
    """Gaussian blur for wide sigmas: on a k-times block-averaged copy (k = s // 3) when
    s >= 6 px, bilinearly interpolated back (no derivatives are taken of the result)."""
    k = int(s // 3) if s >= 6 else 1
    if k <= 1:
        return _smooth(img, s)
    h, w = img.shape
    hp, wp = -(-h // k) * k, -(-w // k) * k
    pad = np.pad(img, ((0, hp - h), (0, wp - w)), mode="edge")
    small = pad.reshape(hp // k, k, wp // k, k).mean(axis=(1, 3))
    small = ndi.gaussian_filter(small, math.sqrt(max(s * s / (k * k) - 1 / 12, 0.25)), mode="nearest")
    up = Image.fromarray(small.astype(np.float32)).resize((wp, hp), Image.BILINEAR)
    return np.asarray(up, dtype=np.float32)[:h, :w]


def _masked_blur(img: np.ndarray, where: np.ndarray, s: float) -> np.ndarray:
    """Normalised convolution: the Gaussian blur of ``img`` using only the pixels in ``where``."""
    num = _smooth_wide(np.where(where, img, 0).astype(np.float32), s)
    den = _smooth_wide(where.astype(np.float32), s)
    return np.where(den > 1e-3, num / np.maximum(den, 1e-3), img)


SPOT_MIN_RING_SKIN = 0.75          # share of skin in the ring around a spot
SPOT_MIN_DB = 1.0                  # b* above the surroundings (brown)
SPOT_MAX_SEARCH_PX_PER_MM = 2.5    # spots (>= 1 mm) are searched at most at this scale
SPOT_MIN_ROUND = 0.4


def _resample_plane(img: np.ndarray, f: float) -> np.ndarray:
    h, w = img.shape
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(img.astype(np.float32)).resize(size, Image.BILINEAR))


def find_spots(view: View, where: np.ndarray, support: np.ndarray | None = None):
    """Age spots: dark round scale-space blobs of L* (LoG, 1-8 mm across, searched at <= 2.5
    px/mm), whose centre is at least thr = max(6, 4 x noise) L* below a 12 mm median background
    (on a ~0.6 px/mm copy of ``support``, L* smoothed at 0.3 mm; the depth and the noise term are
    exposure-normalised: scaled by (SPOT_REF_L + 16) / (background + 16)), roundness >= 0.4, browner than
    the surroundings (mean b* over the spot >= its 4 mm background + 1), and ringed by skin (a
    ring at 1.5-2 spot radii at least 75 % ``support`` and at most half as dark as the centre).
    The spot's extent: pixels within 1.5 radii at least half as dark as its centre.
    Returns (extent mask, darkness map, thr, rows (y, x, diameter mm, darkness L*))."""
    support = view.mask if support is None else support
    L = view.L
    step = max(1, int(round(view.ppmm / 0.6)))              # background on a ~0.6 px/mm copy
    small = L[::step, ::step]
    sk = support[::step, ::step]
    ref = float(np.median(L[support])) if support.any() else float(np.median(L))
    fill = np.where(sk, small, ref).astype(np.float32)
    size = max(3, int(round(12 * view.ppmm / step)) | 1)
    bg_s = ndi.median_filter(fill, size=size, mode="nearest")
    bg = np.asarray(Image.fromarray(bg_s).resize((L.shape[1], L.shape[0]), Image.BILINEAR))
    s03 = max(0.5, 0.3 * view.ppmm)
    Ls = _smooth(L, s03)
    nz = view.noise / (2 * math.sqrt(math.pi) * s03)       # noise std after the 0.3 mm blur
    # the noise guard in the same exposure-normalised units as the darkness (below), so that a dim
    # or dark-skinned photo keeps 4 sigma of margin, not fewer
    gain = (SPOT_REF_L + 16.0) / max(ref + 16.0, 1.0)
    thr = max(SPOT_MIN_DL, 4.0 * nz * gain)
    # darkness as a fraction of the background's L* + 16 (which a change of exposure scales by
    # the cube root of the light), expressed in L* of a reference skin at SPOT_REF_L: a spot on
    # skin of L* 65 keeps its L* depth, and 8 % less exposure no longer drops a fifth of them
    dark = (bg - Ls) * ((SPOT_REF_L + 16.0) / np.maximum(bg + 16.0, 1.0))
    bmap = _masked_blur(view.b, support, max(1.0, 4.0 * view.ppmm))
    keep = np.zeros(L.shape, bool)
    f = min(1.0, SPOT_MAX_SEARCH_PX_PER_MM / view.ppmm)
    if f < 0.95:
        Lq = _resample_plane(L, f)
        hq, wq = Lq.shape
        fy, fx = hq / L.shape[0], wq / L.shape[1]
        ri = np.clip(((np.arange(hq) + 0.5) / fy).astype(int), 0, L.shape[0] - 1)
        ci = np.clip(((np.arange(wq) + 0.5) / fx).astype(int), 0, L.shape[1] - 1)
        wq_mask = where[np.ix_(ri, ci)]
    else:
        Lq, fy, fx, wq_mask = L, 1.0, 1.0, where
    blobs = find_blobs(Lq, wq_mask, view.ppmm * fx, nz, SPOT_BLOB_FWHM_MM, 0.5 * thr, SPOT_MIN_ROUND,
                       n_scales=5, k_noise=0.0)
    rows = []
    H, W = L.shape
    for yq, xq, sq, _, _ in blobs:
        y, x = (yq + 0.5) / fy - 0.5, (xq + 0.5) / fx - 0.5
        r = max(1.0, sq / fx * math.sqrt(2))                 # spot radius, view px
        i, j = int(round(y)), int(round(x))
        if not (0 <= i < H and 0 <= j < W) or dark[i, j] < thr:
            continue
        R2 = int(math.ceil(2.0 * r)) + 1
        i0, i1, j0, j1 = max(0, i - R2), min(H, i + R2 + 1), max(0, j - R2), min(W, j + R2 + 1)
        gy, gx = np.ogrid[i0:i1, j0:j1]
        d = np.sqrt((gy - y) ** 2 + (gx - x) ** 2)
        ext = (d <= 1.5 * r) & (dark[i0:i1, j0:j1] >= 0.5 * dark[i, j])
        ext = ext & where[i0:i1, j0:j1]
        ring = (d >= 1.5 * r) & (d <= 2.0 * r)
        if not ext.any() or ring.sum() == 0:
            continue
        ring_skin = float(support[i0:i1, j0:j1][ring].mean())
        ring_dark = float(dark[i0:i1, j0:j1][ring].mean())
        db = float((view.b - bmap)[i0:i1, j0:j1][ext].mean())
        dmm = 2 * math.sqrt(ext.sum() / math.pi) / view.ppmm
        if (ring_skin >= SPOT_MIN_RING_SKIN and ring_dark <= 0.5 * dark[i, j] and db >= SPOT_MIN_DB
                and SPOT_DIAM_MM[0] <= dmm <= SPOT_DIAM_MM[1]):
            keep[i0:i1, j0:j1] |= ext
            rows.append((y, x, dmm, float(dark[i, j])))
    return keep, dark, thr, np.array(rows, float).reshape(-1, 4)


# --------------------------------------------------------------------------------------------
# acne


ACNE_DIAM_MM = (1.0, 5.0)        # FWHM of the red bump
ACNE_MIN_DA = 6.0
#: acne blobs are searched at most at this scale (a 1 mm bump is still 2 px across)
ACNE_MAX_PX_PER_MM = 2.0
ACNE_MIN_ROUND = 0.3


def find_red_blobs(view: View, where: np.ndarray, support: np.ndarray | None = None) -> np.ndarray:
    """Raised-redness blobs: a* minus its 5 mm background (masked blur over ``support``) ->
    bright scale-space blobs of 1-5 mm (FWHM), height (2 x response) >= max(6 a*, 4 x noise),
    roundness >= 0.3, searched at most at ACNE_MAX_PX_PER_MM. Rows (y, x, sigma_px, delta_a,
    roundness) in pixels of ``view``."""
    support = view.mask if support is None else support
    res = view.a - _masked_blur(view.a, support, max(1.0, 5.0 * view.ppmm))
    na = noise_sigma(view.a, support if support.any() else None)
    f = min(1.0, ACNE_MAX_PX_PER_MM / view.ppmm)
    if f < 0.95:
        h, w = res.shape
        size = (max(1, round(w * f)), max(1, round(h * f)))
        fy, fx = size[1] / h, size[0] / w
        res_s = np.asarray(Image.fromarray(res.astype(np.float32)).resize(size, Image.BILINEAR))
        ri = np.clip(((np.arange(size[1]) + 0.5) / fy).astype(int), 0, h - 1)
        ci = np.clip(((np.arange(size[0]) + 0.5) / fx).astype(int), 0, w - 1)
        where_s = where[np.ix_(ri, ci)]
        rows = find_blobs(res_s, where_s, view.ppmm * fx, na * f, ACNE_DIAM_MM, ACNE_MIN_DA,
                          ACNE_MIN_ROUND, sign=-1.0, n_scales=4)
        if len(rows):
            rows = rows.copy()
            rows[:, 0] = (rows[:, 0] + 0.5) / fy - 0.5
            rows[:, 1] = (rows[:, 1] + 0.5) / fx - 0.5
            rows[:, 2] = rows[:, 2] / fx
        return rows
    return find_blobs(res, where, view.ppmm, na, ACNE_DIAM_MM, ACNE_MIN_DA, ACNE_MIN_ROUND,
                      sign=-1.0, n_scales=4)


# --------------------------------------------------------------------------------------------
# patch-level measurement (phantoms, tests, benchmarks)


def measure_patch(rgb: np.ndarray, ppmm: float, mask: np.ndarray | None = None) -> dict:
    """Run every fine detector on an 8-bit sRGB patch of known scale, exactly as the engine
    runs them on a face region (same working-scale caps, thresholds and filters).

    Returns a dict with, in the patch's pixel coordinates: ``pores`` (N x 2 centres, or None
    when the scale is below PORE_MIN_PX_PER_MM), ``pore_proxy`` (L*, always),
    ``pore_resolvable``, ``line_points`` (skeleton pixel centres, M x 2), ``line_length_mm``,
    ``line_depth`` (median L*), ``texture`` (L*), ``spots`` / ``red_blobs`` (centres),
    ``ppmm_used`` per detector.
    """
    rgb = np.asarray(rgb)
    out: dict = {"ppmm": float(ppmm)}
    resolvable = ppmm >= PORE_MIN_PX_PER_MM
    fv = view_from_rgb(rgb, ppmm, WRINKLE_MAX_PX_PER_MM, mask)
    lines = find_lines(fv)
    r, c = np.nonzero(lines.skeleton)
    y, x = fv.to_full(r, c)
    out["line_points"] = np.column_stack([y, x])
    out["line_length_mm"] = float(lines.seg_length.sum()) / fv.ppmm
    out["line_depth"] = float(np.median(lines.depth[lines.skeleton])) if r.size else 0.0
    out["texture"] = texture_index(fv, fv.mask)["texture"]
    sv = view_from_rgb(rgb, ppmm, SPOT_MAX_PX_PER_MM, mask)
    spot_keep, _, _, spots = find_spots(sv, sv.mask)
    red = find_red_blobs(sv, sv.mask)
    # the pore proxy leaves out lines, spots and red blobs (grown by 1 mm), as on a face
    excl = np.zeros(sv.shape, bool)
    for y, x, sg, _, _ in red:
        rr = sg * math.sqrt(2) + sv.ppmm
        gy, gx = np.ogrid[:sv.shape[0], :sv.shape[1]]
        excl |= (gy - y) ** 2 + (gx - x) ** 2 <= rr * rr
    k = max(1, int(round(sv.ppmm)))
    excl = ndi.maximum_filter(spot_keep, size=2 * k + 1) | excl
    ri = np.clip(((np.arange(fv.shape[0]) + 0.5) / fv.fy * sv.fy).astype(int), 0, sv.shape[0] - 1)
    ci = np.clip(((np.arange(fv.shape[1]) + 0.5) / fv.fx * sv.fx).astype(int), 0, sv.shape[1] - 1)
    excl_f = excl[np.ix_(ri, ci)]
    if lines.keep.any():
        kv = max(1, int(round(fv.ppmm)))
        excl_f |= ndi.maximum_filter(lines.keep, size=2 * kv + 1)
    out["pore_proxy"] = pore_proxy(fv, fv.mask & ~excl_f)
    out["pore_resolvable"] = resolvable
    out["ppmm_used"] = {"lines": fv.ppmm}
    if resolvable:
        pv = view_from_rgb(rgb, ppmm, PORE_MAX_PX_PER_MM, mask)
        blobs = find_pores(pv)
        y, x = pv.to_full(blobs[:, 0], blobs[:, 1])
        off = on_lines(fv, lines, y, x)
        blobs, y, x = blobs[~off], y[~off], x[~off]
        out["pores"] = np.column_stack([y, x])
        out["pore_diam_mm"] = blobs[:, 2] * FWHM / pv.ppmm
        out["pore_depth"] = blobs[:, 3]
        out["ppmm_used"]["pores"] = pv.ppmm
    else:
        out["pores"] = None
    y, x = sv.to_full(spots[:, 0], spots[:, 1])
    out["spots"] = np.column_stack([y, x])
    y, x = sv.to_full(red[:, 0], red[:, 1])
    out["red_blobs"] = np.column_stack([y, x])
    out["ppmm_used"]["spots"] = sv.ppmm
    return out


# --------------------------------------------------------------------------------------------
# views of a face (engine Context)


def _bbox(m: np.ndarray):
    rows = np.flatnonzero(m.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _work_view(ctx) -> View:
    """The engine's working image as a View (no copy, no resampling)."""
    if "fine_work_view" not in ctx.cache:
        ctx.cache["fine_work_view"] = View(
            L=ctx.L, a=ctx.a, b=ctx.b, ppmm=float(ctx.ppmm), mask=ctx.skin_filled,
            noise=float(ctx.noise_l), oy=float(ctx.box[0]), ox=float(ctx.box[1]),
            fy=float(ctx.sy), fx=float(ctx.sx))
    return ctx.cache["fine_work_view"]


def to_view(ctx, view: View, m_work: np.ndarray) -> np.ndarray:
    """A work-grid mask sampled (nearest) on ``view``'s grid."""
    h, w = view.shape
    yf, xf = view.to_full(np.arange(h), np.arange(w))
    ri = np.clip(np.rint((yf + 0.5 - ctx.box[0]) * ctx.sy - 0.5).astype(int), 0, m_work.shape[0] - 1)
    ci = np.clip(np.rint((xf + 0.5 - ctx.box[1]) * ctx.sx - 0.5).astype(int), 0, m_work.shape[1] - 1)
    return m_work[np.ix_(ri, ci)]


def _wb_gains(ctx):
    """The white-balance gains the engine applied to this image's working planes, if any."""
    wb = getattr(ctx, "wb", None) or {}
    if not wb.get("wb_applied"):
        return None
    return np.array([wb.get("wb_gain_r", 1.0), wb.get("wb_gain_g", 1.0), wb.get("wb_gain_b", 1.0)], np.float32)


#: A view of the original pixels is cut only when it is at least this much finer than the
#: working image; otherwise the working image is used as it is (saves a colour conversion).
VIEW_MIN_GAIN = 1.3


def ctx_view(ctx, key: str, region: np.ndarray, cap: float, pad_mm: float = 1.0) -> View | None:
    """A view of the original pixels over the bounding box of the work-grid mask ``region``
    (grown by ``pad_mm``), at min(source scale, ``cap``) px/mm; the working image itself when
    that is less than VIEW_MIN_GAIN times finer. ``mask`` = gap-closed skin, ``noise`` measured on strict skin.
    Cached per image under ``key``."""
    ck = ("fine_view", key, cap)
    if ck in ctx.cache:
        return ctx.cache[ck]
    bb = _bbox(region)
    if bb is None:
        ctx.cache[ck] = None
        return None
    i0, i1, j0, j1 = bb
    pad = int(math.ceil(pad_mm * ctx.ppmm))
    i0, j0 = max(0, i0 - pad), max(0, j0 - pad)
    i1, j1 = min(ctx.L.shape[0], i1 + pad), min(ctx.L.shape[1], j1 + pad)
    target = min(float(ctx.ppmm_full), cap)
    full = ctx.cache.get("full_rgb")
    if full is None or target < VIEW_MIN_GAIN * ctx.ppmm:
        v = View(L=ctx.L[i0:i1, j0:j1], a=ctx.a[i0:i1, j0:j1], b=ctx.b[i0:i1, j0:j1],
                 ppmm=float(ctx.ppmm), mask=ctx.skin_filled[i0:i1, j0:j1], noise=float(ctx.noise_l),
                 oy=ctx.box[0] + i0 / ctx.sy, ox=ctx.box[1] + j0 / ctx.sx, fy=float(ctx.sy),
                 fx=float(ctx.sx))
    else:
        H, W = full.shape[:2]
        y0 = max(0, int(math.floor(ctx.box[0] + i0 / ctx.sy)))
        y1 = min(H, int(math.ceil(ctx.box[0] + i1 / ctx.sy)))
        x0 = max(0, int(math.floor(ctx.box[1] + j0 / ctx.sx)))
        x1 = min(W, int(math.ceil(ctx.box[1] + j1 / ctx.sx)))
        f = min(1.0, cap / float(ctx.ppmm_full))
        small = _resample(np.ascontiguousarray(full[y0:y1, x0:x1, :3]), f)
        h, w = small.shape[:2]
        L, a, b = lab_from_rgb8(small, _wb_gains(ctx), need_ab=False)
        fy, fx = h / (y1 - y0), w / (x1 - x0)
        v = View(L=L, a=a, b=b, ppmm=float(ctx.ppmm_full) * fx, mask=np.ones((h, w), bool), noise=0.0,
                 oy=float(y0), ox=float(x0), fy=fy, fx=fx)
        v.mask = to_view(ctx, v, ctx.skin_filled)
        strict = to_view(ctx, v, ctx.skin)
        v.noise = noise_sigma(v.L, strict if strict.any() else None)
    ctx.cache[ck] = v
    return v


def mask_from_view(ctx, view: View, alpha: np.ndarray) -> Mask:
    """A detection map on ``view``'s grid (float 0..1 or bool) -> a cropped full-image Mask."""
    a = np.asarray(alpha)
    if a.dtype == bool:
        a8 = a.astype(np.uint8) * 255
    else:
        a8 = np.clip(np.rint(np.nan_to_num(a.astype(np.float32)) * 255.0), 0, 255).astype(np.uint8)
    H, W = ctx.shape
    bb = _bbox(a8 > 0)
    if bb is None:
        z = np.zeros((0, 0), np.uint8)
        z.setflags(write=False)
        return Mask(y0=int(view.oy), x0=int(view.ox), alpha=z)
    i0, i1, j0, j1 = bb
    sub = a8[i0:i1, j0:j1]
    y0 = max(0, int(math.floor(view.oy + i0 / view.fy)))
    x0 = max(0, int(math.floor(view.ox + j0 / view.fx)))
    y1 = min(H, int(math.ceil(view.oy + i1 / view.fy)))
    x1 = min(W, int(math.ceil(view.ox + j1 / view.fx)))
    if (y1 - y0, x1 - x0) != sub.shape:
        sub = np.asarray(Image.fromarray(sub).resize((x1 - x0, y1 - y0), Image.BILINEAR))
    sub = np.ascontiguousarray(sub)
    sub.setflags(write=False)
    return Mask(y0=y0, x0=x0, alpha=sub)


def _disc_mask(shape: tuple[int, int], ys, xs, rs) -> Mask:
    """Discs (full-image pixel centres and radii) as a cropped Mask."""
    ys, xs, rs = (np.asarray(v, float) for v in (ys, xs, rs))
    if ys.size == 0:
        z = np.zeros((0, 0), np.uint8)
        z.setflags(write=False)
        return Mask(y0=0, x0=0, alpha=z)
    H, W = shape
    rr = np.maximum(rs, 1.0)
    y0 = max(0, int(np.floor((ys - rr).min()))); y1 = min(H, int(np.ceil((ys + rr).max())) + 1)
    x0 = max(0, int(np.floor((xs - rr).min()))); x1 = min(W, int(np.ceil((xs + rr).max())) + 1)
    canvas = np.zeros((max(1, y1 - y0), max(1, x1 - x0)), np.uint8)
    for y, x, r in zip(ys - y0, xs - x0, rr):
        a0, a1 = max(0, int(y - r)), min(canvas.shape[0], int(y + r) + 2)
        b0, b1 = max(0, int(x - r)), min(canvas.shape[1], int(x + r) + 2)
        if a1 <= a0 or b1 <= b0:
            continue
        gy, gx = np.ogrid[a0:a1, b0:b1]
        canvas[a0:a1, b0:b1][(gy - y) ** 2 + (gx - x) ** 2 <= r * r] = 255
    canvas.setflags(write=False)
    return Mask(y0=y0, x0=x0, alpha=canvas)


def _merge_masks(shape, masks: list[Mask]) -> Mask:
    masks = [m for m in masks if m.alpha.size]
    if not masks:
        z = np.zeros((0, 0), np.uint8)
        z.setflags(write=False)
        return Mask(y0=0, x0=0, alpha=z)
    if len(masks) == 1:
        return masks[0]
    y0 = min(m.y0 for m in masks); x0 = min(m.x0 for m in masks)
    y1 = max(m.y0 + m.alpha.shape[0] for m in masks); x1 = max(m.x0 + m.alpha.shape[1] for m in masks)
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for m in masks:
        sl = canvas[m.y0 - y0:m.y0 - y0 + m.alpha.shape[0], m.x0 - x0:m.x0 - x0 + m.alpha.shape[1]]
        np.maximum(sl, m.alpha, out=sl)
    canvas.setflags(write=False)
    return Mask(y0=y0, x0=x0, alpha=canvas)


def _eroded(ctx, m: np.ndarray, mm: float, key) -> np.ndarray:
    """``m`` eroded by ``mm`` (a square of side 2 mm + 1 px; separable, fast), cached."""
    ck = ("fine_eroded", key, mm)
    if ck not in ctx.cache:
        n = max(1, int(round(mm * ctx.ppmm)))
        ctx.cache[ck] = ndi.minimum_filter(m.view(np.uint8) if m.dtype == bool else m.astype(np.uint8),
                                           size=2 * n + 1, mode="constant", cval=0).astype(bool)
    return ctx.cache[ck]


def _regions_of(concern: str) -> tuple[str, ...]:
    from skinlab.actions import CATALOGUE

    return CATALOGUE["hd_" + concern].regions


def _result(concern: str, scores, masks, meas, proxy: bool = False) -> ConcernMeasurement:
    return ConcernMeasurement(
        concern=concern, scores={k: float(min(100.0, max(1.0, v))) for k, v in scores.items()},
        skin_types={}, masks=masks, measurements={k: _finite(v) for k, v in meas.items()},
        method=FINE_METHODS[concern], proxy=proxy)


def _face_view(ctx) -> View | None:
    """The face view at <= WRINKLE_MAX_PX_PER_MM shared by wrinkles, texture and the pore proxy."""
    return ctx_view(ctx, "face", ctx.regions["face"], WRINKLE_MAX_PX_PER_MM)


def _face_lines(ctx):
    v = _face_view(ctx)
    if v is None:
        return None, None
    if "lines" not in v.cache:
        # away from hair, brows and frames (0.8 mm) and from the face's outline (2.5 mm), where
        # the jaw and cheek shading makes dark edges
        ok = _eroded(ctx, ctx.skin_filled, 0.8, "skin_filled")
        if "oval" in ctx.regions:
            ok = ok & _eroded(ctx, ctx.regions["oval"], 2.5, "oval")
        allowed = to_view(ctx, v, ok)
        find_lines(v, allowed)
    return v, v.cache["lines"]


# --------------------------------------------------------------------------------------------
# concerns

FINE_METHODS: dict[str, str] = {
    "wrinkle": "Dark-line Hessian (Sato) response of L* at 0.15-0.4 mm on a <= 6 px/mm face view, "
               "hysteresis, elongated components >= 2 mm; skeleton mm per cm2 and line depth per region.",
    "pore": "Dark round scale-space blobs (LoG of L*, 0.15-0.6 mm, depth and roundness filters) per "
            "region at >= 8 px/mm; below that not resolvable: a 0.25 mm dark-blob contrast proxy.",
    "texture": "Robust std of band-passed L* (0.25-1.5 mm difference of Gaussians) on cheek, forehead "
               "and chin skin, with the noise's share (Immerkaer estimate x filter gain) removed.",
    "age_spot": "Brown spots: dark round scale-space blobs of L* 1-8 mm across, >= max(6, 4 noise) "
                "below a 12 mm median background, browner (b* +1) and ringed by skin; area and count.",
    "acne": "Raised-redness blobs: scale-space blobs (1-5 mm) of a* above its 5 mm background, "
            ">= 4 a* high and round, on skin away from the lips; count and area.",
}


_WRINKLE_REGIONS = {"whole": "face", "forehead": "forehead", "glabellar": "glabellar",
                    "crowfeet": "crowfeet", "periocular": "periocular", "nasolabial": "nasolabial",
                    "marionette": "marionette"}
#: wrinkle index = length density (mm/cm2) x depth factor; score = decreasing(index, mid, scale)
WRINKLE_MID, WRINKLE_SCALE = 8.0, 3.0
WRINKLE_REF_DEPTH = 5.0


def wrinkle_index(density_mm_cm2: float, depth_l: float) -> float:
    """Length density weighted by depth: density x clip(depth / 5 L*, 0.5, 2)."""
    return density_mm_cm2 * min(2.0, max(0.5, depth_l / WRINKLE_REF_DEPTH)) if density_mm_cm2 > 0 else 0.0


def m_wrinkle(ctx) -> ConcernMeasurement:
    R = ctx.regions
    v, lines = _face_lines(ctx)
    scores, masks, meas = {}, {}, {}
    if v is not None:
        line_labels = ndi.label(lines.keep, np.ones((3, 3), bool))[0]
        alpha_all = np.where(lines.keep, np.clip(0.35 + lines.depth / 15.0, 0, 1), 0).astype(np.float32)
    for region in _regions_of("wrinkle"):
        name = _WRINKLE_REGIONS.get(region, region)
        if v is None or name not in R:
            scores[region] = decreasing(0.0, WRINKLE_MID, WRINKLE_SCALE)
            masks[region] = mask_from_view(ctx, _work_view(ctx), np.zeros_like(ctx.skin))
            meas.update({f"wrinkle_len_mm_per_cm2_{region}": 0.0, f"wrinkle_depth_l_star_{region}": 0.0,
                         f"wrinkle_count_{region}": 0.0, f"skin_area_cm2_{region}": 0.0})
            continue
        reg = to_view(ctx, v, R[name] & ctx.skin_filled)
        area = float(reg.sum()) / (v.ppmm * 10.0) ** 2
        on = lines.skeleton & reg
        length = float(lines.seg_length[on].sum()) / v.ppmm
        dens = length / area if area > 0.05 else 0.0
        depth = float(np.median(lines.depth[on])) if on.any() else 0.0
        n_lines = int(np.unique(line_labels[on]).size) if on.any() else 0
        x = wrinkle_index(dens, depth)
        scores[region] = decreasing(x, WRINKLE_MID, WRINKLE_SCALE)
        masks[region] = mask_from_view(ctx, v, np.where(reg, alpha_all, 0))
        meas[f"wrinkle_len_mm_per_cm2_{region}"] = dens
        meas[f"wrinkle_depth_l_star_{region}"] = depth
        meas[f"wrinkle_count_{region}"] = n_lines
        meas[f"skin_area_cm2_{region}"] = area
    meas["wrinkle_len_mm_per_cm2"] = meas["wrinkle_len_mm_per_cm2_whole"]
    if v is not None:
        meas["ridge_threshold_l_star"] = lines.hi / LINE_GAIN
        meas["working_px_per_mm"] = v.ppmm
        meas["fine_lines_resolvable"] = float(v.ppmm >= FINE_LINE_MIN_PX_PER_MM)
    return _result("wrinkle", scores, masks, meas)


_PORE_PARTS = {"forehead": ("forehead",), "nose": ("nose",), "cheek": ("cheek_l", "cheek_r")}
PORE_MID, PORE_SCALE = 30.0, 10.0                 # pores per cm2
PORE_PROXY_MID, PORE_PROXY_SCALE = 0.45, 0.12     # L*, dark-blob contrast


def _pore_part_mask(ctx, part: str) -> np.ndarray:
    R = ctx.regions
    if part in R:
        return R[part] & ctx.skin_filled
    side = part.rsplit("_", 1)[-1]                     # cheek_l / cheek_r without split regions
    m = R["cheek"] & ctx.skin_filled
    return m & ((ctx.X < 0) if side == "l" else (ctx.X >= 0))


def m_pore(ctx) -> ConcernMeasurement:
    resolvable = float(ctx.ppmm_full) >= PORE_MIN_PX_PER_MM
    regions = _regions_of("pore")
    scores, masks, meas = {}, {}, {}
    meas["pore_resolvable"] = float(resolvable)
    meas["pore_min_px_per_mm"] = PORE_MIN_PX_PER_MM
    meas["px_per_mm"] = float(ctx.ppmm_full)
    if resolvable:
        fv, lines = _face_lines(ctx)
        per: dict[str, tuple] = {}          # part -> (rows y, x, diameter mm, depth; area; Mask; view)
        for part in ("forehead", "nose", "cheek_l", "cheek_r"):
            m = _pore_part_mask(ctx, part)
            v = ctx_view(ctx, "pore_" + part, m, PORE_MAX_PX_PER_MM, pad_mm=0.5)
            if v is None:
                per[part] = (np.zeros((0, 4)), 0.0, _disc_mask(ctx.shape, [], [], []), v)
                continue
            reg = to_view(ctx, v, m)
            blobs = find_pores(v, reg)
            y, x = v.to_full(blobs[:, 0], blobs[:, 1])
            if lines is not None:
                off = on_lines(fv, lines, y, x)
                blobs, y, x = blobs[~off], y[~off], x[~off]
            area = float(reg.sum()) / (v.ppmm * 10.0) ** 2
            rad_full = blobs[:, 2] * math.sqrt(2) / v.fx
            per[part] = (np.column_stack([y, x, blobs[:, 2] * FWHM / v.ppmm, blobs[:, 3]]), area,
                         _disc_mask(ctx.shape, y, x, rad_full), v)
        groups = {r: _PORE_PARTS.get(r, ("forehead", "nose", "cheek_l", "cheek_r")) for r in regions}
        for region, parts in groups.items():
            rows = np.concatenate([per[p][0] for p in parts]) if parts else np.zeros((0, 4))
            area = sum(per[p][1] for p in parts)
            if len(parts) > 1:
                # parts may touch: a pore seen by two part views counts once, and the area is
                # the union's
                if len(rows):
                    _, first = np.unique(np.rint(rows[:, :2]).astype(np.int64), axis=0, return_index=True)
                    rows = rows[np.sort(first)]
                union = np.zeros_like(ctx.skin)
                for p in parts:
                    union |= _pore_part_mask(ctx, p)
                area = min(area, float(union.sum()) / (ctx.ppmm * 10.0) ** 2)
            n = len(rows)
            dens = n / area if area > 0.05 else 0.0
            scores[region] = decreasing(dens, PORE_MID, PORE_SCALE)
            masks[region] = _merge_masks(ctx.shape, [per[p][2] for p in parts])
            meas[f"pore_count_{region}"] = n
            meas[f"pore_density_per_cm2_{region}"] = dens
            meas[f"pore_mean_diameter_mm_{region}"] = float(rows[:, 2].mean()) if n else 0.0
            meas[f"pore_mean_depth_l_star_{region}"] = float(rows[:, 3].mean()) if n else 0.0
            meas[f"skin_area_cm2_{region}"] = area
        return _result("pore", scores, masks, meas, proxy=False)
    # not resolvable: no count; the documented coarser-scale proxy, labelled as such
    v, lines = _face_lines(ctx)
    r, s, nz = pore_proxy_map(v) if v is not None else (None, 1.0, 0.0)
    excl = _proxy_exclusions(ctx, v, lines) if v is not None else None
    for region in regions:
        parts = _PORE_PARTS.get(region, ("forehead", "nose", "cheek_l", "cheek_r"))
        m = np.zeros_like(ctx.skin)
        for p in parts:
            m |= _pore_part_mask(ctx, p)
        if v is None:
            x, alpha_mask = 0.0, mask_from_view(ctx, _work_view(ctx), np.zeros_like(ctx.skin))
        else:
            reg = to_view(ctx, v, m) & ~excl
            x = pore_proxy(v, reg)
            alpha_mask = mask_from_view(ctx, v, np.where(reg, np.clip((r - 3 * nz) / (6 * nz + 1e-6), 0, 1), 0))
        scores[region] = decreasing(x, PORE_PROXY_MID, PORE_PROXY_SCALE)
        masks[region] = alpha_mask
        meas[f"pore_proxy_dark_blob_contrast_l_star_{region}"] = x
    if v is not None:
        meas["pore_proxy_scale_mm"] = s / v.ppmm
        meas["working_px_per_mm"] = v.ppmm
    return _result("pore", scores, masks, meas, proxy=True)


TEXTURE_MID, TEXTURE_SCALE = 1.6, 0.45


def m_texture(ctx) -> ConcernMeasurement:
    R = ctx.regions
    v = _face_view(ctx)
    area_w = ctx.skin & (R["cheek"] | R["forehead"] | R["chin"])
    if area_w.sum() < 20:
        area_w = ctx.skin
    er = area_w & _eroded(ctx, ctx.skin_filled, 1.0, "skin_filled")
    if er.sum() > 20:
        area_w = er
    if v is None:
        v = _work_view(ctx)
    reg = to_view(ctx, v, area_w)
    t = texture_index(v, reg)
    raw = decreasing(t["texture"], TEXTURE_MID, TEXTURE_SCALE)
    alpha = np.where(reg, np.clip((np.abs(t["bandpass"]) - 1.0) / 4.0, 0, 1), 0)
    meas = {"bandpass_l_star_std": t["rough"], "noise_l_star": v.noise, "noise_in_band_l_star": t["noise_band"],
            "roughness_l_star": t["texture"], "texture_snr": min(t["snr"], 1e3), "working_px_per_mm": v.ppmm}
    return _result("texture", {"whole": raw}, {"whole": mask_from_view(ctx, v, alpha)}, meas)


AGE_SPOT_MID, AGE_SPOT_SCALE = 3.0, 1.2


def _ctx_spots(ctx):
    """Age-spot detections on the working image (cached): (area, keep, dark, thr, rows)."""
    if "fine_spots" not in ctx.cache:
        v = _work_view(ctx)
        area = ctx.skin_filled & ~ctx.regions["nose"]
        where = area & _eroded(ctx, ctx.skin_filled, 1.0, "skin_filled")
        ctx.cache["fine_spots"] = (area,) + tuple(find_spots(v, where, support=ctx.skin))
    return ctx.cache["fine_spots"]


def _ctx_red(ctx):
    """Acne detections on the working image (cached): (area, blob rows, lesion map 0..1)."""
    if "fine_red" not in ctx.cache:
        v = _work_view(ctx)
        area = ctx.skin_filled & ~ctx.regions["mouth_ring"]
        where = area & _eroded(ctx, ctx.skin_filled, 1.0, "skin_filled")
        blobs = find_red_blobs(v, where, support=ctx.skin)
        canvas = np.zeros(v.shape, np.float32)
        for y, x, s, da, _ in blobs:
            r = s * math.sqrt(2)
            i0, i1 = max(0, int(y - r)), min(canvas.shape[0], int(y + r) + 2)
            j0, j1 = max(0, int(x - r)), min(canvas.shape[1], int(x + r) + 2)
            gy, gx = np.ogrid[i0:i1, j0:j1]
            disc = (gy - y) ** 2 + (gx - x) ** 2 <= r * r
            sub = canvas[i0:i1, j0:j1]
            sub[disc] = np.maximum(sub[disc], min(1.0, 0.4 + (da - ACNE_MIN_DA) / 8.0))
        canvas *= area
        ctx.cache["fine_red"] = (area, blobs, canvas)
    return ctx.cache["fine_red"]


def _proxy_exclusions(ctx, v: View, lines) -> np.ndarray:
    """View-grid pixels the pore proxy leaves out: detected wrinkle lines, age spots and acne
    lesions, grown by 1 mm (their edges are dark-blob-like at the proxy scale)."""
    _, keep_s, _, _, _ = _ctx_spots(ctx)
    _, _, red = _ctx_red(ctx)
    k = max(1, int(round(1.0 * ctx.ppmm)))
    big = ndi.maximum_filter(keep_s | (red > 0), size=2 * k + 1)
    out = to_view(ctx, v, big)
    if lines is not None and lines.keep.any():
        kv = max(1, int(round(1.0 * v.ppmm)))
        out |= ndi.maximum_filter(lines.keep, size=2 * kv + 1)
    return out


def m_age_spot(ctx) -> ConcernMeasurement:
    v = _work_view(ctx)
    area, keep, dark, thr, rows = _ctx_spots(ctx)
    n = len(rows)
    a_cm2 = float(area.sum()) / (v.ppmm * 10.0) ** 2
    frac = 100.0 * float(keep.sum()) / max(1, int(area.sum()))
    per10 = 10.0 * n / a_cm2 if a_cm2 > 0 else 0.0
    x = frac + 0.3 * per10
    raw = decreasing(x, AGE_SPOT_MID, AGE_SPOT_SCALE)
    alpha = np.where(keep, np.clip(0.4 + (dark - thr) / 15.0, 0, 1), 0)
    meas = {"spot_count": n, "spot_area_fraction_pct": frac, "spots_per_10cm2": per10,
            "spot_threshold_l_star": thr,
            "spot_mean_diameter_mm": float(rows[:, 2].mean()) if n else 0.0,
            "spot_mean_darkness_l_star": float(rows[:, 3].mean()) if n else 0.0}
    return _result("age_spot", {"whole": raw}, {"whole": mask_from_view(ctx, v, alpha)}, meas)


ACNE_MID, ACNE_SCALE = 10.0, 4.0
#: a lesion counts fully in the score once its Δa* is this far above ACNE_MIN_DA
ACNE_SOFT_DA = 4.0


def m_acne(ctx) -> ConcernMeasurement:
    v = _work_view(ctx)
    area, blobs, canvas = _ctx_red(ctx)
    n = len(blobs)
    a_cm2 = float(area.sum()) / (v.ppmm * 10.0) ** 2
    frac = 100.0 * float((canvas > 0).sum()) / max(1, int(area.sum()))
    # the score weighs each lesion by how clearly it clears the detection threshold, so that a
    # blob just at the threshold (which a small change of exposure or compression can tip either
    # way) moves the score a little, not by a whole lesion
    w = np.clip((blobs[:, 3] - ACNE_MIN_DA) / ACNE_SOFT_DA, 0.0, 1.0) if n else np.zeros(0)
    weighted = float(w.sum())
    x = weighted + 2.0 * frac * (float(w.mean()) if n else 0.0)
    raw = decreasing(x, ACNE_MID, ACNE_SCALE)
    meas = {"lesion_count": n, "lesion_area_fraction_pct": frac,
            "lesions_per_10cm2": 10.0 * n / a_cm2 if a_cm2 > 0 else 0.0,
            "lesion_mean_delta_a_star": float(blobs[:, 3].mean()) if n else 0.0,
            "lesion_weighted_count": weighted}
    return _result("acne", {"whole": raw}, {"whole": mask_from_view(ctx, v, canvas)}, meas)


FINE_FUNCS = {"wrinkle": m_wrinkle, "pore": m_pore, "texture": m_texture, "age_spot": m_age_spot,
              "acne": m_acne}
