"""Supervision against the sim: drift repair, degraded workloads, health roll-up, API outages."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from install_kit import context, events, managed, site_v1, wait_for, which_bundle

from agent import installer, intake, kube, sitestatus
from agent.install import drift, journal, model

VERSIONS = {"1.0.0": site_v1()}


async def _installed(config: Path, api: Any, bundle: Path) -> Any:
    ctx = context(config)
    await intake.import_bundle(ctx, bundle)
    run = await installer.run_pending(ctx, api)
    assert run is not None and run.state == "committed"
    return ctx


async def test_drift_restores_deleted_and_modified_objects(
    site_config: Path, api: Any, bundles: dict[str, Path]
) -> None:
    ctx = await _installed(site_config, api, bundles["1.0.0"])
    spec = await installer.spec_for(ctx, journal.current(ctx.store))  # type: ignore[arg-type]
    sup = drift.Supervisor(ctx, api)
    assert await sup.repair(spec) == []  # nothing drifted yet
    await kube.delete(api, "apps/v1", "Deployment", "web", namespace="demo-a")
    await kube.delete(api, "example.com/v1", "Widget", "gizmo", namespace="demo-b")
    await kube.patch(api, "v1", "ConfigMap", "app-a-config", {"data": {"mode": "hacked"}}, namespace="demo-a",
                     field_manager="kubectl-edit")
    await kube.patch(api, "v1", "Service", "web", {"metadata": {"labels": {model.LABEL_COMPONENT: None}}},
                     namespace="demo-a", field_manager="kubectl-edit")
    await kube.patch(api, "apps/v1", "StatefulSet", "db", {"spec": {"template": {"spec": {"containers": [
        {"name": "db", "image": "postgres:9"}]}}}}, namespace="demo-b", patch_type="strategic",
        field_manager="kubectl-edit")
    assert await which_bundle(api, VERSIONS) is None
    repaired = await sup.repair(spec)
    assert len(repaired) == 5, repaired
    assert await which_bundle(api, VERSIONS) == "1.0.0"
    live = await managed(api)
    assert live["apps/StatefulSet/demo-b/db"]["spec"]["template"]["spec"]["containers"][0]["image"] == "postgres:16"
    [event] = events(ctx.store, "drift.repaired")
    assert len(event["data"]["objects"]) == 5
    assert await sup.repair(spec) == []  # repaired for good: no apply loop

    async def healthy() -> bool:
        components = await sup.health(spec)
        return all(c["healthy"] for c in components)

    await wait_for(healthy, timeout=30)
    status = ctx.store.get(sitestatus.INSTALL_KEY)
    assert status["healthy"] and set(status["layers"]) == {"0", "1", "2", "3"}


async def test_degraded_workload_keeps_its_replicas(site_config: Path, api: Any, bundles: dict[str, Path]) -> None:
    ctx = await _installed(site_config, api, bundles["1.0.0"])
    # What the degradation controller does: record the bundle's count, scale down, own the field.
    await kube.patch(api, "apps/v1", "Deployment", "web",
                     {"metadata": {"annotations": {model.ANNOTATION_ORIGINAL_REPLICAS: "2"}}, "spec": {"replicas": 0}},
                     namespace="demo-a", field_manager="edgefleet-degradation")
    spec = await installer.spec_for(ctx, journal.current(ctx.store))  # type: ignore[arg-type]
    sup = drift.Supervisor(ctx, api)
    await sup.repair(spec)
    web = await kube.get(api, "apps/v1", "Deployment", "web", namespace="demo-a")
    assert web is not None and web["spec"]["replicas"] == 0
    # A re-install of the same bundle does not scale it back up either.
    await intake.import_bundle(ctx, bundles["1.0.0"])
    run = await installer.run_pending(ctx, api)
    assert run is not None and run.state == "committed"
    web = await kube.get(api, "apps/v1", "Deployment", "web", namespace="demo-a")
    assert web is not None and web["spec"]["replicas"] == 0
    components = {c["name"]: c for c in await sup.health(spec)}
    assert components["app-a"]["degraded"] and components["app-a"]["healthy"]


class Proxy:
    """A TCP proxy we can cut: the API server 'unreachable' as the agent sees it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.up = False

    async def start(self) -> None:
        self.up = True
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.up = False
        self.server.close()
        for w in self.writers:
            w.close()
        self.writers.clear()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        if not self.up:  # accepted just before the cut
            writer.close()
            up_writer.close()
            return
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while (data := await src.read(65536)) and self.up:
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.mark.slow
async def test_agent_survives_api_outage(
    site: Any, site_config: Path, api: Any, bundles: dict[str, Path], tmp_path: Path
) -> None:
    kubeconfig = yaml.safe_load(Path(site.kubeconfig).read_text())
    server = kubeconfig["clusters"][0]["cluster"]["server"]
    proxy = Proxy(int(server.rsplit(":", 1)[1].split("/")[0]))
    await proxy.start()
    kubeconfig["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{proxy.port}"
    proxied = tmp_path / "proxied.kubeconfig"
    proxied.write_text(yaml.safe_dump(kubeconfig))
    config = yaml.safe_load(site_config.read_text())
    config["kubeconfig"] = str(proxied)
    config["install"]["health_interval_seconds"] = 0.5
    site_config.write_text(yaml.safe_dump(config))
    ctx = context(site_config)
    task = asyncio.create_task(installer.run(ctx))  # the daemon's installer task
    try:
        await intake.import_bundle(ctx, bundles["1.0.0"])

        async def applying() -> bool:
            run = journal.active_run(ctx.store)
            return run is not None and run.position.startswith(("apply:app", "gate:app"))

        await wait_for(applying, timeout=30, interval=0.02)
        await proxy.cut()  # mid-install
        await asyncio.sleep(4)
        assert not task.done()
        assert journal.active_run(ctx.store) is not None  # waiting, not failed or rolled back
        await proxy.start()

        async def committed() -> bool:
            return installer.report(ctx.store)["current"] == "site-1.0.0"

        await wait_for(committed, timeout=60)
        assert await which_bundle(api, VERSIONS) == "1.0.0"
        await proxy.cut()  # while supervising
        await asyncio.sleep(3)
        assert not task.done()
        await proxy.start()
        await kube.delete(api, "v1", "ConfigMap", "ui-config", namespace="demo-a")

        async def healthy_again() -> bool:
            status = ctx.store.get(sitestatus.INSTALL_KEY)
            return bool(status.get("healthy"))

        await wait_for(healthy_again, timeout=30)
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(Exception):
            await proxy.cut()


async def test_verified_versions_survive_a_restart_in_the_same_cluster_only(
    site_config: Path, api: Any, bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first drift pass after a restart reads only what changed (not every object), unless the
    stored versions were recorded in another cluster (kube-system's uid differs): then all."""
    ctx = await _installed(site_config, api, bundles["1.0.0"])
    spec = await installer.spec_for(ctx, journal.current(ctx.store))  # type: ignore[arg-type]
    seeded = journal.verified_versions(ctx.store)
    assert set(seeded) == set(spec.refs())  # the install recorded every object as applied
    await drift.Supervisor(ctx, api).repair(spec)  # learns what controllers changed since (status)
    reads: list[str] = []
    real_get = kube.get

    async def counting_get(*args: Any, **kwargs: Any) -> Any:
        reads.append(str(args[3]))
        return await real_get(*args, **kwargs)

    monkeypatch.setattr(kube, "get", counting_get)
    await kube.patch(api, "v1", "ConfigMap", "app-a-config", {"data": {"mode": "hacked"}}, namespace="demo-a",
                     field_manager="kubectl-edit")
    restarted = drift.Supervisor(ctx, api)
    assert await restarted.repair(spec) == ["reverted ConfigMap/demo-a/app-a-config"]
    assert [r for r in reads if r != "kube-system"] == ["app-a-config"]
    reads.clear()
    ctx.store.put(journal.VERIFIED_CLUSTER_KEY, "another-cluster")
    assert await drift.Supervisor(ctx, api).repair(spec) == []
    assert len([r for r in reads if r != "kube-system"]) == len(spec.refs())
    assert ctx.store.get(journal.VERIFIED_CLUSTER_KEY) not in ("another-cluster", "", None)


async def test_status_only_changes_are_not_read_but_label_and_spec_drift_is_repaired(
    site_config: Path, api: Any, bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an install, controllers change workloads' and CRDs' status (new resourceVersion, same
    generation): the first drift pass must not GET them (the IDP's CRDs are ~8 MB). A label taken
    off a Deployment (no generation bump) and a change to its spec (a bump) are still repaired."""
    ctx = await _installed(site_config, api, bundles["1.0.0"])
    spec = await installer.spec_for(ctx, journal.current(ctx.store))  # type: ignore[arg-type]
    web = "apps/Deployment/demo-a/web"

    async def status_moved() -> bool:  # the sim's deployment controller has written web's status
        live = await kube.get(api, "apps/v1", "Deployment", "web", namespace="demo-a")
        return model.seen(live or {})[0] != journal.verified_versions(ctx.store)[web][0]

    await wait_for(status_moved, timeout=30)
    reads: list[str] = []
    real_get = kube.get

    async def counting_get(*args: Any, **kwargs: Any) -> Any:
        reads.append(f"{args[2]}/{args[3]}")
        return await real_get(*args, **kwargs)

    monkeypatch.setattr(kube, "get", counting_get)
    before = journal.verified_versions(ctx.store)
    sup = drift.Supervisor(ctx, api)
    assert await sup.repair(spec) == []
    after = journal.verified_versions(ctx.store)
    assert after[web][0] != before[web][0] and after[web][1] == before[web][1] >= 1
    assert [r for r in reads if r != "Namespace/kube-system"] == []

    await kube.patch(api, "apps/v1", "Deployment", "web", {"metadata": {"labels": {model.LABEL_TIER: None}}},
                     namespace="demo-a", field_manager="kubectl-edit")
    assert await sup.repair(spec) == ["reverted Deployment/demo-a/web"]
    await kube.patch(api, "apps/v1", "Deployment", "web", {"spec": {"template": {"spec": {"containers": [
        {"name": "web", "image": "nginx:1.0"}]}}}}, namespace="demo-a", patch_type="strategic",
        field_manager="kubectl-edit")
    assert await sup.repair(spec) == ["reverted Deployment/demo-a/web"]
    live = await real_get(api, "apps/v1", "Deployment", "web", namespace="demo-a")
    assert live is not None and live["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.27"
    assert live["metadata"]["labels"][model.LABEL_TIER] == "2"
