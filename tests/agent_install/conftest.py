"""Fixtures of the install-engine tests (helpers live in install_kit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from install_kit import Keys, make_trust, write_config


@pytest.fixture
def trust_keys(tmp_path: Path) -> Keys:
    return make_trust(tmp_path / "trust")


@pytest.fixture
def agent_config(tmp_path: Path, trust_keys: Keys) -> Path:
    kubeconfig = tmp_path / "kubeconfig"
    return write_config(tmp_path / "agent.yaml", state_dir=tmp_path / "state", trust_dir=tmp_path / "trust",
                        kubeconfig=kubeconfig)
