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


@pytest.fixture
async def site():  # type: ignore[no-untyped-def]
    import sim.testing

    async with sim.testing.running(speed=20) as s:
        yield s


@pytest.fixture
async def api(site):  # type: ignore[no-untyped-def]
    from agent import kube

    async with kube.connect(site.kubeconfig) as client:
        yield client


@pytest.fixture
def site_config(tmp_path: Path, trust_keys: Keys, site) -> Path:  # type: ignore[no-untyped-def]
    return write_config(tmp_path / "agent.yaml", state_dir=tmp_path / "state", trust_dir=tmp_path / "trust",
                        kubeconfig=site.kubeconfig)


@pytest.fixture
def bundles(tmp_path: Path, trust_keys: Keys) -> dict[str, Path]:
    from install_kit import build_bundle, site_bad, site_v1, site_v2

    out = tmp_path / "bundles"
    out.mkdir()
    return {
        "1.0.0": build_bundle(out / "v1.bundle", k=trust_keys, comps=site_v1(), version="1.0.0", release=1),
        "2.0.0": build_bundle(out / "v2.bundle", k=trust_keys, comps=site_v2(), version="2.0.0", release=2),
        "3.0.0": build_bundle(out / "bad.bundle", k=trust_keys, comps=site_bad(), version="3.0.0", release=3),
    }
