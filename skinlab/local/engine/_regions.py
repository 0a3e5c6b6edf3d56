"""Skin regions from the 478 MediaPipe face-mesh landmarks.

Index sets follow MediaPipe's canonical face mesh (the ``mesh_annotations`` groups of the
face-mesh model: silhouette, eye lower rings 0-3, eyebrows, lips) and were checked on overlays
of both bundled portraits (``test-artifacts/landmarks/``). Suffix ``_l`` = image left = the
subject's right side; ``_r`` = image right.

Every region is a boolean mask of the working image; :func:`build_landmark_regions` returns the
same keys as the geometric (fallback) construction in ``_context`` plus ``iris_*``,
``sclera_*``, ``lips`` and ``glabella`` (an alias of ``glabellar``).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull

FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
             152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
#: eye contour (lower lid outer -> inner canthus, then upper lid back)
EYE = {"l": [33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246],
       "r": [263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466]}
UPPER_LID = {"l": [33, 246, 161, 160, 159, 158, 157, 173, 133],
             "r": [263, 466, 388, 387, 386, 385, 384, 398, 362]}
LOWER_LID = {"l": [33, 7, 163, 144, 145, 153, 154, 155, 133],
             "r": [263, 249, 390, 373, 374, 380, 381, 382, 362]}
LOWER_RING2 = {"l": [226, 31, 228, 229, 230, 231, 232, 233, 244],
               "r": [446, 261, 448, 449, 450, 451, 452, 453, 464]}
LOWER_RING3 = {"l": [143, 111, 117, 118, 119, 120, 121, 128, 245],
               "r": [372, 340, 346, 347, 348, 349, 350, 357, 465]}
OUTER_CANTHUS = {"l": 33, "r": 263}
INNER_CANTHUS = {"l": 133, "r": 362}
TEMPLE = {"l": 127, "r": 356}
#: iris centre, then the ring (first/third horizontal, second/fourth vertical)
IRIS = {"l": [468, 469, 470, 471, 472], "r": [473, 474, 475, 476, 477]}
BROW = {"l": [70, 63, 105, 66, 107, 55, 65, 52, 53, 46],
        "r": [300, 293, 334, 296, 336, 285, 295, 282, 283, 276]}
BROW_TOP = {"l": [70, 63, 105, 66, 107], "r": [300, 293, 334, 296, 336]}
BROW_PEAK = {"l": 105, "r": 334}
LIPS = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185]
MOUTH_CORNER = {"l": 61, "r": 291}
NOSE = [168, 6, 197, 195, 5, 4, 1, 19, 94, 2, 98, 327, 64, 294, 48, 278, 115, 344, 220, 440]
#: malar cheek (below the eye's ring 3) down to the mouth-corner level, lateral to the nose
CHEEK = {"l": [116, 117, 118, 119, 100, 142, 203, 206, 207, 187, 123, 50, 36, 205, 213, 192, 212],
         "r": [345, 346, 347, 348, 329, 371, 423, 426, 427, 411, 352, 280, 266, 425, 433, 416, 432]}
CHIN = [18, 200, 199, 175, 152, 148, 176, 377, 400, 83, 313, 201, 421, 208, 428]
GLABELLA = [9, 8, 107, 55, 336, 285, 193, 417, 168]
FOREHEAD_TOP = [54, 103, 67, 109, 10, 338, 297, 332, 284]
#: alar crease -> lateral of the mouth corner
NASOLABIAL = {"l": [129, 203, 206, 216, 57], "r": [358, 423, 426, 436, 287]}
#: mouth corner -> jaw line
MARIONETTE = {"l": [57, 202, 210, 169], "r": [287, 422, 430, 394]}
JOWL = {"l": [58, 172, 136, 150, 169, 210, 214, 135, 138],
        "r": [288, 397, 365, 379, 394, 430, 434, 364, 367]}
#: inner canthus, downwards and outwards along the infraorbital groove
TEAR_TROUGH = {"l": [243, 233, 121, 120], "r": [463, 453, 350, 349]}

#: Horizontal visible iris diameter of adults, mm (Rüfer, Schröder & Erb 2005, Cornea 24:259).
IRIS_DIAMETER_MM = 11.7


def iris_diameters(P: np.ndarray) -> dict[str, float]:
    """Horizontal iris diameter (469-471, 474-476) per eye, in the units of ``P``."""
    return {s: float(np.hypot(*(P[IRIS[s][1], :2] - P[IRIS[s][3], :2]))) for s in ("l", "r")}


# ---------------------------------------------------------------------------------------------
# rasterising


class Raster:
    """Draws landmark shapes into boolean masks of a (H, W) grid; coordinates are (x, y)."""

    def __init__(self, shape: tuple[int, int], P: np.ndarray, px_per_mm: float):
        self.shape = (int(shape[0]), int(shape[1]))
        self.P = np.asarray(P, float)[:, :2]
        self.ppmm = float(px_per_mm)

    def pts(self, idx) -> np.ndarray:
        return self.P[list(idx)]

    def polygon(self, xy: np.ndarray) -> np.ndarray:
        img = Image.new("1", (self.shape[1], self.shape[0]), 0)
        xy = np.asarray(xy, float)
        if len(xy) >= 3:
            ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in xy], fill=1, outline=1)
        return np.asarray(img, bool)

    def poly(self, idx) -> np.ndarray:
        return self.polygon(self.pts(idx))

    def hull(self, idx) -> np.ndarray:
        xy = self.pts(idx)
        try:
            v = ConvexHull(xy).vertices
        except Exception:     # degenerate (collinear) points
            return np.zeros(self.shape, bool)
        return self.polygon(xy[v])

    def band(self, xy: np.ndarray, half_mm: float) -> np.ndarray:
        """Points within ``half_mm`` of the polyline ``xy``."""
        w = max(1.0, 2 * half_mm * self.ppmm)
        img = Image.new("1", (self.shape[1], self.shape[0]), 0)
        d = ImageDraw.Draw(img)
        xy = [(float(x), float(y)) for x, y in np.asarray(xy, float)]
        d.line(xy, fill=1, width=int(round(w)), joint="curve")
        r = w / 2
        for x, y in (xy[0], xy[-1]):
            d.ellipse([x - r, y - r, x + r, y + r], fill=1)
        return np.asarray(img, bool)

    def disk(self, x: float, y: float, r: float) -> np.ndarray:
        img = Image.new("1", (self.shape[1], self.shape[0]), 0)
        ImageDraw.Draw(img).ellipse([x - r, y - r, x + r, y + r], fill=1)
        return np.asarray(img, bool)

    def dilate(self, m: np.ndarray, mm: float) -> np.ndarray:
        return dilate(m, mm * self.ppmm)

    def erode(self, m: np.ndarray, mm: float) -> np.ndarray:
        return erode(m, mm * self.ppmm)


def dilate(m: np.ndarray, r: float) -> np.ndarray:
    """Euclidean dilation by ``r`` pixels, computed on the mask's bounding box."""
    if r <= 0 or not m.any():
        return m.copy()
    rows = np.flatnonzero(m.any(1)); cols = np.flatnonzero(m.any(0))
    pad = int(math.ceil(r)) + 1
    i0, i1 = max(0, rows[0] - pad), min(m.shape[0], rows[-1] + pad + 1)
    j0, j1 = max(0, cols[0] - pad), min(m.shape[1], cols[-1] + pad + 1)
    sub = m[i0:i1, j0:j1]
    out = np.zeros_like(m)
    out[i0:i1, j0:j1] = ndi.distance_transform_edt(~sub) <= r
    return out


