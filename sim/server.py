"""Run a simulated site: the cluster model plus its HTTP(S) server, as an async context manager."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from aiohttp import web

from sim import certs, http, images, kubeconfig
from sim.clock import Clock
from sim.cluster import Cluster, NodeSize, Timing


@dataclasses.dataclass
class Site:
    """A running simulated site. ``cluster`` is the live model; the fault methods act on it directly."""

    url: str
    kubeconfig: Path
    cluster: Cluster
    token: str | None
    ca_file: Path | None
    workdir: Path

    @property
    def clock(self) -> Clock:
        return self.cluster.clock

    async def fail_node(self, name: str) -> None:
        self._check(name)
        await self.cluster.fail_node(name)

    async def restore_node(self, name: str) -> None:
        self._check(name)
        await self.cluster.restore_node(name)

    async def partition_node(self, name: str) -> None:
        self._check(name)
        await self.cluster.partition_node(name)

    def set_pullable(self, pullable: Iterable[str] | None) -> None:
        """Change what the kubelets can pull (None: everything); pods backing off retry at their next pull."""
        self.cluster.pullable = images.Pullable.of(pullable)

    def _check(self, name: str) -> None:
        if name not in self.cluster.nodes:
            raise KeyError(f"no node {name!r} (nodes: {', '.join(self.cluster.nodes)})")


@contextlib.asynccontextmanager
async def serve(
    *,
    nodes: list[str],
    speed: float = 1.0,
    tls: bool = False,
    token: str | None = None,
    workdir: Path | None = None,
    port: int = 0,
    host: str = "127.0.0.1",
    kubeconfig_out: Path | None = None,
    timing: Timing | None = None,
    size: NodeSize | None = None,
    sizes: dict[str, NodeSize] | None = None,
    pullable: Iterable[str] | None = None,
    quiet: bool = True,
) -> AsyncIterator[Site]:
    """``pullable``: the images the kubelets can get (sim.images; None: every image)."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgefleet-sim-")))
        workdir.mkdir(parents=True, exist_ok=True)
        logs: list[str] = []
        cluster = Cluster(nodes=nodes, speed=speed, timing=timing, size=size, sizes=sizes,
                          pullable=images.Pullable.of(pullable), log=logs.append if quiet else None)
        ssl_ctx = None
        ca_file = None
        if tls:
            ca_file, crt, key = certs.generate(workdir / "pki")
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(crt, key)
        app = http.make_app(cluster, token=token)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        bound = sock.getsockname()[1]
        site = web.SockSite(runner, sock, ssl_context=ssl_ctx)
        await cluster.start()
        await site.start()
        scheme = "https" if tls else "http"
        url = f"{scheme}://{host}:{bound}"
        kc = kubeconfig.write(kubeconfig_out or workdir / "kubeconfig", url=url, token=token, ca_file=ca_file)
        result = Site(url=url, kubeconfig=kc, cluster=cluster, token=token, ca_file=ca_file, workdir=workdir)
        try:
            yield result
        finally:
            await cluster.stop()
            await runner.cleanup()
            sock.close()
