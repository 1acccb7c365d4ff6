"""Hub ingest benchmark: status messages stored per second, against a raw ``mosquitto_sub`` drain.

Lightweight simulated sites (raw-socket MQTT publishers in a few processes, not full agents) publish status
messages for ``--sites`` site identities to the local mosquitto (127.0.0.1:1883) at an offered rate.
The same stream is consumed, phase by phase, by:

* ``raw``: ``mosquitto_sub -q 1`` (the baseline: what a do-nothing subscriber drains);
* ``hub1-pg``: one ``edgefleet-hub run`` process on PostgreSQL;
* ``hub2-pg``: two replicas on PostgreSQL behind a shared subscription;
* ``hub1-sqlite``: one hub on SQLite (the zero-setup default).

Per phase: messages stored per second (stored count / span from first publish to last stored),
the ratio against the raw drain of the same run, and the p99 publish-to-stored latency (the site
``ts`` set just before publishing vs the ``stored_at`` of the committing batch; same clock). Each
hub phase gets a fresh database (schema) and a fresh client id. Statuses are published *not*
retained here, so the benchmark leaves no retained state behind on the shared broker.

Usage: ``python bench/hub_ingest.py [--sites 10000] [--rate 6000] [--duration 20] [--phases raw,hub1-pg,...]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parents[1]
HUB = ROOT / ".venv" / "bin" / "edgefleet-hub"
PG_URL = os.environ.get("EDGEFLEET_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
HOST, PORT = "127.0.0.1", 1883
#: Profiling only: a command prefix for the hub processes, e.g. ``py-spy record -f raw -o /tmp/hub.txt --``.
_WRAP = os.environ.get("EDGEFLEET_BENCH_HUB_WRAP", "").split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- publishers ------------------------------------------------------------------------------------


def _status_doc(site: str, seq: int) -> dict[str, Any]:
    """A realistic small status: 12 components over 5 layers, 3 nodes, a snapshot, a bundle."""
    return {
        "schema": 1,
        "kind": "status",
        "msg_id": uuid.uuid4().hex,
        "site": site,
        "seq": seq,
        "ts": datetime.now(UTC).isoformat(),
        "state": "green",
        "bundle": {"name": "idp", "version": "1.4.2", "release": 42},
        "install_state": "idle",
        "components": [
            {"name": f"component-{c}", "layer": c % 5, "tier": 1 + c % 4, "healthy": True} for c in range(12)
        ],
        "nodes": [
            {"name": "server-0", "ready": True, "control_plane": True},
            {"name": "agent-0", "ready": True},
            {"name": "agent-1", "ready": True},
        ],
        "snapshot": {"last_success": "2026-01-01T00:00:00+00:00", "age_seconds": 600.0, "size_bytes": 52428800},
        "agent_version": "0.1.0",
        "interval_seconds": 30.0,
    }


def _template() -> bytes:
    """The JSON of :func:`_status_doc` with ``%(site)s``-style holes for what varies per message."""
    doc = _status_doc("SITE", 0)
    doc.update(msg_id="MSGID", seq=0, ts="TS")
    text = json.dumps(doc, separators=(",", ":")).replace("%", "%%")
    text = text.replace('"SITE"', '"%(site)s"').replace('"MSGID"', '"%(msg_id)s"')
    return text.replace('"seq":0', '"seq":%(seq)d').replace('"TS"', '"%(ts)s"').encode()


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_connect(sock: socket.socket, client_id: str) -> None:
    """MQTT 3.1.1 CONNECT (clean session, keepalive 60) and wait for a successful CONNACK."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
    ack = sock.recv(4)
    if len(ack) != 4 or ack[0] != 0x20 or ack[3] != 0:
        raise SystemExit(f"publisher {client_id}: CONNACK refused: {ack!r}")


