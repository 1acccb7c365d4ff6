"""Task supervision: a crashing task is restarted with backoff and reported; the daemon survives."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from pathlib import Path

import pytest
from daemon_helpers import write_config
from prometheus_client import REGISTRY

from agent import config as agent_config
from agent import daemon
from agent.context import AgentContext
from agent.state import StateStore


def test_crash_reports_are_thinned_for_repeats_only() -> None:
    reported, last = [], None
    for n in range(1, 70):
        error = "kubeconfig missing" if n != 20 else "disk full"
        if daemon.should_report(n, error=error, last_reported=last):
            reported.append(n)
            last = error
    assert reported == [1, 2, 4, 8, 16, 20, 21, 32, 64]


def test_backoff_doubles_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    delays = [daemon.backoff_delay(n, initial=1.0, maximum=30.0, rng=rng) for n in range(10)]
    for n, delay in enumerate(delays):
        nominal = min(30.0, 2.0**n)
        assert nominal * 0.8 <= delay <= min(30.0, nominal * 1.2)
    assert max(delays) <= 30.0
    assert len({round(d, 6) for d in delays[6:]}) > 1, "capped delays still carry jitter"
    assert daemon.backoff_delay(10_000, initial=1.0, maximum=5.0) <= 5.0


def _events(store: StateStore, type_: str) -> list[dict[str, object]]:
    rows = store.db.execute("SELECT payload FROM outbox WHERE channel='events' ORDER BY id").fetchall()
    docs = [json.loads(bytes(r["payload"])) for r in rows]
    return [d for d in docs if d["type"] == type_]


async def test_crashing_task_restarts_with_backoff_and_daemon_survives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashes = 0
    healthy_ticks = 0
    stop = asyncio.Event()

    async def crasher(ctx: AgentContext) -> None:
        nonlocal crashes
        crashes += 1
        raise RuntimeError("boom" if crashes != 3 else "other boom")

    async def steady(ctx: AgentContext) -> None:
        nonlocal healthy_ticks
        while True:
            healthy_ticks += 1
            await asyncio.sleep(0.01)

    async def finishes(ctx: AgentContext) -> None:
        return None

    monkeypatch.setattr(daemon, "TASKS", [("crasher", crasher), ("steady", steady), ("oneshot", finishes)])
    config = agent_config.load(
        write_config(tmp_path, daemon={"restart_initial_seconds": 0.05, "restart_max_seconds": 0.4})
    )
    before = REGISTRY.get_sample_value("edgefleet_agent_task_restarts_total", {"task": "crasher"}) or 0.0

    async def stop_after_crashes() -> None:
        while crashes < 6:
            await asyncio.sleep(0.02)
        stop.set()

    stopper = asyncio.create_task(stop_after_crashes())
    code = await asyncio.wait_for(daemon.serve(config, stop=stop), timeout=60)
    await stopper
    assert code == 0
    assert healthy_ticks > 10, "the healthy task kept running while the other crashed"

    after = REGISTRY.get_sample_value("edgefleet_agent_task_restarts_total", {"task": "crasher"}) or 0.0
    assert after - before >= 5

    store = StateStore.open(config.state_dir)
    try:
        crashed = _events(store, "agent.task-crashed")
        assert all(e["data"]["task"] == "crasher" and e["severity"] == "error" for e in crashed)
        assert "RuntimeError: boom" in crashed[0]["summary"]
        # Every new error is reported; repeats only at restarts 1, 2, 4, 8, ...
        reported = [e["data"]["restarts"] for e in crashed]
        assert reported[:4] == [1, 2, 3, 4] and set(reported) <= {1, 2, 3, 4, 8, 16}, reported
        delays = {e["data"]["restarts"]: float(e["data"]["restart_in"]) for e in crashed}
        assert delays[1] <= 0.05 * 1.2
        assert delays[4] >= min(0.4, 0.05 * 8) * 0.8, "the delay grows exponentially"
        assert max(delays.values()) <= 0.4, "backoff is capped"
        state = store.get(daemon.STATE_KEY)
        assert state["tasks"]["crasher"]["restarts"] >= 5
        assert state["tasks"]["oneshot"]["finished"] is True
        assert state["stopping"] is True
        assert len(_events(store, "agent.started")) == 1 and len(_events(store, "agent.stopped")) == 1
    finally:
        store.close()


async def test_drain_is_bounded_when_a_task_ignores_cancellation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = asyncio.Event()
    cancelled = asyncio.Event()

    async def stubborn(ctx: AgentContext) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            await release.wait()  # keeps running after cancel: the daemon must not wait forever
            raise

    monkeypatch.setattr(daemon, "TASKS", [("stubborn", stubborn)])
    config = agent_config.load(write_config(tmp_path, daemon={"drain_seconds": 0.3}))
    stop = asyncio.Event()
    server = asyncio.create_task(daemon.serve(config, stop=stop))
    await asyncio.sleep(0.3)
    stop.set()
    code = await asyncio.wait_for(server, timeout=20)
    assert code == 0 and cancelled.is_set()
    release.set()
    await asyncio.sleep(0)


async def test_http_port_taken_is_reported_and_the_daemon_runs_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = 0

    async def worker(ctx: AgentContext) -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    monkeypatch.setattr(daemon, "TASKS", [("worker", worker)])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = agent_config.load(write_config(tmp_path, http={"port": port}))
        stop = asyncio.Event()
        server = asyncio.create_task(daemon.serve(config, stop=stop))
        while ticks < 5:
            await asyncio.sleep(0.02)
        stop.set()
        assert await asyncio.wait_for(server, 20) == 0
    store = StateStore.open(config.state_dir)
    try:
        failed = _events(store, "agent.http-failed")
        assert len(failed) == 1 and str(port) in failed[0]["summary"]
        assert store.get(daemon.STATE_KEY)["http"] is None
    finally:
        store.close()
