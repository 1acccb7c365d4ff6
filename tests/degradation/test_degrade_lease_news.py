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
