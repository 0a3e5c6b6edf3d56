"""Per-image working context: the face crop at a capped working scale, CIELAB planes, the
eye positions, a face coordinate frame, the regions and the skin gate.

With landmarks (``face.landmarks`` set): the physical scale comes from the iris (11.7 mm
visible iris diameter), colour is white-balanced on the sclera (:mod:`._color`) and the regions
are landmark polygons (:mod:`._regions`). Without (cascade fallback): the scale comes from a
population-mean eye distance, colour is uncorrected, and the regions are geometric shapes in
the face frame.

Face frame: origin at the midpoint of the two eye centres (iris centres with landmarks), X
along the eye line towards image right, Y perpendicular pointing down (towards the chin),
unit = the distance between the eye centres (IPD).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from ._color import lin_to_lab, sclera_white_balance
from ._detect import srgb_to_linear
from ._types import Face, Mask

#: Average adult face (bizygomatic) width used with the detector box when the eyes are not found.
FACE_WIDTH_MM = 140.0
#: Average adult interpupillary distance (Dodgson 2004: mean ~63 mm).
IPD_MM = 63.0
#: Cap on the working resolution of the general measurements, pixels per millimetre.
WORK_PX_PER_MM = 3.5
#: Default eye centres in detector-box units (u across, v down), used when refinement fails.
DEFAULT_EYES = ((0.29, 0.35), (0.71, 0.35))



def rgb_to_lab(rgb01: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float32 sRGB in [0,1] (HxWx3) -> (L*, a*, b*, linear RGB), D65, float32."""
    lin = srgb_to_linear(rgb01)
    L, a, b = lin_to_lab(lin)
    return L, a, b, lin


