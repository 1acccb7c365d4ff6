"""Benchmark: the agent installing the full IDP bundle vs `kubectl apply --server-side`, same run.

Two identical sims (subprocesses, 3 nodes, same speed, HTTPS with a bearer token as on a node).
Into one, ``edgefleet-agent bundle import --wait`` installs the bundle (verification, layers,
DAG parallelism, health gates, commit). Into the other, kubectl applies the *same rendered
objects in the same order*, one component after the other, server-side, waiting for the same
gates (``kubectl wait``: CRDs Established before the rest, workloads Available/ready after each
component), i.e. what an operator with a script would do.

Then ``edgefleet-agent run`` (the daemon) supervises the installed site for a while: its steady RSS
and idle CPU (health every 15 s, drift every 60 s: the defaults) are measured with psutil. Then an
upgrade (the same bundle as 1.0.1, release 2) is dropped into its inbox: the daemon's peak while it
verifies and installs it, each one-shot child's peak (bundle verifier, renderer), and its steady
RSS afterwards.

Prints the ratio (target <= 0.5x), the absolute times, the agent's peak and steady RSS (target
<= 64 MiB) and idle CPU (target <= 1% of one core). Usage::

    .venv/bin/python bench/agent_install.py [--speed 20] [--idle 90] [--env KEY=VALUE]

The daemon gets the ``Environment=`` lines of systemd/edgefleet-agent.service (as on a node;
``bundle import --wait`` runs with the bench's own environment, as from an operator's shell);
``--env`` sets variables for both, after the unit's, to compare settings in the same session.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "agent_install"))

import install_kit as kit  # noqa: E402

import sim.testing  # noqa: E402
from agent.install import journal, model, render, source  # noqa: E402
from agent.state import StateStore  # noqa: E402
from bundles import build  # noqa: E402

PLATFORM = Path(os.environ.get("EDGEFLEET_PLATFORM_DIR", ROOT.parent / "shared" / "platform"))
AGENT = [sys.executable, "-m", "agent.cli"]


def _role(proc: psutil.Process) -> str:
    """Which one-shot child a process is: the bundle verifier, the renderer, or something else."""
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    return "verifier" if "agent.verifyproc" in cmdline else "renderer" if "agent.install.cache" in cmdline else "other"


def sample(p: psutil.Process, peaks: dict[str, float]) -> None:
    """Fold the RSS of ``p`` (``agent``) and of each child, by role, into ``peaks`` (MiB)."""
    try:
        peaks["agent"] = max(peaks.get("agent", 0.0), p.memory_info().rss / 2**20)
        for child in p.children(recursive=True):
            role = _role(child)
            peaks[role] = max(peaks.get(role, 0.0), child.memory_info().rss / 2**20)
    except psutil.Error:
        pass


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, int, dict[str, float]]:
    """(wall s, return code, peak RSS MiB of the agent process and of each kind of child it spawned).

    Sampled with psutil every 50 ms (the children are the one-shot bundle verifier and renderer;
    each lives a second or two). Not wait4's rusage: a forked child's ru_maxrss starts at the size
    of the process that forked it (here the benchmark, ~130 MiB), which says nothing about the agent.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p = psutil.Process(proc.pid)
    peaks: dict[str, float] = {}
    while proc.poll() is None:
        sample(p, peaks)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    return wall, int(proc.returncode or 0), peaks


def unit_environment(unit: Path = ROOT / "systemd" / "edgefleet-agent.service") -> dict[str, str]:
    """The ``Environment=`` assignments of the shipped agent unit, so the daemon here runs as on a node
    (e.g. its allocator settings, which change the RSS measured)."""
    env: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            for item in shlex.split(line.removeprefix("Environment=")):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def kubectl(kubeconfig: Path, *args: str) -> None:
    subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], check=True, capture_output=True, text=True)


