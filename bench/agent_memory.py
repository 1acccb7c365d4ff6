"""Agent import memory: the shipped lazy kubernetes-asyncio import vs the usual full import.

Prints RSS after ``import agent.daemon`` (everything the daemon imports) in fresh interpreters,
with kubernetes-asyncio imported the usual way as the baseline measured in the same run, the
ratio, module counts, and where the code goes (pyc bytes per top-level package). See
docs/operations.md, "Memory". With ``--idle SECONDS``, also runs the daemon (``edgefleet-agent run``,
HTTP on, link and snapshots off, no bundle) against a 3-node sim subprocess and prints its steady
RSS and idle CPU against the targets. Also the RSS a process with the daemon's imports keeps after
verifying one hub command (the check runs in a child: it should keep nothing).
Usage: ``python bench/agent_memory.py [--runs N] [--idle 60]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, sys, collections
if sys.argv[1] == "full":
    import kubernetes_asyncio.client  # the usual way: every generated API and model
import agent.daemon
from agent import kube
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
pyc = collections.Counter()
for name, mod in list(sys.modules.items()):
    cached = getattr(mod, "__cached__", None)
    if cached and os.path.exists(cached):
        pyc[name.split(".")[0]] += os.path.getsize(cached)
print(json.dumps({"rss": status("VmRSS"), "anon": status("RssAnon"), "modules": len(sys.modules),
                  "k8s_modules": sum(1 for m in sys.modules if m.startswith("kubernetes_asyncio")),
                  "lazy": kube.is_lazy(), "pyc": pyc.most_common(8)}))
"""


def measure(mode: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT, check=True, timeout=300
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


COMMAND_PROBE = r"""
import gc, json, sys
from pathlib import Path
import agent.daemon
from agent import commands
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
trust_dir = Path(sys.argv[1])
gc.collect()
before = rss()
command = commands.verify((trust_dir / "command.json").read_bytes(), trust_dir=trust_dir, site="bench-site")
gc.collect()
print(json.dumps({"before": before, "after": rss(), "cryptography": "cryptography" in sys.modules}))
"""


def command() -> dict[str, Any]:
    """RSS of a fresh interpreter with the daemon's imports, before and after it verified one hub command."""
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    sys.path.insert(0, str(ROOT))
    from agent import protocol

    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-command-") as tmp:
        trust_dir = Path(tmp)
        key = Ed25519PrivateKey.generate()
        (trust_dir / protocol.HUB_COMMAND_KEY_FILE).write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        now = datetime.now(UTC)
        signed = protocol.sign_command(protocol.Command(
            site="bench-site", seq=1, name=protocol.CommandName.REPORT_NOW, issued=now,
            expires=now + timedelta(minutes=10)), key=key)
        (trust_dir / "command.json").write_bytes(signed)
        out = subprocess.run([sys.executable, "-c", COMMAND_PROBE, str(trust_dir)], capture_output=True, text=True,
                             cwd=ROOT, check=True, timeout=120)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def idle(seconds: float) -> tuple[float, float]:
    """(steady RSS MiB, CPU % of one core) of the daemon with no bundle, after 20 s of settling."""
    import psutil
    import yaml

    sys.path.insert(0, str(ROOT))
    import sim.testing

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-idle-") as tmp, \
            sim.testing.start_process(speed=20) as site:
        work = Path(tmp)
        config = work / "agent.yaml"
        config.write_text(yaml.safe_dump({
            "site_id": "bench-site", "state_dir": str(work / "state"), "trust_dir": str(work / "trust"),
            "kubeconfig": str(site.kubeconfig), "http": {"enabled": True, "port": 0},
            "link": {"enabled": False}, "snapshots": {"enabled": False},
        }))
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "--config", str(config), "run"], env=env,
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            p = psutil.Process(proc.pid)
            time.sleep(20)
            from agent_install import steady_usage  # bench/ is on sys.path: this script's directory

            rss, cpu = steady_usage(p, seconds)
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited early (rc={proc.returncode})")
            return rss, cpu
        finally:
            proc.terminate()
            proc.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=float, default=0.0, help="also measure the idle daemon for this many seconds")
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {"full": [], "lazy": []}
    for _ in range(args.runs):
        for mode in results:
            results[mode].append(measure(mode))
    rss = {mode: statistics.median(float(r["rss"]) for r in runs) for mode, runs in results.items()}
    for mode, runs in results.items():
        last = runs[-1]
        print(
            f"{mode:4s}: RSS {rss[mode]:6.1f} MiB (median of {args.runs}), anon {float(last['anon']):5.1f} MiB, "
            f"{last['modules']} modules ({last['k8s_modules']} kubernetes_asyncio), lazy={last['lazy']}"
        )
    saved = rss["full"] - rss["lazy"]
    print(f"ratio lazy/full: {rss['lazy'] / rss['full']:.2f}x  (saved {saved:.1f} MiB; agent target RSS <= 64 MiB)")
    print("largest packages by pyc bytes (lazy):")
    for name, size in results["lazy"][-1]["pyc"]:
        print(f"  {name:22s} {size / 2**20:5.2f} MiB")
    cmd = command()
    print(f"one verified hub command (its signature checked in the verifier child): RSS {cmd['before']:.1f} -> "
          f"{cmd['after']:.1f} MiB ({cmd['after'] - cmd['before']:+.1f} MiB kept), cryptography loaded in the agent: "
          f"{cmd['cryptography']}")
    if args.idle > 0:
        steady, cpu = idle(args.idle)
        print(f"idle daemon, no bundle, 3-node sim (speed 20), {args.idle:.0f} s: steady RSS {steady:.1f} MiB "
              f"({steady / 64:.2f}x the 64 MiB target), CPU {cpu:.2f}% of one core ({cpu:.2f}x the 1% target)")


if __name__ == "__main__":
    main()