def smooth(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (std ``sigma`` px, edges replicated); large sigmas run on a block-averaged
    copy and are interpolated back (sigma >= 6 px; error below ~0.3 L* on face images)."""
    sigma = float(sigma)
    k = int(sigma // 3) if sigma >= 6 else 1
    if k <= 1:
        return ndi.gaussian_filter(img, sigma, mode="nearest")
    h, w = img.shape
    hp, wp = -(-h // k) * k, -(-w // k) * k
    pad = np.pad(img, ((0, hp - h), (0, wp - w)), mode="edge")
    small = pad.reshape(hp // k, k, wp // k, k).mean(axis=(1, 3))
    small = ndi.gaussian_filter(small, math.sqrt(max(sigma ** 2 / k ** 2 - 1 / 12, 0.25)), mode="nearest")
    # an exact k-times bilinear upscale keeps block centres aligned ((x + 0.5) / k - 0.5)
    up = Image.fromarray(small.astype(np.float32)).resize((wp, hp), Image.BILINEAR)
    return np.asarray(up, dtype=np.float32)[:h, :w]


def robust_std(x: np.ndarray) -> float:
    if x.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def noise_sigma(img: np.ndarray, where: np.ndarray | None = None) -> float:
    """Immerkaer-style noise estimate: robust std of the 3x3 second-difference operator
    response divided by 6 (its gain for white noise)."""
    k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    r = ndi.convolve(img, k, mode="reflect")
    v = r[where] if where is not None else r.ravel()
    if v.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(v)) / 6.0)


@dataclass
class Context:
    face: Face
    shape: tuple[int, int]               # full image (H, W)
    box: tuple[int, int, int, int]       # work crop in full-res pixels: y0, x0, y1, x1
    sy: float                            # work pixels per full-res pixel (rows)
    sx: float
    rgb: np.ndarray                      # work crop, float32 [0, 1]
    L: np.ndarray
    a: np.ndarray
    b: np.ndarray
    lin: np.ndarray
    eyes: tuple[tuple[float, float], tuple[float, float]]   # work (x, y) of image-left, image-right eye
    eyes_refined: bool
    ipd: float                           # work pixels
    roll_deg: float
    ppmm: float                          # work pixels per mm
    ppmm_full: float                     # full-res pixels per mm
    scale_source: str
    X: np.ndarray = field(repr=False, default=None)
    Y: np.ndarray = field(repr=False, default=None)
    regions: dict = field(repr=False, default_factory=dict)
    skin: np.ndarray = field(repr=False, default=None)
    skin_filled: np.ndarray = field(repr=False, default=None)
    loose_skin: np.ndarray = field(repr=False, default=None)
    ref: dict = field(default_factory=dict)
    noise_l: float = 0.0
    #: "landmarks" or "cascade"
    backend: str = "cascade"
    #: (478, 2) landmark x, y in work pixels; None in the cascade fallback
    landmarks: np.ndarray | None = field(repr=False, default=None)
    pose: dict | None = None
    blendshapes: dict | None = field(repr=False, default=None)
    #: horizontal iris diameters in full-res pixels, per side ("l" = image left)
    iris_px: dict | None = None
    #: white balance report (gains, sclera colour before correction); {} when not applied
    wb: dict = field(default_factory=dict)
    #: uncorrected (L*, a*, b*) when white balance changed the colour, else the same planes
    raw_lab: tuple | None = field(repr=False, default=None)
    cache: dict = field(repr=False, default_factory=dict)
    lock: threading.RLock = field(repr=False, default_factory=threading.RLock)

    # -- helpers ---------------------------------------------------------------------------
    def mm(self, v: float) -> float:
        """Millimetres -> work pixels."""
        return v * self.ppmm

    def area_cm2(self, m: np.ndarray) -> float:
        return float(m.sum()) / (self.ppmm * 10.0) ** 2

    def full_res_pixel(self, y: float, x: float) -> tuple[float, float]:
        return self.box[0] + (y + 0.5) / self.sy - 0.5, self.box[1] + (x + 0.5) / self.sx - 0.5

    def to_mask(self, alpha: np.ndarray) -> Mask:
        """Work-scale detection map (float in [0, 1] or bool) -> a cropped full-res Mask."""
        a = np.asarray(alpha)
        if a.dtype == bool:
            a8 = a.astype(np.uint8) * 255
        elif a.dtype == np.uint8:
            a8 = a
        else:
            a8 = np.clip(np.rint(np.nan_to_num(a) * 255.0), 0, 255).astype(np.uint8)
        rows = np.flatnonzero(a8.any(axis=1))
        if rows.size == 0:
            return _empty_mask(self.box[0], self.box[1])
        cols = np.flatnonzero(a8.any(axis=0))
        i0, i1 = int(rows[0]), int(rows[-1]) + 1
        j0, j1 = int(cols[0]), int(cols[-1]) + 1
        sub = a8[i0:i1, j0:j1]
        H, W = self.shape
        y0 = self.box[0] + int(math.floor(i0 / self.sy))
        x0 = self.box[1] + int(math.floor(j0 / self.sx))
        y1 = min(H, self.box[0] + int(math.ceil(i1 / self.sy)))
        x1 = min(W, self.box[1] + int(math.ceil(j1 / self.sx)))
        if (y1 - y0, x1 - x0) != sub.shape:
            sub = np.asarray(Image.fromarray(sub).resize((x1 - x0, y1 - y0), Image.BILINEAR))
        sub = np.ascontiguousarray(sub)
        sub.setflags(write=False)
        return Mask(y0=y0, x0=x0, alpha=sub)


def _empty_mask(y0: int, x0: int) -> Mask:
    a = np.zeros((0, 0), np.uint8)
    a.setflags(write=False)
    return Mask(y0=y0, x0=x0, alpha=a)


def _refine_eyes(L: np.ndarray, fx: tuple[float, float, float, float]):
    """Darkest round blob (scale-normalised LoG at the iris scale) in each upper quadrant of
    the detector box, weighted by a Gaussian prior around the default position.
    ``fx`` = (top, left, width, height) of the detector box in work pixels."""
    top, left, w, h = fx
    y0 = int(max(0, top + 0.15 * h)); y1 = int(min(L.shape[0], top + 0.56 * h))
    x0 = int(max(0, left)); x1 = int(min(L.shape[1], left + w))
    if y1 - y0 < 8 or x1 - x0 < 16:
        return None
    sig = max(1.0, 0.03 * w)
    # the search runs on a copy at most ~160 px across the box (the blob is large)
    step = max(1, int(w // 160))
    sub = L[y0:y1:step, x0:x1:step]
    resp = (sig / step) ** 2 * ndi.gaussian_laplace(sub, sig / step)
    yy, xx = np.mgrid[0:sub.shape[0], 0:sub.shape[1]]
    u = (xx * step + x0 - left) / w
    v = (yy * step + y0 - top) / h
    out = []
    for (ua, ub), (u0, v0) in zip(((0.06, 0.48), (0.52, 0.94)), DEFAULT_EYES):
        prior = ((u - u0) / 0.08) ** 2 + ((v - v0) / 0.07) ** 2
        win = (u > ua) & (u < ub) & (v > 0.18) & (v < 0.54)
        score = np.where(win, resp - prior, -np.inf)
        k = int(np.argmax(score))
        iy, ix = np.unravel_index(k, score.shape)
        out.append((float(ix * step + x0), float(iy * step + y0), float(resp[iy, ix])))
    (xa, ya, ra), (xb, yb, rb) = out
    d = math.hypot(xb - xa, yb - ya)
    ok = (ra > 2.0 and rb > 2.0 and 0.30 * w <= d <= 0.56 * w and abs(yb - ya) <= 0.12 * w)
    return ((xa, ya), (xb, yb)) if ok else None


def build_context(rgb: np.ndarray, face: Face) -> Context:
    """The working context of ``face`` in ``rgb`` (landmark construction when the face has
    landmarks, else the geometric fallback)."""
    if getattr(face, "landmarks", None) is not None:
        return _build_landmark_context(rgb, face)
    return _build_cascade_context(rgb, face)


#: Crop margins around the landmark mesh box: above (hairline), below, either side; fractions
#: of the box height / width.
CROP_MARGINS = (0.15, 0.05, 0.08)


def _build_landmark_context(rgb: np.ndarray, face: Face) -> Context:
    from ._regions import IRIS_DIAMETER_MM, build_landmark_regions, iris_diameters

    H, W = rgb.shape[:2]
    P = np.asarray(face.landmarks, np.float64)
    mt, mb = P[:468, 1].min(), P[:468, 1].max()
    ml, mr = P[:468, 0].min(), P[:468, 0].max()
    fh, fw = mb - mt, mr - ml
    y0 = max(0, int(math.floor(mt - CROP_MARGINS[0] * fh)))
    y1 = min(H, int(math.ceil(mb + CROP_MARGINS[1] * fh)))
    x0 = max(0, int(math.floor(ml - CROP_MARGINS[2] * fw)))
    x1 = min(W, int(math.ceil(mr + CROP_MARGINS[2] * fw)))
    crop = rgb[y0:y1, x0:x1]
    iris = iris_diameters(P)
    ppmm_full = float(np.mean(list(iris.values()))) / IRIS_DIAMETER_MM
    s = min(1.0, WORK_PX_PER_MM / ppmm_full)
    ch, cw = crop.shape[:2]
    if s < 1.0:
        size = (max(1, round(cw * s)), max(1, round(ch * s)))
        crop = np.asarray(Image.fromarray(crop).resize(size, Image.BILINEAR))
    hw, ww = crop.shape[:2]
    sy, sx = hw / ch, ww / cw
    # full-res (x, y) -> work: inverse of Context.full_res_pixel
    Q = np.empty((P.shape[0], 2))
    Q[:, 0] = (P[:, 0] - x0 + 0.5) * sx - 0.5
    Q[:, 1] = (P[:, 1] - y0 + 0.5) * sy - 0.5
    rgb01 = crop.astype(np.float32) / 255.0
    lin = srgb_to_linear(rgb01)
    L, a, b = lin_to_lab(lin)
    eyes = ((float(Q[468, 0]), float(Q[468, 1])), (float(Q[473, 0]), float(Q[473, 1])))
    (xa, ya), (xb, yb) = eyes
    ipd = math.hypot(xb - xa, yb - ya)
    ppmm = ppmm_full * sx
    ctx = Context(face=face, shape=(H, W), box=(y0, x0, y1, x1), sy=sy, sx=sx, rgb=rgb01,
                  L=L, a=a, b=b, lin=lin, eyes=eyes, eyes_refined=True, ipd=ipd,
                  roll_deg=math.degrees(math.atan2(yb - ya, xb - xa)), ppmm=ppmm,
                  ppmm_full=ppmm_full,
                  scale_source=f"iris diameter / {IRIS_DIAMETER_MM:g} mm (mean adult visible iris)",
                  backend="landmarks", landmarks=Q, pose=dict(face.pose or {}),
                  blendshapes=dict(face.blendshapes or {}), iris_px=iris)
    _build_frame(ctx)
    ctx.regions = build_landmark_regions(L.shape, Q, ppmm, ipd)
    # white balance on the sclera, then every colour plane from the corrected linear RGB
    ref = ctx.regions["cheek_ref"]
    skin_lab = tuple(float(np.median(v[ref])) for v in (L, a, b)) if ref.any() else None
    gains, wb = sclera_white_balance(lin, L, ctx.regions["sclera_l"] | ctx.regions["sclera_r"], skin_lab)
    ctx.wb = wb
    ctx.raw_lab = (L, a, b)
    if wb["wb_applied"]:
        ctx.lin = lin * gains
        ctx.L, ctx.a, ctx.b = lin_to_lab(ctx.lin)
    _build_skin(ctx)
    return ctx


def _build_cascade_context(rgb: np.ndarray, face: Face) -> Context:
    H, W = rgb.shape[:2]
    fw, fh = face.width, face.height
    # the face oval spans about u = 0..1, v = -0.2..1.07 of the detector box; keep a margin
    y0 = max(0, int(face.top - 0.32 * fh)); y1 = min(H, int(face.top + 1.20 * fh))
    x0 = max(0, int(face.left - 0.14 * fw)); x1 = min(W, int(face.left + 1.14 * fw))
    crop = rgb[y0:y1, x0:x1]
    ppmm_box = fw / FACE_WIDTH_MM
    s = min(1.0, WORK_PX_PER_MM / ppmm_box)
    ch, cw = crop.shape[:2]
    if s < 1.0:
        size = (max(1, round(cw * s)), max(1, round(ch * s)))
        crop = np.asarray(Image.fromarray(crop).resize(size, Image.BILINEAR))
    hw, ww = crop.shape[:2]
    sy, sx = hw / ch, ww / cw
    rgb01 = crop.astype(np.float32) / 255.0
    L, a, b, lin = rgb_to_lab(rgb01)
    fbox = ((face.top - y0) * sy, (face.left - x0) * sx, fw * sx, fh * sy)
    eyes = _refine_eyes(L, fbox)
    refined = eyes is not None
    if not refined:
        t, l_, w_, h_ = fbox
        eyes = tuple((l_ + u * w_, t + v * h_) for u, v in DEFAULT_EYES)
    (xa, ya), (xb, yb) = eyes
    ipd = math.hypot(xb - xa, yb - ya)
    if refined:
        ppmm = ipd / IPD_MM
        source = f"eye distance / {IPD_MM:g} mm (mean adult IPD)"
    else:
        ppmm = fbox[2] / FACE_WIDTH_MM
        source = f"face-box width / {FACE_WIDTH_MM:g} mm (mean adult face width)"
    ctx = Context(face=face, shape=(H, W), box=(y0, x0, y1, x1), sy=sy, sx=sx, rgb=rgb01,
                  L=L, a=a, b=b, lin=lin, eyes=eyes, eyes_refined=refined, ipd=ipd,
                  roll_deg=math.degrees(math.atan2(yb - ya, xb - xa)), ppmm=ppmm,
                  ppmm_full=ppmm / sx, scale_source=source)
    ctx.raw_lab = (L, a, b)
    _build_frame(ctx)
    _build_regions(ctx)
    _build_skin(ctx)
    return ctx


def _build_frame(ctx: Context) -> None:
    (xa, ya), (xb, yb) = ctx.eyes
    mx, my = (xa + xb) / 2, (ya + yb) / 2
    th = math.atan2(yb - ya, xb - xa)
    c, s = math.cos(th), math.sin(th)
    yy, xx = np.mgrid[0:ctx.L.shape[0], 0:ctx.L.shape[1]].astype(np.float32)
    dx, dy = xx - mx, yy - my
    ctx.X = (dx * c + dy * s) / ctx.ipd
    ctx.Y = (-dx * s + dy * c) / ctx.ipd


def frame_to_work(ctx: Context, X: float, Y: float) -> tuple[float, float]:
    """Face-frame point -> work (x, y)."""
    (xa, ya), (xb, yb) = ctx.eyes
    mx, my = (xa + xb) / 2, (ya + yb) / 2
    th = math.atan2(yb - ya, xb - xa)
    c, s = math.cos(th), math.sin(th)
    return mx + ctx.ipd * (X * c - Y * s), my + ctx.ipd * (X * s + Y * c)


def _ellipse(X, Y, cx, cy, rx, ry):
    return ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1.0


def _band(X, Y, p0, p1, half):
    """Points within ``half`` of the segment p0-p1."""
    (x0, y0), (x1, y1) = p0, p1
    vx, vy = x1 - x0, y1 - y0
    t = np.clip(((X - x0) * vx + (Y - y0) * vy) / (vx * vx + vy * vy), 0, 1)
    return (X - x0 - t * vx) ** 2 + (Y - y0 - t * vy) ** 2 <= half * half


def _build_regions(ctx: Context) -> None:
    X, Y = ctx.X, ctx.Y
    R: dict[str, np.ndarray] = {}
    R["oval"] = _ellipse(X, Y, 0.0, 0.22, 1.08, 1.50)
    for side, sg in (("l", -1), ("r", 1)):     # image-left / image-right
        R[f"eye_{side}"] = _ellipse(X, Y, sg * 0.5, 0.0, 0.30, 0.15)
        R[f"eye_dil_{side}"] = _ellipse(X, Y, sg * 0.5, 0.0, 0.36, 0.20)
        R[f"brow_{side}"] = _ellipse(X, Y, sg * 0.52, -0.31, 0.44, 0.12)
        # infraorbital band from just below the lash line (~6 mm below the pupil) to ~20 mm
        R[f"under_eye_{side}"] = (_ellipse(X, Y, sg * 0.5, 0.10, 0.32, 0.30) & (Y > 0.09) & (Y < 0.32)
                                  & ~_ellipse(X, Y, sg * 0.5, 0.0, 0.30, 0.14))
        R[f"eye_bag_{side}"] = (_ellipse(X, Y, sg * 0.5, 0.2, 0.34, 0.48) & (Y > 0.10)
                                & ~R[f"eye_dil_{side}"])
        R[f"cheek_ref_{side}"] = ((sg * X >= 0.48) & (sg * X <= 0.86) & (Y >= 0.46) & (Y <= 0.72)
                                  & ~_band(X, Y, (sg * 0.30, 0.62), (sg * 0.56, 1.05), 0.16))
        R[f"crowfeet_{side}"] = (sg * X >= 0.82) & (sg * X <= 1.12) & (Y >= -0.22) & (Y <= 0.32)
        R[f"periocular_{side}"] = (_ellipse(X, Y, sg * 0.5, 0.04, 0.46, 0.36)
                                   & ~R[f"eye_dil_{side}"] & ~R[f"brow_{side}"])
        R[f"nasolabial_{side}"] = _band(X, Y, (sg * 0.30, 0.62), (sg * 0.56, 1.05), 0.085)
        R[f"marionette_{side}"] = _band(X, Y, (sg * 0.52, 1.14), (sg * 0.62, 1.50), 0.085)
        R[f"cheek_{side}"] = ((sg * X >= 0.30) & (sg * X <= 0.95) & (Y >= 0.38) & (Y <= 0.98)
                              & ~R[f"nasolabial_{side}"])
        R[f"tear_trough_{side}"] = _band(X, Y, (sg * 0.26, 0.12), (sg * 0.50, 0.46), 0.07)
        R[f"jowl_{side}"] = (sg * X >= 0.55) & (sg * X <= 1.05) & (Y >= 1.15) & (Y <= 1.65)
    R["mouth"] = _ellipse(X, Y, 0.0, 1.02, 0.52, 0.20)
    R["mouth_ring"] = _ellipse(X, Y, 0.0, 1.02, 0.62, 0.28)
    R["nose"] = (Y >= 0.05) & (Y <= 0.72) & (np.abs(X) <= 0.12 + 0.23 * (Y - 0.05) / 0.67)
    R["forehead"] = (np.abs(X) <= 0.95) & (Y >= -1.30) & (Y <= -0.45)
    R["glabellar"] = (np.abs(X) <= 0.17) & (Y >= -0.50) & (Y <= -0.02)
    R["chin"] = _ellipse(X, Y, 0.0, 1.45, 0.42, 0.25) & ~R["mouth"]
    features = (R["eye_dil_l"] | R["eye_dil_r"] | R["brow_l"] | R["brow_r"] | R["mouth"])
    R["features"] = features
    for k in list(R):
        if k not in ("oval", "features", "mouth", "mouth_ring") and not k.startswith(("eye_", "brow_")):
            R[k] = R[k] & R["oval"] & ~features
    pair = lambda name: R[f"{name}_l"] | R[f"{name}_r"]  # noqa: E731
    for name in ("under_eye", "eye_bag", "cheek_ref", "crowfeet", "periocular", "nasolabial",
                 "marionette", "cheek", "tear_trough", "jowl"):
        R[name] = pair(name)
    R["t_zone"] = R["forehead"] | R["glabellar"] | R["nose"]
    R["u_zone"] = R["cheek"] | R["chin"]
    R["face"] = R["oval"] & ~features
    ctx.regions = R


def _build_skin(ctx: Context) -> None:
    R = ctx.regions
    ref = R["cheek_ref"]
    if ref.sum() < 20:
        ref = R["face"]
    L, a, b = ctx.L, ctx.a, ctx.b
    hue = np.degrees(np.arctan2(b, a))
    mL, ma, mb, mh = (float(np.median(v[ref])) for v in (L, a, b, hue))
    sL, sa, sb, sh = (robust_std(v[ref]) for v in (L, a, b, hue))
    # asymmetric bounds: redder (higher a*, lower hue) and darker-brown skin stays in, while
    # hair (yellower hue, low a*, high b*), hats, glasses frames and background drop out; b*
    # may fall further than it may rise (lit skin - forehead, nose - is less yellow than the
    # cheek in many photos)
    # with landmarks, lips are excluded by their polygon, so the red side can stay open enough
    # that flushed or inflamed skin is measured, not gated out (the fallback's lip ellipse is
    # approximate: there, strongly red pixels are taken for lips)
    red_a, red_hue = (25.0, 35.0) if ctx.landmarks is not None else (12.0, 20.0)
    skin = (R["face"]
            & (a >= ma - max(2.5 * sa, 4.5)) & (a <= ma + max(4.0 * sa, red_a))
            & (b >= mb - max(4.0 * sb, 14.0)) & (b <= mb + max(3.0 * sb, 9.0))
            & (hue >= mh - max(4.0 * sh, red_hue)) & (hue <= mh + max(3.0 * sh, 12.0))
            & (L >= mL - max(20.0, 4 * sL)) & (L <= mL + 30.0))
    frames = _glasses_frames(ctx, skin)
    R["glasses"] = frames
    # keep bright low-chroma pixels too (specular highlights) in a loose skin mask
    loose = R["face"] & (skin | (L >= mL)) & ~frames
    ctx.skin = skin
    # the working image's L* noise on skin (texture, spots and acne discount it)
    ctx.noise_l = noise_sigma(ctx.L, skin)
    # thin or small non-skin gaps (deep lines, spots, pores gated out by colour) closed again,
    # so that a dark wrinkle does not remove itself from the area it is measured in (but a
    # glasses frame is not closed back in)
    k = max(1, int(round(1.2 * ctx.ppmm)))
    filled = ndi.binary_closing(skin, iterations=k, border_value=0) | skin
    ctx.skin_filled = filled & R["face"] & ~frames
    ctx.loose_skin = loose
    ctx.ref = {"L": mL, "a": ma, "b": mb, "hue": mh, "sL": sL, "sa": sa, "sb": sb, "shue": sh,
               "glasses": float(frames.any())}


#: A non-skin component around the eyes at least this long (mm) is taken for a glasses frame.
GLASSES_MIN_LENGTH_MM = 22.0


def _glasses_frames(ctx: Context, skin: np.ndarray) -> np.ndarray:
    """Glasses frames: non-skin components within ~16 mm of the eyes (eyes, lashes and brows
    themselves excluded) that are long (major axis >= GLASSES_MIN_LENGTH_MM) and thin (minor
    axis <= 0.3 x major), dilated by 0.7 mm. Wrinkles are shorter; brow hair is excluded by
    the brow masks. Frames the colour of skin (clear or amber rims) are not found."""
    from ._regions import dilate

    R = ctx.regions
    eyes = R.get("eye_l", np.zeros_like(skin)) | R.get("eye_r", np.zeros_like(skin))
    if not eyes.any():
        return np.zeros_like(skin)
    zone = dilate(eyes, ctx.mm(16.0)) & R["oval"]
    cand = zone & ~skin & ~(R["eye_dil_l"] | R["eye_dil_r"] | R["brow_l"] | R["brow_r"])
    lab, n = ndi.label(cand, structure=np.ones((3, 3), bool))
    keep = np.zeros(n + 1, bool)
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        yy, xx = np.nonzero(lab[sl] == i)
        if yy.size < 10:
            continue
        cov = np.cov(np.vstack([xx, yy]).astype(float)) + np.eye(2) / 12
        ev = np.sort(np.linalg.eigvalsh(cov))
        major, minor = 4 * math.sqrt(max(ev[1], 0)), 4 * math.sqrt(max(ev[0], 0))
        keep[i] = major >= ctx.mm(GLASSES_MIN_LENGTH_MM) and minor <= 0.3 * major
    frames = keep[lab]
    return dilate(frames, ctx.mm(0.7)) & R["oval"] if frames.any() else frames