def baseline(kubeconfig: Path, spec: model.Spec, work: Path) -> float:
    """Sequential kubectl: per component (layer order, DAG order), first Namespaces+CRDs, wait, then the rest, wait."""
    t0 = time.perf_counter()
    order = [u for layer in spec.layers() for u in _dag_order(layer)]
    for unit in order:
        objects = sorted(unit.objects, key=render.order_key)
        first = [o for o in objects if o["kind"] in ("Namespace", "CustomResourceDefinition")]
        rest = [o for o in objects if o not in first]
        for part, objs in (("first", first), ("rest", rest)):
            if not objs:
                continue
            path = work / f"{unit.name}-{part}.yaml"
            path.write_text(yaml.safe_dump_all(objs))
            kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "--field-manager=edgefleet",
                    "-f", str(path))
            if part == "first":
                crds = [o["metadata"]["name"] for o in objs if o["kind"] == "CustomResourceDefinition"]
                if crds:
                    kubectl(kubeconfig, "wait", "--for=condition=Established", "--timeout=300s",
                            *[f"crd/{n}" for n in crds])
        for check in unit.gate_checks:
            ns = ["-n", check["namespace"]] if check.get("namespace") else []
            kind = str(check["kind"]).lower()
            if check["type"] == "deployment-available":
                kubectl(kubeconfig, "wait", *ns, "--for=condition=Available", "--timeout=300s",
                        f"deployment/{check['name']}")
            elif check["type"] in ("statefulset-ready", "daemonset-ready"):
                kubectl(kubeconfig, "rollout", "status", *ns, "--timeout=300s", f"{kind}/{check['name']}")
            elif check["type"] == "job-complete":
                kubectl(kubeconfig, "wait", *ns, "--for=condition=Complete", "--timeout=300s", f"job/{check['name']}")
    return time.perf_counter() - t0


def _dag_order(units: list[model.Unit]) -> list[model.Unit]:
    done: list[model.Unit] = []
    names = {u.name for u in units}
    while len(done) < len(units):
        for u in units:
            if u not in done and all(d not in names or d in {x.name for x in done} for d in u.depends_on):
                done.append(u)
                break
    return done


