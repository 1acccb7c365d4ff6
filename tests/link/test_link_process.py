"""The link in a real agent process: SIGKILL during an outage, and the Last Will."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from link_harness import Broker, Collector, agent_config, collect, running

from agent import protocol

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


class AgentProcess:
    def __init__(self, config_json: str, start: int, count: int, interval: float) -> None:
        self.confirmed: list[tuple[int, str, int]] = []
        self.emitted = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "link_agent_proc.py"), config_json, str(start), str(count), str(interval)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("CONFIRMED "):
                _, seq, msg_id, i = line.split()
                self.confirmed.append((int(seq), msg_id, int(i)))
            elif line.startswith("EMITTED"):
                self.emitted.set()

    async def wait_confirmed(self, n: int, timeout: float = 30) -> None:
        for _ in range(int(timeout * 20)):
            if len(self.confirmed) >= n:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"agent confirmed only {len(self.confirmed)} of {n} events")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout:
            self.proc.stdout.close()


def _config_json(tmp: Path, broker: Broker, **link: Any) -> str:
    config = agent_config(tmp, broker, **link)
    return json.dumps(config.model_dump(mode="json"))


def _dedupe(events: list[protocol.Event]) -> list[protocol.Event]:
    seen: set[str] = set()
    return [e for e in events if not (e.msg_id in seen or seen.add(e.msg_id))]


async def test_agent_sigkilled_during_outage_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    config = _config_json(tmp_path, broker)
    collector = Collector()
    async with running(collect(broker, collector)):
        await asyncio.wait_for(collector.ready.wait(), 10)
        first = AgentProcess(config, 0, 400, 0.02)
        try:
            await first.wait_confirmed(20)
            await collector.wait_for(lambda c: len(c.events()) >= 10)
            broker.stop()  # the outage: events keep being emitted and pile up in the outbox
            confirmed_before = len(first.confirmed)
            await first.wait_confirmed(confirmed_before + 60)
        finally:
            first.kill()  # SIGKILL mid-outage, mid-emission
        killed_with = list(first.confirmed)
        broker.start()
        second = AgentProcess(config, 1000, 10, 0.01)  # the restarted agent replays, then carries on
        try:
            await collector.wait_for(
                lambda c: len(_dedupe(c.events())) >= len(killed_with) + 10, timeout=60
            )
        finally:
            second.kill()
    got = _dedupe(collector.events())
    expected = [msg_id for _, msg_id, _ in killed_with + second.confirmed]
    # Every confirmed event exactly once (after msg_id dedupe) and in emission order. An event
    # committed in the instant between the commit and the kill may appear without confirmation.
    got_ids = [e.msg_id for e in got]
    assert [m for m in got_ids if m in set(expected)] == expected
    assert len(got_ids) - len(expected) <= 1
    assert [e.seq for e in got] == sorted(e.seq for e in got)


async def test_last_will_marks_a_killed_agent_offline(broker: Broker, tmp_path: Path) -> None:
    config = _config_json(tmp_path, broker)
    collector = Collector()
    async with running(collect(broker, collector)):
        await asyncio.wait_for(collector.ready.wait(), 10)
        agent = AgentProcess(config, 0, 1, 0.01)
        try:
            await collector.wait_for(lambda c: any(o.online for o in c.of_type(protocol.Online)))
        finally:
            agent.kill()
        await collector.wait_for(lambda c: c.of_type(protocol.Online)[-1].online is False)
    online = collector.of_type(protocol.Online)
    assert [o.online for o in online] == [True, False]
    assert online[1].site == "site-a"
