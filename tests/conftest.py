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
