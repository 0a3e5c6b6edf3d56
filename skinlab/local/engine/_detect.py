"""Face detection and the image checks (contract §5.4, checks 6-11).

Two backends, chosen once per process by :mod:`._landmarks`: mediapipe's Face Landmarker
(478 landmarks and the head pose) when the verified model is available, else scikit-image's
bundled LBP frontal-face cascade (boxes only: the head-angle check cannot run). The choice is
recorded in ``FaceCheck.details["face_backend"]``.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from PIL import Image

from ._landmarks import backend_name, landmarker
from ._types import Face, FaceCheck, GateConfig

__all__ = ["detect_faces", "check_image", "as_rgb", "srgb_to_linear", "lightness"]

_CASCADE = None
_LOCK = threading.Lock()


def _cascade():
    global _CASCADE
    if _CASCADE is None:
        from skimage.data import lbp_frontal_face_cascade_filename
        from skimage.feature import Cascade

        _CASCADE = Cascade(lbp_frontal_face_cascade_filename())
    return _CASCADE


def as_rgb(rgb) -> np.ndarray:
    """Validate an image: HxWx3 uint8 (an alpha channel is dropped)."""
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 RGB image, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {a.dtype}")
    if a.shape[0] < 16 or a.shape[1] < 16:
        raise ValueError(f"image too small: {a.shape[1]}x{a.shape[0]}")
    return a[..., :3]


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] -> linear light (IEC 61966-2-1)."""
    v = np.asarray(v, np.float32)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def lightness(rgb_u8: np.ndarray) -> np.ndarray:
    """CIELAB L* (D65) of uint8 sRGB pixels."""
    lin = srgb_to_linear(rgb_u8.astype(np.float32) / 255.0)
    y = lin[..., 0] * 0.2126729 + lin[..., 1] * 0.7151522 + lin[..., 2] * 0.0721750
    f = np.where(y > 216 / 24389, np.cbrt(y), (24389 / 27 * y + 16) / 116)
    return 116 * f - 16


def _downscale(rgb: np.ndarray, long_side: int) -> tuple[np.ndarray, float]:
    h, w = rgb.shape[:2]
    s = min(1.0, long_side / max(h, w))
    if s >= 1.0:
        return rgb, 1.0
    size = (max(1, round(w * s)), max(1, round(h * s)))
    small = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    return small, size[0] / w


def _group(boxes: np.ndarray, overlap: float = 0.5, max_ratio: float = 1.6) -> list[np.ndarray]:
    """Merge raw cascade windows (rows: r, c, w, h) into clusters: two windows join when
    their intersection covers >= ``overlap`` of the smaller one and their sizes differ by at
    most ``max_ratio``. Returns the member arrays, largest cluster first."""
    n = len(boxes)
    if n == 0:
        return []
    r, c, w, h = boxes.T
    iw = np.clip(np.minimum(c[:, None] + w[:, None], c + w) - np.maximum(c[:, None], c), 0, None)
    ih = np.clip(np.minimum(r[:, None] + h[:, None], r + h) - np.maximum(r[:, None], r), 0, None)
    area = w * h
    link = (iw * ih >= overlap * np.minimum(area[:, None], area)) & (
        np.maximum(w[:, None], w) <= max_ratio * np.minimum(w[:, None], w))
    label = -np.ones(n, int)
    k = 0
    for i in np.argsort(-w, kind="stable"):
        if label[i] >= 0:
            continue
        label[i] = k
        stack = [i]
        while stack:
            j = stack.pop()
            new = np.flatnonzero(link[j] & (label < 0))
            label[new] = k
            stack.extend(new.tolist())
        k += 1
    groups = [boxes[label == g] for g in range(k)]
    groups.sort(key=lambda m: (-len(m), -np.median(m[:, 2])))
    return groups


