"""Which Lease watch events wake the degradation controller (idle CPU vs reaction time).

Renewals of healthy nodes' leases must not wake a tick (they change nothing, and on a 3-node
site they are a steady stream); anything that can change a decision must. A lease going stale
sends no event at all: that is the poll's job, covered by the sim tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import degrade_helpers as h

from agent.degrade import controller, tracker


def _event(type_: str, name: str) -> bytes:
    return json.dumps({"type": type_, "object": {"kind": "Lease", "metadata": {"name": name},
                                                 "spec": {"renewTime": "2026-11-28T07:00:00.000000Z"}}}).encode()


def test_lease_news(tmp_path: Path) -> None:
    ctx = h.context(h.scaled_config("s", tmp_path / "state", tmp_path / "kc", speed=1.0))
    try:
        ctl = controller.Controller.load(ctx)
        ctl.tracker.marks["healthy"] = tracker.Mark(available=True, raw=True, since=0.0)
        ctl.tracker.marks["lost"] = tracker.Mark(available=False, raw=False, since=0.0)
        ctl.tracker.marks["returning"] = tracker.Mark(available=False, raw=True, since=0.0)
        ctl.tracker.marks["failing"] = tracker.Mark(available=True, raw=False, since=0.0)

        assert not ctl.lease_news(_event("MODIFIED", "healthy"))  # a routine renewal: no tick
        assert ctl.lease_news(_event("MODIFIED", "lost"))  # renewing again: coming back
        assert ctl.lease_news(_event("MODIFIED", "failing"))  # within its degrade dwell
        assert ctl.lease_news(_event("MODIFIED", "unknown-node"))  # never seen by a tick yet
        assert ctl.lease_news(_event("ADDED", "healthy"))
        assert ctl.lease_news(_event("DELETED", "healthy"))
        assert ctl.lease_news(b"{not json")  # unparseable: better a tick too many
        assert ctl.lease_news(json.dumps({"type": "ERROR", "object": {"code": 410}}).encode())
        # "returning" is raw-available already: its renewals change nothing until the dwell ends,
        # which the poll evaluates.
        assert not ctl.lease_news(_event("MODIFIED", "returning"))
    finally:
        ctx.store.close()


def test_renewals_feed_the_tracker_and_set_the_idle_wait(tmp_path: Path) -> None:
    """A quiet site with live watches waits for the earliest possible lease expiry, not the poll."""
    clock = [1000.0]
    ctx = h.context(h.scaled_config("s", tmp_path / "state", tmp_path / "kc", speed=1.0))
    try:
        ctl = controller.Controller.load(ctx, clock=lambda: clock[0])
        timeout, poll = ctl.cfg.lease_timeout_seconds, ctl.cfg.poll_interval_seconds
        for name in ("a", "b"):
            ctl.tracker.marks[name] = tracker.Mark(available=True, raw=True, since=0.0)
            ctl.tracker.leases[name] = tracker.LeaseSeen(renew="t0", seen=clock[0])
        ctl.grace_until, ctl.quiet = 0.0, True

        clock[0] += 5.0
        assert not ctl.lease_news(_event("MODIFIED", "a"))  # a renewal: no tick, but recorded
        assert ctl.tracker.leases["a"].seen == clock[0]
        # "b" was renewed 5 s ago: it could go stale `timeout` after that, checked one poll later.
        assert ctl.idle_wait(watching=True) == timeout - 5.0 + poll
        assert ctl.idle_wait(watching=False) == poll  # no renewals seen between ticks: poll
        ctl.quiet = False  # a node in its dwell, workloads scaled down, ...: poll
        assert ctl.idle_wait(watching=True) == poll
        ctl.quiet, ctl.grace_until = True, clock[0] + 1
        assert ctl.idle_wait(watching=True) == poll  # lease windows restarting after a gap: poll
        ctl.grace_until = 0.0
        clock[0] += timeout  # overdue: never less than one poll interval
        assert ctl.idle_wait(watching=True) == poll
    finally:
        ctx.store.close()
