"""The simulated site: nodes, kubelets, node lifecycle, and the loop that drives controllers and the scheduler.

Node lifecycle follows the real node-lifecycle controller: a kubelet renews its Lease in ``kube-node-lease``
every 10 s; when no renewal arrived for ``node_monitor_grace`` (40 s) the node's Ready condition becomes
Unknown and it gets the ``node.kubernetes.io/unreachable`` NoSchedule and NoExecute taints; pods on it become
not Ready; the taint manager then deletes each pod once its NoExecute toleration runs out (300 s by default via
the DefaultTolerationSeconds admission plugin; immediately for pods without a toleration). A deleted pod on an
unreachable node stays Terminating (no kubelet confirms it) until the node returns, exactly as on a real
cluster; ReplicaSets replace such pods at once, StatefulSets wait.

``fail`` stops the node's kubelet (its containers die: on restore they restart with restartCount+1);
``partition`` only cuts the node off the API (its containers keep running: on restore they are simply Ready
again). ``restore`` brings either back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from sim import apiserver, controllers, errors, images, patching, quantity, resources, scheduler, selectors
from sim.clock import Clock
from sim.store import Event, Store

K3S_VERSION = "v1.33.4+k3s1"
UNREACHABLE = "node.kubernetes.io/unreachable"
NOT_READY = "node.kubernetes.io/not-ready"
UNSCHEDULABLE = "node.kubernetes.io/unschedulable"
CONTROL_PLANE = "node-role.kubernetes.io/control-plane"


@dataclasses.dataclass
class Timing:
    """Every modelled delay, in sim seconds (scaled by the clock's speed)."""

    pod_startup: float = 2.0
    pod_termination: float = 1.0
    job_duration: float = 1.0
    heartbeat: float = 10.0
    node_monitor_period: float = 5.0
    node_monitor_grace: float = 40.0
    crd_establish: float = 0.05
    controller_retry: float = 2.0
    pull_resync: float = 1.0  # a failed pull shows ErrImagePull until the pod's next sync: then ImagePullBackOff
    image_backoff: float = 10.0  # the kubelet's image pull back-off: 10 s doubling ...
    image_backoff_max: float = 300.0  # ... up to 5 minutes


@dataclasses.dataclass
class NodeSize:
    """Capacity of a node. Defaults are the IDP's k3d nodes: 4 GB of memory each, 4 CPUs, 110 pods."""

    cpu: str = "4"
    memory: str = "4Gi"
    pods: int = 110
    reserved_memory: str = "100Mi"  # kubelet eviction-hard memory.available<100Mi


@dataclasses.dataclass
class NodeState:
    name: str
    index: int
    server: bool
    state: str = "up"  # up, failed, partitioned
    last_renew: float = 0.0
    ready: bool = True
    pod_seq: itertools.count[int] = dataclasses.field(default_factory=lambda: itertools.count(2))
    images: set[str] = dataclasses.field(default_factory=set)  # pulled onto this node (containerd's store)


def _latest(image: str) -> bool:
    """The API server's default pull policy is Always for ``:latest`` or an untagged, undigested image."""
    if "@" in image:
        return False
    last = image.rpartition("/")[2]
    return ":" not in last or last.endswith(":latest")


def _invalid_reported(pod: dict[str, Any]) -> bool:
    """The kubelet already reported InvalidImageName for the images the pod has now (it never retries those;
    a pod whose image is edited gets a new status image and is looked at again)."""
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    images = {c.get("name"): c.get("image") for c in [*(spec.get("initContainers") or []),
                                                       *(spec.get("containers") or [])]}
    return any(((cs.get("state") or {}).get("waiting") or {}).get("reason") == "InvalidImageName"
               and images.get(cs.get("name")) == cs.get("image")
               for field in ("initContainerStatuses", "containerStatuses") for cs in status.get(field) or [])


def micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_labels(name: str, server: bool) -> dict[str, str]:
    labels = {"beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
              "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
              "node.kubernetes.io/instance-type": "k3s"}
    if server:
        labels[CONTROL_PLANE] = "true"
        labels["node-role.kubernetes.io/master"] = "true"
    # The IDP's k3d config labels agent:0 role=infra and agent:1 role=apps.
    if name.endswith("agent-0"):
        labels["role"] = "infra"
    elif name.endswith("agent-1"):
        labels["role"] = "apps"
    return labels


class Cluster:
    def __init__(
        self,
        *,
        nodes: list[str],
        speed: float = 1.0,
        timing: Timing | None = None,
        size: NodeSize | None = None,
        sizes: dict[str, NodeSize] | None = None,
        servers: list[str] | None = None,
        pullable: images.Pullable | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("a site needs at least one node")
        self.clock = Clock(speed)
        self.timing = timing or Timing()
        self.size = size or NodeSize()
        self.sizes = sizes or {}
        #: What the kubelets can pull (replaceable at run time: pods in back-off retry against the new set).
        self.pullable = pullable or images.Pullable()
        self._pull_failures: dict[str, int] = {}  # pod uid -> failed pulls in a row (sets its back-off)
        self.store = Store()
        self.registry = resources.Registry()
        self.api = apiserver.ApiServer(self.store, self.registry)
        self.api.hooks.append(self._on_removed)
        server_names = servers if servers is not None else [n for n in nodes if "server" in n] or nodes[:1]
        self.nodes = {n: NodeState(name=n, index=i, server=n in server_names) for i, n in enumerate(nodes)}
        self._log = log
        self.printer_columns: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        self.server_seconds = 0.0
        self.requests = 0
        self.watch_latencies: list[float] = []
        self._write_times: dict[int, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty: set[tuple[str, str, str, str]] = set()
        self._wake = asyncio.Event()
        self._timers: list[asyncio.TimerHandle] = []
        self._pod_timers: dict[str, asyncio.TimerHandle] = {}
        self._evictions: dict[str, asyncio.TimerHandle] = {}
        self._crd_timers: dict[str, asyncio.TimerHandle] = {}
        self.sched_dirty = True
        self.store.listen(self._on_event)
        self.controllers = controllers.Controllers(self)
        self.scheduler = scheduler.Scheduler(self)

    # --- logging / metrics -------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self._log:
            self._log(msg)
        else:
            print(f"sim: {msg}", file=sys.stderr)

    def record_watch_latency(self, rv: int) -> None:
        t = self._write_times.get(rv)
        if t is not None:
            self.watch_latencies.append(time.perf_counter() - t)
            if len(self.watch_latencies) > 200_000:
                del self.watch_latencies[:100_000]

    # --- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._bootstrap()
        loop_fns = (self._controller_loop, self._heartbeat_loop, self._node_monitor_loop)
        self._tasks = [asyncio.create_task(fn(), name=f"sim-{fn.__name__}") for fn in loop_fns]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for h in [*self._timers, *self._pod_timers.values(), *self._evictions.values(), *self._crd_timers.values()]:
            h.cancel()
        self.store.close_watchers()

    def later(self, sim_seconds: float, fn: Callable[..., Any], *args: Any) -> asyncio.TimerHandle:
        def run() -> None:
            try:
                fn(*args)
            except errors.ApiError as exc:
                self.log(f"timer {getattr(fn, '__name__', fn)}: {exc.message}")
            except Exception as exc:  # a model bug must not kill the event loop's callbacks
                self.log(f"timer {getattr(fn, '__name__', fn)} failed: {exc!r}")
            self.wake()

        h = self.clock.call_later(sim_seconds, run)
        self._timers = [t for t in self._timers if not t.cancelled() and t.when() > asyncio.get_running_loop()
                        .time()] + [h]
        return h

    def wake(self) -> None:
        self._wake.set()

    def res(self, group: str, plural: str) -> resources.Resource:
        return self.api.resource(group, plural)

    # --- bootstrap ---------------------------------------------------------------------------------------------
    def _bootstrap(self) -> None:
        ns_res = self.res("", "namespaces")
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.api.create(ns_res, "", {"metadata": {"name": ns}}, manager="k3s", internal=True)
        pc = self.res("scheduling.k8s.io", "priorityclasses")
        for name, value in (("system-cluster-critical", 2000000000), ("system-node-critical", 2000001000)):
            self.api.create(pc, "", {"metadata": {"name": name}, "value": value,
                                     "description": "Used for system critical pods that must not be moved from "
                                                    "their current node."}, manager="k3s", internal=True)
        svc = self.res("", "services")
        self.api.create(svc, "default", {"metadata": {"name": "kubernetes", "labels": {
            "component": "apiserver", "provider": "kubernetes"}},
            "spec": {"clusterIP": "10.43.0.1", "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}},
            manager="k3s", internal=True)
        for node in self.nodes.values():
            self._register_node(node)
        self.controllers.sync_all()

    def node_size(self, name: str) -> NodeSize:
        return self.sizes.get(name, self.size)

    def _register_node(self, node: NodeState) -> None:
        size = self.node_size(node.name)
        mem = quantity.parse(size.memory)
        cap = {"cpu": size.cpu, "memory": quantity.fmt_memory(mem), "pods": str(size.pods),
               "ephemeral-storage": "61255492Ki", "hugepages-1Gi": "0", "hugepages-2Mi": "0"}
        alloc = dict(cap)
        alloc["memory"] = quantity.fmt_memory(mem - quantity.parse(size.reserved_memory))
        alloc["ephemeral-storage"] = "59589342504"
        taints = [{"key": CONTROL_PLANE, "effect": "NoSchedule"}] if node.server else []
        now = apiserver.now_iso()
        obj = {
            "metadata": {"name": node.name, "labels": default_labels(node.name, node.server),
                         "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                                         "volumes.kubernetes.io/controller-managed-attach-detach": "true"}},
            "spec": {"podCIDR": f"10.42.{node.index}.0/24", "podCIDRs": [f"10.42.{node.index}.0/24"],
                     "providerID": f"k3s://{node.name}", **({"taints": taints} if taints else {})},
            "status": {
                "capacity": cap, "allocatable": alloc,
                "conditions": [self._cond(t, "False", r, m, now) for t, r, m in (
                    ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                    ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                    ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"))]
                + [self._cond("Ready", "True", "KubeletReady", "kubelet is posting ready status", now)],
                "addresses": [{"type": "InternalIP", "address": f"172.18.0.{node.index + 2}"},
                              {"type": "Hostname", "address": node.name}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "6.1.0-sim",
                             "osImage": f"K3s {K3S_VERSION}", "containerRuntimeVersion": "containerd://2.0.5-k3s2",
                             "kubeletVersion": K3S_VERSION, "kubeProxyVersion": K3S_VERSION,
                             "operatingSystem": "linux", "architecture": "amd64"},
            },
        }
        self.api.create(self.res("", "nodes"), "", obj, manager="k3s", internal=True)
        node.last_renew = self.clock.monotonic()
        self._renew_lease(node)

    @staticmethod
    def _cond(ctype: str, status: str, reason: str, message: str, now: str) -> dict[str, Any]:
        return {"type": ctype, "status": status, "lastHeartbeatTime": now, "lastTransitionTime": now,
                "reason": reason, "message": message}

    # --- heartbeats and node lifecycle -------------------------------------------------------------------------
    def _renew_lease(self, node: NodeState) -> None:
        res = self.res("coordination.k8s.io", "leases")
        existing = self.api.get(res.storage_key, "kube-node-lease", node.name)
        node_obj = self.api.get(("", "nodes"), "", node.name)
        owner = [{"apiVersion": "v1", "kind": "Node", "name": node.name,
                  "uid": node_obj["metadata"]["uid"]}] if node_obj else []
        lease: dict[str, Any] = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": node.name, "namespace": "kube-node-lease", "ownerReferences": owner},
                 "spec": {"holderIdentity": node.name, "leaseDurationSeconds": 40, "renewTime": micro_now()}}
        if existing is None:
            self.api.create(res, "kube-node-lease", lease, manager="k3s", internal=True)
        else:
            new = json.loads(json.dumps(existing))
            new["spec"]["renewTime"] = lease["spec"]["renewTime"]
            self.api.update(res, "kube-node-lease", node.name, new, manager="k3s")
        node.last_renew = self.clock.monotonic()

    async def _heartbeat_loop(self) -> None:
        while True:
            await self.clock.sleep(self.timing.heartbeat)
            for node in self.nodes.values():
                if node.state == "up":
                    try:
                        self._renew_lease(node)
                    except Exception as exc:  # keep the other kubelets beating
                        self.log(f"lease renewal of {node.name}: {exc!r}")

    async def _node_monitor_loop(self) -> None:
        while True:
            await self.clock.sleep(min(self.timing.node_monitor_period, self.timing.node_monitor_grace / 4))
            try:
                self.monitor_nodes()
            except Exception as exc:  # the monitor must keep running
                self.log(f"node monitor: {exc!r}")

    def monitor_nodes(self) -> None:
        now = self.clock.monotonic()
        for node in self.nodes.values():
            stale = node.state != "up" and now - node.last_renew > self.timing.node_monitor_grace
            if stale and node.ready:
                node.ready = False
                self._mark_unreachable(node)
            elif node.state == "up" and not node.ready:
                node.ready = True
                self._mark_ready(node)

    def _node_update(self, name: str, fn: Callable[[dict[str, Any]], None]) -> None:
        res = self.res("", "nodes")
        cur = self.api.get(res.storage_key, "", name)
        if cur is None:
            return
        new = json.loads(json.dumps(cur))
        fn(new)
        if new.get("spec") != cur.get("spec"):
            self.api.update(res, "", name, new, manager="k3s")
            cur = self.api.get(res.storage_key, "", name) or new
            new["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
        if new.get("status") != cur.get("status"):
            self.api.update(res, "", name, new, manager="k3s", subresource="status")

    def _mark_unreachable(self, node: NodeState) -> None:
        now = apiserver.now_iso()

        def change(n: dict[str, Any]) -> None:
            for c in n["status"]["conditions"]:
                c["status"] = "Unknown"
                c["reason"] = "NodeStatusUnknown"
                c["message"] = "Kubelet stopped posting node status."
                c["lastTransitionTime"] = now
            taints = [t for t in n["spec"].get("taints") or [] if t.get("key") not in (UNREACHABLE, NOT_READY)]
            taints += [{"key": UNREACHABLE, "effect": "NoSchedule", "timeAdded": now},
                       {"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": now}]
            n["spec"]["taints"] = taints

        self._node_update(node.name, change)
        self.log(f"node {node.name} NotReady (no heartbeat for {self.timing.node_monitor_grace:g}s): tainted "
                 f"{UNREACHABLE}")
        for pod in self.pods_on(node.name):
            self._set_pod_ready(pod, False, reason="NodeNotReady")
            self._schedule_eviction(pod)
        self.sched_dirty = True

    def _mark_ready(self, node: NodeState) -> None:
        now = apiserver.now_iso()

        def change(n: dict[str, Any]) -> None:
            for c in n["status"]["conditions"]:
                healthy = c["type"] == "Ready"
                c["status"] = "True" if healthy else "False"
                c["reason"] = {"Ready": "KubeletReady", "MemoryPressure": "KubeletHasSufficientMemory",
                               "DiskPressure": "KubeletHasNoDiskPressure",
                               "PIDPressure": "KubeletHasSufficientPID"}.get(c["type"], "")
                c["message"] = "kubelet is posting ready status" if healthy else "kubelet is healthy"
                c["lastTransitionTime"] = now
                c["lastHeartbeatTime"] = now
            n["spec"]["taints"] = [t for t in n["spec"].get("taints") or []
                                   if t.get("key") not in (UNREACHABLE, NOT_READY)] or None
            if n["spec"]["taints"] is None:
                del n["spec"]["taints"]

        self._node_update(node.name, change)
        for key in [k for k in self._evictions if k.startswith(f"{node.name}/")]:
            self._evictions.pop(key).cancel()
        self.log(f"node {node.name} Ready")
        self.sched_dirty = True

    def pods_on(self, node: str) -> list[dict[str, Any]]:
        return [e.obj for e in self.store.iter(("", "pods"))
                if (e.obj.get("spec") or {}).get("nodeName") == node]

    def _schedule_eviction(self, pod: dict[str, Any]) -> None:
        """Taint manager: delete the pod when its NoExecute toleration of the unreachable taint expires."""
        meta, spec = pod["metadata"], pod.get("spec") or {}
        if meta.get("deletionTimestamp"):
            return
        seconds: float | None = 0.0
        for t in spec.get("tolerations") or []:
            if scheduler.tolerates(t, {"key": UNREACHABLE, "effect": "NoExecute"}):
                ts = t.get("tolerationSeconds")
                if ts is None:
                    seconds = None
                    break
                seconds = max(float(ts), 0.0) if seconds is not None and seconds > 0 else float(ts)
        if seconds is None:
            return
        key = f"{spec.get('nodeName')}/{meta.get('namespace')}/{meta.get('name')}"
        uid = meta.get("uid")

        def evict() -> None:
            self._evictions.pop(key, None)
            cur = self.api.get(("", "pods"), meta.get("namespace", ""), meta.get("name", ""))
            if cur is None or cur["metadata"].get("uid") != uid or cur["metadata"].get("deletionTimestamp"):
                return
            node = self.nodes.get(spec.get("nodeName", ""))
            if node is not None and node.ready:
                return
            self.log(f"taint manager: evicting pod {meta.get('namespace')}/{meta.get('name')}")
            self.api.delete(self.res("", "pods"), meta.get("namespace", ""), meta.get("name", ""))

        if seconds <= 0:
            evict()
        else:
            self._evictions[key] = self.later(seconds, evict)

    # --- fault injection ---------------------------------------------------------------------------------------
    async def fail_node(self, name: str) -> None:
        self.nodes[name].state = "failed"
        self.log(f"node {name}: failed (kubelet stopped)")

    async def partition_node(self, name: str) -> None:
        self.nodes[name].state = "partitioned"
        self.log(f"node {name}: partitioned (cut off the API)")

    async def restore_node(self, name: str) -> None:
        node = self.nodes[name]
        was = node.state
        node.state = "up"
        self._renew_lease(node)
        self.monitor_nodes()
        self.log(f"node {name}: restored (was {was})")
        for pod in self.pods_on(name):
            if pod["metadata"].get("deletionTimestamp"):
                self.later(self.timing.pod_termination, self.api.finish_pod, pod["metadata"]["namespace"],
                           pod["metadata"]["name"])
            elif was == "failed" and (pod.get("status") or {}).get("phase") == "Running":
                self._restart_pod(pod)
            elif (pod.get("status") or {}).get("phase") == "Running":
                self._set_pod_ready(pod, True)
            else:
                self.kubelet_admit(pod)
        self.wake()

    def describe(self) -> dict[str, Any]:
        """State and self-measurements (served at /sim/state; the benchmark reads them)."""
        lat = sorted(self.watch_latencies)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 3) if lat else None

        objects = sum(self.store.count(k) for k in self.store.kinds())
        return {"nodes": {n.name: {"state": n.state, "ready": n.ready, "server": n.server}
                          for n in self.nodes.values()},
                "speed": self.clock.speed, "resourceVersion": self.store.rv, "objects": objects,
                "requests": self.requests, "serverSeconds": round(self.server_seconds, 3),
                "watchEvents": len(lat), "watchLatencyMs": {"p50": pct(0.5), "p99": pct(0.99)}}

    # --- kubelet -----------------------------------------------------------------------------------------------
    def _pod_key(self, pod: dict[str, Any]) -> str:
        return f"{pod['metadata'].get('namespace')}/{pod['metadata'].get('name')}"

    def kubelet_admit(self, pod: dict[str, Any]) -> None:
        """A pod was bound to a node: start its containers after the startup delay (if the node is up)."""
        node = self.nodes.get((pod.get("spec") or {}).get("nodeName", ""))
        if node is None or node.state != "up":
            return
        key = self._pod_key(pod)
        if key in self._pod_timers or _invalid_reported(pod):
            return
        uid = pod["metadata"].get("uid")
        self._pod_timers[key] = self.later(self.timing.pod_startup, self._start_pod, key, uid)

    def _timer_target(self, key: str, uid: str) -> tuple[dict[str, Any], NodeState] | None:
        """A pod timer's pod and node, if the timer still applies: the same pod (uid), not being
        deleted, on a node that is up. A pod that is gone also forgets its pull failures."""
        self._pod_timers.pop(key, None)
        ns, name = key.split("/", 1)
        pod = self.api.get(("", "pods"), ns, name)
        if pod is None or pod["metadata"].get("uid") != uid or pod["metadata"].get("deletionTimestamp"):
            self._pull_failures.pop(uid, None)
            return None
        node = self.nodes.get(pod["spec"].get("nodeName", ""))
        if node is None or node.state != "up":
            return None
        return pod, node

    def _start_pod(self, key: str, uid: str) -> None:
        target = self._timer_target(key, uid)
        if target is None:
            return
        pod, node = target
        ns, name = key.split("/", 1)
        if self._pull_images(pod, node, key):
            return
        self._pull_failures.pop(uid, None)
        now = apiserver.now_iso()
        new = json.loads(json.dumps(pod))
        status = _sandbox_status(new, node, phase="Running", now=now)
        restarts = {c.get("name"): c.get("restartCount", 0) for c in status.get("containerStatuses") or []}
        status["containerStatuses"] = [
            {"name": c.get("name"), "image": c.get("image"), "imageID": f"{c.get('image')}@sha256:sim",
             "containerID": f"containerd://{uid}-{c.get('name')}", "ready": True, "started": True,
             "restartCount": restarts.get(c.get("name"), 0), "state": {"running": {"startedAt": now}}}
            for c in pod["spec"].get("containers") or []]
        if pod["spec"].get("initContainers"):
            status["initContainerStatuses"] = [
                {"name": c.get("name"), "image": c.get("image"), "imageID": f"{c.get('image')}@sha256:sim",
                 "ready": True, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now,
                                          "finishedAt": now}}}
                for c in pod["spec"]["initContainers"]]
        status["conditions"] = [
            {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": now}
            for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")]
        self.api.update(self.res("", "pods"), ns, name, new, manager="k3s", subresource="status")
        # Job pods run to completion; other containers are modelled as long-running servers.
        if any(o.get("kind") == "Job" for o in pod["metadata"].get("ownerReferences") or []):
            self.later(self.timing.job_duration, self._complete_pod, key, uid)

    # --- kubelet: image pulls ------------------------------------------------------------------------------------
    def _pull_images(self, pod: dict[str, Any], node: NodeState, key: str) -> bool:
        """The kubelet's image manager before it starts the pod's containers; True when a pull failed.

        Init containers come first (an image failing there leaves the app containers ``PodInitializing``);
        otherwise every app container is tried, those with their image run and the others wait, so the pod
        stays Pending and not Ready. ``ErrImagePull`` (events Pulling, Failed ``Failed to pull image "x": ...``,
        Failed ``Error: ErrImagePull``) turns into ``ImagePullBackOff`` (events BackOff, Failed ``Error:
        ImagePullBackOff``) at the pod's next sync, and the pull is retried when the back-off (10 s doubling
        to 300 s, per pod) runs out. ``InvalidImageName`` is never retried.
        """
        spec = pod.get("spec") or {}
        inits, apps = spec.get("initContainers") or [], spec.get("containers") or []
        failed: dict[str, tuple[str, str]] = {}
        for c in inits:
            err = self._pull(pod, node, c)
            if err is not None:
                failed[c.get("name", "")] = err
                break
        if not failed:
            for c in apps:
                err = self._pull(pod, node, c)
                if err is not None:
                    failed[c.get("name", "")] = err
        if not failed:
            return False
        uid = pod["metadata"]["uid"]
        retry = any(reason != "InvalidImageName" for reason, _ in failed.values())
        if retry:
            count = self._pull_failures.get(uid, 0)
            backoff = min(self.timing.image_backoff * 2 ** count, self.timing.image_backoff_max)
            self._pull_failures[uid] = count + 1
            resync = min(self.timing.pull_resync, backoff)
            self._pod_timers[key] = self.later(resync, self._pull_backed_off, key, uid, backoff - resync)
        self._write_waiting(pod, node, failed, init_failed=bool(inits) and next(iter(failed)) in
                            {c.get("name") for c in inits})
        return True

    def _pull(self, pod: dict[str, Any], node: NodeState, container: dict[str, Any]) -> tuple[str, str] | None:
        """One container's image: ``None`` when present or pulled, else ``(reason, message)`` (events recorded)."""
        image = str(container.get("image") or "")
        policy = container.get("imagePullPolicy") or ("Always" if _latest(image) else "IfNotPresent")
        if image in node.images and policy != "Always":
            return None
        events = self.controllers._event
        err = self.pullable.error(image)
        if err is not None and err[0] == "InvalidImageName":
            events(pod, "Warning", "InspectFailed", err[1], component="kubelet")
        elif policy == "Never":
            err = ("ErrImageNeverPull", f'Container image "{image}" is not present with pull policy of Never')
            events(pod, "Warning", "ErrImageNeverPull", err[1], component="kubelet")
        else:
            events(pod, "Normal", "Pulling", f'Pulling image "{image}"', component="kubelet")
            if err is None:
                node.images.add(image)
                events(pod, "Normal", "Pulled", f'Successfully pulled image "{image}"', component="kubelet")
                return None
            events(pod, "Warning", "Failed", f'Failed to pull image "{image}": {err[1]}', component="kubelet")
        events(pod, "Warning", "Failed", f"Error: {err[0]}", component="kubelet")
        return err

    def _pull_backed_off(self, key: str, uid: str, remaining: float) -> None:
        """The pod's next sync while its pull is backing off: ``ImagePullBackOff``; retry when it runs out."""
        target = self._timer_target(key, uid)
        if target is None:
            return
        pod, _ = target
        ns, name = key.split("/", 1)
        self._pod_timers[key] = self.later(remaining, self._start_pod, key, uid)
        new = json.loads(json.dumps(pod))
        for field in ("initContainerStatuses", "containerStatuses"):
            for cs in (new.get("status") or {}).get(field) or []:
                waiting = (cs.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") == "ErrImagePull":
                    image = cs.get("image", "")
                    cs["state"] = {"waiting": {"reason": "ImagePullBackOff", "message":
                                               f'Back-off pulling image "{image}": ErrImagePull: '
                                               f'{waiting.get("message", "")}'}}
                    self.controllers._event(pod, "Normal", "BackOff", f'Back-off pulling image "{image}"',
                                            component="kubelet")
                    self.controllers._event(pod, "Warning", "Failed", "Error: ImagePullBackOff", component="kubelet")
        if new != pod:
            self.api.update(self.res("", "pods"), ns, name, new, manager="k3s", subresource="status")

    def _write_waiting(self, pod: dict[str, Any], node: NodeState, failed: dict[str, tuple[str, str]], *,
                       init_failed: bool) -> None:
        """Pending with a sandbox (pod IP) and waiting containers, as a real kubelet reports a failed pull."""
        now = apiserver.now_iso()
        new = json.loads(json.dumps(pod))
        old = {c.get("type"): c for c in (new.get("status") or {}).get("conditions") or []}
        status = _sandbox_status(new, node, phase="Pending", now=now)
        spec = pod["spec"]
        uid = pod["metadata"]["uid"]
        restarts = {c.get("name"): c.get("restartCount", 0) for c in status.get("containerStatuses") or []}
        started = {c.get("name"): c["state"]["running"] for c in status.get("containerStatuses") or []
                   if "running" in (c.get("state") or {})}

        def waiting(c: dict[str, Any], default: str) -> dict[str, Any]:
            reason, message = failed.get(c.get("name", ""), (default, ""))
            return {"waiting": {"reason": reason, **({"message": message} if message else {})}}

        def entry(c: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
            running = "running" in state
            out = {"name": c.get("name"), "image": c.get("image"), "imageID": "", "ready": running,
                   "started": running, "restartCount": restarts.get(c.get("name"), 0), "state": state}
            if "waiting" not in state:
                out["imageID"] = f"{c.get('image')}@sha256:sim"
            if running:
                out["containerID"] = f"containerd://{uid}-{c.get('name')}"
            return out

        inits = spec.get("initContainers") or []
        if inits:
            done = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}
            stuck = next((i for i, c in enumerate(inits) if c.get("name") in failed), len(inits))
            status["initContainerStatuses"] = [entry(c, done if i < stuck else waiting(c, "PodInitializing"))
                                               for i, c in enumerate(inits)]
        status["containerStatuses"] = [
            entry(c, waiting(c, "PodInitializing") if init_failed or c.get("name") in failed
                  else {"running": started.get(c.get("name")) or {"startedAt": now}})
            for c in spec.get("containers") or []]
        unready = [c.get("name") for c in spec.get("containers") or [] if init_failed or c.get("name") in failed]
        pending_inits = [c.get("name") for c in inits[stuck:]] if inits else []

        def cond(ctype: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
            prev = old.get(ctype) or {}
            value = "True" if ok else "False"
            c: dict[str, Any] = {"type": ctype, "status": value, "lastProbeTime": None,
                                 "lastTransitionTime": prev.get("lastTransitionTime", now)
                                 if prev.get("status") == value else now}
            if not ok:
                c["reason"], c["message"] = reason, message
            return c

        names = " ".join(str(n) for n in unready)  # Go's %v of a []string
        status["conditions"] = [
            cond("PodReadyToStartContainers", True),
            cond("Initialized", not init_failed, "ContainersNotInitialized",
                 f"containers with incomplete status: [{' '.join(str(n) for n in pending_inits)}]"),
            cond("Ready", False, "ContainersNotReady", f"containers with unready status: [{names}]"),
            cond("ContainersReady", False, "ContainersNotReady", f"containers with unready status: [{names}]"),
            cond("PodScheduled", True)]
        self.api.update(self.res("", "pods"), new["metadata"]["namespace"], new["metadata"]["name"], new,
                        manager="k3s", subresource="status")

    def _complete_pod(self, key: str, uid: str) -> None:
        ns, name = key.split("/", 1)
        pod = self.api.get(("", "pods"), ns, name)
        if pod is None or pod["metadata"].get("uid") != uid:
            return
        node = self.nodes.get(pod["spec"].get("nodeName", ""))
        if node is None or node.state != "up":
            return
        now = apiserver.now_iso()
        new = json.loads(json.dumps(pod))
        status = new["status"]
        status["phase"] = "Succeeded"
        for cs in status.get("containerStatuses") or []:
            started = ((cs.get("state") or {}).get("running") or {}).get("startedAt", now)
            cs["state"] = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": started,
                                          "finishedAt": now}}
            cs["ready"] = False
            cs["started"] = False
        for c in status.get("conditions") or []:
            if c["type"] in ("Ready", "ContainersReady"):
                c["status"] = "False"
                c["reason"] = "PodCompleted"
                c["lastTransitionTime"] = now
        self.api.update(self.res("", "pods"), ns, name, new, manager="k3s", subresource="status")

    def _restart_pod(self, pod: dict[str, Any]) -> None:
        new = json.loads(json.dumps(pod))
        for cs in new["status"].get("containerStatuses") or []:
            cs["restartCount"] = cs.get("restartCount", 0) + 1
            cs["ready"] = False
            cs["state"] = {"waiting": {"reason": "ContainerCreating"}}
        self._flip_ready(new, False, reason="ContainersNotReady")
        self.api.update(self.res("", "pods"), new["metadata"]["namespace"], new["metadata"]["name"], new,
                        manager="k3s", subresource="status")
        key = self._pod_key(new)
        uid = new["metadata"]["uid"]
        self._pod_timers[key] = self.later(self.timing.pod_startup, self._start_pod, key, uid)

    @staticmethod
    def _flip_ready(pod: dict[str, Any], ready: bool, *, reason: str = "") -> bool:
        now = apiserver.now_iso()
        changed = False
        for c in pod.get("status", {}).get("conditions") or []:
            if c["type"] in ("Ready", "ContainersReady"):
                want = "True" if ready else "False"
                if c["status"] != want:
                    c["status"] = want
                    c["lastTransitionTime"] = now
                    changed = True
                if reason and not ready:
                    c["reason"] = reason
                elif ready:
                    c.pop("reason", None)
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            if cs.get("ready") != ready and "running" in (cs.get("state") or {}):
                cs["ready"] = ready
                changed = True
        return changed

    def _set_pod_ready(self, pod: dict[str, Any], ready: bool, *, reason: str = "") -> None:
        new = json.loads(json.dumps(pod))
        if self._flip_ready(new, ready, reason=reason):
            self.api.update(self.res("", "pods"), new["metadata"]["namespace"], new["metadata"]["name"], new,
                            manager="k3s", subresource="status")

    def kubelet_terminate(self, pod: dict[str, Any]) -> None:
        """A bound pod got a deletionTimestamp: its (live) kubelet stops it and confirms the deletion."""
        node = self.nodes.get((pod.get("spec") or {}).get("nodeName", ""))
        key = "term/" + self._pod_key(pod)
        if node is None or node.state != "up" or key in self._pod_timers:
            return
        grace = float(pod["metadata"].get("deletionGracePeriodSeconds") or 0)
        delay = min(self.timing.pod_termination, grace) if grace else 0.0
        uid = pod["metadata"].get("uid")

        def finish() -> None:
            self._pod_timers.pop(key, None)
            if node.state != "up":
                return  # the node died meanwhile: the deletion is confirmed when it comes back
            cur = self.api.get(("", "pods"), pod["metadata"]["namespace"], pod["metadata"]["name"])
            if cur is not None and cur["metadata"].get("uid") == uid:
                self.api.finish_pod(pod["metadata"]["namespace"], pod["metadata"]["name"])

        self._pod_timers[key] = self.later(delay, finish)

    # --- event plumbing ----------------------------------------------------------------------------------------
    def _on_event(self, ev: Event) -> None:
        self._write_times[ev.entry.rv] = time.perf_counter()
        if len(self._write_times) > 20000:
            for rv in sorted(self._write_times)[:10000]:
                del self._write_times[rv]
        group, plural = ev.key
        if (group, plural) == ("apiextensions.k8s.io", "customresourcedefinitions"):
            if ev.type != "DELETED":
                self._crd_changed(ev.entry.name)
            return
        if (group, plural) == ("", "pods"):
            pod = ev.entry.obj
            self.sched_dirty = True
            if ev.type != "DELETED":
                spec = pod.get("spec") or {}
                if pod["metadata"].get("deletionTimestamp"):
                    if spec.get("nodeName"):
                        self.kubelet_terminate(pod)
                elif spec.get("nodeName") and (pod.get("status") or {}).get("phase") == "Pending":
                    self.kubelet_admit(pod)
        elif (group, plural) == ("", "nodes"):
            self.sched_dirty = True
        self.controllers.on_event(ev)
        self.wake()

    def _on_removed(self, event: str, res: resources.Resource, obj: dict[str, Any]) -> None:
        if res.kind == "CustomResourceDefinition" and not res.custom:
            name = obj["metadata"]["name"]
            for _r in self.registry.all_resources():
                pass
            self.registry.remove_crd(name)
            spec = obj.get("spec") or {}
            key = (spec.get("group", ""), (spec.get("names") or {}).get("plural", ""))
            for e in list(self.store.iter(key)):
                self.store.delete(key, e.namespace, e.name)

    # --- CRDs --------------------------------------------------------------------------------------------------
    def _crd_changed(self, name: str) -> None:
        if name in self._crd_timers:
            return
        self._crd_timers[name] = self.later(self.timing.crd_establish, self._establish, name)

    def _establish(self, name: str) -> None:
        self._crd_timers.pop(name, None)
        res = self.res("apiextensions.k8s.io", "customresourcedefinitions")
        entry = self.store.get(res.storage_key, "", name)
        if entry is None:
            return
        crd = entry.obj
        if crd["metadata"].get("deletionTimestamp"):
            return
        spec = crd.get("spec") or {}
        served = resources.crd_resources(crd)
        for r in served:
            cols = next((v.get("additionalPrinterColumns") for v in spec.get("versions") or []
                         if v.get("name") == r.version), None)
            self.printer_columns[(r.group, r.version, r.plural)] = cols or []
        conflict = self._names_conflict(crd)
        now = apiserver.now_iso()
        status = dict(crd.get("status") or {})
        old_conds = {c.get("type"): c for c in status.get("conditions") or []}

        def cond(t: str, ok: bool, reason: str, msg: str) -> dict[str, Any]:
            prev = old_conds.get(t)
            st = "True" if ok else "False"
            ltt = prev["lastTransitionTime"] if prev and prev.get("status") == st else now
            return {"type": t, "status": st, "lastTransitionTime": ltt, "reason": reason, "message": msg}

        if conflict:
            status["conditions"] = [cond("NamesAccepted", False, "MultipleNamesNotAllowed", conflict),
                                    cond("Established", False, "NotAccepted", "not all names are accepted")]
        else:
            status["conditions"] = [
                cond("NamesAccepted", True, "NoConflicts", "no conflicts found"),
                cond("Established", True, "InitialNamesAccepted", "the initial names have been accepted")]
            status["acceptedNames"] = {k: v for k, v in (spec.get("names") or {}).items()}
            storage = [v.get("name") for v in spec.get("versions") or [] if v.get("storage")]
            stored = list(status.get("storedVersions") or [])
            for s in storage:
                if s not in stored:
                    stored.append(s)
            status["storedVersions"] = stored
        if status != crd.get("status"):
            new = entry.copy()
            new["status"] = status
            self.api.update(res, "", name, new, manager="k3s", subresource="status")
        if not conflict:
            self.registry.set_crd(name, served)

    def _names_conflict(self, crd: dict[str, Any]) -> str:
        spec = crd.get("spec") or {}
        plural = (spec.get("names") or {}).get("plural", "")
        group = spec.get("group", "")
        for r in self.registry.all_resources():
            if r.group == group and r.plural == plural and not r.custom:
                return f'"{plural}" is already in use'
        return ""

    # --- controller loop ---------------------------------------------------------------------------------------
    async def _controller_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)
            try:
                self.controllers.run_dirty()
                if self.sched_dirty:
                    self.sched_dirty = False
                    self.scheduler.run()
                if self.controllers.foreground_pending:
                    self.controllers.foreground_pending = self.api.foreground_step()
            except Exception as exc:
                import traceback

                self.log(f"controller error: {exc!r}\n{traceback.format_exc()}")
                await asyncio.sleep(self.clock.real(self.timing.controller_retry))
                self.wake()

    # --- subresources and special verbs ------------------------------------------------------------------------
    def scale_of(self, res: resources.Resource, obj: dict[str, Any]) -> dict[str, Any]:
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        meta = obj["metadata"]
        sel = spec.get("selector")
        sel_str = selectors.selector_string(sel) if isinstance(sel, dict) else str(sel or "")
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": meta["name"], "namespace": meta.get("namespace"), "uid": meta.get("uid"),
                             "resourceVersion": meta.get("resourceVersion"),
                             "creationTimestamp": meta.get("creationTimestamp")},
                "spec": {"replicas": spec.get("replicas", 0)},
                "status": {"replicas": status.get("replicas", 0), "selector": sel_str}}

    def set_scale(self, res: resources.Resource, ns: str, name: str, body: Any, *, manager: str) -> dict[str, Any]:
        entry = self.api.require(res, ns, name)
        if not isinstance(body, dict):
            raise errors.bad_request("invalid Scale object")
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if rv and str(rv) != str(entry.rv):
            raise errors.conflict(res.plural, name, res.group)
        replicas = (body.get("spec") or {}).get("replicas", 0)
        return self._write_replicas(res, ns, name, replicas, manager=manager)

    def patch_scale(self, res: resources.Resource, ns: str, name: str, body: bytes, *, content_type: str,
                    manager: str) -> dict[str, Any]:
        entry = self.api.require(res, ns, name)
        current = self.scale_of(res, entry.obj)
        if content_type == "application/apply-patch+yaml":
            patched = apiserver.parse_body(body)
        else:
            try:
                patched = patching.apply_patch(content_type, current, body)
            except patching.PatchError as exc:
                raise errors.ApiError(422, str(exc)) from exc
        replicas = ((patched or {}).get("spec") or {}).get("replicas", current["spec"]["replicas"])
        return self._write_replicas(res, ns, name, replicas, manager=manager)

    def _write_replicas(self, res: resources.Resource, ns: str, name: str, replicas: Any, *,
                        manager: str) -> dict[str, Any]:
        if not isinstance(replicas, int) or replicas < 0:
            raise errors.invalid("Scale", name, [{"reason": "FieldValueInvalid",
                                                  "message": f"Invalid value: {replicas}: must be greater than or "
                                                             "equal to 0", "field": "spec.replicas"}], "autoscaling")
        entry = self.api.require(res, ns, name)
        new = entry.copy()
        new.setdefault("spec", {})["replicas"] = replicas
        return self.api.update(res, ns, name, new, manager=manager, subresource="scale")

    def evict(self, ns: str, name: str, body: Any) -> None:
        """pods/eviction: honour PodDisruptionBudgets (429 when one would be violated), then delete."""
        res = self.res("", "pods")
        pod = self.api.require(res, ns, name).obj
        labels = pod["metadata"].get("labels") or {}
        for pdb in self.api.list_objects(("policy", "poddisruptionbudgets"), ns):
            reqs = selectors.from_label_selector((pdb.get("spec") or {}).get("selector"))
            if reqs is None or not selectors.match_labels(reqs, labels):
                continue
            if (pdb.get("status") or {}).get("disruptionsAllowed", 1) <= 0:
                raise errors.ApiError(429, "Cannot evict pod as it would violate the pod's disruption budget.",
                                      reason="TooManyRequests",
                                      details={"causes": [{"reason": "DisruptionBudget",
                                                           "message": f"The disruption budget "
                                                                      f"{pdb['metadata']['name']} needs more "
                                                                      "healthy pods"}]})
        opts = (body or {}).get("deleteOptions") or {}
        self.api.delete(res, ns, name, grace=opts.get("gracePeriodSeconds"))

    def bind(self, ns: str, name: str, body: Any) -> None:
        target = ((body or {}).get("target") or {}).get("name")
        if not target:
            raise errors.bad_request("binding target is required")
        self.scheduler.bind(ns, name, target)

    def review(self, res: resources.Resource, body: Any) -> dict[str, Any]:
        """Access/token reviews: the sim authorises everything its bearer token admits."""
        doc = dict(body) if isinstance(body, dict) else {}
        doc["apiVersion"] = res.api_version
        doc["kind"] = res.kind
        if res.kind.endswith("AccessReview"):
            doc["status"] = {"allowed": True, "reason": "sim allows everything"}
        elif res.kind == "SelfSubjectRulesReview":
            doc["status"] = {"resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
                             "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}], "incomplete": False}
        elif res.kind == "SelfSubjectReview":
            doc["status"] = {"userInfo": {"username": "system:admin", "groups": ["system:masters",
                                                                                 "system:authenticated"]}}
        elif res.kind == "TokenReview":
            doc["status"] = {"authenticated": True, "user": {"username": "system:admin"}}
        return doc


def _sandbox_status(pod: dict[str, Any], node: NodeState, *, phase: str, now: str) -> dict[str, Any]:
    """Set what a pod's status has once the kubelet made its sandbox: phase, host and pod IPs
    (the pod IP kept across restarts), start time. Returns the status, changed in place."""
    status: dict[str, Any] = pod.setdefault("status", {})
    status["phase"] = phase
    status["hostIP"] = f"172.18.0.{node.index + 2}"
    status["hostIPs"] = [{"ip": status["hostIP"]}]
    if not status.get("podIP"):
        ip = f"10.42.{node.index}.{next(node.pod_seq) % 250 + 2}"
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    status.setdefault("startTime", now)
    return status
