"""Image pulls in the sim: what a site can pull, ErrImagePull then ImagePullBackOff with the kubelet's and
containerd's words, back-off retries, InvalidImageName, init containers, events, kubectl's view, the CLI."""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sim_helpers import Kubectl, until

import sim.testing
from sim import images
from sim.cluster import Timing

#: Image pulls back off for seconds: a longer default wait than the other sim tests.
_until = functools.partial(until, timeout=20.0)


def test_references_normalize_like_docker() -> None:
    assert str(images.parse("busybox")) == "docker.io/library/busybox:latest"
    assert str(images.parse("index.docker.io/acme/app:2")) == "docker.io/acme/app:2"
    assert str(images.parse("registry.local:5000/a/b:1")) == "registry.local:5000/a/b:1"
    assert str(images.parse("localhost/x")) == "localhost/x:latest"
    digest = "sha256:" + "a" * 64
    assert images.parse(f"quay.io/acme/w@{digest}").digest == digest
    for bad in ("Nginx:1", "nginx:", "a//b", "nginx:1@sha256:zz"):
        with pytest.raises(images.InvalidReference):
            images.parse(bad)


def test_pullable_entries() -> None:
    p = images.Pullable.of(["nginx:1.27", "quay.io/acme/widget", "registry.local:5000", "myregistry:5000/"])
    assert p.error("nginx:1.27") is None and p.error("docker.io/library/nginx:1.27") is None
    assert p.error("quay.io/acme/widget:9") is None and p.error("registry.local:5000/any/thing") is None
    assert p.error("myregistry:5000/team/app:1") is None
    reason, message = p.error("nginx:1.28") or ("", "")
    assert reason == "ErrImagePull" and message.startswith("rpc error: code = NotFound")
    assert message.endswith("docker.io/library/nginx:1.28: not found")
    reason, message = p.error("ghcr.io/x/y:1") or ("", "")
    assert reason == "ErrImagePull"
    assert message.endswith('Head "https://ghcr.io/v2/x/y/manifests/1": dial tcp: lookup ghcr.io: no such host')
    assert (images.Pullable.of([]).error("busybox") or ("", ""))[1].endswith(
        "lookup registry-1.docker.io: no such host")
    assert images.Pullable().error("anything.example/x:1") is None  # the default: everything
    assert (p.error("Bad:1") or ("",))[0] == "InvalidImageName"
    with pytest.raises(ValueError, match="Bad:1"):
        images.Pullable.of(["Bad:1"])


def _pod(name: str, *images_: str, init: tuple[str, ...] = ()) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeName": "agent-0",
                            "containers": [{"name": f"c{i}", "image": img} for i, img in enumerate(images_)]}
    if init:
        spec["initContainers"] = [{"name": f"i{i}", "image": img} for i, img in enumerate(init)]
    return {"metadata": {"name": name}, "spec": spec}


def _waiting(pod: dict[str, Any] | None, field: str = "containerStatuses") -> dict[str, dict[str, Any]]:
    statuses = ((pod or {}).get("status") or {}).get(field) or []
    return {cs["name"]: (cs.get("state") or {}).get("waiting") or {} for cs in statuses}


async def test_failed_pull_backs_off_then_starts_when_the_image_appears() -> None:
    timing = Timing(pod_startup=0.5, image_backoff=10, image_backoff_max=40)
    async with sim.testing.running(speed=50, pullable=["nginx:1.27"], timing=timing) as site:
        api = site.cluster.api
        api.create(site.cluster.res("", "pods"), "default", _pod("p", "nginx:1.27", "ghcr.io/acme/app:2"),
                   manager="test")

        def get() -> dict[str, Any]:
            pod = api.get(("", "pods"), "default", "p")
            assert pod is not None
            return pod

        await _until(lambda: _waiting(get()).get("c1", {}).get("reason") == "ErrImagePull")
        pod = get()
        assert pod["status"]["phase"] == "Pending" and pod["status"].get("podIP")
        err = _waiting(pod)["c1"]["message"]
        assert err.startswith('rpc error: code = Unknown desc = failed to pull and unpack image "ghcr.io/acme/app:2"')
        conds = {c["type"]: c for c in pod["status"]["conditions"]}
        assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "ContainersNotReady"
        assert conds["Ready"]["message"] == "containers with unready status: [c1]"
        assert conds["PodReadyToStartContainers"]["status"] == "True"
        running = {cs["name"]: cs for cs in pod["status"]["containerStatuses"]}
        assert "running" in running["c0"]["state"] and running["c1"]["imageID"] == ""
        await _until(lambda: _waiting(get()).get("c1", {}).get("reason") == "ImagePullBackOff")
        assert _waiting(get())["c1"]["message"] == f'Back-off pulling image "ghcr.io/acme/app:2": ErrImagePull: {err}'
        # The kubelet retries after the back-off: ErrImagePull again, then back off for longer.
        await _until(lambda: any(e["reason"] == "Pulling" and e["count"] >= 2 and "ghcr.io" in e["message"]
                                 for e in api.list_objects(("", "events"), "default")))
        assert get()["status"]["phase"] == "Pending"
        by_message = {e["message"]: e for e in api.list_objects(("", "events"), "default")}
        assert by_message[f'Failed to pull image "ghcr.io/acme/app:2": {err}']["type"] == "Warning"
        assert by_message['Back-off pulling image "ghcr.io/acme/app:2"']["reason"] == "BackOff"
        assert by_message["Error: ErrImagePull"]["reason"] == "Failed"
        assert by_message["Error: ImagePullBackOff"]["reason"] == "Failed"
        assert all(e["source"]["component"] == "kubelet" for m, e in by_message.items() if "image" in m)
        # The site gets the image (e.g. its registry now has it): the next retry pulls it and the pod runs.
        site.set_pullable(["nginx:1.27", "ghcr.io/acme/app:2"])
        await _until(lambda: get()["status"]["phase"] == "Running", timeout=30)
        assert all(c["status"] == "True" for c in get()["status"]["conditions"])


