"""``edgefleet-sim``: run a simulated site, or inject node faults into a running one.

Exit codes: 0 ok, 2 bad arguments, 3 the sim is unreachable or refused the request, 4 the port is taken.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from sim import admin, images, quantity
from sim.cluster import NodeSize, Timing

EXIT_OK, EXIT_USAGE, EXIT_ADMIN, EXIT_PORT = 0, 2, 3, 4


def _nodes(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--nodes needs at least one node name")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"duplicate node names in {value!r}")
    return names


def _positive(value: str) -> float:
    try:
        f = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from exc
    if f <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {value!r}")
    return f


def _quantity(value: str) -> str:
    try:
        quantity.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return value


def _pullable(value: str) -> list[str]:
    entries = [e.strip() for e in value.split(",") if e.strip()]
    try:
        images.Pullable.of(entries)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return entries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet-sim", description="A simulated edge site speaking the Kubernetes API.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve a simulated site until interrupted")
    run.add_argument("--nodes", type=_nodes, default=_nodes("server-0,agent-0,agent-1"),
                     help="comma-separated node names; names containing 'server' are control-plane nodes")
    run.add_argument("--port", type=int, default=0, help="listen port (0: pick a free one)")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--kubeconfig-out", type=Path, required=True, help="where to write the kubeconfig")
    run.add_argument("--speed", type=_positive, default=1.0, help="sim seconds per real second")
    run.add_argument("--tls", action="store_true", help="serve HTTPS with a generated CA")
    run.add_argument("--token", help="require this bearer token (also for the admin endpoint)")
    run.add_argument("--startup-delay", type=float, default=2.0, help="pod startup delay, sim seconds")
    run.add_argument("--node-cpu", type=_quantity, default="4")
    run.add_argument("--node-memory", type=_quantity, default="4Gi")
    run.add_argument("--node-pods", type=int, default=110)
    run.add_argument("--pullable", type=_pullable, metavar="LIST",
                     help="comma-separated registries (docker.io, registry.local:5000), repositories (nginx) or "
                          "references (nginx:1.27) the kubelets can pull; others fail with ErrImagePull/"
                          "ImagePullBackOff. Default: every image. An empty LIST: none (air-gapped, no registry)")
    run.add_argument("--workdir", type=Path, help="directory for generated certificates")
    run.add_argument("--verbose", action="store_true", help="log model events to stderr")
    node = sub.add_parser("node", help="inject a node fault into a running sim")
    node.add_argument("action", choices=["fail", "restore", "partition"])
    node.add_argument("name")
    node.add_argument("--kubeconfig", type=Path, required=True)
    return p


async def _run(args: argparse.Namespace) -> int:
    from sim.server import serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    timing = Timing(pod_startup=args.startup_delay)
    size = NodeSize(cpu=args.node_cpu, memory=args.node_memory, pods=args.node_pods)
    try:
        async with serve(nodes=args.nodes, speed=args.speed, tls=args.tls, token=args.token, port=args.port,
                         host=args.host, kubeconfig_out=args.kubeconfig_out, workdir=args.workdir, timing=timing,
                         size=size, pullable=args.pullable, quiet=not args.verbose) as site:
            print(f"edgefleet-sim ready url={site.url} kubeconfig={site.kubeconfig} nodes={','.join(args.nodes)} "
                  f"speed={args.speed:g}", flush=True)
            await stop.wait()
    except OSError as exc:
        print(f"edgefleet-sim: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return EXIT_PORT
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return asyncio.run(_run(args))
    if not args.kubeconfig.is_file():
        print(f"edgefleet-sim: kubeconfig not found: {args.kubeconfig}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = admin.node(args.kubeconfig, args.action, args.name)
    except admin.AdminError as exc:
        print(f"edgefleet-sim: {exc}", file=sys.stderr)
        return EXIT_ADMIN
    print(f"node {result['node']}: {result['state']}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