def _publisher(index: int, sites: list[str], rate: float, total: int, seq_base: int, out: Any) -> None:
    """One lightweight simulated fleet: real MQTT 3.1.1 QoS 1 PUBLISH packets on a plain socket.

    Not paho: a Python client costs ~100 µs of CPU per message, so at thousands per second on a
    2-core machine the publishers took the CPU the hub and the broker were being measured on. Here a
    message is a template fill and a few bytes of framing (~5 µs); PUBACKs are counted by a reader
    thread, at most ``window`` messages are unacknowledged, and ``ts`` is set as the message is
    framed, just before it is sent.
    """
    import threading

    window = 2000
    sock = socket.create_connection((HOST, PORT))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _mqtt_connect(sock, f"bench-pub-{index}-{uuid.uuid4().hex[:6]}")
    acked = [0]
    slots = threading.Semaphore(window)

    def read_acks() -> None:
        buf = b""
        while acked[0] < total:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
            n = len(buf) // 4  # PUBACK (3.1.1): 0x40 0x02 <packet id>; nothing else comes to a publisher
            buf = buf[n * 4 :]
            acked[0] += n
            for _ in range(n):
                slots.release()

    reader = threading.Thread(target=read_acks, daemon=True)
    reader.start()
    template = _template()
    prefix = uuid.uuid4().hex[:12]
    topics = [f"edgefleet/v1/sites/{site}/status".encode() for site in sites]
    start = time.monotonic()
    pending = bytearray()
    for i in range(total):
        slots.acquire()
        site = sites[i % len(sites)]
        payload = template % {
            b"site": site.encode(), b"msg_id": f"{prefix}{i:020x}".encode(), b"seq": seq_base + i // len(sites),
            b"ts": datetime.now(UTC).isoformat().encode(),
        }
        topic = topics[i % len(sites)]
        packet_id = i % 65535 + 1
        body = len(topic).to_bytes(2, "big") + topic + packet_id.to_bytes(2, "big") + payload
        pending += b"\x32" + _remaining_length(len(body)) + body  # PUBLISH, QoS 1
        if i % 50 == 49 or i == total - 1:
            sock.sendall(pending)
            pending.clear()
            ahead = (i + 1) / rate - (time.monotonic() - start)  # pace to the offered rate
            if ahead > 0:
                time.sleep(ahead)
    reader.join(timeout=60)
    elapsed = time.monotonic() - start
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.close()
    out.put((index, total, acked[0], elapsed, time.process_time()))


def publish_stream(*, prefix: str, sites: int, rate: float, duration: float, publishers: int) -> dict[str, Any]:
    names = [f"{prefix}-{i:06d}" for i in range(sites)]
    total = int(rate * duration)
    per = total // publishers
    seq_base = int(time.time())  # later phases carry higher sequence numbers
    queue: Any = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(
            target=_publisher, args=(i, names[i::publishers], rate / publishers, per, seq_base, queue)
        )
        for i in range(publishers)
    ]
    t0 = time.time()
    for p in procs:
        p.start()
    results = [queue.get(timeout=duration * 4 + 120) for _ in procs]
    for p in procs:
        p.join()
    published = sum(r[1] for r in results)
    acked = sum(r[2] for r in results)
    span = max(r[3] for r in results)
    cpu = sum(r[4] for r in results)
    return {"t0": t0, "published": published, "acked": acked, "publish_rate": published / span, "publisher_cpu": cpu}


# ---- consumers ---------------------------------------------------------------------------------------


