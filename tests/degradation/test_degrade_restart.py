"""Crash safety: the agent SIGKILLed while Yellow, with the broker down all along.

The daemon (``edgefleet-agent run``) runs in a subprocess against an in-process sim; its MQTT link
points at a port where no broker listens, so every event must wait in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brokers
import degrade_helpers as h
import pytest
import yaml

import sim.testing
from agent import degrade, kube, sitestatus
from agent.degrade import records
from agent.degrade.model import ORIGINAL_REPLICAS_ANNOTATION
from agent.state import StateStore

SPEED = 10.0
ORIGINAL = {s.name: s.replicas for s in h.PLATFORM}
TIER = {s.name: s.tier for s in h.PLATFORM}


@contextlib.contextmanager
def _store(state_dir: Path) -> Iterator[StateStore]:
    store = StateStore.open(state_dir)
    try:
        yield store
    finally:
        store.close()


def _kv(state_dir: Path) -> dict[str, Any]:
    if not (state_dir / "agent.db").exists():
        return {}
    with _store(state_dir) as store:
        return store.get(sitestatus.DEGRADATION_KEY) or {}


def _start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
        stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip


async def _replicas(api: Any) -> dict[str, int]:
    return {name: int(obj["spec"]["replicas"]) for name, obj in (await h.workloads(api)).items()}


@pytest.mark.slow
async def test_sigkill_while_yellow_keeps_originals_and_restores_later(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with sim.testing.running(speed=SPEED) as site, kube.connect(site.kubeconfig) as api:
        await h.deploy_platform(api)
        cfg = {
            "site_id": "site-k",
            "state_dir": str(state),
            "kubeconfig": str(site.kubeconfig),
            "http": {"enabled": False},
            "snapshots": {"enabled": False},
            # Broker down: nothing listens there.
            "link": {"enabled": True, "port": brokers.free_port(), "backoff_min_seconds": 0.2,
                     "backoff_max_seconds": 1.0},
            "degradation": {
                "lease_timeout_seconds": 20 / SPEED,
                "degrade_dwell_seconds": 5 / SPEED,
                "recover_dwell_seconds": 60 / SPEED,
                "restore_stagger_seconds": 10 / SPEED,
                "poll_interval_seconds": 0.1,
            },
        }
        config = tmp_path / "agent.yaml"
        config.write_text(yaml.safe_dump(cfg))
        log = tmp_path / "agent.log"
        proc = _start_agent(config, log)
        try:
            await h.eventually(lambda: _async(_kv(state).get("state") == "green"), timeout=60, what="agent green")
            await site.fail_node("agent-1")
            await h.eventually(lambda: _async(_kv(state).get("state") == "yellow"), timeout=20, what="yellow")

            async def scaled_and_annotated() -> bool:
                objs = await h.workloads(api)
                low = [n for n, o in objs.items() if int(o["spec"]["replicas"]) < ORIGINAL[n]]
                return bool(low) and all(
                    (objs[n]["metadata"].get("annotations") or {}).get(ORIGINAL_REPLICAS_ANNOTATION) for n in low
                )

            await h.eventually(scaled_and_annotated, timeout=20, what="tier 4 scaled down and annotated")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

        scaled = {n: r for n, r in (await _replicas(api)).items() if r < ORIGINAL[n]}
        assert scaled and all(TIER[n] == 4 for n in scaled)
        with _store(state) as store:
            journal = records.load(store)
            assert {r.name: r.original for r in journal.values()} == {n: ORIGINAL[n] for n in scaled}
            pending = h.events(store)
            assert ("green", "yellow") in [(e["data"]["from"], e["data"]["to"]) for e in pending if "from" in e["data"]]
            assert {e["data"]["workload"].split("/")[-1] for e in pending if e["type"] == "degradation.scaled-down"} \
                == set(scaled)  # fmt: skip

        # The node comes back while the agent is dead; Kubernetes alone restores nothing.
        await site.restore_node("agent-1")
        await asyncio.sleep(2)
        assert {n: r for n, r in (await _replicas(api)).items() if r < ORIGINAL[n]} == scaled

        proc = _start_agent(config, log)
        try:

            async def restored() -> bool:
                return await _replicas(api) == ORIGINAL and _kv(state).get("state") == "green" and not _kv(state).get(
                    "scaled_down"
                )

            await h.eventually(restored, timeout=60, what="originals restored after the restart")
            objs = await h.workloads(api)
            annotations = [o["metadata"].get("annotations") or {} for o in objs.values()]
            assert not any(ORIGINAL_REPLICAS_ANNOTATION in a for a in annotations)
            await h.eventually(
                lambda: _async(_journal_empty(state)), timeout=10, what="journal emptied after the restore"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        # Broker down all along: every transition is still waiting in the outbox, in order.
        with _store(state) as store:
            transitions = [(e["data"]["from"], e["data"]["to"]) for e in h.events(store, "degradation.transition")]
            assert transitions == [("green", "yellow"), ("yellow", "green")], transitions
            restored_events = h.events(store, "degradation.restored")
            assert {e["data"]["workload"].split("/")[-1] for e in restored_events} == set(scaled)


async def _async(value: bool) -> bool:
    return value


def _journal_empty(state: Path) -> bool:
    with _store(state) as store:
        return records.load(store) == {}


async def test_restarted_controller_adopts_annotations_without_journal(tmp_path: Path) -> None:
    """DB lost (e.g. state dir restored from an old backup): the annotation alone brings the original back."""
    async with sim.testing.running(speed=SPEED) as site, kube.connect(site.kubeconfig) as api:
        await h.deploy_platform(api)
        config = h.scaled_config("site-r", tmp_path / "state", site.kubeconfig, speed=SPEED)
        ctx = h.context(config)
        task = asyncio.create_task(degrade.run(ctx))
        try:
            await site.fail_node("agent-1")
            await h.eventually(
                lambda: _async((ctx.store.get(sitestatus.DEGRADATION_KEY) or {}).get("state") == "yellow"),
                timeout=20, what="yellow",
            )  # fmt: skip
            await h.eventually(lambda: _async(bool(records.load(ctx.store))), timeout=10, what="a scale-down")
            await asyncio.sleep(0.5)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            ctx.store.close()
        scaled = {n: r for n, r in (await _replicas(api)).items() if r < ORIGINAL[n]}
        assert scaled

        # A fresh state dir: no journal, no tracker. Only the annotations remember.
        fresh = h.context(h.scaled_config("site-r", tmp_path / "fresh", site.kubeconfig, speed=SPEED))
        task = asyncio.create_task(degrade.run(fresh))
        try:
            await site.restore_node("agent-1")

            async def restored() -> bool:
                return await _replicas(api) == ORIGINAL and records.load(fresh.store) == {}

            await h.eventually(restored, timeout=30, what="restored from the annotations alone")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            fresh.store.close()
