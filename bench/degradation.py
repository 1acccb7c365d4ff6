"""Benchmark: how fast tier 2 is back after a worker fails, with the agent vs Kubernetes alone.

Both runs use a 3-node sim site (``edgefleet-sim`` in a subprocess) with Kubernetes' default
timings (lease renewal 10 s, NotReady after 40 s, eviction after 300 s), the tiered IDP-like
platform of tests/degradation/degrade_helpers.py, and fail the worker hosting the most tier-2
pods. Measured from the moment the node fails:

(a) with the degradation controller (default agent config: 20 s lease timeout, 5 s dwell): until
    every tier-2 workload has all its replicas Running and Ready on the remaining nodes *and*
    the scale-down is done (the site reports Yellow and every scaled workload is at its target);
(b) Kubernetes alone (no agent): until every tier-2 workload is Running again. Kubernetes never
    scales anything down, so (b) has no scale-down to wait for.

(a) runs at sim speed 1 (real time). (b) takes over 5 minutes at speed 1, so by default it runs
at ``--speed-b 20`` and the measured time is multiplied back by 20 (sim time = real time x
speed); pass ``--speed-b 1`` to measure it in real time. Prints both, their ratio, and whether
(a) met the target of being done within 10 s of the node turning NotReady.

    .venv/bin/python bench/degradation.py [--speed-a 1] [--speed-b 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "degradation"))

import degrade_helpers as h  # noqa: E402

import sim.testing  # noqa: E402
from agent import degrade, kube, sitestatus  # noqa: E402
from agent.config import AgentConfig  # noqa: E402
from agent.degrade import records  # noqa: E402

TIER2 = {s.name: s.replicas for s in h.PLATFORM if s.tier == 2}
WORKERS = ("agent-0", "agent-1")


async def _victim(api: Any) -> tuple[str, int]:
    """The worker with the most tier-2 pods (what the failure should hurt)."""
    counts = {w: 0 for w in WORKERS}
    for pod in await h.pods(api):
        if h.pod_app(pod) in TIER2 and pod["spec"].get("nodeName") in counts:
            counts[pod["spec"]["nodeName"]] += 1
    name = max(WORKERS, key=lambda w: (counts[w], w))
    return name, counts[name]


async def _tier2_back(api: Any, live: set[str]) -> set[str]:
    """The tier-2 workloads with all their replicas Running and Ready on the remaining nodes."""
    running = await h.running_by_app(api, nodes=live)
    return {name for name, count in TIER2.items() if running.get(name, 0) >= count}


async def _node_not_ready(api: Any, name: str) -> bool:
    node = await kube.get(api, "v1", "Node", name)
    conditions = (node or {}).get("status", {}).get("conditions") or []
    return node is not None and not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


async def run_once(*, speed: float, agent: bool, workdir: Path, timeout: float) -> dict[str, Any]:
    site = sim.testing.start_process(speed=speed, workdir=workdir)
    ctx = None
    task: asyncio.Task[None] | None = None
    try:
        async with kube.connect(site.kubeconfig) as api:
            await h.deploy_platform(api)
            await h.eventually(lambda: _all_running(api), timeout=60, interval=0.2, what="the platform Running")
            if agent:
                # The agent's default timings, divided by the sim speed (identical to the defaults at speed 1).
                config = h.scaled_config("bench", workdir / "state", site.kubeconfig, speed=speed)
                assert speed != 1 or config.degradation == AgentConfig(site_id="x").degradation
                ctx = h.context(config)
                task = asyncio.create_task(degrade.run(ctx))
                await h.eventually(
                    lambda: _async((ctx.store.get(sitestatus.DEGRADATION_KEY) or {}).get("state") == "green"),
                    timeout=30, what="agent green",
                )  # fmt: skip
                # A long-running agent, not one that just started: past its first lease window.
                await asyncio.sleep(config.degradation.lease_timeout_seconds + 1)
            victim, hurt = await _victim(api)
            live = {"server-0", *WORKERS} - {victim}
            await asyncio.to_thread(site.fail_node, victim)
            failed = time.monotonic()
            not_ready: float | None = None
            back: dict[str, float] = {}
            done: float | None = None
            while time.monotonic() - failed < timeout:
                now = time.monotonic() - failed
                if not_ready is None and await _node_not_ready(api, victim):
                    not_ready = now
                for name in await _tier2_back(api, live):
                    back.setdefault(name, now)
                if done is None and len(back) == len(TIER2) and (not agent or await _scaled(api, ctx)):
                    done = now
                if done is not None and not_ready is not None:
                    break
                await asyncio.sleep(0.1)
            kinds = {s.name: s.kind for s in h.PLATFORM}
            deployments = [back.get(n) for n in TIER2 if kinds[n] == "Deployment"]
            return {
                "speed": speed, "victim": victim, "tier2_pods_on_victim": hurt,
                "done_s": None if done is None else done * speed,
                "not_ready_s": None if not_ready is None else not_ready * speed,
                "measured_s": done,
                "deployments_s": None if None in deployments else max(d or 0.0 for d in deployments) * speed,
                "missing": sorted(set(TIER2) - set(back)),
                "timeout_s": timeout * speed,
            }  # fmt: skip
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if ctx is not None:
            ctx.store.close()
        site.stop()


async def _all_running(api: Any) -> bool:
    return await h.running_by_app(api) == {s.name: s.replicas for s in h.PLATFORM}


async def _async(value: bool) -> bool:
    return value


async def _scaled(api: Any, ctx: Any) -> bool:
    """The agent reports the loss and every workload it scaled is at its target."""
    st = ctx.store.get(sitestatus.DEGRADATION_KEY) or {}
    journal = records.load(ctx.store)
    if st.get("state") not in ("yellow", "red") or not journal:
        return False
    live = await h.workloads(api)
    return all(r.name in live and int(live[r.name]["spec"]["replicas"]) == r.target for r in journal.values())


def _fmt(value: float | None) -> str:
    return "n/a (timed out)" if value is None else f"{value:.1f} s"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-a", type=float, default=1.0, help="sim speed of run (a), with the agent")
    parser.add_argument("--speed-b", type=float, default=20.0, help="sim speed of run (b), Kubernetes alone")
    args = parser.parse_args()
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-degr-") as tmp:
        a_dir, b_dir = Path(tmp, "a"), Path(tmp, "b")
        a_dir.mkdir()
        b_dir.mkdir()
        a = await run_once(speed=args.speed_a, agent=True, workdir=a_dir, timeout=180 / args.speed_a)
        b = await run_once(speed=args.speed_b, agent=False, workdir=b_dir, timeout=420 / args.speed_b)
    print("degradation benchmark: 3-node sim, Kubernetes default timings, one worker fails")
    print(f"  failed node: {a['victim']} ({a['tier2_pods_on_victim']} tier-2 pods on it)")
    a_done, a_nr, b_done, b_nr = a["done_s"], a["not_ready_s"], b["done_s"], b["not_ready_s"]
    rel = None if a_done is None or a_nr is None else a_done - a_nr
    print(f"  (a) with the agent (speed {args.speed_a:g}): tier 2 Running + scale-down done {_fmt(a_done)} after "
          f"the failure; node NotReady at {_fmt(a_nr)}; done {_fmt(rel)} relative to NotReady")
    how = f"measured at speed {args.speed_b:g} and scaled x{args.speed_b:g}" if args.speed_b != 1 else "real time"
    print(f"  (b) Kubernetes alone ({how}): node NotReady at {_fmt(b_nr)}; tier-2 Deployments Running again "
          f"{_fmt(b['deployments_s'])} after the failure; all of tier 2: {_fmt(b_done)}"
          + (f" ({', '.join(b['missing'])} still not back after {b['timeout_s']:.0f} s: a StatefulSet pod on a "
             "dead node is never replaced until its kubelet returns)" if b["missing"] else "")
          + "; scale-down: never")  # fmt: skip
    baseline = b_done if b_done is not None else b["deployments_s"]
    if a_done and baseline:
        bound = "" if b_done is not None else " (at least: using the tier-2 Deployments only)"
        print(f"  ratio (b)/(a): {baseline / a_done:.1f}x{bound}")
    met = rel is not None and rel <= 10.0
    print(f"  target (a) within 10 s of NotReady: {'met' if met else 'NOT met'}")
    return 0 if a_done is not None and baseline is not None else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
