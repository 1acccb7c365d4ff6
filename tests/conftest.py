"""Shared test fixtures: paths to the platform test data and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def platform_dir() -> Path:
    return Path(os.environ.get("EDGEFLEET_PLATFORM_DIR", ROOT.parent / "shared" / "platform")).resolve()


@pytest.fixture(scope="session")
def platform() -> Path:
    path = platform_dir()
    if not (path / "idp-blueprint").is_dir():
        pytest.fail(f"platform test data not found at {path} (set EDGEFLEET_PLATFORM_DIR)")
    return path
