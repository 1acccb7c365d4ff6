"""Helpers shared by the agent-daemon tests (imported by name: pytest puts this directory on sys.path)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from agent import intake
from agent.state import StateStore
from bundles import pack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent_install"))
from install_kit import Comp, Keys, build_bundle, context, events, make_trust, site_v1  # noqa: E402

__all__ = ["Comp", "Keys", "context", "events", "make_trust"]  # re-exported for the tests

ROOT = Path(__file__).resolve().parents[2]
AGENT = [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())"]


def write_config(tmp_path: Path, **overrides: Any) -> Path:
    doc: dict[str, Any] = {
        "site_id": "site-test",
        "state_dir": str(tmp_path / "state"),
        "kubeconfig": str(tmp_path / "missing-kubeconfig.yaml"),
        "log_format": "json",
        "http": {"port": 0},
        "daemon": {"kube_probe_interval_seconds": 0.5, "status_interval_seconds": 0.5, "drain_seconds": 2},
        "link": {"enabled": False},
        "snapshots": {"enabled": False},
        "degradation": {"enabled": False},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEFLEET_AGENT_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


class NotifySocket:
    """A real AF_UNIX datagram socket playing systemd's side of sd_notify (read continuously, like PID 1)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append(message)

    def close(self) -> None:
        self._closed.set()
        self._reader.join(5)
        self.sock.close()

    def wait_for(self, key: str, value: str | None = None, *, timeout: float = 30.0) -> dict[str, str]:
        """Wait until a message has ``key`` (with ``value``, if given); return the first such message."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for message in self.messages:
                    if key in message and (value is None or message[key] == value):
                        return message
            if time.monotonic() > deadline:
                raise AssertionError(f"no sd_notify message with {key}={value} within {timeout}s; got {self.messages}")
            time.sleep(0.02)


# --- a running daemon fed through its inbox (real signed bundles from tests/agent_install) -----------


def bundle(tmp: Path, *, signer: Any, release: int, chain: list[bytes] | None = None,
           comps: list[Comp] | None = None) -> Path:
    """A signed ``site`` bundle (``site_v1`` unless ``comps``), version ``1.0.<release>``, with ``chain`` if given."""
    out = build_bundle(tmp / f"r{release}.bundle", k=Keys(private=signer, root_path=Path()),
                       comps=site_v1() if comps is None else comps, version=f"1.0.{release}", release=release)
    if chain:
        pack.attach_chain(out, chain)
    return out


@contextmanager
def daemon(config: Path, prefix: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([*prefix, *AGENT, "--config", str(config), "run"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=agent_env())
    try:
        yield proc
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def drop(inbox: Path, path: Path) -> Path:
    """Copy a bundle into the inbox as a USB copy would end: complete, then visible, already settled."""
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{path.name}"
    tmp.write_bytes(path.read_bytes())
    past = time.time() - 2 * intake.SETTLE_SECONDS
    os.utime(tmp, (past, past))
    os.replace(tmp, inbox / path.name)
    return inbox / path.name


def outcome(inbox: Path, name: str, proc: subprocess.Popen[str], *, timeout: float = 60) -> str:
    """``done`` or ``rejected`` once the daemon moved ``name`` out of the inbox (a split bundle
    moves into a ``<name>.d`` directory with its parts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for folder in ("done", "rejected"):
            moved = (inbox / folder).iterdir() if (inbox / folder).is_dir() else iter(())
            if any(p.name.endswith((name, name + ".d")) for p in moved):
                return folder
        assert proc.poll() is None, f"daemon exited: {proc.communicate()[1][-2000:]}"
        time.sleep(0.1)
    raise AssertionError(f"{name} still in the inbox after {timeout}s")


def status(config: Path) -> dict[str, Any]:
    done = subprocess.run([*AGENT, "--config", str(config), "status", "--json"], capture_output=True, text=True,
                          timeout=60, env=agent_env(), check=True)
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def stored_events(state: Path, type_: str) -> list[dict[str, Any]]:
    store = StateStore.open(state)
    try:
        return events(store, type_)
    finally:
        store.close()
