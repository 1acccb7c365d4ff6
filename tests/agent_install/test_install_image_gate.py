"""A bundle whose image the site cannot get: the health gate fails at once naming the component, the pod
and the image (not as an anonymous timeout), the run rolls back to the last good bundle and the version
is marked bad; supervision reports the same reason. The sim's kubelets pull only the images listed."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from install_kit import Comp, Keys, build_bundle, context, events, site_v2, wait_for, which_bundle, write_config

from agent import installer, intake, kube
from agent.install import drift, gates, journal

# The images site_v2 runs: docker.io is reachable, and has exactly these.
PULLABLE = ["nginx:1.27", "postgres:16", "busybox:1.36"]
MISSING = "nginx:1.99-missing"  # docker.io answers "not found"
AIRGAPPED = "registry.example.com/team/app:9.9"  # a registry the site cannot reach


def with_web_image(image: str) -> list[Comp]:
    """site_v2 with app-a's Deployment ``web`` upgraded to ``image`` (a rolling update)."""
    comps = copy.deepcopy(site_v2())
    for comp in comps:
        for obj in comp.objects:
            if obj["kind"] == "Deployment" and obj["metadata"]["name"] == "web":
                obj["spec"]["template"]["spec"]["containers"][0]["image"] = image
    return comps


@pytest.fixture
async def pull_site() -> AsyncIterator[Any]:
    import sim.testing

    async with sim.testing.running(speed=20, pullable=PULLABLE) as s:
        yield s


@pytest.fixture
async def pull_api(pull_site: Any) -> AsyncIterator[Any]:
    async with kube.connect(pull_site.kubeconfig) as client:
        yield client


@pytest.fixture
def pull_config(tmp_path: Path, trust_keys: Keys, pull_site: Any) -> Path:
    # A 120 s gate: a failure that only the timeout could find would take that long and say "timed out".
    return write_config(tmp_path / "agent.yaml", state_dir=tmp_path / "state", trust_dir=tmp_path / "trust",
                        kubeconfig=pull_site.kubeconfig, default_gate_timeout_seconds=120)


async def _install(ctx: Any, api: Any, bundle: Path) -> journal.Run:
    await intake.import_bundle(ctx, bundle)
    run = await installer.run_pending(ctx, api)
    assert run is not None
    return run