def _detect(rgb: np.ndarray, cfg: GateConfig, want_small: bool = False):
    small, s = _downscale(rgb, cfg.detect_long_side)
    lstar = lightness(small)
    grey = lstar / 100.0
    hs, ws = grey.shape
    min_px = int(min(cfg.min_face_px, 0.9 * min(hs, ws)))
    max_px = int(min(hs, ws))
    if min_px < 24:
        return ([], {"raw_windows": 0, "detect_scale": s}) + ((lstar, s) if want_small else ())
    with _LOCK:
        raw = _cascade().detect_multi_scale(
            grey, scale_factor=cfg.scale_factor, step_ratio=1, min_size=(min_px, min_px),
            max_size=(max_px, max_px), min_neighbor_number=1, intersection_score_threshold=2.0)
    boxes = np.array([[d["r"], d["c"], d["width"], d["height"]] for d in raw], float).reshape(-1, 4)
    groups = _group(boxes)
    faces: list[Face] = []
    best = max((len(g) for g in groups), default=0)
    need = max(cfg.min_neighbors, cfg.relative_min_neighbors * best)
    for g in groups:
        if len(g) < need:
            continue
        r, c, w, h = np.median(g, axis=0)
        cy, cx = r + h / 2, c + w / 2
        # a cluster centred inside an accepted, larger face is a part of it (eyes, mouth)
        if any(f.top * s <= cy <= f.bottom * s and f.left * s <= cx <= f.right * s
               and f.width * s > w for f in faces):
            continue
        faces.append(Face(top=int(round(r / s)), left=int(round(c / s)), height=int(round(h / s)),
                          width=int(round(w / s)), score=float(len(g))))
    faces.sort(key=lambda f: (-f.width, -f.score))
    info = {"raw_windows": int(len(boxes)), "detect_scale": float(s)}
    return (faces, info) + ((lstar, s) if want_small else ())


def _face_from_landmarks(fl) -> Face:
    t, l_, b, r = fl.bbox
    return Face(top=int(math.floor(t)), left=int(math.floor(l_)), height=int(round(b - t)),
                width=int(round(r - l_)), score=1.0, landmarks=fl.points,
                pose={"yaw": fl.yaw, "pitch": fl.pitch, "roll": fl.roll}, blendshapes=fl.blendshapes)


def detect_faces(rgb, *, config: GateConfig | None = None) -> list[Face]:
    """Faces in an upright HxWx3 uint8 RGB image, largest first (with landmarks and pose when
    the landmark backend is in use)."""
    rgb = as_rgb(rgb)
    lm = landmarker()
    if lm is not None:
        return [_face_from_landmarks(f) for f in lm.detect(rgb)]
    return _detect(rgb, config or GateConfig())[0]


