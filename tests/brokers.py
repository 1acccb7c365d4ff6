"""Shared by the test harnesses: a free loopback port, and private mosquitto processes.

Imported by name (``import brokers``): pytest puts ``tests/`` on ``sys.path`` for its conftest.

Every test that needs a broker starts its own mosquitto on a free port, so tests can stop, kill
and restart it (an outage) without touching the shared one on 1883 or each other. The harnesses
differ in the config (plain anonymous, or the shipped TLS config with two listeners) and in
whether they restart on the same port; starting, waiting until it listens, and stopping are here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
#: The config of a plain test broker: anyone may connect, nothing survives a restart.
ANONYMOUS = "allow_anonymous true\npersistence false\n"


def free_port() -> int:
    """A TCP port free on the loopback right now (the kernel's pick; a race with other processes
    is possible but rare, and shows as a clear "did not start listening")."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_mosquitto(workdir: Path, config: str, *, port: int, timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """Run mosquitto with ``config`` (written to ``workdir/mosquitto.conf``) until ``port`` accepts.

    Appended to ``config``: the log to ``workdir/mosquitto.log``, and ``user root`` when run as
    root (mosquitto otherwise drops to its own user, which cannot enter pytest's 0700 temp dirs:
    persistence, the log and 0600 test keys would silently be out of reach). stderr (config errors
    come before the log is open) goes to ``workdir/mosquitto.stderr``, never to an unread pipe.
    Raises ``RuntimeError`` with both if it exits or does not listen within ``timeout``.
    """
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed (make sysdeps)")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    extra = ["user root"] if os.geteuid() == 0 else []
    conf.write_text("\n".join([config.rstrip("\n"), *extra, f"log_dest file {workdir}/mosquitto.log"]) + "\n")
    with open(workdir / "mosquitto.stderr", "ab") as err:
        proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"mosquitto on port {port} did not start listening: {_tail(workdir)}")
        time.sleep(0.05)


def _tail(workdir: Path) -> str:
    parts = []
    for name in ("mosquitto.stderr", "mosquitto.log"):
        path = workdir / name
        if path.is_file():
            parts.append(path.read_text(errors="replace")[-1000:].strip())
    return " | ".join(p for p in parts if p) or "no output"


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, *, timeout: float = 10.0) -> None:
    """Send ``sig`` (SIGKILL: a crash) and reap it; a process that ignores SIGTERM is killed."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class Mosquitto:
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path


@contextlib.contextmanager
def mosquitto(workdir: Path, config: str = ANONYMOUS) -> Iterator[Mosquitto]:
    """A private mosquitto listening on a free loopback port with ``config`` (without a listener line)."""
    port = free_port()
    proc = start_mosquitto(workdir, f"listener {port} {HOST}\n{config}", port=port)
    try:
        yield Mosquitto(host=HOST, port=port, proc=proc, workdir=workdir)
    finally:
        stop(proc)
