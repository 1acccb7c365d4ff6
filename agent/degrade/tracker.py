"""Node availability with hysteresis, and the site state it implies.

Each node has a *raw* view (Ready condition True and its Lease renewed recently) and an
*effective* one, which is what the planner and the site state use. The effective view follows
the raw one only after it held steadily for a dwell time: ``degrade_dwell`` to count a node as
lost, the (longer) ``recover_dwell`` to count it back. A flapping node therefore stays lost until
it has been steadily healthy for the recover dwell: the site degrades once and recovers once.

The tracker is plain data, persisted in the agent DB after every change, so a restarted agent
continues the same timers instead of re-learning (and, e.g., restoring too early).

Lease staleness is measured on the agent's clock from the moment a *change* of the lease's
``renewTime`` was last seen, not by comparing ``renewTime`` with the agent's clock: the worker's
kubelet writes ``renewTime`` with its own clock, and a skewed worker clock must not fake a dead node.
For the same reason a restarted agent (or one whose API server was unreachable) gives every lease
a fresh timeout window instead of trusting timestamps from before the gap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from agent import placement, protocol
from agent.degrade.model import Node, Workload
from agent.degrade.planner import Plan


@dataclass
class Mark:
    available: bool
    raw: bool
    #: When ``raw`` last changed (agent wall clock).
    since: float


@dataclass
class LeaseSeen:
    renew: str
    seen: float


@dataclass
class Tracker:
    marks: dict[str, Mark] = field(default_factory=dict)
    leases: dict[str, LeaseSeen] = field(default_factory=dict)

    # ------------------------------------------------------------------ leases

    def lease_fresh(self, node: str, renew_time: str | None, *, now: float, timeout: float) -> bool | None:
        """Whether ``node``'s lease was renewed within ``timeout``; None if it has no lease.

        A lease seen for the first time counts as just renewed: after a power cut of the whole
        site every lease is old by the wall clock, and declaring every node dead at boot would
        scale the platform down for nothing. A dead node is still caught ``timeout`` later.
        """
        if renew_time is None:
            self.leases.pop(node, None)
            return None
        seen = self.leases.get(node)
        if seen is None:
            self.leases[node] = seen = LeaseSeen(renew=renew_time, seen=now)
        elif seen.renew != renew_time:
            seen.renew, seen.seen = renew_time, now
        return now - seen.seen <= timeout

    def grace(self, *, now: float) -> None:
        """Restart every lease's timeout window: after an agent restart or an API outage, kubelets
        could not renew (or the agent could not see it), which says nothing about the nodes."""
        for seen in self.leases.values():
            seen.seen = max(seen.seen, now)

    # ------------------------------------------------------------------ hysteresis

    def observe(
        self, raw: Mapping[str, bool], *, now: float, degrade_dwell: float, recover_dwell: float
    ) -> list[tuple[str, bool]]:
        """Feed one observation; return the nodes whose *effective* availability changed."""
        changes: list[tuple[str, bool]] = []
        for name in list(self.marks):
            if name not in raw:  # the Node object is gone (deleted): nothing left to track
                del self.marks[name]
        for name, healthy in raw.items():
            mark = self.marks.get(name)
            if mark is None:
                self.marks[name] = Mark(available=healthy, raw=healthy, since=now)
                continue
            if mark.raw != healthy:
                mark.raw, mark.since = healthy, now
            if mark.available != mark.raw:
                dwell = recover_dwell if mark.raw else degrade_dwell
                if now - mark.since >= dwell:
                    mark.available = mark.raw
                    changes.append((name, mark.available))
        return changes

    def available(self, name: str) -> bool:
        mark = self.marks.get(name)
        return bool(mark and mark.available)

    def pending(self, *, now: float, degrade_dwell: float, recover_dwell: float) -> dict[str, float]:
        """Nodes whose raw state differs from the effective one: seconds until it takes effect."""
        out = {}
        for name, mark in self.marks.items():
            if mark.available != mark.raw:
                dwell = recover_dwell if mark.raw else degrade_dwell
                out[name] = max(0.0, dwell - (now - mark.since))
        return out

    # ------------------------------------------------------------------ persistence

    def to_json(self) -> dict[str, Any]:
        return {
            "marks": {k: asdict(v) for k, v in self.marks.items()},
            "leases": {k: asdict(v) for k, v in self.leases.items()},
        }

    @classmethod
    def from_json(cls, doc: Any) -> Tracker:
        tracker = cls()
        if not isinstance(doc, Mapping):
            return tracker
        for name, m in (doc.get("marks") or {}).items():
            try:
                tracker.marks[str(name)] = Mark(
                    available=bool(m["available"]), raw=bool(m["raw"]), since=float(m["since"])
                )
            except (KeyError, TypeError, ValueError):
                continue
        for name, s in (doc.get("leases") or {}).items():
            try:
                tracker.leases[str(name)] = LeaseSeen(renew=str(s["renew"]), seen=float(s["seen"]))
            except (KeyError, TypeError, ValueError):
                continue
        return tracker


# --------------------------------------------------------------------------- site state


#: Why the site is in its state, as a short code (the metrics label ``reason``; the words go
#: to events and ``status``). A fixed set, so a label built from it cannot grow without bound.
CAUSE_NONE = "none"  # Green: every node available
CAUSE_NODE_LOST = "node-lost"  # Yellow: capacity lost, tiers 1-3 still fit
CAUSE_CAPACITY = "capacity"  # Red: workers are left, but they cannot hold tier 3
CAUSE_CONTROL_PLANE_ONLY = "control-plane-only"  # Red: only the lifeboat (control-plane) node is left
CAUSE_NO_NODES = "no-nodes"  # Red: no node is available at all, or the cluster lists none
CAUSE_API_UNREACHABLE = "api-unreachable"  # Black
CAUSE_UNKNOWN = "unknown"  # state written by an agent that did not record the cause
CAUSES = (CAUSE_NONE, CAUSE_NODE_LOST, CAUSE_CAPACITY, CAUSE_CONTROL_PLANE_ONLY, CAUSE_NO_NODES,
          CAUSE_API_UNREACHABLE, CAUSE_UNKNOWN)  # fmt: skip


def classify(
    nodes: Sequence[Node], plan: Plan | None, workloads: Iterable[Workload]
) -> tuple[protocol.SiteState, str, str]:
    """Green/Yellow/Red from the effective nodes and the plan, with its cause (:data:`CAUSES`) and reason in words.

    Generalised by capacity, for any number of nodes:

    * Green: every node is available.
    * Red: no worker is left (a node ordinary pods may use: not tainted control-plane, so an
      untainted HA server counts as one), or what is left cannot hold tier 3 in
      full: only the lifeboat tiers (1, 2) run. This is limp-home mode.
    * Yellow: anything in between: capacity was lost but tiers 1-3 run in full.

    Black (API unreachable) is decided by the controller, which cannot see nodes then.
    """
    lost = sorted(n.name for n in nodes if not n.available)
    if not nodes:
        return protocol.SiteState.RED, CAUSE_NO_NODES, "the cluster reports no nodes"
    if not lost:
        return protocol.SiteState.GREEN, CAUSE_NONE, "all nodes ready"
    workers = [n for n in nodes if n.available and not n.unschedulable and not _lifeboat_only(n)]
    lost_text = f"{_names(lost)} lost"
    if not workers:
        left = sorted(n.name for n in nodes if n.available)
        if not left:
            return protocol.SiteState.RED, CAUSE_NO_NODES, f"{lost_text}; no node left"
        only = f"{lost_text}; only the control-plane node {_names(left)} is left"
        return protocol.SiteState.RED, CAUSE_CONTROL_PLANE_ONLY, only
    short = [
        w for w in workloads if w.tier == 3 and plan is not None and plan.targets.get(w.key, w.desired) < w.desired
    ]
    if short:
        return (
            protocol.SiteState.RED,
            CAUSE_CAPACITY,
            f"{lost_text}; the remaining capacity cannot hold tier 3 ({_names(w.ref for w in short)})",
        )
    consolidating = f"{lost_text}; consolidating on {len(nodes) - len(lost)} of {len(nodes)} nodes"
    return protocol.SiteState.YELLOW, CAUSE_NODE_LOST, consolidating


def _lifeboat_only(node: Node) -> bool:
    return any(
        t.key == placement.CONTROL_PLANE_TAINT and t.effect in ("NoSchedule", "NoExecute") for t in node.taints
    )


def _names(names: Iterable[str]) -> str:
    items = list(names)
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
