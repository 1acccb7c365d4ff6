"""The real `edgefleet-agent run` process: sd_notify on a real socket, HTTP, SIGTERM drain, exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from daemon_helpers import AGENT, NotifySocket, agent_env, write_config

from agent import daemon, exitcodes, sdnotify
from agent.state import StateStore


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def notify(tmp_path: Path) -> NotifySocket:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_sdnotify_sends_datagrams(notify: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    assert sdnotify.ready("all\ngood")
    msg = notify.wait_for("READY", "1", timeout=5)
    assert msg["STATUS"] == "all good" and msg["MAINPID"] == str(os.getpid())
    assert sdnotify.watchdog()
    notify.wait_for("WATCHDOG", "1", timeout=5)

    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    assert sdnotify.watchdog_interval() == 3.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None, "another process's watchdog is not ours to ping"

    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.notify("READY=1") is False  # not under systemd: a no-op


def test_sdnotify_never_blocks_on_a_full_receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd not reading (queue full, net.unix.max_dgram_qlen) must drop pings, not block the loop."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as deaf:  # bound, never read
        deaf.bind(str(tmp_path / "deaf.sock"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "deaf.sock"))
        results: list[bool] = []
        sender = threading.Thread(target=lambda: results.extend(sdnotify.watchdog() for _ in range(2000)), daemon=True)
        sender.start()
        sender.join(20)
        assert not sender.is_alive(), "sd_notify blocked on a full datagram queue"
        assert results[0] is True and results.count(False) > 0


def test_sdnotify_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edgefleet-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.status("hello")
        assert server.recv(1024) == b"STATUS=hello"


def test_run_notifies_serves_and_drains_on_sigterm(tmp_path: Path, notify: NotifySocket) -> None:
    config = write_config(tmp_path)
    proc = subprocess.Popen(
        [*AGENT, "--config", str(config), "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=agent_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000"),
    )
    try:
        ready = notify.wait_for("READY", "1")
        assert ready["MAINPID"] == str(proc.pid)
        assert "site site-test" in ready["STATUS"]
        notify.wait_for("WATCHDOG", "1")  # pinged at half of WATCHDOG_USEC by the heartbeat
        status = notify.wait_for("STATUS", timeout=10)
        assert "tasks" in status["STATUS"]

        store = StateStore.open(tmp_path / "state")
        try:
            host, port = store.get(daemon.STATE_KEY)["http"]
        finally:
            store.close()
        base = f"http://{host}:{port}"
        code, body = _get(base + "/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        code, body = _get(base + "/readyz")
        doc = json.loads(body)
        assert code == 503, "no API server answered: not ready"
        assert doc["checks"]["kube"]["ok"] is False and doc["checks"]["store"]["ok"] is True
        code, body = _get(base + "/metrics")
        assert code == 200
        assert 'edgefleet_agent_task_up{task="kube-probe"} 1.0' in body
        assert "edgefleet_agent_kube_up 0.0" in body
        assert "process_resident_memory_bytes" in body

        status = subprocess.run(
            [*AGENT, "--config", str(config), "status", "--json"], capture_output=True, text=True, timeout=60,
            env=agent_env(),
        )
        doc = json.loads(status.stdout)
        assert doc["daemon"]["running"] is True and doc["daemon"]["pid"] == proc.pid
        assert doc["daemon"]["tasks"]["kube-probe"]["up"] is True

        second = subprocess.run(
            [*AGENT, "--config", str(config), "run"], capture_output=True, text=True, timeout=60, env=agent_env()
        )
        assert second.returncode == exitcodes.UNAVAILABLE
        expected = f"edgefleet-agent: another agent (pid {proc.pid}) is running on {tmp_path / 'state'}"
        assert second.stderr.strip() == expected

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    notify.wait_for("STOPPING", "1", timeout=5)
    logged = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(e["event"] == "agent stopped" for e in logged)
    assert all("level" in e and "timestamp" in e for e in logged), "JSON lines for journald"
    store = StateStore.open(tmp_path / "state")
    try:
        types = [json.loads(bytes(r["payload"]))["type"] for r in store.db.execute("SELECT payload FROM outbox")]
    finally:
        store.close()
    assert types[0] == "agent.started" and types[-1] == "agent.stopped"
    assert "kube.unreachable" in types
