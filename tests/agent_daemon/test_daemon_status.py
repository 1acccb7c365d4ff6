"""`edgefleet-agent status`: a separate, read-only process that explains the site at the node."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from daemon_helpers import AGENT, agent_env, write_config

from agent import events, exitcodes, outbox, protocol, sitestatus
from agent.install import journal
from agent.state import DB_NAME, StateStore


def _status(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGENT, "--config", str(config), "status", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=agent_env(),
    )


def test_fresh_node_without_state(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = _status(config)
    assert result.returncode == exitcodes.OK, result.stderr
    assert "site site-test" in result.stdout
    assert "no agent state yet" in result.stdout
    assert not (tmp_path / "state").exists(), "status must not create anything"

    result = _status(config, "--json")
    doc = json.loads(result.stdout)
    assert doc["initialized"] is False and doc["site"] == "site-test"


def test_empty_database_prints_every_section(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    StateStore.open(tmp_path / "state").close()  # a DB with only the store's own tables
    result = _status(config)
    assert result.returncode == exitcodes.OK, result.stderr
    out = result.stdout
    assert "never started" in out
    assert "bundle:    none installed, install idle" in out
    assert "components: none reported yet" in out
    assert "snapshot:  none yet" in out
    assert "outbox:    0 message(s) waiting; last publish never" in out


def _populate(state_dir: Path) -> None:
    store = StateStore.open(state_dir)
    try:
        outbox.setup(store)
        journal.setup(store)
        store.put(
            sitestatus.INSTALL_KEY,
            {
                "bundle": {"name": "idp", "version": "1.2.0", "release": 7},
                "install_state": "committed",
                "components": [
                    {"name": "cilium", "layer": 0, "tier": 1, "healthy": True},
                    {"name": "cert-manager", "layer": 0, "tier": 1, "healthy": True},
                    {"name": "loki", "layer": 2, "tier": 3, "healthy": False, "reason": "0/1 ready", "degraded": True},
                    {"name": "argocd", "layer": 1, "tier": 2, "healthy": True},
                ],
            },
        )
        store.put(
            sitestatus.DEGRADATION_KEY,
            {
                "state": "yellow",
                "reason": "node agent-1 not ready",
                "nodes": [
                    {"name": "server-0", "ready": True, "control_plane": True},
                    {"name": "agent-0", "ready": True},
                    {"name": "agent-1", "ready": False},
                ],
                "scaled_down": [
                    {"kind": "StatefulSet", "namespace": "observability", "name": "loki", "tier": 3,
                     "original_replicas": 2, "replicas": 0, "reason": "tier 3 shed"},
                ],
            },
        )
        taken = datetime.now(UTC) - timedelta(hours=2, minutes=5)
        store.put(sitestatus.SNAPSHOT_KEY, {"last_success": taken.isoformat(), "failures": 1, "size_bytes": 1234})
        manifest = json.dumps({"name": "idp", "version": "1.2.0"})
        good = journal.BundleRecord(
            bundle_id=hashlib.sha256(b"good").hexdigest(), bundle="idp-1.2.0", name="idp", version="1.2.0",
            release=7, created="2026-01-01T00:00:00Z", path="/x", manifest=manifest,
        )
        bad = journal.BundleRecord(
            bundle_id=hashlib.sha256(b"bad").hexdigest(), bundle="idp-1.3.0", name="idp", version="1.3.0",
            release=8, created="2026-02-01T00:00:00Z", path="/y", manifest=manifest,
        )
        journal.record_bundle(store, good)
        journal.record_bundle(store, bad)
        store.put(journal.CURRENT_KEY, good.bundle_id)
        journal.mark_bad(store, bad, "gate loki timed out after 300s")
        store.put("daemon.state", {"pid": 2**22 + 12345, "started": time.time(), "tasks": {}, "http": None})
        events.emit(store, site="site-test", type="install.rolled-back", summary="rolled back to idp 1.2.0",
                    severity=protocol.Severity.ERROR)
    finally:
        store.close()


def test_populated_database(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    _populate(tmp_path / "state")
    before = (tmp_path / "state" / DB_NAME).read_bytes()

    result = _status(config)
    assert result.returncode == exitcodes.OK, result.stderr
    out = result.stdout
    assert "agent:     not running" in out
    assert "state:     YELLOW (node agent-1 not ready)" in out
    assert "server-0* ready" in out and "agent-1 NOT READY" in out
    assert "bundle:    idp 1.2.0 (release 7), install committed" in out
    assert "last good: idp 1.2.0 (release 7)" in out
    assert "BAD:       idp-1.3.0: gate loki timed out after 300s" in out
    # grouped by layer, unhealthy ones flagged with the reason
    assert out.index("layer 0: healthy") < out.index("layer 1: healthy") < out.index("layer 2: UNHEALTHY")
    assert "BAD loki (tier 3) [scaled down] - 0/1 ready" in out
    assert "StatefulSet observability/loki tier 3: 0/2 replicas - tier 3 shed" in out
    assert "(2h5m ago), 1 failure(s) since" in out
    assert "outbox:    1 message(s) waiting" in out
    assert "install.rolled-back: rolled back to idp 1.2.0" in out

    doc = json.loads(_status(config, "--json").stdout)
    assert doc["site_state"]["state"] == "yellow"
    assert doc["install"]["bad_versions"][0]["bundle"] == "idp-1.3.0"
    assert doc["layers"]["2"]["healthy"] is False
    assert 2 * 3600 <= doc["snapshot"]["age_seconds"] < 3 * 3600
    assert (tmp_path / "state" / DB_NAME).read_bytes() == before, "status is read-only"
