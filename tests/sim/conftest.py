"""Fixtures for the sim's fidelity tests: a site in a background thread and the real kubectl against it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sim_helpers import Kubectl

import sim.testing


@pytest.fixture(scope="module")
def thread_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sim.testing.ThreadSite]:
    workdir = tmp_path_factory.mktemp("site")
    with sim.testing.start_thread(speed=20.0, workdir=workdir) as site:
        yield site


@pytest.fixture(scope="module")
def kubectl(thread_site: sim.testing.ThreadSite, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    return Kubectl(thread_site.kubeconfig, tmp_path_factory.mktemp("kcache"))