def erode(m: np.ndarray, r: float) -> np.ndarray:
    """Euclidean erosion by ``r`` pixels (the image border counts as outside)."""
    if r <= 0 or not m.any():
        return m.copy()
    rows = np.flatnonzero(m.any(1)); cols = np.flatnonzero(m.any(0))
    i0, i1, j0, j1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    sub = np.pad(m[i0:i1, j0:j1], 1)
    out = np.zeros_like(m)
    out[i0:i1, j0:j1] = (ndi.distance_transform_edt(sub) > r)[1:-1, 1:-1]
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.hypot(*v))
    return v / n if n > 0 else np.array([1.0, 0.0])


def build_landmark_regions(shape: tuple[int, int], P: np.ndarray, px_per_mm: float,
                           ipd_px: float) -> dict[str, np.ndarray]:
    """All regions (work-image masks) from landmarks ``P`` (478 x >=2, work pixels)."""
    rs = Raster(shape, P, px_per_mm)
    R: dict[str, np.ndarray] = {}
    R["oval"] = rs.poly(FACE_OVAL)
    lips = rs.poly(LIPS)
    R["lips"] = lips
    R["mouth"] = rs.dilate(lips, 1.5)
    R["mouth_ring"] = rs.dilate(lips, 5.0)
    for s in ("l", "r"):
        eye = rs.poly(EYE[s])
        R[f"eye_{s}"] = eye
        R[f"eye_dil_{s}"] = rs.dilate(eye, 2.0)          # lashes and lid margin
        R[f"brow_{s}"] = rs.dilate(rs.poly(BROW[s]), 1.5)
        c = P[IRIS[s][0], :2]
        r_iris = 0.5 * np.hypot(*(P[IRIS[s][1], :2] - P[IRIS[s][3], :2]))
        R[f"iris_{s}"] = rs.disk(c[0], c[1], r_iris) & eye
        # white of the eye: outside the iris, away from the canthi (caruncle, lid corners)
        R[f"sclera_{s}"] = (rs.erode(eye, 0.8) & ~rs.disk(c[0], c[1], 1.3 * r_iris)
                            & rs.disk(c[0], c[1], 2.1 * r_iris))
    features = R["eye_dil_l"] | R["eye_dil_r"] | R["brow_l"] | R["brow_r"] | R["mouth"]
    R["features"] = features
    for s in ("l", "r"):
        lid = rs.pts(LOWER_LID[s])
        lower = rs.polygon(np.vstack([lid, rs.pts(LOWER_RING3[s])[::-1]]))   # lid to ring 3, ~9 mm
        # infraorbital skin: clear of the lash line and its shadow (2.5 mm)
        R[f"under_eye_{s}"] = lower & ~rs.dilate(R[f"eye_{s}"], 2.5)
        R[f"eye_bag_{s}"] = lower
        R[f"nasolabial_{s}"] = rs.band(rs.pts(NASOLABIAL[s]), 3.5)
        R[f"marionette_{s}"] = rs.band(rs.pts(MARIONETTE[s]), 3.5)
        cheek = rs.hull(CHEEK[s]) & ~R[f"nasolabial_{s}"] & ~R[f"marionette_{s}"]
        R[f"cheek_{s}"] = cheek
        R[f"cheek_ref_{s}"] = rs.erode(cheek, 2.0) & ~rs.dilate(R[f"nasolabial_{s}"], 2.0)
        # clear of the face outline, where the jaw turns away from the light
        R[f"jowl_{s}"] = rs.hull(JOWL[s]) & ~R[f"marionette_{s}"] & rs.erode(R["oval"], 5.0)
        R[f"tear_trough_{s}"] = rs.band(rs.pts(TEAR_TROUGH[s]), 2.5)
        # crow's feet: a quad lateral to the outer canthus, towards the temple
        o = P[OUTER_CANTHUS[s], :2]
        u = _unit(P[TEMPLE[s], :2] - o)
        u = _unit(u + np.array([0.0, 0.25]))      # the temple point sits high: level the axis
        v = np.array([-u[1], u[0]])
        a0, a1, h = 0.06 * ipd_px, 0.45 * ipd_px, 0.22 * ipd_px
        quad = np.array([o + a0 * u - h * v, o + a1 * u - h * v, o + a1 * u + h * v, o + a0 * u + h * v])
        R[f"crowfeet_{s}"] = rs.polygon(quad)
        ring = rs.dilate(R[f"eye_{s}"], 8.0)
        R[f"periocular_{s}"] = ring & ~R[f"eye_dil_{s}"] & ~R[f"brow_{s}"]
    R["nose"] = rs.hull(NOSE)
    R["glabellar"] = rs.hull(GLABELLA)
    R["forehead"] = (rs.hull(FOREHEAD_TOP + BROW_TOP["l"] + BROW_TOP["r"]) & ~R["glabellar"]
                     & ~rs.dilate(R["brow_l"] | R["brow_r"], 1.0))
    R["chin"] = rs.hull(CHIN) & ~R["mouth"]
    # every skin region: inside the oval, outside eyes, brows and mouth
    for k in list(R):
        if k in ("oval", "features", "mouth", "mouth_ring", "lips") or k.startswith(("eye_", "brow_", "iris_", "sclera_")):
            continue
        R[k] = R[k] & R["oval"] & ~features
    for name in ("under_eye", "eye_bag", "cheek_ref", "crowfeet", "periocular", "nasolabial",
                 "marionette", "cheek", "tear_trough", "jowl"):
        R[name] = R[f"{name}_l"] | R[f"{name}_r"]
    R["glabella"] = R["glabellar"]
    R["t_zone"] = R["forehead"] | R["glabellar"] | R["nose"]
    R["u_zone"] = R["cheek"] | R["chin"]
    R["face"] = R["oval"] & ~features
    return R