def phase_raw(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"bench-raw-{uuid.uuid4().hex[:4]}"
    out = Path(tempfile.mkstemp(prefix="hub-bench-raw-")[1])
    with open(out, "wb") as fh:
        sub = subprocess.Popen(
            ["mosquitto_sub", "-h", HOST, "-p", str(PORT), "-V", "mqttv5", "-q", "1", "-i", f"raw-{prefix}",
             "-t", "edgefleet/v1/sites/+/status", "-F", "%t %U"],
            stdout=fh,
        )
        time.sleep(1.0)
        pub = publish_stream(prefix=prefix, sites=args.sites, rate=args.rate, duration=args.duration,
                             publishers=args.publishers)
        _wait_quiet(lambda: _raw_count(out, prefix)[0], pub["published"])
        sub.terminate()
        sub.wait()
    count, last = _raw_count(out, prefix)
    out.unlink()
    return {**pub, "stored": count, "rate": count / (last - pub["t0"]) if count else 0.0, "p99": None}


def _raw_count(path: Path, prefix: str) -> tuple[int, float]:
    count, last = 0, 0.0
    with open(path, "rb") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 2 and parts[0].split(b"/")[3].startswith(prefix.encode()):
                count += 1
                last = max(last, float(parts[1]))
    return count, last


def _wait_quiet(counter: Any, target: int, *, idle: float = 5.0) -> None:
    """Until ``counter()`` reaches ``target`` or stops moving for ``idle`` seconds."""
    last, since = -1, time.monotonic()
    while True:
        n = counter()
        if n >= target:
            return
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > idle:
            return
        time.sleep(0.25)


def phase_hub(args: argparse.Namespace, *, replicas: int, db: str, backlog: bool = False) -> dict[str, Any]:
    prefix = f"bench-{db}{replicas}-{uuid.uuid4().hex[:4]}"
    work = Path(tempfile.mkdtemp(prefix="hub-bench-"))
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    if db == "pg":
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    else:
        url = f"sqlite:///{work / 'hub.db'}"
    procs = []
    try:
        for r in range(replicas):
            port = _free_port()
            cfg = {
                "db_url": url,
                "data_dir": str(work / f"data{r}"),
                "log_format": "json",
                "mqtt": {"host": HOST, "port": PORT, "client_id": f"{prefix}-r{r}",
                         "shared_subscriptions": replicas > 1, "shared_group": prefix},
                "api": {"host": "127.0.0.1", "port": port},
            }
            path = work / f"hub{r}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            log = open(work / f"hub{r}.log", "wb")  # noqa: SIM115
            cmd = [*_WRAP, str(HUB), "--config", str(path), "run"]
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=log), port))
            log.close()
        _wait_ready([p for _, p in procs])
        time.sleep(1.0)
        engine = sa.create_engine(url)
        if backlog:  # stop the hub, queue the stream in its session, start it again: time the drain
            cmds = [proc.args for proc, _ in procs]
            for proc, _ in procs:
                proc.terminate()
                proc.wait(timeout=30)
            pub = publish_stream(prefix=prefix, sites=args.sites, rate=args.rate, duration=args.duration,
                                 publishers=args.publishers)
            procs = []
            for r, cmd in enumerate(cmds):
                log = open(work / f"hub{r}-again.log", "wb")  # noqa: SIM115
                procs.append((subprocess.Popen(cmd, stdout=log, stderr=log), 0))
                log.close()
            pub["t0"] = time.time()
            cpu0 = _cpu_snapshot([p.pid for p, _ in procs])
        else:
            cpu0 = _cpu_snapshot([p.pid for p, _ in procs])
            pub = publish_stream(prefix=prefix, sites=args.sites, rate=args.rate, duration=args.duration,
                                 publishers=args.publishers)

        def stored() -> int:
            with engine.connect() as conn:
                return int(conn.execute(sa.text("SELECT count(*) FROM status_history")).scalar_one())

        _wait_quiet(stored, pub["published"])
        cpu1 = _cpu_snapshot([p.pid for p, _ in procs])
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT ts, stored_at FROM status_history")).all()
        engine.dispose()
        lat = sorted(_secs(r.stored_at) - _secs(r.ts) for r in rows)
        last = max((_secs(r.stored_at) for r in rows), default=pub["t0"])
        first = min((_secs(r.stored_at) for r in rows), default=pub["t0"])
        result = {
            **pub,
            "stored": len(rows),
            "rate": len(rows) / (last - pub["t0"]) if rows else 0.0,
            "p99": (lat[int(len(lat) * 0.99) - 1] if lat else None) if not backlog else None,
            "p50": (statistics.median(lat) if lat else None) if not backlog else None,
            # Backlog only: the drain itself, first to last commit (the rate above includes hub startup).
            "drain": (len(rows) / (last - first) if last > first else None) if backlog else None,
            # CPU per stored message, by role (the hub's own figure gives its capacity per core).
            "cpu_us": {k: (cpu1[k] - cpu0[k]) * 1e6 / max(len(rows), 1) for k in cpu0},
            # Cores busy on average over the phase, all roles (publishers included unless backlog).
            "cores": (sum(cpu1[k] - cpu0[k] for k in cpu0) + (0.0 if backlog else pub["publisher_cpu"]))
            / max(last - pub["t0"], 1e-9),
        }
        if args.keep_logs:
            result["logs"] = str(work)
        return result
    finally:
        for proc, _port in procs:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if db == "pg":
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
        if not args.keep_logs:
            shutil.rmtree(work, ignore_errors=True)