def steady_usage(p: psutil.Process, seconds: float) -> tuple[float, float]:
    """(median RSS MiB, CPU % of one core) of ``p`` over ``seconds``, sampled every second."""
    c0, t0 = p.cpu_times(), time.perf_counter()
    samples = []
    while time.perf_counter() - t0 < seconds:
        samples.append(p.memory_info().rss / 2**20)
        time.sleep(1)
    c1, t1 = p.cpu_times(), time.perf_counter()
    return sorted(samples)[len(samples) // 2], (c1.user + c1.system - c0.user - c0.system) / (t1 - t0) * 100


def idle(config: Path, env: dict[str, str], seconds: float, *, inbox_bundle: Path, state_dir: Path,
         inbox: Path) -> dict[str, float]:
    """Run the daemon: steady RSS and CPU after it settled; then an inbox-delivered upgrade.

    Settling covers startup and the first drift pass (at ``drift_interval_seconds``, 60 s), which
    reads every object once to learn their resourceVersions; later passes read only what changed.
    Then ``inbox_bundle`` is dropped into the inbox: the daemon verifies it (in its verifier
    child), renders it (renderer child) and installs it; its peak and each child's are sampled
    until the new bundle is committed, and its steady RSS is measured again after it settled.
    """
    proc = subprocess.Popen([*AGENT, "--config", str(config), "run"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p = psutil.Process(proc.pid)
        time.sleep(75)
        out: dict[str, float] = {}
        out["steady"], out["cpu"] = steady_usage(p, seconds)
        out["peak_idle"] = getattr(p.memory_full_info(), "rss", 0) / 2**20
        store = StateStore.open(state_dir)
        try:
            before = journal.current(store)
            inbox.mkdir(parents=True, exist_ok=True)
            tmp = inbox / f".{inbox_bundle.name}.part"
            shutil.copyfile(inbox_bundle, tmp)
            os.replace(tmp, inbox / inbox_bundle.name)
            peaks: dict[str, float] = {}
            deadline = time.monotonic() + 600
            while (rec := journal.current(store)) is None or before is None or rec.bundle_id == before.bundle_id:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the daemon did not install the inbox bundle")
                sample(p, peaks)
                time.sleep(0.05)
        finally:
            store.close()
        out.update({f"inbox_{k}": v for k, v in peaks.items()})
        time.sleep(75)
        out["steady_after_inbox"], out["cpu_after_inbox"] = steady_usage(p, seconds / 2)
        return out
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", type=float, default=20.0, help="sim clock speed (both sims)")
    parser.add_argument("--idle", type=float, default=120.0, help="seconds of idle supervision to measure")
    parser.add_argument("--no-baseline", action="store_true", help="skip kubectl (development only: no ratio)")
    parser.add_argument("--plain-http", action="store_true", help="sims without TLS (a node's API server has it)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set for the agent processes, after the unit's Environment= (e.g. PYTHONMALLOC=malloc)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-install-"))
    overrides = dict(item.partition("=")[::2] for item in args.env)
    env = {**os.environ, **overrides, "PYTHONPATH": str(ROOT)}
    env.pop("EDGEFLEET_FAILPOINT", None)
    # The daemon runs as its unit does on a node; `bundle import --wait` as an operator's shell would.
    daemon_env = {**env, **unit_environment(), **overrides}
    print(f"daemon environment (systemd/edgefleet-agent.service Environment=, then --env): "
          f"{ {**unit_environment(), **overrides} }; `bundle import --wait`: --env only: {overrides}")
    try:
        k = kit.make_trust(work / "trust")
        res = build.build(profile=build.DEFAULT_PROFILE, platform=PLATFORM / "idp-blueprint",
                          mirror=PLATFORM / "mirror", out=work / "idp.bundle", version="1.0.0", release=1,
                          keys=[k.private], allow_unrendered=True)
        print(f"bundle: {res.object_count} objects, {res.path.stat().st_size / 2**20:.2f} MiB, "
              f"unrendered (need helm): {', '.join(res.needs_helm) or '-'}")
        upgrade = build.build(profile=build.DEFAULT_PROFILE, platform=PLATFORM / "idp-blueprint",
                              mirror=PLATFORM / "mirror", out=work / "upgrade" / "idp-1.0.1.bundle", version="1.0.1",
                              release=2, keys=[k.private], allow_unrendered=True)
        # HTTPS and a bearer token, as a node's API server: every connection is a TLS session,
        # which costs the agent memory a plain-HTTP sim would not show.
        tls = {"tls": not args.plain_http, "token": None if args.plain_http else "bench-token"}
        with (sim.testing.start_process(speed=args.speed, **tls) as site_a,
              sim.testing.start_process(speed=args.speed, **tls) as site_b):
            config = kit.write_config(work / "agent.yaml", state_dir=work / "state", trust_dir=work / "trust",
                                      kubeconfig=site_a.kubeconfig, default_gate_timeout_seconds=600)
            doc = yaml.safe_load(config.read_text())
            doc["http"] = {"enabled": True, "port": 0}
            doc["install"].pop("default_gate_timeout_seconds")
            config.write_text(yaml.safe_dump(doc))
            agent_s, rc, install = run_measured([*AGENT, "--config", str(config), "bundle", "import",
                                                 str(res.path), "--wait"], env)
            if rc != 0:
                print(f"agent install failed (rc={rc})")
                return 1
            store = StateStore.open(work / "state")
            rec = journal.current(store)
            assert rec is not None
            spec = source.load_spec(manifest_json=rec.manifest, bundle_id=rec.bundle_id, path=rec.path,
                                    default_timeout=600)
            entries = journal.entries(store, journal.last_run(store).id)  # type: ignore[union-attr]
            engine_s = entries[-1]["ts"] - entries[0]["ts"]
            store.close()
            kube_s = float("nan") if args.no_baseline else baseline(site_b.kubeconfig, spec, work)
            daemon = idle(config, daemon_env, args.idle, inbox_bundle=upgrade.path, state_dir=work / "state",
                          inbox=work / "state" / "inbox")
        ratio = agent_s / kube_s
        print(f"agent install (import --wait, verify + plan + apply + gates + commit): {agent_s:.1f} s "
              f"(engine, prepare..commit: {engine_s:.1f} s)")
        print(f"kubectl apply --server-side, same objects and order, same gates:     {kube_s:.1f} s")
        print(f"ratio agent/kubectl: {ratio:.2f}x (target <= 0.5x)")
        print(f"agent RSS (target <= 64 MiB): `bundle import --wait` process peak {install['agent']:.1f} MiB "
              f"({install['agent'] / 64:.2f}x); its one-shot children (exit when done): verifier "
              f"{install.get('verifier', 0):.1f} MiB, renderer {install.get('renderer', 0):.1f} MiB")
        print(f"daemon supervising the bundle: steady {daemon['steady']:.1f} MiB ({daemon['steady'] / 64:.2f}x), "
              f"peak while idle {daemon['peak_idle']:.1f} MiB")
        print(f"daemon idle CPU: {daemon['cpu']:.2f}% of one core over {args.idle:.0f} s "
              f"({daemon['cpu']:.2f}x the 1% target)")
        print(f"daemon taking an upgrade from its inbox: peak {daemon['inbox_agent']:.1f} MiB "
              f"({daemon['inbox_agent'] / 64:.2f}x; children: verifier {daemon.get('inbox_verifier', 0):.1f} MiB, "
              f"renderer {daemon.get('inbox_renderer', 0):.1f} MiB); steady after it "
              f"{daemon['steady_after_inbox']:.1f} MiB ({daemon['steady_after_inbox'] / 64:.2f}x), "
              f"idle CPU {daemon['cpu_after_inbox']:.2f}% over {args.idle / 2:.0f} s")
        print(f"(bench process itself: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
