"""Agent import memory: the shipped lazy kubernetes-asyncio import vs the usual full import.

Prints RSS after ``import agent.daemon`` (everything the daemon imports) in fresh interpreters,
with kubernetes-asyncio imported the usual way as the baseline measured in the same run, the
ratio, module counts, and where the code goes (pyc bytes per top-level package). See
docs/operations.md, "Memory". Usage: ``python bench/agent_memory.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
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


if __name__ == "__main__":
    main()