def _cpu_snapshot(hub_pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of the hub processes, the broker(s) and PostgreSQL (every backend), by role."""
    import psutil

    totals = {"hub": 0.0, "broker": 0.0, "postgres": 0.0}
    for proc in psutil.process_iter(["pid", "name"]):
        role = ("hub" if proc.info["pid"] in hub_pids else "broker" if proc.info["name"] == "mosquitto"
                else "postgres" if proc.info["name"] in ("postgres", "postmaster") else None)
        if role is None:
            continue
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        totals[role] += t.user + t.system
    return totals


def _secs(value: Any) -> float:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def _wait_ready(ports: list[int]) -> None:
    import httpx

    deadline = time.monotonic() + 60
    for port in ports:
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                if r.json().get("mqtt_connected"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"hub on port {port} did not become ready")
            time.sleep(0.2)


def phase_backlog(args: argparse.Namespace, *, db: str, replicas: int = 1) -> dict[str, Any]:
    """The hub's own consumption capacity, without publishers competing for the CPUs: a backlog is
    queued in the hub's persistent session on a private mosquitto while the hub is stopped, then the
    hub starts and drains it. (Not a raw-vs-hub comparison; a capacity figure.)"""
    global HOST, PORT
    work = Path(tempfile.mkdtemp(prefix="hub-bench-backlog-"))
    port = _free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 10000000\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = (HOST, PORT)
    HOST, PORT = "127.0.0.1", port
    try:
        time.sleep(0.5)
        first = phase_hub(args, replicas=replicas, db=db, backlog=True)
        return first
    finally:
        HOST, PORT = saved
        broker.terminate()
        broker.wait()
        shutil.rmtree(work, ignore_errors=True)


PHASES = {
    "raw": lambda a: phase_raw(a),
    "hub1-pg": lambda a: phase_hub(a, replicas=1, db="pg"),
    "hub2-pg": lambda a: phase_hub(a, replicas=2, db="pg"),
    "hub1-sqlite": lambda a: phase_hub(a, replicas=1, db="sqlite"),
    "backlog-pg": lambda a: phase_backlog(a, db="pg"),
    "backlog-sqlite": lambda a: phase_backlog(a, db="sqlite"),
    # Replica scaling without publishers competing for the CPUs (the backlog split between two sessions).
    "backlog2-pg": lambda a: phase_backlog(a, db="pg", replicas=2),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=6000.0, help="offered status messages per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of publishing per phase")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument("--phases", default="raw,hub1-pg,hub2-pg,hub1-sqlite")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    if shutil.which("mosquitto_sub") is None:
        print("mosquitto_sub not found (apt-get install mosquitto-clients)", file=sys.stderr)
        return 2
    results: dict[str, dict[str, Any]] = {}
    print(f"hub ingest benchmark: {args.sites} site ids, offered {args.rate:.0f} msg/s for {args.duration:.0f} s, "
          f"{args.publishers} publisher processes, broker {HOST}:{PORT}, {os.cpu_count()} CPUs")
    for name in args.phases.split(","):
        res = PHASES[name](args)
        results[name] = res
        p99 = f"{res['p99'] * 1000:.0f} ms" if res.get("p99") is not None else "-"
        p50 = f"{res['p50'] * 1000:.0f} ms" if res.get("p50") is not None else "-"
        print(f"  {name:12s} published {res['published']:7d} ({res['publish_rate']:7.0f}/s) "
              f"stored {res['stored']:7d}  rate {res['rate']:7.0f} msg/s  p50 {p50:>8s}  p99 {p99:>8s}"
              + (f"  drain {res['drain']:.0f} msg/s (first to last commit)" if res.get("drain") else ""), flush=True)
        if res.get("cpu_us"):
            cpu = res["cpu_us"]
            print(f"  {'':12s} CPU per stored message: hub {cpu['hub']:.0f} µs (capacity {1e6 / cpu['hub']:.0f} msg/s "
                  f"per core), broker {cpu['broker']:.0f} µs, PostgreSQL {cpu['postgres']:.0f} µs; "
                  f"{res['cores']:.2f} of {os.cpu_count()} cores busy", flush=True)
    raw = results.get("raw", {}).get("rate")
    print("summary:")
    for name, res in results.items():
        if name == "raw":
            print(f"  raw mosquitto_sub drain: {res['rate']:.0f} msg/s")
            continue
        ratio = f"{res['rate'] / raw:.2f}x raw" if raw else "no raw baseline"
        print(f"  {name}: {res['rate']:.0f} msg/s stored ({ratio}), p99 "
              f"{res['p99'] * 1000 if res['p99'] is not None else float('nan'):.0f} ms, "
              f"lost {res['published'] - res['stored']}")
    if "hub1-pg" in results and "hub2-pg" in results and results["hub1-pg"]["rate"]:
        print(f"  2 replicas vs 1 on PostgreSQL: {results['hub2-pg']['rate'] / results['hub1-pg']['rate']:.2f}x")
    one, two = results.get("backlog-pg", {}).get("drain"), results.get("backlog2-pg", {}).get("drain")
    if one and two:
        print(f"  2 replicas vs 1 on PostgreSQL, backlog drain: {two / one:.2f}x ({two:.0f} vs {one:.0f} msg/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
