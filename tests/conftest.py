"""Shared test helpers. Markers are declared in pyproject.toml."""

import socket

import pytest


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (tests only ever listen and dial on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port():
    return free_port()
