"""The cluster model with an accelerated clock: scheduler, preemption, node failure, eviction, workloads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sim_helpers import until

import sim.testing
from sim.cluster import NodeSize, Timing

CONTROL_PLANE_TOL = {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}


def _res(site: sim.testing.Site, group: str, plural: str) -> Any:
    return site.cluster.api.resource(group, plural)


def create(site: sim.testing.Site, group: str, plural: str, obj: dict[str, Any], ns: str = "default") -> Any:
    return site.cluster.api.create(_res(site, group, plural), ns, obj, manager="test")


def pods(site: sim.testing.Site, selector: Callable[[dict[str, Any]], bool] = lambda p: True) -> list[dict[str, Any]]:
    return [p for p in site.cluster.api.list_objects(("", "pods")) if selector(p)]


def labelled(app: str) -> Callable[[dict[str, Any]], bool]:
    return lambda p: (p["metadata"].get("labels") or {}).get("app") == app


def running(p: dict[str, Any]) -> bool:
    return (p.get("status") or {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")


def deployment(name: str, replicas: int, *, cpu: str = "100m", memory: str = "64Mi", **pod_spec: Any) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "img:1",
                                                           "resources": {"requests": {"cpu": cpu,
                                                                                      "memory": memory}}}],
                                           **pod_spec}}}}


def pod(name: str, *, cpu: str = "100m", memory: str = "64Mi", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"containers": [{"name": "c", "image": "img:1",
                                     "resources": {"requests": {"cpu": cpu, "memory": memory}}}], **spec}}


def node(site: sim.testing.Site, name: str) -> dict[str, Any]:
    obj = site.cluster.api.get(("", "nodes"), "", name)
    assert obj is not None
    return obj


def ready(n: dict[str, Any]) -> str:
    return next(c["status"] for c in n["status"]["conditions"] if c["type"] == "Ready")


def pod_scheduled(p: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in p["status"].get("conditions") or [] if c["type"] == "PodScheduled")


async def test_scheduler_requests_selectors_affinity_and_taints() -> None:
    async with sim.testing.running(speed=100) as site:
        create(site, "", "pods", pod("big-a", cpu="3"))
        create(site, "", "pods", pod("big-b", cpu="3"))
        await until(lambda: len(pods(site, running)) == 2)
        assert {p["spec"]["nodeName"] for p in pods(site)} == {"agent-0", "agent-1"}
        create(site, "", "pods", pod("big-c", cpu="3"))
        stuck = await until(lambda: next((p for p in pods(site, labelled("big-c"))
                                          if pod_scheduled(p).get("reason") == "Unschedulable"), None)
                            if pods(site, labelled("big-c"))[0]["status"].get("conditions") else None)
        cond = pod_scheduled(stuck)
        assert cond["status"] == "False" and stuck["status"]["phase"] == "Pending"
        assert cond["message"].startswith("0/3 nodes are available: 2 Insufficient cpu, 1 node(s) had untolerated "
                                          "taint {node-role.kubernetes.io/control-plane: }.")
        create(site, "", "pods", pod("infra", nodeSelector={"role": "infra"}))
        create(site, "", "pods", pod("cp", tolerations=[CONTROL_PLANE_TOL], affinity={"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}]}}}))
        create(site, "", "pods", pod("cp-untolerated", nodeSelector={"kubernetes.io/hostname": "server-0"}))
        await until(lambda: len(pods(site, running)) == 4)
        placed = {p["metadata"]["name"]: p["spec"].get("nodeName") for p in pods(site)}
        assert placed["infra"] == "agent-0" and placed["cp"] == "server-0" and placed["cp-untolerated"] is None
        # freeing room schedules the pending pod
        site.cluster.api.delete(_res(site, "", "pods"), "default", "big-a")
        await until(lambda: any(running(p) for p in pods(site, labelled("big-c"))))


async def test_preferred_anti_affinity_spreads_replicas() -> None:
    async with sim.testing.running(speed=100) as site:
        aff = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                "labelSelector": {"matchLabels": {"app": "spread"}}}}]}}
        create(site, "apps", "deployments", deployment("spread", 3, affinity=aff, tolerations=[CONTROL_PLANE_TOL]))
        await until(lambda: len(pods(site, lambda p: labelled("spread")(p) and running(p))) == 3)
        assert sorted(p["spec"]["nodeName"] for p in pods(site, labelled("spread"))) == ["agent-0", "agent-1",
                                                                                        "server-0"]


async def test_priority_preemption() -> None:
    sizes = {"agent-0": NodeSize(cpu="2"), "agent-1": NodeSize(cpu="2")}
    async with sim.testing.running(speed=100, sizes=sizes) as site:
        create(site, "scheduling.k8s.io", "priorityclasses", {"metadata": {"name": "low"}, "value": 100})
        create(site, "scheduling.k8s.io", "priorityclasses", {"metadata": {"name": "high"}, "value": 1000})
        create(site, "apps", "deployments", deployment("filler", 4, cpu="900m", priorityClassName="low"))
        await until(lambda: len(pods(site, lambda p: labelled("filler")(p) and running(p))) == 4)
        assert all(p["spec"]["priority"] == 100 for p in pods(site, labelled("filler")))
        create(site, "", "pods", pod("vip", cpu="1500m", priorityClassName="high"))
        vip = await until(lambda: next((p for p in pods(site, labelled("vip")) if running(p)), None))
        assert vip["spec"]["priority"] == 1000
        node_pods = [p for p in pods(site, running) if p["spec"]["nodeName"] == vip["spec"]["nodeName"]]
        assert sum(1 for p in node_pods if labelled("filler")(p)) == 0  # both low-priority pods there preempted
        fillers = pods(site, lambda p: labelled("filler")(p) and not p["metadata"].get("deletionTimestamp"))
        pending = [p for p in fillers if not p["spec"].get("nodeName")]
        assert len(pending) == 2 and all(pod_scheduled(p)["reason"] == "Unschedulable" for p in pending
                                         if p["status"].get("conditions"))
        # an unknown PriorityClass is refused by admission, as on a real server
        try:
            create(site, "", "pods", pod("nope", priorityClassName="missing"))
        except sim.errors.ApiError as exc:  # type: ignore[attr-defined]
            assert exc.code == 403 and "no PriorityClass with name missing" in exc.message
        else:
            raise AssertionError("pod with unknown priority class admitted")


async def test_node_failure_taints_evicts_and_reschedules() -> None:
    timing = Timing(pod_startup=2.0)
    async with sim.testing.running(speed=100, timing=timing) as site:
        aff = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                "labelSelector": {"matchLabels": {"app": "web"}}}}]}}
        create(site, "apps", "deployments", deployment("web", 2, affinity=aff))
        quick = [{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                  "tolerationSeconds": 30}]
        create(site, "", "pods", pod("quick", nodeSelector={"role": "infra"}, tolerations=quick))
        forever = [{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"}]
        create(site, "", "pods", pod("stay", nodeSelector={"role": "infra"}, tolerations=forever))
        ds = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "ds"},
              "spec": {"selector": {"matchLabels": {"app": "ds"}}, "template": {
                  "metadata": {"labels": {"app": "ds"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
        create(site, "apps", "daemonsets", ds)
        await until(lambda: len(pods(site, running)) == 6)
        web_pod = next(p for p in pods(site, labelled("web")) if p["spec"]["nodeName"] == "agent-0")
        default_tol = [t for t in web_pod["spec"]["tolerations"] if t["key"] == "node.kubernetes.io/unreachable"]
        assert default_tol == [{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                                "effect": "NoExecute", "tolerationSeconds": 300}]
        lease_before = site.cluster.api.get(("coordination.k8s.io", "leases"), "kube-node-lease", "agent-0")
        t0 = site.clock.monotonic()
        await site.fail_node("agent-0")
        await until(lambda: ready(node(site, "agent-0")) == "Unknown")
        elapsed = site.clock.monotonic() - t0
        # node-monitor grace period 40 s after the last renewal (up to 10 s before the failure); the upper bound
        # leaves room for scheduling jitter on a loaded machine (1 ms real = 0.1 sim-s here)
        assert 30 <= elapsed <= 90, elapsed
        taints = {(t["key"], t["effect"]) for t in node(site, "agent-0")["spec"]["taints"]}
        assert taints == {("node.kubernetes.io/unreachable", "NoSchedule"),
                          ("node.kubernetes.io/unreachable", "NoExecute")}
        # the dead kubelet stopped renewing its Lease (read and failed with no await in between: no renewal slipped
        # in), which is what the node-lifecycle controller and the agent's degradation controller watch
        lease_after = site.cluster.api.get(("coordination.k8s.io", "leases"), "kube-node-lease", "agent-0")
        assert lease_after is not None and lease_before is not None
        assert lease_after["spec"]["renewTime"] == lease_before["spec"]["renewTime"]
        assert lease_after["metadata"]["resourceVersion"] == lease_before["metadata"]["resourceVersion"]
        on_failed = [p for p in pods(site) if p["spec"].get("nodeName") == "agent-0"]
        assert all(next(c["status"] for c in p["status"]["conditions"] if c["type"] == "Ready") == "False"
                   for p in on_failed)
        # tolerationSeconds=30: evicted long before the 300 s default
        quick_pod = await until(lambda: next((p for p in pods(site, labelled("quick"))
                                              if p["metadata"].get("deletionTimestamp")), None))
        assert quick_pod["status"]["phase"] == "Running"  # no kubelet confirms it: stuck Terminating
        assert not any(p["metadata"].get("deletionTimestamp") for p in pods(site, labelled("web")))
        # the default 300 s toleration: then the web pod is evicted and replaced on agent-1
        await until(lambda: any(p["metadata"].get("deletionTimestamp") for p in pods(site, labelled("web"))),
                    timeout=10)
        evicted_after = site.clock.monotonic() - t0
        assert 300 <= evicted_after <= 420, evicted_after
        await until(lambda: len([p for p in pods(site, labelled("web")) if running(p)]) == 2)
        assert {p["spec"]["nodeName"] for p in pods(site, labelled("web")) if running(p)} == {"agent-1"}
        assert not any(p["metadata"].get("deletionTimestamp") for p in pods(site, labelled("stay")))
        assert not any(p["metadata"].get("deletionTimestamp") for p in pods(site, labelled("ds")))
        # restore: Ready again, taints gone, the stuck Terminating pods are finally removed
        await site.restore_node("agent-0")
        await until(lambda: ready(node(site, "agent-0")) == "True")
        assert not node(site, "agent-0")["spec"].get("taints")
        await until(lambda: not any(p["metadata"].get("deletionTimestamp") for p in pods(site)))
        stay = pods(site, labelled("stay"))[0]
        await until(lambda: running(pods(site, labelled("stay"))[0]) and
                    pods(site, labelled("stay"))[0]["status"]["containerStatuses"][0]["ready"])
        stay = pods(site, labelled("stay"))[0]
        assert stay["status"]["containerStatuses"][0]["restartCount"] == 1  # failed node: containers restarted


async def test_partition_keeps_containers_and_both_workers_lost_moves_tier2_to_server() -> None:
    async with sim.testing.running(speed=100) as site:
        create(site, "apps", "deployments", deployment("tier2", 2, memory="1Gi", tolerations=[
            CONTROL_PLANE_TOL,
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
             "tolerationSeconds": 5}]))
        await until(lambda: len([p for p in pods(site, labelled("tier2")) if running(p)]) == 2)
        await site.partition_node("agent-0")
        await site.partition_node("agent-1")
        await until(lambda: ready(node(site, "agent-0")) == "Unknown" and ready(node(site, "agent-1")) == "Unknown")
        await until(lambda: [p["spec"]["nodeName"] for p in pods(site, labelled("tier2")) if running(p)]
                    == ["server-0", "server-0"], timeout=10)
        assert len(pods(site, labelled("tier2"))) == 4  # the evicted two stay Terminating while cut off
        await site.restore_node("agent-1")
        await until(lambda: ready(node(site, "agent-1")) == "True")
        await until(lambda: len(pods(site, labelled("tier2"))) == 3)  # agent-1 confirms its pod's deletion
        await site.restore_node("agent-0")
        await until(lambda: len(pods(site, labelled("tier2"))) == 2)
        assert all(p["spec"]["nodeName"] == "server-0" for p in pods(site, labelled("tier2")))


async def test_statefulset_job_and_status_fields() -> None:
    async with sim.testing.running(speed=100) as site:
        sts = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
               "spec": {"replicas": 3, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                        "template": {"metadata": {"labels": {"app": "db"}},
                                     "spec": {"containers": [{"name": "c", "image": "pg:16"}]}}}}
        create(site, "apps", "statefulsets", sts)
        seen: list[list[str]] = []

        def progress() -> bool:
            names = sorted(p["metadata"]["name"] for p in pods(site, labelled("db")))
            if not seen or seen[-1] != names:
                seen.append(names)
            return len([p for p in pods(site, labelled("db")) if running(p)]) == 3

        await until(progress)
        seen = [s for s in seen if s]
        assert seen[0] == ["db-0"] and ["db-0", "db-1"] in seen  # OrderedReady: one at a time, in order
        status = await until(lambda: (lambda st: st if st.get("readyReplicas") == 3 else None)(
            site.cluster.api.get(("apps", "statefulsets"), "default", "db")["status"]))  # type: ignore[index]
        assert status["availableReplicas"] == 3 and status["replicas"] == 3
        assert status["currentRevision"] == status["updateRevision"]
        assert pods(site, labelled("db"))[0]["spec"]["hostname"] == "db-0"
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
               "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}
        create(site, "batch", "jobs", job)

        def complete() -> Any:
            j = site.cluster.api.get(("batch", "jobs"), "default", "once")
            conds = (j or {}).get("status", {}).get("conditions") or []
            return j if any(c["type"] == "Complete" and c["status"] == "True" for c in conds) else None

        j = await until(complete)
        assert j["status"]["succeeded"] == 1 and j["status"]["completionTime"]
        job_pods = pods(site, lambda p: (p["metadata"].get("labels") or {}).get("job-name") == "once")
        assert [p["status"]["phase"] for p in job_pods] == ["Succeeded"]


async def test_kubelet_starts_pods_after_the_configured_startup_delay() -> None:
    """Bound → Pending (PodScheduled, no containers) for ``pod_startup`` sim seconds → Running and Ready.

    The sim's kubelet flips Running and Ready in one status update (no readiness probes are modelled). Only a
    lower bound is asserted, in sim time, with a delay of 4 sim-s at speed 2 (2 s real): a loaded machine can only
    make the observed gap longer, while a kubelet that ignored the delay would show ~0.
    """
    async with sim.testing.running(speed=2, timing=Timing(pod_startup=4.0)) as site:
        create(site, "", "pods", pod("slow"))
        bound = await until(lambda: next((p for p in pods(site, labelled("slow")) if p["spec"].get("nodeName")),
                                         None))
        bound_at = site.clock.monotonic()
        assert bound["status"]["phase"] == "Pending" and not bound["status"].get("containerStatuses")
        assert pod_scheduled(bound)["status"] == "True"
        started = await until(lambda: next((p for p in pods(site, labelled("slow")) if running(p)), None))
        assert site.clock.monotonic() - bound_at >= 2.0  # half the delay: the rest is the poll's slack
        conditions = {c["type"]: c["status"] for c in started["status"]["conditions"]}
        assert conditions["Ready"] == conditions["ContainersReady"] == conditions["PodScheduled"] == "True"
        assert started["status"]["containerStatuses"][0]["state"].keys() == {"running"}
        assert started["status"]["podIP"].startswith("10.42.")


async def test_accelerated_clock_and_heartbeats() -> None:
    async with sim.testing.running(speed=200) as site:
        lease = site.cluster.api.get(("coordination.k8s.io", "leases"), "kube-node-lease", "agent-1")
        assert lease is not None and lease["spec"]["holderIdentity"] == "agent-1"
        first = lease["spec"]["renewTime"]
        await site.clock.sleep(25)  # 0.125 s real: two 10 s heartbeats
        lease = site.cluster.api.get(("coordination.k8s.io", "leases"), "kube-node-lease", "agent-1")
        assert lease is not None and lease["spec"]["renewTime"] != first
        assert site.clock.speed == 200


async def test_missing_service_account_fails_create_with_backoff_then_recovers() -> None:
    async with sim.testing.running(speed=100) as site:
        create(site, "apps", "deployments", deployment("late", 1, serviceAccountName="late-sa"))
        await site.clock.sleep(60)  # 0.6 s real: retries back off (2, 4, 8, 16, 32 s ...)

        def failed_creates() -> list[dict[str, Any]]:
            return [e for e in site.cluster.api.list_objects(("", "events"), "default")
                    if e["reason"] == "FailedCreate"]

        events = failed_creates()
        assert len(events) == 1 and 2 <= events[0]["count"] <= 12  # aggregated, and backing off (not 30 tries)
        assert 'serviceaccount "late-sa" not found' in events[0]["message"]
        assert not pods(site, labelled("late"))
        create(site, "", "serviceaccounts", {"metadata": {"name": "late-sa"}})
        await until(lambda: any(running(p) for p in pods(site, labelled("late"))))
        # a StatefulSet whose serviceName is not a DNS label cannot create pods (spec.subdomain), as for real
        sts = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "x"},
               "spec": {"serviceName": "bad.name", "selector": {"matchLabels": {"app": "x"}},
                        "template": {"metadata": {"labels": {"app": "x"}},
                                     "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
        create(site, "apps", "statefulsets", sts)
        msg = await until(lambda: next((e["message"] for e in failed_creates() if "x-0" in e["message"]), None))
        assert 'spec.subdomain: Invalid value: "bad.name"' in msg


async def test_endpoints_follow_ready_pods() -> None:
    async with sim.testing.running(speed=100) as site:
        dep = deployment("api", 2)
        dep["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": 8080}]
        create(site, "apps", "deployments", dep)
        create(site, "", "services", {"metadata": {"name": "api"}, "spec": {
            "selector": {"app": "api"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}})

        def endpoints() -> Any:
            return site.cluster.api.get(("", "endpoints"), "default", "api")

        ep = await until(lambda: (lambda e: e if e and len(e.get("subsets", [{}])[0].get("addresses", [])) == 2
                                  else None)(endpoints()))
        subset = ep["subsets"][0]
        assert subset["ports"] == [{"port": 8080, "protocol": "TCP", "name": "web"}]
        assert {a["targetRef"]["name"] for a in subset["addresses"]} == {p["metadata"]["name"]
                                                                         for p in pods(site, labelled("api"))}
        k8s = site.cluster.api.get(("", "endpoints"), "default", "kubernetes")
        assert k8s is not None and k8s["subsets"][0]["ports"][0]["port"] == 6443
        # a failed node's pods turn not ready and move to notReadyAddresses
        victim = pods(site, labelled("api"))[0]
        await site.fail_node(victim["spec"]["nodeName"])
        ep = await until(lambda: (lambda e: e if e["subsets"][0].get("notReadyAddresses") else None)(endpoints()))
        assert victim["status"]["podIP"] in [a["ip"] for a in ep["subsets"][0]["notReadyAddresses"]]
