"""Fixtures shared by the unit tests."""

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config_dir(tmp_path):
    """A copy of the bundled config/ (platform, catalogue, demo accounts) to edit freely."""
    for name in ("labfleet.yaml", "catalogue.yaml", "accounts.yaml"):
        shutil.copy(ROOT / "config" / name, tmp_path / name)
    return tmp_path
