"""Shared pytest fixtures."""

import pytest


@pytest.fixture(scope="session")
def local_server():
    """One emulator for the whole session: instant tasks (``task_duration_s=0``), no rate limit.

    The rate limit is off because every test shares the 127.0.0.1 bucket; tests of the limit,
    the clock, faults or other special settings start their own server. Use a test-specific
    API key: unit balances are per key.
    """
    from skinlab.local import LocalServer

    server = LocalServer(task_duration_s=0.0, rate_limit=None)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def landmark_model():
    """The verified Face Landmarker model, fetched once (a cache hit after the first run), and
    the engine switched to it. Skipped offline, except under CI, where it must be had."""
    import os

    pytest.importorskip("mediapipe")
    from skinlab.local import engine
    from skinlab.local.engine import _model

    try:
        path = _model.fetch_model(progress=None)
    except _model.ModelError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"landmark model unavailable (offline?): {exc}")
    if engine.FACE_BACKEND != "mediapipe-face-landmarker":   # an earlier test resolved without the model
        engine.reset_face_backend()
    assert engine.FACE_BACKEND == "mediapipe-face-landmarker"
    return path
