"""skinlab's local skin measurement engine.

Measures skin concerns from the pixels of one upright RGB photo, with classical image
analysis (CIELAB colour, Hessian ridge filters, blob detection, geometry) placed on a face
found by mediapipe's Face Landmarker (478 landmarks, head pose; model fetched and verified by
``skinlab fetch-model`` or at first use), or, when that is unavailable, by scikit-image's
bundled LBP frontal-face cascade (a loudly warned fallback). ``FACE_BACKEND`` and
``ENGINE_VERSION`` name the backend actually in use, and every result records them. Nothing
here knows about HTTP.

The numbers are measurements with documented score mappings; they are **not clinically
validated** (see ``docs/engine-methods.md``).

Public API: :func:`detect_faces`, :func:`check_image`, :func:`analyze`, :func:`ui_score`,
the data classes :class:`Face`, :class:`GateConfig`, :class:`FaceCheck`, :class:`Mask`,
:class:`ConcernMeasurement`, :class:`Analysis`, and ``ENGINE_VERSION``, ``FACE_BACKEND``,
``CONCERN_METHODS``. :func:`describe_measurement` gives the declared :class:`Quantity`
(quantity, region, unit in ``UNITS``, kind in ``KINDS``) of any measurement name;
``skinlab.local.measure`` builds its tidy table from these declarations.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Iterable

import numpy as np

from skinlab.actions import CONCERNS

from ._detect import as_rgb, check_image, detect_faces
from ._types import Analysis, ConcernMeasurement, Face, FaceCheck, GateConfig, Mask
from ._quantities import KINDS, UNITS, Quantity, describe as describe_measurement

__all__ = [
    "ENGINE_VERSION", "FACE_BACKEND", "CONCERN_METHODS", "Face", "GateConfig", "FaceCheck", "Mask",
    "ConcernMeasurement", "Analysis", "detect_faces", "check_image", "analyze", "ui_score",
    "clear_cache", "fetch_model", "reset_face_backend", "use_landmark_model",
    "Quantity", "UNITS", "KINDS", "describe_measurement",
]

#: The engine's own version; ``ENGINE_VERSION`` appends the face backend in use.
ENGINE_BASE_VERSION = "0.2.3"

from ._landmarks import LandmarkFallbackWarning, backend_name as _backend_name  # noqa: E402
from ._model import fetch_model  # noqa: E402


def __getattr__(name: str):
    # resolved at first access (which may fetch the landmark model), never at import
    if name == "FACE_BACKEND":
        return _backend_name()
    if name == "ENGINE_VERSION":
        return ENGINE_BASE_VERSION + ("+landmarks" if _backend_name() == "mediapipe-face-landmarker"
                                      else "+cascade-fallback")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_landmark_model(path) -> str:
    """Switch the engine to the verified model file ``path`` (no fetching), or to the cascade
    fallback with ``None``; forgets every cached result. Returns the new ``FACE_BACKEND``."""
    from ._landmarks import use_model

    name = use_model(path)
    clear_cache()
    return name


def reset_face_backend() -> None:
    """Close the landmarker, forget the backend choice and every cached result; the next use
    chooses again (after ``fetch_model()`` or a change of ``SKINLAB_LANDMARK_MODEL``)."""
    from ._landmarks import reset

    reset()
    clear_cache()

from ._measure import FUNCS as _FUNCS, METHODS as _METHODS  # noqa: E402

#: concern -> one-line method (the same text as ``ConcernMeasurement.method``).
CONCERN_METHODS: dict[str, str] = {c: _METHODS[c] for c in CONCERNS}

#: Concerns whose measurements feed the skin-age proxy.
SKIN_AGE_INPUTS = ("wrinkle", "age_spot", "texture", "firmness", "eye_bag")

_RESULTS_MAX = 48          # (image, concern) entries: three full 16-concern analyses
_CONTEXTS_MAX = 2          # prepared working images
_CHECKS_MAX = 32

_lock = threading.RLock()
_results: "OrderedDict[tuple[str, str], ConcernMeasurement]" = OrderedDict()
_contexts: "OrderedDict[str, object]" = OrderedDict()
_checks: "OrderedDict[str, FaceCheck]" = OrderedDict()


def ui_score(raw: float) -> int:
    """Contract §6.4: ``min(99, max(1, round(35 + 0.64 * raw)))``."""
    return int(min(99, max(1, round(35 + 0.64 * float(raw)))))


def clear_cache() -> None:
    """Forget every cached face check, working image and measurement."""
    with _lock:
        _results.clear(); _contexts.clear(); _checks.clear()


def _digest(rgb: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(repr(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).data)
    return h.hexdigest()


def _lru_get(store: OrderedDict, key):
    with _lock:
        if key in store:
            store.move_to_end(key)
            return store[key]
    return None


def _lru_put(store: OrderedDict, key, value, cap: int) -> None:
    with _lock:
        store[key] = value
        store.move_to_end(key)
        while len(store) > cap:
            store.popitem(last=False)


_building: dict[str, threading.Lock] = {}


def _context(digest: str, rgb: np.ndarray, face: Face):
    from ._context import build_context

    key = f"{digest}:{face.top},{face.left},{face.width},{face.height}"
    ctx = _lru_get(_contexts, key)
    if ctx is not None:
        return ctx
    with _lock:
        build_lock = _building.setdefault(key, threading.Lock())
    with build_lock:                      # one build per image, even from several threads
        ctx = _lru_get(_contexts, key)
        if ctx is None:
            ctx = build_context(rgb, face)
            ctx.cache["full_rgb"] = rgb
            _lru_put(_contexts, key, ctx, _CONTEXTS_MAX)
    with _lock:
        _building.pop(key, None)
    return ctx


def _measure_one(digest: str, concern: str, rgb: np.ndarray, face: Face) -> ConcernMeasurement:
    key = (digest + f":{face.top},{face.left},{face.width},{face.height}", concern)
    hit = _lru_get(_results, key)
    if hit is not None:
        return hit
    ctx = _context(digest, rgb, face)
    with ctx.lock:   # the context's scratch cache is per image; different images run in parallel
        hit = _lru_get(_results, key)
        if hit is not None:
            return hit
        if concern == "skin_type":
            from ._measure import m_skin_type

            moist = _measure_one(digest, "moisture", rgb, face).scores["whole"]
            res = m_skin_type(ctx, moist)
        else:
            res = _FUNCS[concern](ctx)
    _lru_put(_results, key, res, _RESULTS_MAX)
    return res


def _skin_age(parts: dict[str, ConcernMeasurement]) -> int:
    """Proxy: 18 + 0.40*(100-wrinkle) + 0.15*(100-age_spot) + 0.10*(100-texture)
    + 0.10*(100-firmness) + 0.05*(100-eye_bag), using the 'whole' raw scores; clipped 18..90."""
    g = lambda c: 100.0 - parts[c].scores["whole"]  # noqa: E731
    age = 18 + 0.40 * g("wrinkle") + 0.15 * g("age_spot") + 0.10 * g("texture") \
        + 0.10 * g("firmness") + 0.05 * g("eye_bag")
    return int(min(90, max(18, round(age))))


def analyze(rgb, concerns: Iterable[str], *, check: FaceCheck | None = None) -> Analysis:
    """Measure ``concerns`` (tier-free keys of ``skinlab.actions.CONCERNS``) on one upright
    HxWx3 uint8 RGB image.

    Runs :func:`check_image` unless ``check`` is given, and raises ``ValueError`` if the
    check failed. Deterministic; results are cached per (pixels, concern) in a bounded LRU.
    """
    rgb = as_rgb(rgb)
    if isinstance(concerns, str):
        concerns = [concerns]
    wanted = list(dict.fromkeys(concerns))
    unknown = [c for c in wanted if c not in CONCERNS]
    if unknown:
        raise ValueError(f"unknown concern(s) {unknown}; known: {', '.join(CONCERNS)}")
    digest = _digest(rgb)
    if check is None:
        check = _lru_get(_checks, digest)
        if check is None:
            check = check_image(rgb)
            _lru_put(_checks, digest, check, _CHECKS_MAX)
    if check.error is not None:
        raise ValueError(f"image check failed: {check.error}")
    if not check.faces:
        raise ValueError("image check has no face")
    face = check.faces[0]
    out = {c: _measure_one(digest, c, rgb, face) for c in wanted}
    age_parts = {c: out.get(c) or _measure_one(digest, c, rgb, face) for c in SKIN_AGE_INPUTS}
    ctx = _context(digest, rgb, face)
    return Analysis(concerns=out, skin_age=_skin_age(age_parts), face=check,
                    engine_version=__getattr__("ENGINE_VERSION"), face_backend=__getattr__("FACE_BACKEND"),
                    px_per_mm=float(ctx.ppmm_full))
