"""The degradation plan: what fits on the remaining nodes, and which replicas must go.

A pure function of (nodes, load already bound to them, tiered workloads), so it can be tested
exhaustively and re-run every tick: the controller converges on its output instead of
remembering what it did.

How it packs, in tier order (1, 2, 3, 4), so a lower tier only gets what is left:

* Capacity is each *available*, schedulable node's allocatable minus the ``fixed`` load
  already bound to it (DaemonSet pods, tier-less pods, everything the plan does not place).
* A replica may go on a node if its requests fit, the node's ``NoSchedule``/``NoExecute`` taints
  are tolerated, its ``nodeSelector`` and required node affinity match, and (for workloads with
  a required hostname anti-affinity among their own pods) no sibling is there yet.
* Pods that already run on an available node stay there (Kubernetes does not move running
  pods), provided the higher tiers left room: otherwise they would be preempted, and are not.
* Within a tier, the other replicas are placed round-robin across workloads (largest request first
  within a round), so every workload of a tier gets its first replica before any gets its
  second: degrading tier 4 keeps as many tier-4 services up as possible, not a few at full size.
* A replica goes to the feasible node with the most free room (the scheduler's default
  *LeastAllocated* scoring), which also leaves the biggest holes for what comes next.

Tiers 1 and 2 are never scaled: the plan reports their replicas that do not fit
(``unplaced``) so the operator sees why the lifeboat is short. Tiers 3 and 4 get a target of
as many replicas as fit, never more than desired. Packing is greedy: it can be pessimistic
on pathological request mixes, never optimistic, which is the safe direction (the controller
restores more once capacity is seen to be free).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import placement
from agent.degrade.model import Node, Resources, Workload

Key = tuple[str, str, str]
NEVER_SCALED_TIERS = frozenset({1, 2})


@dataclass(frozen=True)
class Plan:
    #: Replica target per scalable workload (tiers 3 and 4; tiers 1 and 2 map to desired).
    targets: dict[Key, int]
    #: Where each placed replica went, per workload (diagnostics and tests).
    placement: dict[Key, list[str]] = field(default_factory=dict)
    #: Replicas of never-scaled tiers (1, 2) that found no room.
    unplaced: dict[Key, int] = field(default_factory=dict)
    #: Free room left per node after the plan.
    free: dict[str, Resources] = field(default_factory=dict)

    def scaled(self, workloads: Iterable[Workload]) -> list[Workload]:
        """Workloads whose target is below what the bundle wants."""
        return [w for w in workloads if self.targets.get(w.key, w.desired) < w.desired]


def eligible(node: Node, w: Workload) -> bool:
    """Static feasibility of ``w``'s pods on ``node`` (ignoring room)."""
    if not node.available or node.unschedulable:
        return False
    for taint in node.taints:
        if taint.effect not in ("NoSchedule", "NoExecute"):
            continue
        if not placement.tolerates(list(w.tolerations), key=taint.key, value=taint.value, effect=taint.effect):
            return False
    if any(node.labels.get(k) != v for k, v in w.node_selector.items()):
        return False
    return not w.node_terms or any(_term_matches(term, node.labels) for term in w.node_terms)


def _term_matches(term: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    expressions = term.get("matchExpressions") or []
    if not expressions and not term.get("matchFields"):
        return False  # an empty term matches nothing (Kubernetes semantics)
    for expr in expressions:
        key, op = str(expr.get("key", "")), str(expr.get("operator", ""))
        values = [str(v) for v in expr.get("values") or []]
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op in ("Gt", "Lt"):
            try:
                have, want = int(labels[key]), int(values[0])
            except (KeyError, IndexError, ValueError):
                return False
            if (op == "Gt" and not have > want) or (op == "Lt" and not have < want):
                return False
    # matchFields (metadata.name In [...]) is the only field selector Kubernetes supports here.
    return all(
        str(f.get("key")) != "metadata.name"
        or (str(f.get("operator")) == "In") == (labels.get("kubernetes.io/hostname") in (f.get("values") or []))
        for f in term.get("matchFields") or []
    )


def plan(
    nodes: Sequence[Node], workloads: Sequence[Workload], *, fixed: Mapping[str, Resources] | None = None
) -> Plan:
    """Place every tier's desired replicas in tier order; see the module docstring."""
    fixed = fixed or {}
    free: dict[str, Resources] = {
        n.name: n.allocatable - fixed.get(n.name, Resources()) for n in nodes if n.available and not n.unschedulable
    }
    capacity = {n.name: n.allocatable for n in nodes}
    placed: dict[Key, list[str]] = {w.key: [] for w in workloads}
    unplaced: dict[Key, int] = {}
    targets: dict[Key, int] = {}
    feasible = {w.key: [n.name for n in nodes if n.name in free and eligible(n, w)] for w in workloads}

    for tier in (1, 2, 3, 4):
        pending = {w.key: w.desired for w in workloads if w.tier == tier and w.desired > 0}
        batch = sorted(
            (w for w in workloads if w.tier == tier), key=lambda w: (-w.requests.cpu_m, -w.requests.memory, w.key)
        )
        # Pods that already run stay where they are (if the higher tiers left them room).
        for w in batch:
            for name in w.running_on:
                if pending.get(w.key, 0) <= 0:
                    break
                if name in free and name in feasible[w.key] and _fits(w, name, free, placed[w.key]):
                    free[name] = free[name] - w.requests
                    placed[w.key].append(name)
                    pending[w.key] -= 1
            if pending.get(w.key) == 0:
                del pending[w.key]
        while pending:
            for w in batch:
                if pending.get(w.key, 0) <= 0:
                    continue
                node = _best_node(w, feasible[w.key], free, capacity, placed[w.key])
                if node is None:
                    # Room only shrinks from here on: this workload is done.
                    missing = pending.pop(w.key)
                    if tier in NEVER_SCALED_TIERS:
                        unplaced[w.key] = missing
                    continue
                free[node] = free[node] - w.requests
                placed[w.key].append(node)
                pending[w.key] -= 1
                if pending[w.key] == 0:
                    del pending[w.key]
        for w in batch:
            targets[w.key] = w.desired if tier in NEVER_SCALED_TIERS else len(placed[w.key])
    return Plan(
        targets=targets,
        placement={k: v for k, v in placed.items() if v},
        unplaced=unplaced,
        free=free,
    )


def _best_node(
    w: Workload,
    candidates: list[str],
    free: Mapping[str, Resources],
    capacity: Mapping[str, Resources],
    siblings: list[str],
) -> str | None:
    best: str | None = None
    best_score: tuple[float, int, str] = (0.0, 0, "")
    for name in candidates:
        if not _fits(w, name, free, siblings):
            continue
        left, total = free[name] - w.requests, capacity[name]
        # Largest share of the node left free (LeastAllocated); fewer own siblings (spread); name.
        share = (_ratio(left.cpu_m, total.cpu_m) + _ratio(left.memory, total.memory)) / 2
        score = (share, -siblings.count(name), name)
        if best is None or score[:2] > best_score[:2] or (score[:2] == best_score[:2] and name < best_score[2]):
            best, best_score = name, score
    return best


def _fits(w: Workload, name: str, free: Mapping[str, Resources], siblings: list[str]) -> bool:
    return w.requests.fits_in(free[name]) and not (w.one_per_node and name in siblings)


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole > 0 else 1.0
