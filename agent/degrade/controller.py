"""The degradation controller: observe nodes, plan, scale, restore; no hub needed.

One loop (``run``), woken by Node/Lease watch events and at least every
``poll_interval_seconds``; on a settled site whose watches stream, Lease renewals are recorded
as they arrive and the loop sleeps until the earliest moment a lease could go stale
(:meth:`Controller.idle_wait`: two LISTs a second were most of the agent's idle CPU). Each tick:

1. Lists Nodes and the Leases in ``kube-node-lease``. A node is healthy when its Ready
   condition is True *and* its lease was renewed within ``lease_timeout_seconds``: a dead
   kubelet stops renewing at once, while Kubernetes marks the node NotReady only after 40 s
   and evicts after 300 s. :mod:`~agent.degrade.tracker` applies the dwell times.
2. With every node available and nothing scaled down, that is all (Green, cheap).
3. Otherwise lists the tiered Deployments/StatefulSets and the pods, plans
   (:mod:`~agent.degrade.planner`) and converges on the plan:

   * **force-delete** tier 2-4 pods bound to lost nodes, so their controllers start
     replacements now (a StatefulSet cannot recreate a pod name before the old pod is gone;
     the kubelet that would confirm the deletion is dead). Tier 1 is never touched. First, so
     that a scale-down never makes a ReplicaSet pick a healthy replica over a stranded one;
   * **scale down** (only while capacity is lost), tier 4 before tier 3: journal row + event in
     one DB transaction, then the ``edgefleet.io/original-replicas`` annotation, then the
     ``scale`` subresource (field manager ``edgefleet-degradation``);
   * **restore**, in reverse tier order (3 before 4), one tier per ``restore_stagger_seconds``,
     up to what the plan says fits; at the original count the annotation and the row go.

4. Persists ``site.degradation`` (state, reason, cause, nodes, scaled_down) for ``edgefleet-agent
   status``, the hub and ``/metrics``; every state change is an event (outbox: works offline);
   Red sets ``ctx.limp_home``.

API unreachable for ``degrade_dwell_seconds`` → Black: recorded and reported, nothing enforced,
limp-home left as it was; the next successful tick resumes from the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent import kube, metrics, protocol, sitestatus
from agent.context import AgentContext
from agent.degrade import planner, records, tracker
from agent.degrade.model import (
    API_VERSIONS,
    LOST_TAINT,
    ORIGINAL_REPLICAS_ANNOTATION,
    TIER_LABEL,
    Node,
    Resources,
    Workload,
    node_from,
    node_ready,
    pod_requests,
    tier_of,
    workload_from,
)

log = structlog.get_logger("edgefleet.degradation")

FIELD_MANAGER = "edgefleet-degradation"
LEASE_NAMESPACE = "kube-node-lease"
TRACKER_KEY = "degradation.tracker"
#: The nodes available at the last scale-down: restores need capacity beyond that (see ``enforce``).
BASELINE_KEY = "degradation.baseline"
_SEVERITY = {
    protocol.SiteState.GREEN: protocol.Severity.INFO,
    protocol.SiteState.YELLOW: protocol.Severity.WARNING,
    protocol.SiteState.RED: protocol.Severity.ERROR,
    protocol.SiteState.BLACK: protocol.Severity.ERROR,
}
_TERMINAL_PHASES = ("Succeeded", "Failed")
#: Shortest pause between two ticks however many watch events arrive.
_MIN_TICK_SECONDS = 0.1
#: (The dataclass below has a field named ``tracker``, which hides the module in its body.)
_NO_CAUSE = tracker.CAUSE_NONE


@dataclass
class Controller:
    ctx: AgentContext
    clock: Callable[[], float] = time.time
    tracker: tracker.Tracker = field(default_factory=tracker.Tracker)
    state: protocol.SiteState = protocol.SiteState.GREEN
    reason: str = ""
    #: The reason as a short code (:data:`tracker.CAUSES`), for the metrics label.
    cause: str = _NO_CAUSE
    state_since: float = 0.0
    unreachable_since: float | None = None
    last_restore: float = float("-inf")
    deleted_pods: set[str] = field(default_factory=set)
    saved_tracker: dict[str, Any] = field(default_factory=dict)
    #: Until then lease ages are not yet meaningful (after a restart or an API outage): no restores.
    grace_until: float = 0.0
    #: False until one full pass looked at the workloads (adopting annotations without a journal row).
    reconciled: bool = False
    #: The last tick found the site settled: every node available, nothing scaled down, no dwell running.
    quiet: bool = False

    @classmethod
    def load(cls, ctx: AgentContext, *, clock: Callable[[], float] = time.time) -> Controller:
        records.setup(ctx.store)
        saved = ctx.store.get(sitestatus.DEGRADATION_KEY, {}) or {}
        try:
            state = protocol.SiteState(saved.get("state", protocol.SiteState.GREEN.value))
        except ValueError:
            state = protocol.SiteState.GREEN
        ctl = cls(
            ctx=ctx,
            clock=clock,
            tracker=tracker.Tracker.from_json(ctx.store.get(TRACKER_KEY)),
            state=state,
            reason=str(saved.get("reason", "")),
            cause=str(saved.get("cause") or (tracker.CAUSE_UNKNOWN if saved else tracker.CAUSE_NONE)),
            state_since=float(saved.get("since") or clock()),
        )
        if state is protocol.SiteState.RED:
            ctx.limp_home.set()
        ctl.start_grace(clock())
        return ctl

    def start_grace(self, now: float) -> None:
        """A fresh lease window for every node, and no restores until it has passed (see tracker)."""
        self.tracker.grace(now=now)
        self.grace_until = now + self.cfg.lease_timeout_seconds

    def lease_news(self, line: bytes) -> bool:
        """Whether a Lease watch event can change a decision, i.e. is worth a tick now.

        Kubelets renew every ~10 s each: on a healthy site that is a stream of events that change
        nothing (a stale lease is found by the poll, which no event announces anyway). Waking a
        tick (two LISTs) for each cost most of the agent's idle CPU. News: a lease appearing or
        going, or renewed for a node not currently raw-available (it is coming back).
        Unparseable lines count as news. A routine renewal is fed into the tracker as it
        arrives instead, so the poll can wait for the earliest moment a lease could go stale
        (:meth:`idle_wait`).
        """
        try:
            event = json.loads(line)
            obj = event["object"]
            name = str(obj["metadata"]["name"])
        except (ValueError, KeyError, TypeError):
            return True
        mark = self.tracker.marks.get(name)
        if event.get("type") != "MODIFIED" or mark is None or not mark.raw:
            return True
        renew = (obj.get("spec") or {}).get("renewTime") if isinstance(obj, dict) else None
        if renew:
            self.tracker.lease_fresh(name, str(renew), now=self.clock(), timeout=self.cfg.lease_timeout_seconds)
        return False

    def idle_wait(self, *, watching: bool) -> float:
        """Seconds until the next tick if no watch event wakes one earlier.

        The poll finds what no event announces: a lease that stopped being renewed. While both
        watches stream (renewals reach the tracker as they happen, see :meth:`lease_news`; a
        Node change or a watch ending wakes a tick at once) and the last tick found the site
        settled, nothing can change before the earliest lease could go stale: the wait lasts
        until then, plus one poll interval (the same worst case as polling throughout). In
        every other case (a watch down, a dwell or grace window running, workloads scaled down,
        the API unreachable) it is ``poll_interval_seconds``.
        """
        poll = float(self.cfg.poll_interval_seconds)
        now = self.clock()
        if not watching or not self.quiet or now < self.grace_until or not self.tracker.leases:
            return poll
        earliest = min(seen.seen for seen in self.tracker.leases.values()) + float(self.cfg.lease_timeout_seconds)
        return max(poll, earliest + poll - now)

    @property
    def cfg(self) -> Any:
        return self.ctx.config.degradation

    # ------------------------------------------------------------------ the tick

    async def tick(self, api: Any) -> None:
        now = self.clock()
        self.quiet = False
        try:
            node_objs = await kube.list_objects(api, "v1", "Node")
            leases = await kube.list_objects(api, "coordination.k8s.io/v1", "Lease", namespace=LEASE_NAMESPACE)
        except kube.KubeUnavailable as exc:
            self.unreachable(str(exc), now=now)
            return
        if self.unreachable_since is not None:
            self.start_grace(now)
        self.unreachable_since = None
        renew = {
            str((lease.get("metadata") or {}).get("name")): str((lease.get("spec") or {}).get("renewTime") or "")
            for lease in leases
        }
        raw: dict[str, bool] = {}
        for obj in node_objs:
            name = str((obj.get("metadata") or {}).get("name", ""))
            fresh = self.tracker.lease_fresh(
                name, renew.get(name) or None, now=now, timeout=self.cfg.lease_timeout_seconds
            )
            raw[name] = node_ready(obj) and fresh is not False
        changes = self.tracker.observe(
            raw, now=now, degrade_dwell=self.cfg.degrade_dwell_seconds, recover_dwell=self.cfg.recover_dwell_seconds
        )
        doc = self.tracker.to_json()
        # Persist when a node's marks change, not on lease renewals (every ~10 s per node: an fsync
        # each): after a restart start_grace() restarts every lease window anyway, so saved renew
        # times only need to be as fresh as the marks.
        if doc["marks"] != self.saved_tracker.get("marks"):
            self.ctx.store.put(TRACKER_KEY, doc)
            self.saved_tracker = doc
        for name, available in changes:
            log.info("node available" if available else "node lost", node=name)
        await self.mark_lost_nodes(api, node_objs)
        nodes = [node_from(obj, available=self.tracker.available(n)) for obj in node_objs
                 for n in [str((obj.get("metadata") or {}).get("name", ""))]]  # fmt: skip
        journal = records.load(self.ctx.store)
        if all(n.available for n in nodes) and not journal and nodes and self.reconciled:
            self.settle(protocol.SiteState.GREEN, "all nodes ready", cause=tracker.CAUSE_NONE, nodes=nodes,
                        workloads=[], journal={}, now=now)
            self.quiet = all(mark.raw for mark in self.tracker.marks.values())
            return
        await self.enforce(api, nodes=nodes, journal=journal, now=now)

    async def enforce(
        self, api: Any, *, nodes: list[Node], journal: dict[records.Key, records.Record], now: float
    ) -> None:
        workloads, pods = await self.observe_workloads(api, journal)
        journal = self.adopt(workloads, journal, now=now)
        self.reconciled = True
        fixed = fixed_load(pods, nodes=nodes, workloads=workloads)
        plan = planner.plan(nodes, workloads, fixed=fixed)
        state, cause, reason = tracker.classify(nodes, plan, workloads)
        unplaced = [f"{k[0]}/{k[1]}/{k[2]} short by {v}" for k, v in plan.unplaced.items()]
        if unplaced:
            reason += f"; tiers 1-2 do not fit: {', '.join(unplaced[:5])}"
        capacity_lost = any(not n.available for n in nodes)
        by_key = {w.key: w for w in workloads}

        available = sorted(n.name for n in nodes if n.available)

        # 1. Pods stuck on lost nodes: replacements now, not after Kubernetes' 300 s. Before the
        #    scale-down: a ReplicaSet scaled down while its stranded pod still counts as active
        #    may delete the replica that runs on a healthy node instead (it cannot tell them apart
        #    until the node turns NotReady, 40 s later), leaving the workload with none running.
        if self.cfg.evict_lost_pods:
            await self.delete_lost_pods(api, pods, nodes=nodes)

        # 2. Scale down, tier 4 first; only while capacity is lost.
        if capacity_lost:
            for w in sorted(workloads, key=lambda w: (-w.tier, w.key)):
                target = plan.targets.get(w.key, w.desired)
                if w.tier >= 3 and target < w.replicas:
                    await self.scale_down(api, w, target=target, reason=reason, now=now)
                    self.ctx.store.put(BASELINE_KEY, available)

        # 3. Restore what fits again, tier 3 before tier 4, one tier per stagger interval; only
        #    with capacity beyond what was left at the last scale-down (a node came back past its
        #    recover dwell), never because a re-plan on the same nodes packs differently.
        baseline = self.ctx.store.get(BASELINE_KEY)
        grow = now >= self.grace_until and (
            not capacity_lost or (isinstance(baseline, list) and bool(set(available) - set(baseline)))
        )
        journal = records.load(self.ctx.store)
        await self.restore(api, by_key=by_key, journal=journal, plan=plan, now=now, grow=grow)
        if not journal and baseline is not None:
            self.ctx.store.put(BASELINE_KEY, None)

        self.settle(state, reason, cause=cause, nodes=nodes, workloads=workloads,
                    journal=records.load(self.ctx.store), now=now)

    # ------------------------------------------------------------------ observation

    async def observe_workloads(
        self, api: Any, journal: Mapping[records.Key, records.Record]
    ) -> tuple[list[Workload], list[dict[str, Any]]]:
        objs: list[dict[str, Any]] = []
        for kind in ("Deployment", "StatefulSet"):
            objs += await kube.list_objects(api, API_VERSIONS[kind], kind, label_selector=TIER_LABEL)
        workloads = []
        for obj in objs:
            meta = obj.get("metadata") or {}
            key = (str(obj.get("kind")), str(meta.get("namespace") or "default"), str(meta.get("name")))
            record = journal.get(key)
            w = workload_from(obj, original=record.original if record else None)
            if w is not None:
                workloads.append(w)
        pods = await kube.list_objects(api, "v1", "Pod")
        return with_running_pods(workloads, pods), pods

    # ------------------------------------------------------------------ actions

    def adopt(
        self, workloads: list[Workload], journal: dict[records.Key, records.Record], *, now: float
    ) -> dict[records.Key, records.Record]:
        """Journal rows for annotated workloads the DB does not know (a lost or older state dir)."""
        adopted = False
        for w in workloads:
            if w.annotated_original is None or w.key in journal or w.tier < 3:
                continue
            with self.ctx.store.transaction():
                records.save(self.ctx.store, key=w.key, tier=w.tier, original=w.annotated_original,
                             target=w.replicas, reason="adopted from its annotation", now=now)  # fmt: skip
                self.ctx.emit(
                    "degradation.adopted",
                    f"{w.ref} carries {ORIGINAL_REPLICAS_ANNOTATION}={w.annotated_original} without a journal row; "
                    "adopting it",
                    data={"workload": w.ref, "tier": w.tier, "original": w.annotated_original, "replicas": w.replicas},
                )
            adopted = True
        return records.load(self.ctx.store) if adopted else journal

    async def scale_down(self, api: Any, w: Workload, *, target: int, reason: str, now: float) -> None:
        original = w.desired
        with self.ctx.store.transaction():  # the journal row and its event land together
            records.save(self.ctx.store, key=w.key, tier=w.tier, original=original, target=target, reason=reason,
                         now=now)  # fmt: skip
            self.ctx.emit(
                "degradation.scaled-down",
                f"scaling tier-{w.tier} {w.ref} from {w.replicas} to {target} (original {original}): {reason}",
                severity=protocol.Severity.WARNING,
                data={"workload": w.ref, "tier": w.tier, "from": w.replicas, "to": target, "original": original},
            )
        if w.annotated_original != original:
            await kube.patch(
                api, API_VERSIONS[w.kind], w.kind, w.name,
                {"metadata": {"annotations": {ORIGINAL_REPLICAS_ANNOTATION: str(original)}}},
                namespace=w.namespace, field_manager=FIELD_MANAGER,
            )  # fmt: skip
        await self.scale(api, w, target)

    async def mark_lost_nodes(self, api: Any, node_objs: list[dict[str, Any]]) -> None:
        """Taint lost nodes ``edgefleet.io/node-lost:NoSchedule``; untaint them once available again.

        Until Kubernetes marks a dead node NotReady (40 s) its scheduler keeps binding pods there,
        including the replacements of the pods this controller just deleted. The patch carries the
        node's resourceVersion, so it never overwrites a taint the node controller added meanwhile
        (a conflict is retried on the next tick).
        """
        for obj in node_objs:
            meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
            name = str(meta.get("name", ""))
            taints = [t for t in spec.get("taints") or [] if isinstance(t, dict)]
            ours = any(t.get("key") == LOST_TAINT for t in taints)
            lost = not self.tracker.available(name)
            if lost == ours:
                continue
            if lost:
                new = [*taints, {"key": LOST_TAINT, "effect": "NoSchedule"}]
            else:
                new = [t for t in taints if t.get("key") != LOST_TAINT]
            body = {"metadata": {"resourceVersion": meta.get("resourceVersion")}, "spec": {"taints": new or None}}
            try:
                await kube.patch(api, "v1", "Node", name, body, field_manager=FIELD_MANAGER)
            except (kube.Conflict, kube.NotFound) as exc:
                log.info("node taint deferred", node=name, error=str(exc))
                continue
            log.info("tainted lost node" if lost else "untainted recovered node", node=name, taint=LOST_TAINT)

    async def scale(self, api: Any, w: Workload, replicas: int) -> None:
        await kube.patch(
            api, API_VERSIONS[w.kind], w.kind, w.name, {"spec": {"replicas": replicas}},
            namespace=w.namespace, field_manager=FIELD_MANAGER, subresource="scale",
        )  # fmt: skip

    async def restore(
        self,
        api: Any,
        *,
        by_key: Mapping[records.Key, Workload],
        journal: Mapping[records.Key, records.Record],
        plan: planner.Plan,
        now: float,
        grow: bool,
    ) -> None:
        ready: list[tuple[records.Record, Workload, int]] = []
        for key, record in journal.items():
            w = by_key.get(key)
            if w is None:  # deleted (or untiered) meanwhile: nothing to restore, forget it
                with self.ctx.store.transaction():
                    records.forget(self.ctx.store, key)
                    self.ctx.emit(
                        "degradation.forgotten", f"{'/'.join(key)} is gone; dropping its scale-down record",
                        data={"workload": "/".join(key), "original": record.original},
                    )  # fmt: skip
                continue
            target = min(plan.targets.get(key, record.original), record.original)
            if target > w.replicas or (target == record.original and target == w.replicas):
                ready.append((record, w, target))
        if not ready:
            return
        # Already-restored workloads (crash between scale-up and clean-up) finish right away.
        done_already = [(r, w, t) for r, w, t in ready if t == w.replicas]
        for record, w, _ in done_already:
            await self.finish_restore(api, record, w)
        growing = [(r, w, t) for r, w, t in ready if t > w.replicas]
        if not grow or not growing or now - self.last_restore < self.cfg.restore_stagger_seconds:
            return
        tier = min(w.tier for _, w, _ in growing)  # 3 before 4
        for record, w, target in growing:
            if w.tier != tier:
                continue
            await self.scale(api, w, target)
            self.ctx.emit(
                "degradation.restored",
                f"restoring tier-{w.tier} {w.ref} from {w.replicas} to {target} (original {record.original})",
                data={"workload": w.ref, "tier": w.tier, "from": w.replicas, "to": target, "original": record.original},
            )
            if target == record.original:
                await self.finish_restore(api, record, w)
            else:
                records.save(self.ctx.store, key=w.key, tier=w.tier, original=record.original, target=target,
                             reason=record.reason, now=record.since)  # fmt: skip
        self.last_restore = now

    async def finish_restore(self, api: Any, record: records.Record, w: Workload) -> None:
        if w.annotated_original is not None:
            await kube.patch(
                api, API_VERSIONS[w.kind], w.kind, w.name,
                {"metadata": {"annotations": {ORIGINAL_REPLICAS_ANNOTATION: None}}},
                namespace=w.namespace, field_manager=FIELD_MANAGER,
            )  # fmt: skip
        records.forget(self.ctx.store, record.key)

    async def delete_lost_pods(self, api: Any, pods: list[dict[str, Any]], *, nodes: list[Node]) -> None:
        lost = {n.name for n in nodes if not n.available and not self.tracker.marks[n.name].raw}
        if not lost:
            self.deleted_pods.clear()
            return
        victims = []
        for pod in pods:
            meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
            uid = str(meta.get("uid") or meta.get("name"))
            tier = tier_of(pod)
            if spec.get("nodeName") not in lost or tier is None or tier < 2 or uid in self.deleted_pods:
                continue
            # A DaemonSet pod belongs to its node: its controller recreates it there at once (node-exporter
            # tolerates every taint), so deleting it frees nothing and would loop for as long as the node is lost.
            if any(ref.get("kind") == "DaemonSet" for ref in meta.get("ownerReferences") or []):
                continue
            path = f"/api/v1/namespaces/{meta.get('namespace', 'default')}/pods/{meta.get('name')}"
            body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                    "preconditions": {"uid": meta.get("uid")} if meta.get("uid") else None}  # fmt: skip
            with contextlib.suppress(kube.NotFound, kube.Conflict):  # gone already, or a new pod by that name
                await kube.request(api, "DELETE", path, body={k: v for k, v in body.items() if v is not None})
            self.deleted_pods.add(uid)
            victims.append(f"{meta.get('namespace')}/{meta.get('name')}")
        if victims:
            self.ctx.emit(
                "degradation.pods-deleted",
                f"force-deleted {len(victims)} tier 2-4 pods on lost nodes {', '.join(sorted(lost))} "
                "so their replacements start now",
                severity=protocol.Severity.WARNING,
                data={"pods": victims[:50], "nodes": sorted(lost)},
            )

    # ------------------------------------------------------------------ state

    def unreachable(self, error: str, *, now: float) -> None:
        if self.unreachable_since is None:
            self.unreachable_since = now
            log.warning("API server unreachable", error=error)
        if self.state is protocol.SiteState.BLACK or now - self.unreachable_since < self.cfg.degrade_dwell_seconds:
            return
        saved = self.ctx.store.get(sitestatus.DEGRADATION_KEY, {}) or {}
        self.transition(protocol.SiteState.BLACK, f"API server unreachable: {error[:300]}",
                        cause=tracker.CAUSE_API_UNREACHABLE, now=now)
        self.ctx.store.put(sitestatus.DEGRADATION_KEY, {**saved, "state": self.state.value, "reason": self.reason,
                                                        "cause": self.cause, "since": now})  # fmt: skip

    def settle(
        self,
        state: protocol.SiteState,
        reason: str,
        *,
        cause: str,
        nodes: list[Node],
        workloads: list[Workload],
        journal: Mapping[records.Key, records.Record],
        now: float,
    ) -> None:
        if state is not self.state:
            self.transition(state, reason, cause=cause, now=now)
        self.reason, self.cause = reason, cause
        by_key = {w.key: w for w in workloads}
        scaled = [
            protocol.ScaledWorkload(
                kind=r.kind, namespace=r.namespace, name=r.name, tier=r.tier, original_replicas=r.original,
                replicas=by_key[r.key].replicas if r.key in by_key else r.target, reason=r.reason,
            ).model_dump()
            for r in sorted(journal.values(), key=lambda r: (r.tier, r.key))
        ]  # fmt: skip
        pending = self.tracker.pending(
            now=now, degrade_dwell=self.cfg.degrade_dwell_seconds, recover_dwell=self.cfg.recover_dwell_seconds
        )
        doc = {
            "state": self.state.value,
            "reason": self.reason,
            "cause": self.cause,
            "since": self.state_since,
            "nodes": [
                protocol.NodeHealth(name=n.name, ready=n.available, control_plane=n.control_plane).model_dump()
                for n in sorted(nodes, key=lambda n: (not n.control_plane, n.name))
            ],
            "scaled_down": scaled,
            "pending": {k: round(v, 1) for k, v in sorted(pending.items())},
            "limp_home": self.state is protocol.SiteState.RED,
        }
        if json.dumps(doc, sort_keys=True) != json.dumps(
            self.ctx.store.get(sitestatus.DEGRADATION_KEY), sort_keys=True
        ):
            self.ctx.store.put(sitestatus.DEGRADATION_KEY, doc)

    def transition(self, state: protocol.SiteState, reason: str, *, cause: str, now: float) -> None:
        previous = self.state
        self.state, self.cause, self.reason, self.state_since = state, cause, reason, now
        self.ctx.emit(
            "degradation.transition",
            f"site {previous.value} -> {state.value}: {reason}",
            severity=_SEVERITY[state],
            data={"from": previous.value, "to": state.value, "reason": reason, "cause": cause},
        )
        metrics.TRANSITIONS.labels(previous.value, state.value).inc()
        if state is protocol.SiteState.RED:
            self.ctx.limp_home.set()
        elif state is not protocol.SiteState.BLACK:
            self.ctx.limp_home.clear()
        self.ctx.report_now.set()


def with_running_pods(workloads: list[Workload], pods: list[dict[str, Any]]) -> list[Workload]:
    """Attach to each workload the nodes its live (bound, not terminating, not finished) pods run on."""
    running: dict[tuple[str, str, str], list[str]] = {}
    for pod in pods:
        meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
        if not spec.get("nodeName") or meta.get("deletionTimestamp") or status.get("phase") in _TERMINAL_PHASES:
            continue
        owner = _owner(meta)
        if owner is not None:
            running.setdefault(owner, []).append(str(spec["nodeName"]))
    return [dataclasses.replace(w, running_on=tuple(sorted(running.get(w.key, ())))) for w in workloads]


def _owner(meta: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """The Deployment or StatefulSet (kind, namespace, name) a pod belongs to, by its owner reference."""
    ns = str(meta.get("namespace") or "default")
    for ref in meta.get("ownerReferences") or []:
        kind, name = ref.get("kind"), str(ref.get("name", ""))
        if kind == "StatefulSet":
            return ("StatefulSet", ns, name)
        if kind == "ReplicaSet":
            # A Deployment's ReplicaSet is named <deployment>-<pod-template-hash>.
            hash_ = str((meta.get("labels") or {}).get("pod-template-hash", ""))
            base = name[: -len(hash_) - 1] if hash_ and name.endswith("-" + hash_) else name.rpartition("-")[0]
            return ("Deployment", ns, base)
    return None


def fixed_load(pods: list[dict[str, Any]], *, nodes: list[Node], workloads: list[Workload]) -> dict[str, Resources]:
    """Requests of the pods on available nodes that the plan does not place itself.

    The planner re-places every replica of the tiered Deployments/StatefulSets, so their pods
    are left out; everything else bound to an available node (DaemonSet pods, tier-less and
    bare pods) stays where it is and takes room. Finished pods take none.
    """
    available = {n.name for n in nodes if n.available}
    planned = {w.key for w in workloads}
    load: dict[str, Resources] = {}
    for pod in pods:
        meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
        node = spec.get("nodeName")
        if node not in available or status.get("phase") in _TERMINAL_PHASES:
            continue
        if _owner(meta) in planned:
            continue
        load[str(node)] = load.get(str(node), Resources()) + pod_requests(spec)
    return load


# --------------------------------------------------------------------------- the daemon task


async def run(ctx: AgentContext) -> None:
    """The daemon task: see the module docstring. Returns only if degradation is disabled."""
    if not ctx.config.degradation.enabled:
        log.info("degradation controller disabled by config")
        return
    ctl = Controller.load(ctx)
    cfg = ctx.config.degradation
    while True:
        try:
            async with kube.shared(ctx.config.kubeconfig) as api:
                wake = asyncio.Event()
                streaming: set[str] = set()
                paths = ["/api/v1/nodes", f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"]
                watchers = (
                    [asyncio.create_task(watch(api, paths[0], wake, live=streaming)),
                     asyncio.create_task(watch(api, paths[1], wake, news=ctl.lease_news, live=streaming))]
                    if cfg.watch else []
                )  # fmt: skip
                try:
                    while True:
                        started = time.monotonic()
                        try:
                            await ctl.tick(api)
                        except kube.KubeUnavailable as exc:
                            ctl.unreachable(str(exc), now=ctl.clock())
                        except kube.KubeError as exc:
                            log.warning("degradation tick failed", error=str(exc))
                        wake.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(wake.wait(), ctl.idle_wait(watching=streaming.issuperset(paths)))
                        await asyncio.sleep(max(0.0, _MIN_TICK_SECONDS - (time.monotonic() - started)))
                finally:
                    for task in watchers:
                        task.cancel()
                    await asyncio.gather(*watchers, return_exceptions=True)
        except kube.KubeConfigError as exc:
            ctl.unreachable(str(exc), now=ctl.clock())
            await asyncio.sleep(cfg.poll_interval_seconds * 5)


async def watch(
    api: Any,
    path: str,
    wake: asyncio.Event,
    *,
    news: Callable[[bytes], bool] | None = None,
    live: set[str] | None = None,
) -> None:
    """Stream a watch on ``path``, set ``wake`` on each event ``news`` accepts (default: all); reconnect with backoff.

    Only a hint: the tick re-lists everything it needs, so a missed or failed watch costs at
    most one poll interval. ``path`` is in ``live`` while the stream is open; its end wakes a
    tick (from then on the controller polls, see :meth:`Controller.idle_wait`), and a new stream
    starts with an ADDED event per existing object, which wakes one too.
    """
    delay = 0.5
    while True:
        try:
            response = await api.call_api(
                path, "GET",
                query_params=[("watch", "true"), ("allowWatchBookmarks", "false"), ("timeoutSeconds", "300")],
                header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
                _preload_content=False, _request_timeout=330,
            )  # fmt: skip
            async with response:
                if response.status != 200:
                    raise kube.KubeError(f"watch {path}: HTTP {response.status}")
                delay = 0.5
                if live is not None:
                    live.add(path)
                try:
                    async for line in response.content:
                        if news is None or news(line):
                            wake.set()
                finally:
                    if live is not None:
                        live.discard(path)
                        wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure: back off and re-watch
            log.debug("watch failed", path=path, error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)