@pytest.mark.parametrize("image", [MISSING, AIRGAPPED])
async def test_missing_image_fails_gate_naming_it_and_rolls_back(
    pull_config: Path, pull_api: Any, trust_keys: Keys, tmp_path: Path, image: str
) -> None:
    ctx = context(pull_config)
    good = build_bundle(tmp_path / "v2.bundle", k=trust_keys, comps=site_v2(), version="2.0.0", release=2)
    bad = build_bundle(tmp_path / "v3.bundle", k=trust_keys, comps=with_web_image(image), version="3.0.0", release=3)
    assert (await _install(ctx, pull_api, good)).state == "committed"
    run = await _install(ctx, pull_api, bad)
    assert run.state == "rolled-back"
    error = run.error or ""
    assert "timed out" not in error, error
    assert error.startswith("component app-a: Deployment demo-a/web: pod demo-a/web-"), error
    assert f'cannot get image "{image}"' in error and "pod demo-a/web-" in error, error
    assert "ImagePullBackOff" in error or "ErrImagePull" in error, error
    # The kubelet's own words travel with it: not found at a reachable registry, DNS for an unreachable one.
    assert ("not found" if image == MISSING else "no such host") in error, error
    [failed] = events(ctx.store, "install.failed")
    assert image in failed["summary"]
    assert "site-3.0.0" in journal.bad_versions(ctx.store)
    assert installer.report(ctx.store)["current"] == "site-2.0.0"
    assert await which_bundle(pull_api, {"2.0.0": site_v2()}) == "2.0.0"

    async def web_back() -> bool:
        web = await kube.get(pull_api, "apps/v1", "Deployment", "web", namespace="demo-a")
        assert web is not None
        pods = await kube.list_objects(pull_api, "v1", "Pod", namespace="demo-a", label_selector="app=web")
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        return (web["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.27"
                and web["status"].get("availableReplicas") == 2
                and {p["spec"]["containers"][0]["image"] for p in live} == {"nginx:1.27"})

    await wait_for(web_back, timeout=30)


async def test_supervision_reports_the_image_not_just_not_ready(
    pull_config: Path, pull_api: Any, pull_site: Any, trust_keys: Keys, tmp_path: Path
) -> None:
    ctx = context(pull_config)
    good = build_bundle(tmp_path / "v2.bundle", k=trust_keys, comps=site_v2(), version="2.0.0", release=2)
    assert (await _install(ctx, pull_api, good)).state == "committed"
    spec = await installer.spec_for(ctx, journal.current(ctx.store))  # type: ignore[arg-type]
    sup = drift.Supervisor(ctx, pull_api)
    # Someone edits the image by hand (drift repair has not run yet): the new pod cannot pull it.
    await kube.patch(pull_api, "apps/v1", "Deployment", "web", {"spec": {"template": {"spec": {"containers": [
        {"name": "web", "image": AIRGAPPED}]}}}}, namespace="demo-a", patch_type="strategic",
        field_manager="kubectl-edit")

    async def app_a_reason() -> str:
        components = {c["name"]: c for c in await sup.health(spec)}
        reason = str(components["app-a"]["reason"])
        return reason if "cannot get image" in reason else ""

    reason = await wait_for(app_a_reason, timeout=30)
    assert f'cannot get image "{AIRGAPPED}"' in reason and "pod demo-a/web-" in reason, reason
    # Once the site can get it (e.g. its registry now has it), the pod starts at its next retry: healthy again.
    pull_site.set_pullable([*PULLABLE, AIRGAPPED])

    async def healthy() -> bool:
        components = {c["name"]: c for c in await sup.health(spec)}
        return bool(components["app-a"]["healthy"])

    await wait_for(healthy, timeout=60)


def _pod(name: str, reason: str, *, deleting: bool = False, init: bool = False) -> dict[str, Any]:
    field = "initContainerStatuses" if init else "containerStatuses"
    meta: dict[str, Any] = {"name": name, "namespace": "demo", "uid": f"uid-{name}"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"containers": [{"name": "c", "image": "x:1"}]},
            "status": {"phase": "Pending", field: [{"name": "c", "image": "x:1",
                                                   "state": {"waiting": {"reason": reason, "message": "m"}}}]}}


def test_image_problem_terminal_reasons_at_once_transient_after_grace() -> None:
    seen: dict[tuple[str, str], float] = {}
    assert gates.image_problem([_pod("a", "ContainerCreating")], seen=seen, now=0.0) is None
    assert gates.image_problem([_pod("a", "ErrImagePull")], seen=seen, now=100.0) is None  # grace starts
    assert gates.image_problem([_pod("a", "ErrImagePull")], seen=seen, now=100.0 + gates.PULL_GRACE - 1) is None
    problem = gates.image_problem([_pod("a", "ErrImagePull")], seen=seen, now=100.0 + gates.PULL_GRACE)
    assert problem == 'pod demo/a: container c cannot get image "x:1": ErrImagePull: m'
    # The container got past it: a later ErrImagePull starts a new grace.
    assert gates.image_problem([_pod("a", "ContainerCreating")], seen=seen, now=200.0) is None and seen == {}
    assert gates.image_problem([_pod("a", "ErrImagePull")], seen=seen, now=201.0) is None
    for reason in gates.PULL_TERMINAL:
        assert gates.image_problem([_pod("b", reason, init=True)], seen={}, now=0.0) == (
            f'pod demo/b: container c cannot get image "x:1": {reason}: m')
    assert gates.image_problem([_pod("c", "ImagePullBackOff", deleting=True)], seen={}, now=0.0) is None
    # Supervision (no ``seen``) reports what is, transient or not.
    assert gates.image_problem([_pod("d", "ErrImagePull")]) is not None


def test_selector_string() -> None:
    assert gates.selector_string({"matchLabels": {"b": "2", "a": "1"}, "matchExpressions": [
        {"key": "t", "operator": "In", "values": ["x", "y"]}, {"key": "u", "operator": "NotIn", "values": ["z"]},
        {"key": "v", "operator": "Exists"}, {"key": "w", "operator": "DoesNotExist"}]}) == \
        "a=1,b=2,t in (x,y),u notin (z),v,!w"
