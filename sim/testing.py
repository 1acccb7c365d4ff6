"""Test helpers: run a simulated site in-process (async), in a thread, or in a subprocess.

``running`` is the async context manager most tests want::

    async with sim.testing.running(nodes=["server-0", "agent-0", "agent-1"], speed=60) as site:
        ...  # site.url, site.kubeconfig, site.cluster, await site.fail_node("agent-0"), site.clock

``start_thread`` / ``start_process`` serve sync callers (tests that drive kubectl through subprocess); both
return a handle with ``url``, ``kubeconfig``, ``fail_node``/``restore_node``/``partition_node`` and ``stop``
(also usable as a context manager). The subprocess variant isolates memory and CPU, which the benchmark needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from sim import admin
from sim.cluster import NodeSize, Timing
from sim.server import Site, serve

DEFAULT_NODES = ("server-0", "agent-0", "agent-1")

__all__ = ["DEFAULT_NODES", "NodeSize", "ProcessSite", "Site", "ThreadSite", "Timing", "running", "start_process",
           "start_thread"]


@contextlib.asynccontextmanager
async def running(
    nodes: list[str] | tuple[str, ...] = DEFAULT_NODES,
    speed: float = 1.0,
    tls: bool = False,
    token: str | None = None,
    workdir: Path | None = None,
    *,
    timing: Timing | None = None,
    size: NodeSize | None = None,
    sizes: dict[str, NodeSize] | None = None,
    pullable: Iterable[str] | None = None,
) -> AsyncIterator[Site]:
    """``pullable``: registries, repositories or references the kubelets can get (None: every image; see
    sim.images); any other image fails to pull (ErrImagePull, then ImagePullBackOff)."""
    async with serve(nodes=list(nodes), speed=speed, tls=tls, token=token, workdir=workdir, timing=timing,
                     size=size, sizes=sizes, pullable=pullable) as site:
        yield site


class _Handle:
    url: str
    kubeconfig: Path

    def fail_node(self, name: str) -> None:
        admin.node(self.kubeconfig, "fail", name)

    def restore_node(self, name: str) -> None:
        admin.node(self.kubeconfig, "restore", name)

    def partition_node(self, name: str) -> None:
        admin.node(self.kubeconfig, "partition", name)

    def compact(self) -> None:
        admin.request(self.kubeconfig, "POST", "/sim/compact")

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> _Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ThreadSite(_Handle):
    """A site served by its own event loop in a daemon thread. ``site`` is the live model (thread-unsafe:
    read it only through the API, or via ``call`` which runs a function on the site's loop)."""

    def __init__(self, **kwargs: Any) -> None:
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self.site: Site | None = None
        self._thread = threading.Thread(target=self._run, kwargs=kwargs, name="edgefleet-sim", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("sim thread did not start within 30 s")
        if self._error is not None:
            raise RuntimeError(f"sim thread failed to start: {self._error}") from self._error
        assert self.site is not None
        self.url = self.site.url
        self.kubeconfig = self.site.kubeconfig

    def _run(self, **kwargs: Any) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                async with serve(**kwargs) as site:
                    self.site = site
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                raise

        with contextlib.suppress(BaseException):
            asyncio.run(main())

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` (sync or async) on the sim's loop and return its result."""
        assert self._loop is not None

        async def wrapper() -> Any:
            out = fn(*args)
            if asyncio.iscoroutine(out):
                out = await out
            return out

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(30)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(15)


def start_thread(
    nodes: list[str] | tuple[str, ...] = DEFAULT_NODES,
    speed: float = 1.0,
    tls: bool = False,
    token: str | None = None,
    workdir: Path | None = None,
    **kwargs: Any,
) -> ThreadSite:
    return ThreadSite(nodes=list(nodes), speed=speed, tls=tls, token=token, workdir=workdir, **kwargs)


class ProcessSite(_Handle):
    def __init__(self, proc: subprocess.Popen[str], url: str, kubeconfig: Path, tmp: Any) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.url = url
        self.kubeconfig = kubeconfig
        self._tmp = tmp

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def start_process(
    nodes: list[str] | tuple[str, ...] = DEFAULT_NODES,
    speed: float = 1.0,
    tls: bool = False,
    token: str | None = None,
    workdir: Path | None = None,
    *,
    extra_args: list[str] | None = None,
    pullable: Iterable[str] | None = None,
    timeout: float = 30.0,
) -> ProcessSite:
    """Start ``edgefleet-sim run`` in a subprocess on a free port; returns once it printed its ready line."""
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="edgefleet-sim-")
        workdir = Path(tmp.name)
    kc = workdir / "kubeconfig"
    cmd = [sys.executable, "-m", "sim.cli", "run", "--nodes", ",".join(nodes), "--port", "0",
           "--kubeconfig-out", str(kc), "--speed", str(speed), "--workdir", str(workdir)]
    if tls:
        cmd.append("--tls")
    if token:
        cmd += ["--token", token]
    if pullable is not None:
        cmd += ["--pullable", ",".join(pullable)]
    cmd += extra_args or []
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = (workdir / "sim.log").open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    log.close()
    assert proc.stdout is not None
    line = ""
    done = threading.Event()

    def read() -> None:
        nonlocal line
        assert proc.stdout is not None
        line = proc.stdout.readline()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout) or not line.startswith("edgefleet-sim ready"):
        proc.kill()
        proc.wait(5)
        err = (workdir / "sim.log").read_text()[-2000:]
        if tmp is not None:
            tmp.cleanup()
        raise RuntimeError(f"edgefleet-sim did not become ready: {line!r} {err}")
    fields = dict(part.split("=", 1) for part in line.split()[2:] if "=" in part)
    return ProcessSite(proc, fields["url"], Path(fields["kubeconfig"]), tmp)
