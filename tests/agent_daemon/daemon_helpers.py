"""Helpers shared by the agent-daemon tests (imported by name: pytest puts this directory on sys.path)."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

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
