"""The daemon against the sim: /readyz follows the API server through an outage, with events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import brokers
import pytest
from daemon_helpers import write_config
from prometheus_client import REGISTRY

from agent import config as agent_config
from agent import daemon
from agent.state import StateStore

sim_testing = pytest.importorskip("sim.testing")
sim_server = pytest.importorskip("sim.server")


async def _wait(predicate, *, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` (sync or async) until true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached in time")


def _event_types(state_dir: Path) -> list[str]:
    store = StateStore.open(state_dir)
    try:
        rows = store.db.execute("SELECT payload FROM outbox WHERE channel='events' ORDER BY id").fetchall()
        return [json.loads(bytes(r["payload"]))["type"] for r in rows]
    finally:
        store.close()


async def test_readyz_tracks_api_outage_and_recovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "TASKS", [("kube-probe", daemon.kube_probe)])
    port = brokers.free_port()
    kubeconfig = tmp_path / "kubeconfig"
    config = agent_config.load(
        write_config(
            tmp_path,
            kubeconfig=str(kubeconfig),
            daemon={"kube_probe_interval_seconds": 0.2, "kube_contact_max_age_seconds": 1.0},
        )
    )
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            state = StateStore.open(config.state_dir)
            try:
                address = (state.get(daemon.STATE_KEY) or {}).get("http")
            finally:
                state.close()
            if not address:
                return False
            async with http.get(f"http://{address[0]}:{address[1]}/readyz") as resp:
                return resp.status == 200

        async def not_ready() -> bool:
            return not await ready()

        async with sim_server.serve(nodes=["server-0"], port=port, kubeconfig_out=kubeconfig):
            server = asyncio.create_task(daemon.serve(config, stop=stop))
            await _wait(ready)
            assert REGISTRY.get_sample_value("edgefleet_agent_kube_up") == 1.0
        # API server down: readiness drops, an event says so, the daemon keeps running.
        await _wait(not_ready)
        await _wait(lambda: "kube.unreachable" in _event_types(config.state_dir))
        assert not server.done()
        # Back on the same address: the probe reconnects on its own.
        async with sim_server.serve(nodes=["server-0"], port=port, kubeconfig_out=kubeconfig):
            await _wait(ready)
            await _wait(lambda: "kube.reachable" in _event_types(config.state_dir))
            stop.set()
            assert await asyncio.wait_for(server, 30) == 0
    types = _event_types(config.state_dir)
    assert types.index("kube.unreachable") < types.index("kube.reachable")
