"""Face landmarks with mediapipe's Face Landmarker (Tasks API), and the choice of face backend.

The backend is chosen once per process, at first use (:func:`landmarker`): mediapipe must be
importable and the verified model file found or fetched (:mod:`._model`). Otherwise the
engine falls back to scikit-image's LBP cascade, warns loudly (:class:`LandmarkFallbackWarning`)
and names the fallback in ``FACE_BACKEND`` / ``ENGINE_VERSION``, which every result records.

mediapipe's native (glog / TFLite) log lines are written straight to file descriptor 2, which
``GLOG_minloglevel`` does not silence; they would show in notebooks. Creation, the first
detections and closing therefore run with fd 2 redirected to a temporary file, whose text is
passed to the ``skinlab.local.engine`` logger at DEBUG level.

Landmark topology: MediaPipe's 478-point face mesh (468 mesh + 10 iris points). Subject's
right = image left: iris centre 468 is the image-left eye, 473 the image-right eye.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import _model

__all__ = ["LANDMARK_BACKEND", "CASCADE_BACKEND", "FALLBACK_BACKEND", "LandmarkFallbackWarning",
           "FaceLandmarks", "Landmarker", "landmarker", "backend_name", "backend_reason", "reset",
           "use_model", "quiet_native_stderr", "pose_from_matrix"]

log = logging.getLogger("skinlab.local.engine")

LANDMARK_BACKEND = "mediapipe-face-landmarker"
CASCADE_BACKEND = "skimage-lbp-cascade"
#: The name recorded when landmarks were wanted but could not be had (no spaces: it goes into
#: the ``x-skinlab-engine`` header).
FALLBACK_BACKEND = "skimage-lbp-cascade(FALLBACK:no-landmark-model)"

#: Faces the landmarker looks for (more than one is needed for the several-people check).
MAX_FACES = 3
#: Detections run with fd 2 redirected (the native runtime logs during the first inferences).
_QUIET_DETECTIONS = 3


class LandmarkFallbackWarning(UserWarning):
    """The landmark model or mediapipe is unavailable: the cascade fallback is in use."""


_fd_lock = threading.Lock()


@contextlib.contextmanager
def quiet_native_stderr():
    """Redirect file descriptor 2 to a temporary file for the block; the captured text goes to
    the engine's logger at DEBUG level. Python's ``sys.stderr`` is flushed first."""
    with _fd_lock:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:          # no fd 2 at all: nothing to protect
            yield
            return
        tmp = tempfile.TemporaryFile()
        try:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os.dup2(saved, 2)
        finally:
            os.close(saved)
            with contextlib.suppress(Exception):
                tmp.seek(0)
                text = tmp.read().decode("utf-8", "replace").strip()
                if text:
                    log.debug("mediapipe native log:\n%s", text)
            tmp.close()


def pose_from_matrix(m: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from the Face Landmarker's 4x4 facial transformation
    matrix (canonical face -> camera; ZYX Euler decomposition of its rotation part).

    yaw: head turned (positive = towards image left); pitch: nodding (positive = chin down
    in the images seen so far); roll: in-plane tilt, signed like the eye line
    ``atan2(y_right - y_left, x_right - x_left)`` in image coordinates (y down)."""
    r = np.asarray(m, float)[:3, :3]
    # remove any scale
    r = r / np.linalg.norm(r, axis=0, keepdims=True)
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, -r[2, 0]))))
    pitch = math.degrees(math.atan2(r[2, 1], r[2, 2]))
    roll = -math.degrees(math.atan2(r[1, 0], r[0, 0]))
    return yaw, pitch, roll


