"""Fixtures of the bundle tests (helpers live in bundle_kit.py, importable by name from any directory)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bundle_kit import Kit


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return Kit(tmp_path)
