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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ``SKINLAB_NO_SKIP=1`` (set by ``.ci/run``) a skipped test fails: in CI everything the
    tests need is installed (Chromium, the landmark model, dask, ...), so a skip means a broken
    set-up, not a missing optional part. Tests marked ``allow_skip`` may still skip."""
    import os

    outcome = yield
    report = outcome.get_result()
    if (report.skipped and os.environ.get("SKINLAB_NO_SKIP") == "1" and not hasattr(report, "wasxfail")
            and item.get_closest_marker("allow_skip") is None):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but SKINLAB_NO_SKIP=1 forbids skips here: {reason}"
