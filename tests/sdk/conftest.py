"""Fixtures for the OpenTelemetry Python SDK tests against the real canaryd binary.

The daemon is started once per test session on port 0 (every listener), and its chosen addresses are
read from ``<data dir>/addrs.json``. Every test uses its own service names, so tests share the
daemon without seeing each other's data. Helpers live in sdk_harness.py.
"""

from __future__ import annotations

import uuid

import pytest

from sdk_harness import start_canaryd, stop_canaryd


@pytest.fixture(scope="session")
def canaryd(tmp_path_factory: pytest.TempPathFactory):
    daemon = start_canaryd(tmp_path_factory.mktemp("canaryd"))
    try:
        yield daemon
    finally:
        stop_canaryd(daemon)


@pytest.fixture
def token() -> str:
    """A short random suffix, so that every test names its own services."""
    return uuid.uuid4().hex[:8]
