"""Data classes of the local measurement engine (no image maths here)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Face", "GateConfig", "FaceCheck", "Mask", "ConcernMeasurement", "Analysis"]


@dataclass
class Face:
    """One detected face; pixel coordinates in the image given to :func:`detect_faces`.

    With the landmark backend the box is the bounding box of the 468 face-mesh points (upper
    forehead to chin tip, cheek edge to cheek edge; it may reach outside the image when the face
    is cut off), ``score`` is 1.0 (the Face Landmarker reports no confidence), ``landmarks``
    holds the 478 points (x, y in pixels, z relative depth) and ``pose`` the head angles in
    degrees (``yaw``, ``pitch``, ``roll``). With the cascade fallback ``score`` is the number of
    raw cascade windows merged into this face (real faces collect many, false positives few),
    and ``landmarks`` / ``pose`` are None.
    """

    top: int
    left: int
    height: int
    width: int
    score: float
    landmarks: np.ndarray | None = field(default=None, repr=False, compare=False)
    pose: dict | None = field(default=None, compare=False)
    blendshapes: dict | None = field(default=None, repr=False, compare=False)

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width


@dataclass
class GateConfig:
    """Thresholds of the image checks (contract §5.4, checks 6..11).

    Attributes
    ----------
    min_face_width_fraction
        Largest face width / image width must be at least this (contract default 0.50,
        strict mode 0.60), else ``error_src_face_too_small``. Face width: the horizontal extent
        of the face-mesh landmarks (cheek edge to cheek edge), or the cascade box in the fallback.
    max_yaw_deg, max_pitch_deg, max_roll_deg
        Head-angle limits (check 11, landmarks only): ``error_large_face_angle`` when the
        absolute yaw (turn), pitch (nod) or roll (in-plane tilt) from the Face Landmarker's
        transformation matrix exceeds them. Pitch is the least certain (the matrix assumes a
        fixed camera field of view: re-cropping the same photo moved it by ~8 degrees), hence
        its wider default.
    landmark_forehead_extension, landmark_chin_extension
        For the out-of-bound check with landmarks: the mesh stops at the upper forehead, so its
        box is extended upwards by this fraction of its height (to about the hairline) and
        downwards by the second (below the chin tip) before it is compared with the frame.
    dark_threshold_l
        Median CIELAB L* of the central face skin (cheeks, nose, mouth area of the face box)
        below this gives ``error_lighting_dark``. 25 is far below well-lit skin of any tone
        (well-lit very dark skin measures L* ~ 30-40; the bundled photos 60-70).
    second_face_min_ratio
        A second face counts (``error_multiple_people``) if its width is at least this
        fraction of the largest face's width.
    forehead_extension, chin_extension, side_extension
        Cascade fallback only. The detector's box runs from about the mid forehead to the chin. For the out-of-bound
        check a square face box is re-derived from the two eye centres (eyes 0.42 box widths
        apart and 0.35 below the top; the detector's own box when the eyes are not found),
        then extended upwards by ``forehead_extension`` x its size (to the hairline),
        downwards by ``chin_extension`` (to the chin tip) and sideways by ``side_extension``.
    out_of_bound_tolerance
        How far (fraction of the box size) the extended face may leave the frame before
        ``error_src_face_out_of_bound``.
    min_neighbors
        Cascade fallback only. Minimum raw cascade windows for a face to count at all (false-positive filter).
    relative_min_neighbors
        A face other than the best-supported one also needs at least this fraction of the
        best face's window count.
    detect_long_side
        Detection runs on a copy whose long side is at most this many pixels.
    min_face_px
        Smallest face searched for, in pixels of that copy.
    scale_factor
        Cascade window growth per scale step.
    """

    min_face_width_fraction: float = 0.50
    dark_threshold_l: float = 25.0
    second_face_min_ratio: float = 0.5
    forehead_extension: float = 0.25
    chin_extension: float = 0.08
    side_extension: float = 0.0
    out_of_bound_tolerance: float = 0.02
    min_neighbors: int = 4
    relative_min_neighbors: float = 0.3
    detect_long_side: int = 480
    min_face_px: int = 36
    scale_factor: float = 1.2
    max_yaw_deg: float = 20.0
    max_pitch_deg: float = 25.0
    max_roll_deg: float = 20.0
    landmark_forehead_extension: float = 0.12
    landmark_chin_extension: float = 0.02

    @classmethod
    def strict(cls, **kw) -> "GateConfig":
        """The documented service rule: the face must be at least 60 % of the image width."""
        kw.setdefault("min_face_width_fraction", 0.60)
        return cls(**kw)


@dataclass
class FaceCheck:
    """Outcome of :func:`check_image`.

    ``error`` is None when every check passed, else exactly one of ``error_no_face``,
    ``error_src_face_too_small``, ``error_src_face_out_of_bound``, ``error_lighting_dark``,
    ``error_multiple_people``, ``error_large_face_angle`` (the last only with landmarks: the
    cascade fallback cannot measure yaw or pitch). ``faces`` is largest first. ``details`` holds
    the measured numbers behind the decision, including ``face_backend``.
    """

    error: str | None
    faces: list[Face]
    face_width_fraction: float | None
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def face(self) -> Face | None:
        return self.faces[0] if self.faces else None


@dataclass
class Mask:
    """A detection map stored cropped: ``alpha`` (uint8, 0 = not detected, 255 = strongly
    detected) is placed with its top-left corner at row ``y0``, column ``x0`` of the image.
    An empty ``alpha`` (shape (0, 0)) means nothing was detected."""

    y0: int
    x0: int
    alpha: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.alpha.shape[:2])

    @property
    def empty(self) -> bool:
        return self.alpha.size == 0 or not bool(self.alpha.any())

    def full(self, shape: tuple[int, int]) -> np.ndarray:
        """A uint8 canvas of ``shape`` (H, W) with ``alpha`` pasted at (y0, x0), clipped."""
        h, w = int(shape[0]), int(shape[1])
        out = np.zeros((h, w), np.uint8)
        ah, aw = self.alpha.shape[:2] if self.alpha.ndim >= 2 else (0, 0)
        ya, xa = max(self.y0, 0), max(self.x0, 0)
        yb, xb = min(self.y0 + ah, h), min(self.x0 + aw, w)
        if yb > ya and xb > xa:
            out[ya:yb, xa:xb] = self.alpha[ya - self.y0:yb - self.y0, xa - self.x0:xb - self.x0]
        return out


@dataclass
class ConcernMeasurement:
    """The measurement of one concern.

    ``scores``: region -> raw score in [1, 100], higher = healthier ({} for skin type).
    ``skin_types``: skin type only, region -> one of ``skinlab.actions.SKIN_TYPES``.
    ``masks``: region -> :class:`Mask` (same region keys as the concern's HD action).
    ``measurements``: named physical values; the quantity, region and unit of every name are
    declared in ``_quantities.py`` (see :func:`skinlab.local.engine.describe_measurement`).
    ``method``: one line on what was measured and how. ``proxy``: True where the value is
    only a proxy for the named property.
    """

    concern: str
    scores: dict[str, float]
    skin_types: dict[str, str]
    masks: dict[str, Mask]
    measurements: dict[str, float]
    method: str
    proxy: bool


@dataclass
class Analysis:
    """Result of :func:`analyze`: the requested concerns, a skin-age proxy, the face check,
    the engine's identity and the estimated physical scale (pixels per millimetre of the
    given image)."""

    concerns: dict[str, ConcernMeasurement]
    skin_age: int
    face: FaceCheck
    engine_version: str
    face_backend: str
    px_per_mm: float | None
