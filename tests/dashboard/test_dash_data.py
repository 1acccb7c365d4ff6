"""Dashboard data rules (no browser): snapshot overdue, timeline runs and gaps, layer grouping,
and the optional snapshot-upload router mounted by config."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from hub import api
from hub import config as hub_config
from hub.context import HubContext
from hub.dashboard import data
from hub.store import open_store

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def test_snapshot_overdue_uses_hub_clock_and_schedule_limit() -> None:
    fresh = {"snapshot": {"last_success": (NOW - timedelta(minutes=30)).isoformat(), "age_seconds": 5,
                          "max_age_seconds": 7200, "schedule": "0 * * * *"}}
    view = data.snapshot_view(fresh, now=NOW)
    assert view is not None and not view["overdue"] and view["age_seconds"] == 1800
    # The age the agent reported (5 s) is stale information: the hub recomputes it.
    old = {"snapshot": {**fresh["snapshot"], "last_success": (NOW - timedelta(hours=3)).isoformat()}}
    assert data.snapshot_view(old, now=NOW)["overdue"] is True  # type: ignore[index]
    never = {"snapshot": {"last_success": None, "max_age_seconds": 7200, "failures": 3}}
    assert data.snapshot_view(never, now=NOW) == {
        "last_success": None, "age_seconds": None, "max_age_seconds": 7200, "schedule": None, "failures": 3,
        "overdue": True,
    }
    assert data.snapshot_view({}, now=NOW) is None
    assert data.snapshot_view(None, now=NOW) is None


def test_state_runs_merge_and_mark_gaps_stale() -> None:
    t = [NOW - timedelta(seconds=s) for s in (600, 570, 540, 510, 480, 200, 170, 20)]
    samples = [(t[0], "green"), (t[1], "green"), (t[2], "yellow"), (t[3], "yellow"), (t[4], "yellow"),
               # 280 s without a report (limit 3 x 30 s = 90 s): stale from t[4] + 90 s
               (t[5], "yellow"), (t[6], "red"), (t[7], "red")]
    runs = data.state_runs(samples, now=NOW, interval=30, factor=3)
    assert [r["state"] for r in runs] == ["green", "yellow", "stale", "yellow", "red"]
    assert runs[2]["at"] == (t[4] + timedelta(seconds=90)).isoformat()
    # A Red site reports less often: 150 s between Red samples is not a gap.
    red = [(NOW - timedelta(seconds=300), "red"), (NOW - timedelta(seconds=150), "red")]
    assert [r["state"] for r in data.state_runs(red, now=NOW, interval=30, factor=3)] == ["red"]
    # Silence since the last sample counts too.
    silent = data.state_runs([(NOW - timedelta(seconds=200), "green")], now=NOW, interval=30, factor=3)
    assert [r["state"] for r in silent] == ["green", "stale"]
    assert data.state_runs([], now=NOW, interval=30, factor=3) == []


def test_components_grouped_by_layer_sorted_by_tier() -> None:
    status = {"components": [
        {"name": "grafana", "layer": 3, "tier": 4, "healthy": True},
        {"name": "prometheus", "layer": 1, "tier": 2, "healthy": False},
        {"name": "cert-manager", "layer": 1, "tier": 1, "healthy": True},
        {"name": "bogus", "layer": 9, "tier": 1, "healthy": True},
    ]}
    layers = data.components_by_layer(status)
    assert [layer["layer"] for layer in layers] == [0, 1, 2, 3, 4]
    assert [c["name"] for c in layers[1]["components"]] == ["cert-manager", "prometheus"]
    assert layers[1]["healthy"] == 1 and layers[0]["components"] == []
    assert data.status_doc('{"state": "green"}') == {"state": "green"} and data.status_doc("{bad") == {}


async def test_snapshot_upload_mounted_only_when_enabled(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        off = HubContext(config=hub_config.HubConfig(data_dir=tmp_path / "off"), store=store)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api.create_app(off)), base_url="http://t") as c:
            r = await c.put("/api/v1/sites/site-1/snapshots/etcd-20261128T120000.000Z.db",
                            json={"size": 3, "sha256": "0" * 64})
            assert r.status_code in (404, 405)

        cfg = hub_config.HubConfig(data_dir=tmp_path / "on", snapshot_upload={"enabled": True})
        tokens = tmp_path / "on" / "snapshot-tokens"
        tokens.mkdir(parents=True)
        (tokens / "site-1").write_text("site-1-secret\n")
        on = HubContext(config=cfg, store=store)
        name = "etcd-20261128T120000.000Z.db"
        body = b"etcd snapshot bytes"
        sha = hashlib.sha256(body).hexdigest()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api.create_app(on)), base_url="http://t") as c:
            url = f"/api/v1/sites/site-1/snapshots/{name}"
            assert (await c.put(url, json={"size": len(body), "sha256": sha})).status_code == 401
            wrong = {"Authorization": "Bearer site-2-secret"}
            assert (await c.put(url, json={"size": len(body), "sha256": sha}, headers=wrong)).status_code == 403
            # Site 2 has no token file: it cannot upload at all.
            other = f"/api/v1/sites/site-2/snapshots/{name}"
            assert (await c.put(other, json={"size": 1, "sha256": sha}, headers=wrong)).status_code == 403
            auth = {"Authorization": "Bearer site-1-secret"}
            r = await c.put(url, json={"size": len(body), "sha256": sha}, headers=auth)
            assert r.status_code == 200 and r.json()["received"] == 0
            r = await c.patch(f"{url}?offset=0", content=body,
                              headers={**auth, "X-Chunk-Sha256": hashlib.sha256(body).hexdigest()})
            assert r.status_code == 200, r.text
            r = await c.post(f"{url}/complete", headers=auth)
            assert r.status_code == 200 and r.json()["complete"] is True
        assert (tmp_path / "on" / "snapshots" / "site-1" / name).read_bytes() == body
    finally:
        store.close()


def test_snapshot_reported_by_event_and_status_is_listed_once() -> None:
    t = NOW - timedelta(minutes=5)
    rows = [
        {"taken_at": t.replace(microsecond=123456), "ok": True, "size_bytes": 10, "revision": 6, "detail": "",
         "source": "status"},
        {"taken_at": t.replace(microsecond=120000), "ok": True, "size_bytes": 10, "revision": 6,
         "detail": "etcd snapshot taken", "source": "event"},
        {"taken_at": t - timedelta(minutes=10), "ok": False, "size_bytes": None, "revision": None,
         "detail": "etcdctl timed out", "source": "event"},
    ]
    out = data.dedupe_snapshots(rows)
    assert [(r["source"], r["ok"]) for r in out] == [("event", True), ("event", False)]


def test_overview_counts_stale_sites_as_stale_and_keeps_their_last_state(tmp_path: Path) -> None:
    from agent import protocol
    from hub.store import Received

    store = open_store(f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        ctx = HubContext(config=hub_config.HubConfig(data_dir=tmp_path), store=store)
        now = datetime.now(UTC)
        snap = protocol.SnapshotInfo(last_success=now - timedelta(hours=1), max_age_seconds=600, schedule="*/5 * * * *")
        msgs = [
            Received(protocol.Status(site="fresh", seq=1, state=protocol.SiteState.RED, interval_seconds=30), now),
            # Last status 10 minutes ago with a 30 s interval: stale (3 x 30 s).
            Received(protocol.Status(site="quiet", seq=1, state=protocol.SiteState.GREEN, interval_seconds=30,
                                     snapshot=snap), now - timedelta(minutes=10)),
        ]
        store.write_batch(msgs)
        doc = data.overview(ctx)
        assert doc["counts"] == {"green": 0, "yellow": 0, "red": 1, "black": 0, "stale": 1, "unknown": 0}
        quiet = next(s for s in doc["sites"] if s["site"] == "quiet")
        assert quiet["display"] == "stale" and quiet["state"] == "green"
        assert quiet["snapshot"]["overdue"] is True and quiet["snapshot"]["age_seconds"] >= 3600
        page = data.site_page(ctx, "quiet")
        assert page is not None and [r["state"] for r in page["timeline"]["runs"]] == ["green", "stale"]
        assert data.site_page(ctx, "nobody") is None
    finally:
        store.close()


async def test_pages_and_assets_are_all_served_by_the_hub(tmp_path: Path) -> None:
    """Offline: the pages reference only the hub's own paths, every referenced asset is served, and no
    asset names an outside URL (the SVG namespace is an identifier, never fetched)."""
    import re

    from hub.dashboard import router

    store = open_store(f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        ctx = HubContext(config=hub_config.HubConfig(data_dir=tmp_path), store=store)
        transport = httpx.ASGITransport(app=api.create_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as c:
            referenced: set[str] = set()
            for page in ("/dashboard/", "/dashboard/sites/site-1"):
                r = await c.get(page)
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
                assert "default-src 'self'" in r.headers["content-security-policy"]
                refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
                assert refs and all(ref.startswith("/") and not ref.startswith("//") for ref in refs), refs
                referenced.update(refs)
            for ref in sorted(referenced):
                assert (await c.get(ref)).status_code == 200, ref
        assert {"/dashboard/static/app.js", "/dashboard/static/style.css"} <= referenced
        for asset in sorted(router.STATIC_DIR.iterdir()):
            text = asset.read_text(encoding="utf-8").replace("http://www.w3.org/2000/svg", "")
            assert not re.search(r"(?:https?:)?//[\w-]+\.[\w.-]+", text), f"{asset.name} names an outside URL"
    finally:
        store.close()
