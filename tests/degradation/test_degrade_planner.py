"""The pure planner, tracker and state classification: exhaustive-ish and property tests."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import placement, protocol
from agent.degrade import planner, tracker
from agent.degrade.model import Node, Resources, Taint, Workload, quantity, workload_from

GiB = 1 << 30
CP_TAINT = Taint(key="node-role.kubernetes.io/control-plane", effect="NoSchedule")
CP_TOL = dict(placement.CONTROL_PLANE_TOLERATION)


def node(name: str, *, cpu: int = 4000, mem: int = 8 * GiB, cp: bool = False, available: bool = True) -> Node:
    return Node(
        name=name,
        available=available,
        control_plane=cp,
        allocatable=Resources(cpu, mem, 110),
        taints=(CP_TAINT,) if cp else (),
        labels={"kubernetes.io/hostname": name},
    )


def wl(name: str, tier: int, replicas: int, *, cpu: int = 500, mem: int = GiB, **kw: Any) -> Workload:
    tolerations = (CP_TOL,) if tier <= 2 else ()
    return Workload(
        kind="Deployment", namespace="ns", name=name, tier=tier, desired=kw.pop("desired", replicas),
        replicas=replicas, requests=Resources(cpu, mem, 1), tolerations=kw.pop("tolerations", tolerations), **kw,
    )  # fmt: skip


def site(*, lost: tuple[str, ...] = ()) -> list[Node]:
    return [node("server-0", cp=True, available="server-0" not in lost)] + [
        node(f"agent-{i}", available=f"agent-{i}" not in lost) for i in range(2)
    ]


PLATFORM = [
    wl("cilium-operator", 1, 1, cpu=200, mem=GiB // 4),
    wl("argocd-server", 2, 2, cpu=500, mem=GiB),
    wl("prometheus", 2, 1, cpu=1000, mem=2 * GiB),
    wl("loki", 3, 1, cpu=1000, mem=2 * GiB),
    wl("argo-events", 3, 1, cpu=500, mem=GiB),
    wl("grafana", 4, 2, cpu=1000, mem=2 * GiB),
    wl("backstage", 4, 2, cpu=1000, mem=2 * GiB),
]


def test_quantities() -> None:
    assert quantity("100m") * 1000 == 100
    assert quantity("1.5") == quantity("1500m")
    assert quantity("512Mi") == 512 * 2**20
    assert quantity("1G") == 10**9
    assert quantity("2e3") == 2000
    assert quantity("bogus") == 0
    assert Resources.parse({"cpu": "250m", "memory": "1Gi", "pods": "110"}) == Resources(250, GiB, 110)


def test_all_healthy_everything_fits() -> None:
    plan = planner.plan(site(), PLATFORM)
    assert all(plan.targets[w.key] == w.desired for w in PLATFORM)
    assert not plan.unplaced and not plan.scaled(PLATFORM)


def test_one_worker_lost_tier4_shrinks_tiers_2_3_full() -> None:
    plan = planner.plan(site(lost=("agent-1",)), PLATFORM)
    for w in PLATFORM:
        if w.tier <= 3:
            assert plan.targets[w.key] == w.desired, w.name
    scaled = plan.scaled(PLATFORM)
    assert scaled and all(w.tier == 4 for w in scaled)
    # Round-robin inside tier 4: each tier-4 workload keeps a replica before any keeps two.
    t4 = [plan.targets[w.key] for w in PLATFORM if w.tier == 4]
    assert max(t4) - min(t4) <= 1
    state, cause, reason = tracker.classify(site(lost=("agent-1",)), plan, PLATFORM)
    assert state is protocol.SiteState.YELLOW and cause == tracker.CAUSE_NODE_LOST and "agent-1" in reason


def test_both_workers_lost_tier2_on_server_tiers_3_4_zero() -> None:
    nodes = site(lost=("agent-0", "agent-1"))
    plan = planner.plan(nodes, PLATFORM)
    for w in PLATFORM:
        if w.tier <= 2:
            assert plan.targets[w.key] == w.desired
            assert plan.placement[w.key] == ["server-0"] * w.desired
        else:
            assert plan.targets[w.key] == 0, w.name
    assert not plan.unplaced
    state, cause, reason = tracker.classify(nodes, plan, PLATFORM)
    assert state is protocol.SiteState.RED and cause == tracker.CAUSE_CONTROL_PLANE_ONLY and "server-0" in reason


def test_tier2_that_does_not_fit_is_reported_not_scaled() -> None:
    nodes = [node("server-0", cp=True, cpu=1000)] + [node("agent-0", available=False)]
    workloads = [wl("big", 2, 3, cpu=600)]
    plan = planner.plan(nodes, workloads)
    assert plan.targets[workloads[0].key] == 3
    assert plan.unplaced == {workloads[0].key: 2}


def test_fixed_load_taken_first() -> None:
    nodes = [node("agent-0", cpu=2000)]
    workloads = [wl("a", 4, 2, cpu=1000)]
    assert planner.plan(nodes, workloads).targets[workloads[0].key] == 2
    assert planner.plan(nodes, workloads, fixed={"agent-0": Resources(500, 0, 1)}).targets[workloads[0].key] == 1


def test_pod_slots_and_memory_limit() -> None:
    nodes = [Node(name="n", allocatable=Resources(100_000, 4 * GiB, 3))]
    assert planner.plan(nodes, [w := wl("a", 4, 5, cpu=1, mem=1, tolerations=())]).targets[w.key] == 3
    assert planner.plan(nodes, [w := wl("b", 4, 5, cpu=1, mem=GiB + 1)]).targets[w.key] == 3


def test_taints_selectors_affinity_and_one_per_node() -> None:
    nodes = [
        Node(name="a", allocatable=Resources(8000, 16 * GiB, 110), labels={"role": "infra"}),
        Node(name="b", allocatable=Resources(8000, 16 * GiB, 110), labels={"role": "apps"},
             taints=(Taint("dedicated", "x", "NoExecute"),)),
        Node(name="c", allocatable=Resources(8000, 16 * GiB, 110), labels={}, unschedulable=True),
        Node(name="d", allocatable=Resources(8000, 16 * GiB, 110), labels={},
             taints=(Taint("soft", "", "PreferNoSchedule"),)),
    ]  # fmt: skip
    sel = wl("sel", 4, 2, node_selector={"role": "apps"})
    assert planner.plan(nodes, [sel]).targets[sel.key] == 0  # b is tainted and not tolerated
    tol = wl("tol", 4, 2, node_selector={"role": "apps"}, tolerations=({"key": "dedicated", "operator": "Exists"},))
    assert planner.plan(nodes, [tol]).placement[tol.key] == ["b", "b"]
    term = {"matchExpressions": [{"key": "role", "operator": "In", "values": ["infra"]}]}
    aff = wl("aff", 4, 2, node_terms=(term,))
    assert planner.plan(nodes, [aff]).placement[aff.key] == ["a", "a"]
    notin = {"matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["infra"]}]}
    assert set(planner.plan(nodes, [w := wl("notin", 4, 1, node_terms=(notin,))]).placement[w.key]) == {"d"}
    spread = wl("spread", 4, 3, one_per_node=True)
    plan = planner.plan(nodes, [spread])
    assert plan.targets[spread.key] == 2 and sorted(plan.placement[spread.key]) == ["a", "d"]


def test_tier3_only_gets_what_tier2_leaves_and_tier4_what_tier3_leaves() -> None:
    nodes = [node("agent-0", cpu=2000)]
    workloads = [wl("t2", 2, 1, cpu=1000), wl("t3", 3, 2, cpu=500), wl("t4", 4, 1, cpu=100)]
    plan = planner.plan(nodes, workloads)
    assert [plan.targets[w.key] for w in workloads] == [1, 2, 0]


def test_running_pods_stay_unless_higher_tiers_need_the_room() -> None:
    nodes = [node("a", cpu=2000), node("b", cpu=2000)]
    t4 = wl("t4", 4, 2, cpu=1000, running_on=("a", "a"))
    plan = planner.plan(nodes, [t4])
    assert plan.placement[t4.key] == ["a", "a"]  # not spread over a and b: running pods do not move
    t3 = wl("t3", 3, 2, cpu=1000, running_on=("b",))
    plan = planner.plan(nodes, [t3, t4])
    # Tier 3 keeps its running pod on b; its new replica takes the roomier a, and tier 4 (placed
    # last) keeps one running pod on a; the other (preempted) finds room on b.
    assert plan.placement[t3.key] == ["b", "a"] and plan.placement[t4.key] == ["a", "b"]
    big = wl("t2", 2, 1, cpu=2000)
    plan = planner.plan(nodes, [big, t3, t4])
    assert plan.placement[big.key] == ["a"] and plan.placement[t3.key] == ["b", "b"] and plan.targets[t4.key] == 0


def test_workload_from_manifest_annotation_and_record() -> None:
    obj = {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "loki", "namespace": "obs", "labels": {"edgefleet.io/tier": "3"},
                     "annotations": {"edgefleet.io/original-replicas": "3"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "loki"}}, "template": {"spec": {
            "containers": [{"resources": {"requests": {"cpu": "250m", "memory": "1Gi"}}},
                           {"resources": {"requests": {"cpu": "50m"}}}],
            "initContainers": [{"resources": {"requests": {"cpu": "2", "memory": "10Mi"}}}],
            "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {"app": "loki"}}, "topologyKey": "kubernetes.io/hostname"}]}},
        }}},
    }  # fmt: skip
    w = workload_from(obj)
    assert w is not None
    assert (w.tier, w.replicas, w.desired, w.annotated_original, w.one_per_node) == (3, 1, 3, 3, True)
    assert w.requests == Resources(2000, GiB, 1)
    assert workload_from(obj, original=4).desired == 4  # the DB record wins
    obj["metadata"]["labels"] = {}
    assert workload_from(obj) is None


# --------------------------------------------------------------------------- properties

_nodes = st.lists(
    st.builds(
        lambda i, cp, avail, cpu, mem: node(f"n{i}", cp=cp, available=avail, cpu=cpu, mem=mem * GiB),
        st.integers(0, 10**6), st.booleans(), st.booleans(), st.integers(0, 8000), st.integers(0, 16),
    ),
    max_size=5, unique_by=lambda n: n.name,
)  # fmt: skip
_workloads = st.lists(
    st.builds(
        lambda i, tier, replicas, cpu, mem, opn: wl(f"w{i}", tier, replicas, cpu=cpu, mem=mem * GiB // 4,
                                                     one_per_node=opn),
        st.integers(0, 10**6), st.integers(1, 4), st.integers(0, 5), st.integers(0, 3000), st.integers(0, 12),
        st.booleans(),
    ),
    max_size=8, unique_by=lambda w: w.name,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(nodes=_nodes, workloads=_workloads)
def test_plan_invariants(nodes: list[Node], workloads: list[Workload]) -> None:
    plan = planner.plan(nodes, workloads)
    by_name = {n.name: n for n in nodes}
    used: dict[str, Resources] = {}
    for w in workloads:
        target = plan.targets[w.key]
        where = plan.placement.get(w.key, [])
        # Tiers 1-2 never scaled; 3-4 never above desired and exactly what was placed.
        if w.tier <= 2:
            assert target == w.desired and len(where) + plan.unplaced.get(w.key, 0) == w.desired
        else:
            assert 0 <= target <= w.desired and target == len(where)
        for name in where:
            n = by_name[name]
            assert n.available and planner.eligible(n, w)
            used[name] = used.get(name, Resources()) + w.requests
        if w.one_per_node:
            assert len(where) == len(set(where))
    # Never over capacity.
    for name, total in used.items():
        assert total.fits_in(by_name[name].allocatable)
    # Lower tiers never take room from higher ones: tiers 1-2 are placed exactly as if 3-4 did not exist.
    top = [w for w in workloads if w.tier <= 2]
    alone = planner.plan(nodes, top)
    assert alone.unplaced == plan.unplaced
    assert {k: v for k, v in plan.placement.items() if k in alone.targets} == alone.placement


@settings(max_examples=200, deadline=None)
@given(nodes=_nodes, workloads=_workloads)
def test_more_capacity_never_lowers_targets(nodes: list[Node], workloads: list[Workload]) -> None:
    """Monotonic in capacity for one tier-3/4 workload at a time (greedy packing is not globally monotonic)."""
    healthy = [Node(**{**n.__dict__, "available": True}) for n in nodes]
    for w in workloads:
        alone = [w]
        assert planner.plan(healthy, alone).targets[w.key] >= planner.plan(nodes, alone).targets[w.key]


# --------------------------------------------------------------------------- tracker


def test_hysteresis_and_flapping() -> None:
    t = tracker.Tracker()
    dwell = {"degrade_dwell": 5.0, "recover_dwell": 60.0}
    assert t.observe({"a": True}, now=0, **dwell) == []
    assert t.available("a")
    assert t.observe({"a": False}, now=1, **dwell) == []
    assert t.observe({"a": False}, now=6, **dwell) == [("a", False)]
    # Flapping: healthy for 30 s, down 10 s, ... never 60 s in a row: stays lost.
    now, changes = 6.0, []
    for _ in range(10):
        changes += t.observe({"a": True}, now=now, **dwell)
        now += 30
        changes += t.observe({"a": True}, now=now, **dwell)
        changes += t.observe({"a": False}, now=now + 1, **dwell)
        now += 10
    assert changes == [] and not t.available("a")
    t.observe({"a": True}, now=now, **dwell)
    assert t.observe({"a": True}, now=now + 59, **dwell) == []
    assert t.observe({"a": True}, now=now + 60, **dwell) == [("a", True)]
    # Persisted and reloaded, the timers go on.
    t.observe({"a": False}, now=now + 100, **dwell)
    again = tracker.Tracker.from_json(t.to_json())
    assert again.observe({"a": False}, now=now + 105, **dwell) == [("a", False)]


def test_lease_staleness_on_agent_clock() -> None:
    t = tracker.Tracker()
    # A worker clock 1 h ahead does not matter: only changes of renewTime count.
    skewed = "2099-01-01T00:00:00.000000Z"
    assert t.lease_fresh("a", skewed, now=1000, timeout=20) is True
    assert t.lease_fresh("a", skewed, now=1019, timeout=20) is True
    assert t.lease_fresh("a", skewed, now=1021, timeout=20) is False
    assert t.lease_fresh("a", "2099-01-01T00:00:10.000000Z", now=1022, timeout=20) is True
    # First sight of an old lease (a site powering up): one fresh timeout window, then stale.
    assert t.lease_fresh("b", "2000-01-01T00:00:00Z", now=2000, timeout=20) is True
    assert t.lease_fresh("b", "2000-01-01T00:00:00Z", now=2021, timeout=20) is False
    # After a gap (agent restart, API outage) every lease gets a new window.
    t.grace(now=2030)
    assert t.lease_fresh("b", "2000-01-01T00:00:00Z", now=2049, timeout=20) is True
    assert t.lease_fresh("b", "2000-01-01T00:00:00Z", now=2051, timeout=20) is False
    assert t.lease_fresh("c", None, now=1000, timeout=20) is None


@pytest.mark.parametrize(
    ("lost", "state", "cause"),
    [((), "green", "none"), (("agent-0",), "yellow", "node-lost"), (("server-0",), "yellow", "node-lost"),
     (("agent-0", "agent-1"), "red", "control-plane-only"), (("server-0", "agent-0", "agent-1"), "red", "no-nodes")],
)  # fmt: skip
def test_classify_three_nodes(lost: tuple[str, ...], state: str, cause: str) -> None:
    nodes = site(lost=lost)
    plan = planner.plan(nodes, PLATFORM)
    got = tracker.classify(nodes, plan, PLATFORM)
    assert (got[0].value, got[1]) == (state, cause)
    assert got[1] in tracker.CAUSES


def test_classify_untainted_ha_servers_count_as_workers() -> None:
    servers = [Node(name=f"s{i}", control_plane=True, available=i != 0, allocatable=Resources(4000, 8 * GiB, 110))
               for i in range(3)]  # fmt: skip
    plan = planner.plan(servers, PLATFORM)
    assert tracker.classify(servers, plan, PLATFORM)[0] is protocol.SiteState.YELLOW


def test_classify_by_capacity_many_nodes() -> None:
    nodes = [node("cp", cp=True)] + [node(f"w{i}", cpu=1000, available=i < 2) for i in range(6)]
    small = [wl("t3", 3, 1, cpu=500)]
    assert tracker.classify(nodes, planner.plan(nodes, small), small)[0] is protocol.SiteState.YELLOW
    big = [wl("t3", 3, 5, cpu=900)]
    state, cause, reason = tracker.classify(nodes, planner.plan(nodes, big), big)
    assert state is protocol.SiteState.RED and cause == tracker.CAUSE_CAPACITY and "tier 3" in reason
