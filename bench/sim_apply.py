"""Benchmark: ``kubectl apply --server-side`` of the whole platform mirror into a fresh sim.

Prints objects/s, the sim's peak RSS (3 nodes holding the whole mirror), p50/p99 write->watch-event latency,
and where the time goes (kubectl client vs sim server). Baselines measured in the same run:
- kubectl alone: ``kubectl create --dry-run=client -o name`` of the same files (kubectl parses, discovers, maps
  and validates, sends nothing): the ratio apply/baseline says how much the sim adds to kubectl's own cost;
- the targets from the issue (RSS <= 200 MiB, watch p99 <= 50 ms) as ratios.

Usage: python bench/sim_apply.py [--platform DIR] [--quick]  (--quick: only the CRDs and two components)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sim.testing  # noqa: E402
from sim import admin  # noqa: E402

PRE_EXISTING = ("argocd", "argo", "argo-events", "policy-reporter", "vault", "logging", "monitoring")
NS_FLAG = {"argo-cd": "argocd", "argo-workflows": "argo", "vault-k8s": "vault"}
RSS_BUDGET_MIB = 200.0
WATCH_P99_BUDGET_MS = 50.0


def groups(mirror: Path, quick: bool) -> list[tuple[str, list[Path]]]:
    files = sorted(p for p in mirror.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    out: dict[tuple[int, str], list[Path]] = {}
    for f in files:
        component = f.relative_to(mirror).parts[0]
        text = f.read_text(errors="replace")
        first = 0 if re.search(r"^kind: (CustomResourceDefinition|Namespace)\s*$", text, re.M) else 1
        if quick and first and component not in ("kube-prometheus", "argo-cd"):
            continue
        out.setdefault((first, NS_FLAG.get(component, "")), []).append(f)
    return [(ns, fs) for (_, ns), fs in sorted(out.items())]


def kubectl(kubeconfig: Path, cache: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), KUBECACHEDIR=str(cache))
    t0 = time.perf_counter()
    proc = subprocess.run(["kubectl", *args], capture_output=True, text=True, env=env, timeout=1800)
    return time.perf_counter() - t0, proc


def apply_all(kubeconfig: Path, cache: Path, grouped: list[tuple[str, list[Path]]], *, dry: bool) -> tuple[float, int]:
    total, objects = 0.0, 0
    for ns, files in grouped:
        if dry:  # kubectl alone: parse, discover, map and validate, but send nothing
            args = ["create", "--dry-run=client", "-o", "name"] + (["-n", ns] if ns else [])
        else:
            args = ["apply", "--server-side"] + (["-n", ns] if ns else [])
        for f in files:
            args += ["-f", str(f)]
        secs, proc = kubectl(kubeconfig, cache, *args)
        total += secs
        objects += proc.stdout.count("serverside-applied") if not dry else len(proc.stdout.split())
    return total, objects


def peak_rss_mib(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return hwm / 1024, rss / 1024


async def watch_latency(url: str, n: int) -> list[float]:
    """Write ConfigMaps and patch them while watching: latency from sending the write to receiving its event."""
    sent: dict[str, float] = {}
    got: list[float] = []
    async with aiohttp.ClientSession() as s:
        await s.post(f"{url}/api/v1/namespaces", json={"metadata": {"name": "bench"}})
        async with s.get(f"{url}/api/v1/namespaces/bench/configmaps") as r:
            rv = (await r.json())["metadata"]["resourceVersion"]
        done = asyncio.Event()

        async def watcher() -> None:
            async with s.get(f"{url}/api/v1/namespaces/bench/configmaps",
                             params={"watch": "true", "resourceVersion": rv}) as resp:
                async for line in resp.content:
                    ev = json.loads(line)
                    key = f"{ev['type']}/{ev['object']['metadata']['name']}"
                    if key in sent:
                        got.append(time.perf_counter() - sent.pop(key))
                    if len(got) >= 2 * n:
                        done.set()
                        return

        task = asyncio.create_task(watcher())
        await asyncio.sleep(0.2)
        for i in range(n):
            name = f"cm-{i}"
            sent[f"ADDED/{name}"] = time.perf_counter()
            await s.post(f"{url}/api/v1/namespaces/bench/configmaps", json={"metadata": {"name": name},
                                                                          "data": {"i": str(i)}})
            sent[f"MODIFIED/{name}"] = time.perf_counter()
            await s.patch(f"{url}/api/v1/namespaces/bench/configmaps/{name}", data=json.dumps({"data": {"x": "y"}}),
                          headers={"Content-Type": "application/merge-patch+json"})
            await asyncio.sleep(0.002)
        await asyncio.wait_for(done.wait(), 30)
        task.cancel()
    return got


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platform", type=Path,
                    default=Path(os.environ.get("EDGEFLEET_PLATFORM_DIR", ROOT.parent / "shared" / "platform")))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--watch-writes", type=int, default=500)
    args = ap.parse_args()
    mirror = args.platform / "mirror"
    if not mirror.is_dir():
        print(f"sim_apply: platform mirror not found at {mirror}", file=sys.stderr)
        return 2
    grouped = groups(mirror, args.quick)
    nfiles = sum(len(fs) for _, fs in grouped)
    with tempfile.TemporaryDirectory() as tmp, sim.testing.start_process(speed=10, workdir=Path(tmp)) as site:
        cache = Path(tmp) / "cache"
        for ns in PRE_EXISTING:
            kubectl(site.kubeconfig, cache, "create", "namespace", ns)
        # warm kubectl's discovery/OpenAPI cache so both runs pay the same client-side setup
        kubectl(site.kubeconfig, cache, "api-resources")
        base_secs, base_objs = apply_all(site.kubeconfig, cache, grouped, dry=True)
        before = admin.request(site.kubeconfig, "GET", "/sim/state")
        t0 = time.perf_counter()
        secs, objects = apply_all(site.kubeconfig, cache, grouped, dry=False)
        wall = time.perf_counter() - t0
        time.sleep(2.0)  # controllers settle: pods scheduled and started
        after = admin.request(site.kubeconfig, "GET", "/sim/state")
        hwm, rss = peak_rss_mib(site.pid)
        lat = asyncio.run(watch_latency(site.url, args.watch_writes))
        internal = admin.request(site.kubeconfig, "GET", "/sim/state")["watchLatencyMs"]
    server = after["serverSeconds"] - before["serverSeconds"]
    requests = after["requests"] - before["requests"]
    p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
    print(f"sim_apply: {nfiles} files, {objects} objects applied server-side (kubectl dry-run counted {base_objs})")
    print(f"  apply wall time        {wall:8.2f} s   -> {objects / wall:7.1f} objects/s")
    print(f"  kubectl alone (create --dry-run=client) {base_secs:6.2f} s   ratio apply/kubectl-alone = "
          f"{secs / base_secs:.2f}x")
    print(f"  where the time goes    sim server {server:6.2f} s ({100 * server / secs:4.1f}%) over {requests} requests,"
          f" kubectl client+transport {secs - server:6.2f} s ({100 * (secs - server) / secs:4.1f}%)")
    print(f"  sim objects stored     {after['objects']} (incl. pods, replicasets, events, leases)")
    print(f"  sim peak RSS           {hwm:8.1f} MiB (now {rss:.1f} MiB)   ratio to 200 MiB budget = "
          f"{hwm / RSS_BUDGET_MIB:.2f}")
    print(f"  watch write->event     p50 {p50:6.2f} ms  p99 {p99:6.2f} ms over {len(lat)} events   "
          f"ratio p99 to 50 ms budget = {p99 / WATCH_P99_BUDGET_MS:.2f}")
    print(f"  sim-internal store->socket p50 {internal['p50']} ms  p99 {internal['p99']} ms")
    ok = hwm <= RSS_BUDGET_MIB and p99 <= WATCH_P99_BUDGET_MS
    print("  targets: " + ("met" if ok else "NOT met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