async def test_invalid_name_and_init_containers() -> None:
    async with sim.testing.running(speed=50, pullable=["busybox:1.36"], timing=Timing(pod_startup=0.5)) as site:
        api = site.cluster.api
        res = site.cluster.res("", "pods")
        api.create(res, "default", _pod("bad", "Busybox:1.36"), manager="test")
        api.create(res, "default", _pod("init", "busybox:1.36", init=("busybox:1.36", "quay.io/x/missing:1")),
                   manager="test")
        await _until(lambda: _waiting(api.get(("", "pods"), "default", "bad")).get("c0"))
        waiting = _waiting(api.get(("", "pods"), "default", "bad"))["c0"]
        assert waiting == {"reason": "InvalidImageName", "message": 'Failed to apply default image tag '
                           '"Busybox:1.36": couldn\'t parse image name "Busybox:1.36": invalid reference format'}
        await _until(lambda: _waiting(api.get(("", "pods"), "default", "init"), "initContainerStatuses")
                     .get("i1", {}).get("reason") == "ImagePullBackOff")
        pod = api.get(("", "pods"), "default", "init")
        assert pod is not None
        inits = {cs["name"]: cs["state"] for cs in pod["status"]["initContainerStatuses"]}
        assert inits["i0"]["terminated"]["reason"] == "Completed"
        assert _waiting(pod) == {"c0": {"reason": "PodInitializing"}}
        conds = {c["type"]: c for c in pod["status"]["conditions"]}
        assert conds["Initialized"]["message"] == "containers with incomplete status: [i1]"
        # InvalidImageName is never retried: one InspectFailed event, its count stays 1.
        await site.clock.sleep(30)
        inspect = [e for e in api.list_objects(("", "events"), "default") if e["reason"] == "InspectFailed"]
        assert [e["count"] for e in inspect] == [1]


def test_kubectl_shows_the_pull_failure(tmp_path: Path) -> None:
    """kubectl's own columns and describe read the model like a real node's."""
    with sim.testing.start_thread(speed=20, workdir=tmp_path, pullable=[]) as site:
        k = Kubectl(site.kubeconfig, tmp_path / "cache")
        k("run", "web", "--image=nginx:1.27")
        out = ""
        for _ in range(100):
            out = k("get", "pod", "web", "--no-headers")
            if "ImagePullBackOff" in out or "ErrImagePull" in out:
                break
            time.sleep(0.1)
        assert "0/1" in out and ("ImagePullBackOff" in out or "ErrImagePull" in out), out
        described = k("describe", "pod", "web")
        assert 'Failed to pull image "nginx:1.27"' in described
        assert "lookup registry-1.docker.io: no such host" in described


def test_cli_pullable_option(tmp_path: Path) -> None:
    bad = subprocess.run([sys.executable, "-m", "sim.cli", "run", "--kubeconfig-out", str(tmp_path / "kc"),
                          "--pullable", "nginx:1.27,Bad:1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Bad:1" in bad.stderr
    with sim.testing.start_process(speed=50, workdir=tmp_path, pullable=["nginx:1.27"]) as site:
        k = Kubectl(site.kubeconfig, tmp_path / "cache")
        k("run", "ok", "--image=nginx:1.27")
        k("run", "no", "--image=nginx:1.28")
        out = ""
        for _ in range(100):
            out = k("get", "pods", "--no-headers")
            if "Running" in out and ("ImagePullBackOff" in out or "ErrImagePull" in out):
                break
            time.sleep(0.1)
        rows = {line.split()[0]: line for line in out.splitlines()}
        assert "Running" in rows["ok"], out
        assert "ImagePullBackOff" in rows["no"] or "ErrImagePull" in rows["no"], out