def _skin_lightness(rgb: np.ndarray, face: Face) -> float:
    """Median L* of the central face (cheeks, nose, mouth band of the box), measured on a copy
    of at most 128 px across the face."""
    t = face.top + int(0.45 * face.height)
    b = face.top + int(0.85 * face.height)
    l_ = face.left + int(0.2 * face.width)
    r = face.left + int(0.8 * face.width)
    sub = rgb[max(t, 0):max(b, 0), max(l_, 0):max(r, 0)]
    if sub.size == 0:
        return float("nan")
    step = max(1, sub.shape[1] // 128)
    return float(np.median(lightness(sub[::step, ::step])))


#: Canonical face box in units of its width: eye centres are 0.42 apart, 0.35 below the top.
EYE_DISTANCE_PER_BOX = 0.42
EYE_HEIGHT_IN_BOX = 0.35


def _eyes_small(lstar: np.ndarray, face: Face, s: float):
    """Eye centres (full-res x, y) refined on the detection copy, or None."""
    from ._context import _refine_eyes

    fb = (face.top * s, face.left * s, face.width * s, face.height * s)
    eyes = _refine_eyes(lstar.astype(np.float32), fb)
    if eyes is None:
        return None
    return tuple((x / s, y / s) for x, y in eyes)


def check_image(rgb, *, config: GateConfig | None = None) -> FaceCheck:
    """Contract §5.4 checks 6..11 in order; the first failure is the result.

    6 no face -> ``error_no_face``; 7 largest face width / image width below
    ``min_face_width_fraction`` -> ``error_src_face_too_small``; 8 the face extended to the
    hairline and chin leaves the frame -> ``error_src_face_out_of_bound``; 9 median skin L*
    below ``dark_threshold_l`` -> ``error_lighting_dark``; 10 a second face at least
    ``second_face_min_ratio`` as wide -> ``error_multiple_people``; 11 |yaw|, |pitch| or
    |roll| above ``max_yaw_deg`` / ``max_pitch_deg`` / ``max_roll_deg`` ->
    ``error_large_face_angle`` (landmark backend only; the cascade fallback cannot measure
    yaw or pitch and never returns it).
    """
    cfg = config or GateConfig()
    rgb = as_rgb(rgb)
    lm = landmarker()
    if lm is not None:
        return _check_landmarks(rgb, cfg, lm)
    return _check_cascade(rgb, cfg)


#: an upright face has lips redder than its cheeks (Δa* 7.7 to 13.4 on the two test portraits)
#: and brows darker than its cheeks (ΔL* 5.5 to 11.4); a mesh fitted to an upside-down face
#: puts its lips on the forehead and its brows on the cheeks (-4.6 to -0.4 and -29 to 0.8).
#: Below both limits the face is taken as upside down. A grey photo has no a*: there only brows
#: far lighter than the cheeks count (the inverted astronaut in grey: -33; upright Grace Hopper
#: in grey: +1.9).
UPRIGHT_MIN_LIP_A = 2.5
UPRIGHT_MIN_BROW_L = 2.5
UPRIGHT_MIN_BROW_L_GREY = -10.0
#: cheek chroma (C*ab) below which a photo counts as grey for the orientation cues
GREY_MAX_CHROMA = 3.0


def _landmark_face_facts(rgb: np.ndarray, P: np.ndarray) -> dict:
    """Measured on a copy ~200 px across the face, with the landmark polygons: ``skin_l`` (median
    L* of the cheeks and nose), and the two orientation cues ``lips_minus_cheek_a_star`` and
    ``cheek_minus_brow_l_star`` (medians; absent when a polygon is too small)."""
    from ._color import lin_to_lab
    from ._regions import BROW, CHEEK, LIPS, NOSE, Raster

    H, W = rgb.shape[:2]
    x0, x1 = int(max(0, np.floor(P[:468, 0].min()))), int(min(W, np.ceil(P[:468, 0].max()) + 1))
    y0, y1 = int(max(0, np.floor(P[:468, 1].min()))), int(min(H, np.ceil(P[:468, 1].max()) + 1))
    if x1 - x0 < 4 or y1 - y0 < 4:
        return {"skin_l": float("nan")}
    step = max(1, (x1 - x0) // 200)
    sub = rgb[y0:y1:step, x0:x1:step]
    Q = (P[:, :2] - (x0, y0)) / step
    rs = Raster(sub.shape[:2], Q, 1.0)
    cheeks = rs.hull(CHEEK["l"]) | rs.hull(CHEEK["r"])
    m = cheeks | rs.hull(NOSE)
    if m.sum() < 10:
        return {"skin_l": float("nan")}
    out = {"skin_l": float(np.median(lightness(sub[m])))}
    lips, brows = rs.poly(LIPS), rs.poly(BROW["l"]) | rs.poly(BROW["r"])
    if lips.sum() >= 5 and brows.sum() >= 5 and cheeks.sum() >= 10:
        L, a, b = lin_to_lab(srgb_to_linear(sub.astype(np.float32) / 255.0))
        out["lips_minus_cheek_a_star"] = float(np.median(a[lips]) - np.median(a[cheeks]))
        out["cheek_minus_brow_l_star"] = float(np.median(L[cheeks]) - np.median(L[brows]))
        out["cheek_chroma"] = float(np.median(np.hypot(a[cheeks], b[cheeks])))
    return out


#: how much more upright (lip Δa* + brow ΔL*) the photo turned by 180 degrees must look before an
#: upside-down verdict from the cues stands (upright portraits score 11-21, turned ones -35-2)
UPSIDE_DOWN_MARGIN = 4.0


def _detect_turned(rgb: np.ndarray, lm):
    """The photo turned by 180 degrees, and the faces the landmarker finds in it."""
    turned = np.ascontiguousarray(rgb[::-1, ::-1])
    return turned, lm.detect(turned)


def _turned_roll(roll: float) -> float:
    """A roll measured on a photo, as on the photo turned by 180 degrees (within +-180)."""
    return roll - 180.0 if roll >= 0 else roll + 180.0


def _upright_score(facts: dict) -> float:
    return facts.get("lips_minus_cheek_a_star", 0.0) + facts.get("cheek_minus_brow_l_star", 0.0)


def _confirmed_upside_down(rgb: np.ndarray, facts: dict, lm, details: dict) -> bool:
    """The cues can be weak on an upright face (pale lips, sepia, faint brows): fit the mesh on the
    photo turned by 180 degrees as well, and keep the verdict only if that fit looks clearly more
    upright. One more landmark pass, only for photos the cues flag."""
    turned, found = _detect_turned(rgb, lm)
    if not found:
        details["upside_down_check"] = "cues flagged it, but no face is found in the turned photo: taken as upright"
        return False
    other = _landmark_face_facts(turned, found[0].points)
    gain = _upright_score(other) - _upright_score(facts)
    details["upside_down_gain"] = gain
    return gain >= UPSIDE_DOWN_MARGIN


def _looks_upside_down(facts: dict) -> bool:
    if "lips_minus_cheek_a_star" not in facts:
        return False
    if facts["cheek_chroma"] < GREY_MAX_CHROMA:
        return facts["cheek_minus_brow_l_star"] < UPRIGHT_MIN_BROW_L_GREY
    return (facts["lips_minus_cheek_a_star"] < UPRIGHT_MIN_LIP_A
            and facts["cheek_minus_brow_l_star"] < UPRIGHT_MIN_BROW_L)


def _check_landmarks(rgb: np.ndarray, cfg: GateConfig, lm) -> FaceCheck:
    H, W = rgb.shape[:2]
    found = lm.detect(rgb)
    details: dict = {"image_height": H, "image_width": W, "n_faces": len(found),
                     "face_backend": backend_name(), "head_angle_checked": False}
    if not found:
        # the landmarker rarely finds a face upside down: a photo that lost its EXIF orientation
        # would read as "no face". If the photo turned by 180 degrees holds one, it is a face with
        # a roll of 180 degrees (check 11), reported in this photo's own coordinates.
        _, turned = _detect_turned(rgb, lm)
        if not turned:
            return FaceCheck("error_no_face", [], None, details)
        from dataclasses import replace

        back = []
        for f in turned:
            P = f.points.copy()
            P[:, 0], P[:, 1] = (W - 1) - P[:, 0], (H - 1) - P[:, 1]
            back.append(replace(f, points=P, roll=_turned_roll(f.roll)))
        faces = [_face_from_landmarks(f) for f in back]
        t, l_, b, r = back[0].bbox
        details.update(n_faces=len(back), upside_down=True, upside_down_check="no face upright; one turned by 180",
                       yaw_deg=back[0].yaw, pitch_deg=back[0].pitch, roll_deg=back[0].roll, head_angle_checked=True)
        return FaceCheck("error_large_face_angle", faces, (r - l_) / W, details)
    faces = [_face_from_landmarks(f) for f in found]
    fl = found[0]
    t, l_, b, r = fl.bbox
    fw, fh = r - l_, b - t
    frac = fw / W
    details["face_width_fraction"] = frac
    details["min_face_width_fraction"] = cfg.min_face_width_fraction
    P = fl.points
    details["eye_centres"] = [round(float(v), 1) for v in (P[468, 0], P[468, 1], P[473, 0], P[473, 1])]
    details["eye_line_roll_deg"] = math.degrees(math.atan2(P[473, 1] - P[468, 1], P[473, 0] - P[468, 0]))
    details.update(yaw_deg=fl.yaw, pitch_deg=fl.pitch, roll_deg=fl.roll)
    blink = [fl.blendshapes.get("eyeBlinkLeft", 0.0), fl.blendshapes.get("eyeBlinkRight", 0.0)]
    details["eye_blink"] = [round(v, 3) for v in blink]
    details["eyes_closed"] = bool(max(blink) > 0.5)
    if frac < cfg.min_face_width_fraction:
        return FaceCheck("error_src_face_too_small", faces, frac, details)
    top = t - cfg.landmark_forehead_extension * fh
    bottom = b + cfg.landmark_chin_extension * fh
    overflow = max(0.0, -top, bottom - H, -l_, r - W) / fw
    details["bounds_from"] = "landmarks"
    details["out_of_bound_fraction"] = overflow
    if overflow > cfg.out_of_bound_tolerance:
        return FaceCheck("error_src_face_out_of_bound", faces, frac, details)
    facts = _landmark_face_facts(rgb, P)
    skin_l = facts["skin_l"]
    details["skin_l_median"] = skin_l
    details["dark_threshold_l"] = cfg.dark_threshold_l
    if not skin_l >= cfg.dark_threshold_l:
        return FaceCheck("error_lighting_dark", faces, frac, details)
    if len(faces) > 1:
        ratio = (found[1].bbox[3] - found[1].bbox[1]) / fw
        details["second_face_ratio"] = ratio
        if ratio >= cfg.second_face_min_ratio:
            return FaceCheck("error_multiple_people", faces, frac, details)
    details["head_angle_checked"] = True
    details["max_angles_deg"] = [cfg.max_yaw_deg, cfg.max_pitch_deg, cfg.max_roll_deg]
    # the mesh is always fitted upright: an upside-down photo (say, one that lost its EXIF
    # orientation) gets a small measured roll, so its orientation is judged from colour too
    roll = fl.roll
    details.update({k: v for k, v in facts.items() if k != "skin_l"})
    details["upside_down"] = _looks_upside_down(facts) and _confirmed_upside_down(rgb, facts, lm, details)
    if details["upside_down"]:
        roll = _turned_roll(roll)
        details["roll_deg"] = roll
    if not (abs(fl.yaw) <= cfg.max_yaw_deg and abs(fl.pitch) <= cfg.max_pitch_deg
            and abs(roll) <= cfg.max_roll_deg):
        return FaceCheck("error_large_face_angle", faces, frac, details)
    return FaceCheck(None, faces, frac, details)


def _check_cascade(rgb: np.ndarray, cfg: GateConfig) -> FaceCheck:
    H, W = rgb.shape[:2]
    faces, det, lstar, s = _detect(rgb, cfg, want_small=True)
    details: dict = {"image_height": H, "image_width": W, **det, "n_faces": len(faces),
                     "face_backend": backend_name(), "head_angle_checked": False}
    if not faces:
        return FaceCheck("error_no_face", [], None, details)
    f = faces[0]
    frac = f.width / W
    details["face_width_fraction"] = frac
    details["min_face_width_fraction"] = cfg.min_face_width_fraction
    if frac < cfg.min_face_width_fraction:
        return FaceCheck("error_src_face_too_small", faces, frac, details)
    # the box to extend: the detector's, or (better: it does not shrink when the chin is cut
    # off) a canonical box re-derived from the two eye centres found in its upper half
    bt, bl, bw = float(f.top), float(f.left), float(f.width)
    eyes = _eyes_small(lstar, f, s)
    if eyes is not None:
        (xa, ya), (xb, yb) = eyes
        bw = math.hypot(xb - xa, yb - ya) / EYE_DISTANCE_PER_BOX
        bt = (ya + yb) / 2 - EYE_HEIGHT_IN_BOX * bw
        bl = (xa + xb) / 2 - 0.5 * bw
        details["eye_centres"] = [round(xa, 1), round(ya, 1), round(xb, 1), round(yb, 1)]
        # in-plane tilt, reported only: yaw and pitch need landmarks, so check 11 is not run
        details["roll_deg"] = math.degrees(math.atan2(yb - ya, xb - xa))
    details["bounds_from"] = "eyes" if eyes is not None else "detector box"
    top = bt - cfg.forehead_extension * bw
    bottom = bt + (1.0 + cfg.chin_extension) * bw
    left = bl - cfg.side_extension * bw
    right = bl + (1.0 + cfg.side_extension) * bw
    overflow = max(0.0, -top, bottom - H, -left, right - W) / bw
    details["out_of_bound_fraction"] = overflow
    if overflow > cfg.out_of_bound_tolerance:
        return FaceCheck("error_src_face_out_of_bound", faces, frac, details)
    skin_l = _skin_lightness(rgb, f)
    details["skin_l_median"] = skin_l
    details["dark_threshold_l"] = cfg.dark_threshold_l
    if not skin_l >= cfg.dark_threshold_l:
        return FaceCheck("error_lighting_dark", faces, frac, details)
    if len(faces) > 1:
        ratio = faces[1].width / f.width
        details["second_face_ratio"] = ratio
        if ratio >= cfg.second_face_min_ratio:
            return FaceCheck("error_multiple_people", faces, frac, details)
    return FaceCheck(None, faces, frac, details)
