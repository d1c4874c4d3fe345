"""Fixtures for the batch service tests: a real JupyterHub, users with real tokens."""

from __future__ import annotations

import pytest

from tests.batch.hub import start_hub, stop_hub


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    running = start_hub(tmp_path_factory.mktemp("batch-hub"))
    try:
        yield running
    finally:
        stop_hub(running)
