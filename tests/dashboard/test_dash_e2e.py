"""The dashboard end to end in headless Chromium: real mosquitto, real hub, a real agent link.

* the overview lists every site, with counts per state and the overdue snapshot highlighted;
* a state change reaches an open page through server-sent events, without a reload;
* "snapshot now" is signed by the hub, admitted by the agent's command handler (over the real
  broker) and the agent's genuine reply shows up on the page;
* screenshots of the overview and of a site page are saved under artifacts/dashboard/.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import httpx
import pytest
from dash_harness import (
    ARTIFACTS,
    WRITE_TOKEN,
    agent_context,
    agent_link,
    browser,
    hub_config_for,
    hub_running,
    mosquitto,
    wait_until,
)

from agent import protocol, sitestatus

COMPONENTS = [
    {"name": "namespaces", "layer": 0, "tier": 1, "healthy": True},
    {"name": "cert-manager", "layer": 1, "tier": 1, "healthy": True},
    {"name": "prometheus", "layer": 1, "tier": 2, "healthy": True},
    {"name": "loki", "layer": 1, "tier": 3, "healthy": False, "reason": "0/1 replicas ready", "degraded": True},
    {"name": "argo-cd", "layer": 2, "tier": 2, "healthy": True},
    {"name": "grafana", "layer": 3, "tier": 4, "healthy": True},
    {"name": "backstage", "layer": 4, "tier": 4, "healthy": True},
]
NODES = [
    {"name": "server-0", "ready": True, "control_plane": True},
    {"name": "agent-0", "ready": True},
    {"name": "agent-1", "ready": True},
]


def _seed_agent(ctx) -> None:  # type: ignore[no-untyped-def]
    ctx.store.put(
        sitestatus.INSTALL_KEY,
        {
            "bundle": {"name": "idp-platform", "version": "1.0.0", "release": 1},
            "install_state": "committed",
            "components": COMPONENTS,
        },
    )
    ctx.store.put(sitestatus.DEGRADATION_KEY, {"state": "green", "reason": "all nodes ready", "nodes": NODES})
    # A snapshot 3 hours old where the schedule allows 2: the overview must flag it.
    taken = datetime.now(UTC) - timedelta(hours=3)
    ctx.store.put(
        sitestatus.SNAPSHOT_KEY,
        {"last_success": taken.isoformat(), "schedule": "0 * * * *", "max_age_seconds": 7200, "size_bytes": 4_200_000},
    )


async def _publish_status(port: int, site: str, seq: int, state: str, reason: str) -> None:
    status = protocol.Status(
        site=site, seq=seq, state=protocol.SiteState(state), state_reason=reason,
        bundle=protocol.BundleRef(name="idp-platform", version="1.0.0", release=1), install_state="committed",
        nodes=[protocol.NodeHealth(**n) for n in NODES],
    )
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"pub-{uuid.uuid4().hex[:8]}") as client:
        await client.publish(protocol.topic(site, protocol.Channel.STATUS), status.to_bytes(), qos=1, retain=True)


async def test_dashboard_live_end_to_end(tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with mosquitto(tmp_path / "broker") as broker:
        cfg = hub_config_for(tmp_path, broker.port)
        async with hub_running(cfg) as hub:
            ctx = agent_context(tmp_path, broker.port, "store-a", hub_pub=tmp_path / "hubkeys" / "hub-command.pub")
            _seed_agent(ctx)
            async with agent_link(ctx) as agent_task:
                await _publish_status(broker.port, "store-b", 1, "green", "all nodes ready")
                await _publish_status(broker.port, "store-c", 1, "yellow", "agent-1 lost; tier 4 scaled down")
                await wait_until(lambda: hub.ctx.store.fleet_summary()["sites"] == 3, what="three sites in the hub")

                async with browser() as b:
                    page = await b.new_page(viewport={"width": 1400, "height": 800})
                    # Offline: every request the pages make (documents, script, style, data, stream) goes to the hub.
                    requested: list[str] = []
                    page.on("request", lambda r: requested.append(r.url))
                    await page.goto(f"{hub.api_url}/dashboard/")
                    await page.wait_for_selector("#live.on")
                    await page.wait_for_selector("#sites tbody tr[data-site='store-c']")
                    sites = await page.eval_on_selector_all("#sites tbody tr", "rows => rows.map(r => r.dataset.site)")
                    assert sorted(sites) == ["store-a", "store-b", "store-c"]
                    assert await page.text_content(".count.green .n") == "2"
                    assert await page.text_content(".count.yellow .n") == "1"
                    snap = await page.text_content("tr[data-site='store-a'] .snap-age")
                    assert snap is not None and "overdue" in snap
                    assert await page.get_attribute("tr[data-site='store-a'] .snap-age", "class") == "overdue snap-age"

                    # Filter by state (click a count) and by text.
                    await page.click(".count.yellow")
                    assert await page.eval_on_selector_all("#sites tbody tr", "r => r.length") == 1
                    await page.click(".count.yellow")
                    await page.fill("#filter", "store-b")
                    assert await page.eval_on_selector_all("#sites tbody tr", "r => r.length") == 1
                    await page.fill("#filter", "")

                    # Sort: by state first (yellow before green), then by a clicked column, twice to reverse.
                    async def order() -> list[str]:
                        return await page.eval_on_selector_all("#sites tbody tr", "r => r.map(x => x.dataset.site)")

                    assert (await order())[0] == "store-c"
                    await page.click("#sites th[data-sort='site']")
                    assert await order() == ["store-a", "store-b", "store-c"]
                    await page.click("#sites th[data-sort='site']")
                    assert await order() == ["store-c", "store-b", "store-a"]
                    await page.click("#sites th[data-sort='display']")

                    # Live: a state change appears without a reload.
                    await page.evaluate("window.__noReload = 42")
                    await _publish_status(broker.port, "store-b", 2, "red", "agent-0 and agent-1 lost: limp home")
                    await page.wait_for_selector("tr[data-site='store-b'][data-state='red']", timeout=15000)
                    assert await page.evaluate("window.__noReload") == 42
                    assert await page.text_content(".count.red .n") == "1"
                    await page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)

                    # Site page of the agent's site; its state change (by the real agent link) arrives live.
                    await page.click("a[href='/dashboard/sites/store-a']")
                    await page.wait_for_selector("#site-state.green")
                    await page.wait_for_selector("#live.on")
                    assert await page.eval_on_selector_all(".layer", "l => l.length") == 5
                    loki = await page.get_attribute(".comp[data-component='loki']", "class")
                    assert loki == "comp unhealthy degraded"
                    await page.evaluate("window.__noReload = 43")
                    ctx.store.put(
                        sitestatus.DEGRADATION_KEY,
                        {"state": "yellow", "reason": "agent-1 lost; tier 4 scaled down",
                         "nodes": [*NODES[:2], {"name": "agent-1", "ready": False}]},
                    )
                    ctx.report_now.set()
                    await page.wait_for_selector("#site-state.yellow", timeout=15000)
                    await page.wait_for_selector("#timeline .run-yellow")
                    assert await page.evaluate("window.__noReload") == 43
                    await page.wait_for_selector(".node.down")

                    # Recent events and snapshots: a failed snapshot reported by the agent shows in both.
                    ctx.emit("snapshot.failed", "etcd snapshot failed: etcdctl snapshot save: timed out after 600s",
                             severity=protocol.Severity.ERROR, data={"trigger": "scheduled", "reason": "timed out"})
                    await page.wait_for_selector("#events tbody tr[data-type='snapshot.failed']", timeout=15000)
                    await page.wait_for_selector("#snapshots tbody tr td.state-failed")
                    snap_rows = await page.eval_on_selector_all("#snapshots tbody tr", "r => r.map(x => x.textContent)")
                    assert any("ok" in r and "status" in r for r in snap_rows), snap_rows  # the seeded last success

                    # Writes need a token: no buttons before signing in.
                    assert await page.is_hidden("#actions")
                    await page.fill("#token-input", WRITE_TOKEN)
                    await page.click("#sign-in button")
                    await page.wait_for_selector("#actions:not([hidden])")
                    assert not ctx.snapshot_now.is_set()
                    await page.click("#snapshot-now")
                    row = "#commands tr[data-name='snapshot-now']"
                    await page.wait_for_selector(f"{row} .reply", timeout=20000)
                    reply = await page.text_content(f"{row} .reply")
                    assert reply is not None and "accepted" in reply and "snapshot requested" in reply
                    assert ctx.snapshot_now.is_set(), "the command did not reach the agent"
                    cmds = hub.ctx.store.commands(site="store-a")
                    assert [c["state"] for c in cmds] == ["accepted"]
                    await page.screenshot(path=str(ARTIFACTS / "site.png"), full_page=True)
                    await page.close()
                assert not agent_task.done()
                foreign = [u for u in requested if not u.startswith(f"{hub.api_url}/")]
                assert requested and foreign == [], foreign


async def test_read_token_required_and_writes_refused(tmp_path: Path) -> None:
    with mosquitto(tmp_path / "broker") as broker:
        cfg = hub_config_for(tmp_path, broker.port, api={"read_tokens": ["dash-read-token"]})
        async with hub_running(cfg) as hub:
            await _publish_status(broker.port, "store-x", 1, "green", "ok")
            await wait_until(lambda: hub.ctx.store.get_site("store-x") is not None, what="site stored")
            async with httpx.AsyncClient(base_url=hub.api_url) as http:
                assert (await http.get("/dashboard/api/overview")).status_code == 401
                assert (await http.get("/dashboard/api/stream")).status_code == 401
                r = await http.get("/dashboard/api/overview", headers={"Authorization": "Bearer dash-read-token"})
                assert r.status_code == 200 and [s["site"] for s in r.json()["sites"]] == ["store-x"]
                # A read token cannot send commands.
                r = await http.post("/api/v1/sites/store-x/commands", json={"name": "snapshot-now"},
                                    headers={"Authorization": "Bearer dash-read-token"})
                assert r.status_code == 403
                page_html = await http.get("/dashboard/")
                assert page_html.status_code == 200
                assert "script-src 'self'" in page_html.headers["content-security-policy"]
            async with browser() as b:
                page = await b.new_page()
                await page.goto(f"{hub.api_url}/dashboard/")
                await page.wait_for_selector("#error:not([hidden])")
                assert "requires a token" in (await page.text_content("#error") or "")
                await page.fill("#token-input", "dash-read-token")
                await page.click("#sign-in button")
                await page.wait_for_selector("#sites tbody tr[data-site='store-x']")
                assert await page.is_hidden("#error")
                await page.close()


@pytest.mark.timeout(90)
async def test_open_event_stream_does_not_hold_hub_shutdown(tmp_path: Path) -> None:
    """A browser left open on the dashboard must not keep `Ctrl-C` from stopping the hub."""
    import asyncio
    import contextlib
    import time

    with mosquitto(tmp_path / "broker") as broker:
        cfg = hub_config_for(tmp_path, broker.port)
        http = httpx.AsyncClient(timeout=30)
        try:
            async with hub_running(cfg) as hub:
                stream_cm = http.stream("GET", f"{hub.api_url}/dashboard/api/stream")
                response = await stream_cm.__aenter__()
                assert response.headers["content-type"].startswith("text/event-stream")
                chunks = response.aiter_text()
                got = ""
                while "event: hello" not in got:
                    got += await anext(chunks)
                await _publish_status(broker.port, "store-s", 1, "green", "ok")
                while "event: change" not in got:
                    got += await anext(chunks)
                assert '"kind":"site"' in got and '"site":"store-s"' in got
                started = time.monotonic()
            assert time.monotonic() - started < 10, "hub shutdown waited for the open stream"
            with contextlib.suppress(httpx.HTTPError, TimeoutError):
                await asyncio.wait_for(stream_cm.__aexit__(None, None, None), 10)
        finally:
            await http.aclose()


MINI_PROFILE = {
    "name": "mini",
    "tiers": {1: {"priorityClassName": "platform-infrastructure", "tolerateControlPlane": True, "spread": True}},
    "components": [
        {"name": "priority-classes", "layer": 0, "tier": 1, "sources": [{"kustomize": "IT/priorityclasses"}]},
        {"name": "namespaces", "layer": 0, "tier": 1, "sources": [{"platform": "IT/namespaces/argocd.yaml"}]},
    ],
}


async def test_install_bundle_button_reaches_the_agent(tmp_path: Path, platform: Path) -> None:
    """Operator picks an uploaded bundle and presses "Install bundle": the agent fetches it from the
    hub, verifies it against its trust root and queues it; its reply shows on the page."""
    import shutil

    import yaml

    from bundles import build, keys
    from hub import demo

    k = demo.make_keys(tmp_path / "keys")
    profile = tmp_path / "mini.yaml"
    profile.write_text(yaml.safe_dump(MINI_PROFILE))
    bundle = build.build(profile=profile, platform=platform / "idp-blueprint", mirror=None,
                         out=tmp_path / "mini-1.0.0.bundle", version="1.0.0", release=1,
                         keys=[keys.load_private(k.release_key)],
                         created=datetime.now(UTC) - timedelta(minutes=1)).path
    with mosquitto(tmp_path / "broker") as broker:
        cfg = hub_config_for(tmp_path, broker.port, trust_root=str(k.root))
        async with hub_running(cfg) as hub:
            async with httpx.AsyncClient(base_url=hub.api_url, timeout=30) as http:
                r = await http.post("/api/v1/bundles", content=Path(bundle).read_bytes(),
                                    headers={"Authorization": f"Bearer {WRITE_TOKEN}",
                                             "Content-Type": "application/octet-stream"})
                assert r.status_code == 201, r.text
            ctx = agent_context(tmp_path, broker.port, "store-i", hub_pub=tmp_path / "hubkeys" / "hub-command.pub")
            shutil.copy2(k.root, ctx.config.trust_dir / "root.json")
            async with agent_link(ctx):
                await wait_until(lambda: hub.ctx.store.get_site("store-i") is not None, what="site reported")
                async with browser() as b:
                    page = await b.new_page(viewport={"width": 1400, "height": 900})
                    page.on("dialog", lambda d: d.accept())  # the confirmation before installing
                    await page.goto(f"{hub.api_url}/dashboard/sites/store-i")
                    await page.wait_for_selector("#live.on")
                    await page.fill("#token-input", WRITE_TOKEN)
                    await page.click("#sign-in button")
                    await page.wait_for_selector("#install-bundle:not([disabled])")
                    assert "mini-1.0.0" in (await page.text_content("#bundle-select") or "")
                    await page.click("#install-bundle")
                    row = "#commands tr[data-name='install-bundle'][data-state='done']"
                    await page.wait_for_selector(row, timeout=30000)
                    replies = await page.text_content(f"{row} td:last-child") or ""
                    assert "downloading bundle" in replies and "verified and queued for install" in replies
                    await page.close()
            # The agent really has it: the intake staged it and queued the install.
            events = hub.ctx.store.site_events("store-i", limit=100)
            assert any(e["type"] == "bundle.accepted" for e in events), [e["type"] for e in events]