@dataclass
class FaceLandmarks:
    """One face from the landmarker, in pixels of the image it ran on.

    ``points``: (478, 3) float array of x, y (pixels) and z (relative depth, x-pixel units,
    smaller = nearer the camera). ``yaw``/``pitch``/``roll`` in degrees
    (:func:`pose_from_matrix`). ``blendshapes``: the 52 ARKit-style coefficients in [0, 1]
    (``eyeBlinkLeft`` ... ).
    """

    points: np.ndarray
    yaw: float
    pitch: float
    roll: float
    matrix: np.ndarray | None = None
    blendshapes: dict = field(default_factory=dict)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(top, left, bottom, right) of the 468 mesh points."""
        p = self.points[:468]
        return float(p[:, 1].min()), float(p[:, 0].min()), float(p[:, 1].max()), float(p[:, 0].max())


class Landmarker:
    """A mediapipe ``FaceLandmarker`` in IMAGE mode (thread-safe; call :meth:`close`)."""

    def __init__(self, model_path: str | os.PathLike, *, max_faces: int = MAX_FACES):
        from mediapipe.tasks.python import BaseOptions, vision

        self.model_path = str(model_path)
        opts = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=self.model_path),
            running_mode=vision.RunningMode.IMAGE, num_faces=int(max_faces),
            output_face_blendshapes=True, output_facial_transformation_matrixes=True)
        self._lock = threading.Lock()
        self._calls = 0
        with quiet_native_stderr():
            self._lm = vision.FaceLandmarker.create_from_options(opts)

    def detect(self, rgb: np.ndarray) -> list[FaceLandmarks]:
        """Faces in an HxWx3 uint8 RGB image, widest first."""
        import mediapipe as mp

        H, W = rgb.shape[:2]
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb[..., :3]))
        with self._lock:
            if self._lm is None:
                raise RuntimeError("the landmarker is closed")
            self._calls += 1
            if self._calls <= _QUIET_DETECTIONS:
                with quiet_native_stderr():
                    res = self._lm.detect(image)
            else:
                res = self._lm.detect(image)
        faces = []
        mats = res.facial_transformation_matrixes or []
        shapes = res.face_blendshapes or []
        for i, pts in enumerate(res.face_landmarks):
            P = np.array([[p.x * W, p.y * H, p.z * W] for p in pts], np.float64)
            m = np.asarray(mats[i], float) if i < len(mats) else None
            yaw, pitch, roll = pose_from_matrix(m) if m is not None else (float("nan"),) * 3
            bs = {c.category_name: float(c.score) for c in shapes[i]} if i < len(shapes) else {}
            faces.append(FaceLandmarks(points=P, yaw=yaw, pitch=pitch, roll=roll, matrix=m, blendshapes=bs))
        faces.sort(key=lambda f: -(f.bbox[3] - f.bbox[1]))
        return faces

    def close(self) -> None:
        with self._lock:
            lm, self._lm = self._lm, None
        if lm is not None:
            with quiet_native_stderr():
                lm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# the process-wide choice of backend

_state_lock = threading.RLock()
#: None until resolved, then (landmarker or None, reason for the fallback, where the model came
#: from): one tuple, replaced as a whole, so a reader never sees half a choice.
_choice: tuple | None = None


def _warn(msg: str) -> None:
    warnings.warn(LandmarkFallbackWarning(msg), stacklevel=4)
    if log.hasHandlers():     # servers with logging set up get it in their log as well
        log.warning("%s", msg)


def _resolve(auto_fetch: bool = True) -> tuple:
    try:
        import mediapipe  # noqa: F401
        from mediapipe.tasks.python import vision  # noqa: F401
    except Exception as exc:  # ImportError, or a missing system library (libEGL, libGLES)
        return (None, f"mediapipe is not importable ({type(exc).__name__}: {exc}); "
                      "install it with: pip install 'skinlab[local]'", "")
    path, how = _model.find_model(auto_fetch=auto_fetch)
    if path is None:
        return (None, f"no landmark model ({how}); run `skinlab fetch-model` "
                      "(or `skinlab fetch-model --path face_landmarker.task` offline)", "")
    try:
        return (Landmarker(path), "", how)
    except Exception as exc:
        return (None, f"the Face Landmarker could not be created from {path} "
                      f"({type(exc).__name__}: {exc})", "")


def landmarker() -> Landmarker | None:
    """The process's landmarker, created at first call (which may fetch the model), or None
    when the cascade fallback is in use (warned once, loudly)."""
    global _choice
    choice = _choice
    if choice is not None:
        return choice[0]
    with _state_lock:
        if _choice is None:
            choice = _resolve()
            _choice = choice
            if choice[0] is None:
                _warn("skinlab local engine: face LANDMARKS UNAVAILABLE, using the FALLBACK "
                      f"scikit-image cascade ({FALLBACK_BACKEND}): regions, eyelid measurements "
                      "and px/mm are coarse geometric estimates and the head-angle check is not "
                      f"run. Reason: {choice[1]}")
            else:
                log.info("face backend: %s (model from %s)", LANDMARK_BACKEND, choice[2])
        return _choice[0]


def backend_name() -> str:
    """``mediapipe-face-landmarker`` or :data:`FALLBACK_BACKEND` (resolves the backend)."""
    return LANDMARK_BACKEND if landmarker() is not None else FALLBACK_BACKEND


def backend_reason() -> str:
    """Why the fallback is in use ('' when landmarks are)."""
    landmarker()
    return _choice[1] if _choice is not None else ""


def reset() -> None:
    """Close the landmarker and forget the choice; the next use resolves the backend again
    (e.g. after ``skinlab fetch-model`` or a change of ``SKINLAB_LANDMARK_MODEL``)."""
    global _choice
    with _state_lock:
        old, _choice = _choice, None
    if old is not None and old[0] is not None:
        old[0].close()


def use_model(path: str | os.PathLike | None) -> str:
    """Switch the process to the model at ``path`` (verified first), or to the cascade with
    ``None``, without any fetching. Returns the new backend name."""
    global _choice
    with _state_lock:
        lm = Landmarker(_model.verify_model(path)) if path is not None else None
        reset()
        _choice = (lm, "" if lm else "landmarks switched off by use_model(None)", str(path or ""))
    return backend_name()


@atexit.register
def _close_at_exit() -> None:   # a landmarker left to __del__ at exit prints a TypeError
    lm = _choice[0] if _choice is not None else None
    if lm is not None:
        with contextlib.suppress(Exception):
            lm.close()
