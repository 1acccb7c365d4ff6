"""How a raw snapshot gets taken: ``etcdctl snapshot save`` or ``k3s etcd-snapshot save``.

Both end with a plain etcd snapshot file (bbolt database + sha256 trailer) at the path we
asked for; everything after that (verify, compress, catalog) is backend-independent.

* etcdctl: one endpoint (never a list: ``snapshot save`` refuses several), TLS material from
  the preset unless overridden field by field. etcdctl writes ``<dest>.part`` itself and
  renames it; we ask for our own ``.part`` name, so a crash leaves only ``*.part`` files.
* k3s: ``k3s etcd-snapshot save`` writes ``<name>-<node>-<timestamp>`` into ``--dir``. We give
  it a fresh private directory, so the only file there is the one it just wrote, then move it
  (same filesystem: a rename). ``--snapshot-compress`` stays off because we compress ourselves
  and must verify the raw file first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent.config import SnapshotConfig
from agent.snapshots import binaries, procs


@dataclass(frozen=True)
class Endpoint:
    url: str
    cacert: Path | None
    cert: Path | None
    key: Path | None


PRESETS: dict[str, Endpoint] = {
    "k3s": Endpoint(
        url="https://127.0.0.1:2379",
        cacert=Path("/var/lib/rancher/k3s/server/tls/etcd/server-ca.crt"),
        cert=Path("/var/lib/rancher/k3s/server/tls/etcd/client.crt"),
        key=Path("/var/lib/rancher/k3s/server/tls/etcd/client.key"),
    ),
    "kubeadm": Endpoint(
        url="https://127.0.0.1:2379",
        cacert=Path("/etc/kubernetes/pki/etcd/ca.crt"),
        cert=Path("/etc/kubernetes/pki/etcd/healthcheck-client.crt"),
        key=Path("/etc/kubernetes/pki/etcd/healthcheck-client.key"),
    ),
    "custom": Endpoint(url="", cacert=None, cert=None, key=None),
}


class BackendError(Exception):
    """The backend could not produce a snapshot file; one line."""


def endpoint(config: SnapshotConfig) -> Endpoint:
    """The preset's endpoint and certificates, each replaced by an explicit setting if given."""
    base = PRESETS[config.preset]
    resolved = Endpoint(
        url=config.endpoint or base.url,
        cacert=config.cacert or base.cacert,
        cert=config.cert or base.cert,
        key=config.key or base.key,
    )
    if not resolved.url:
        raise BackendError("snapshots.endpoint must be set with preset 'custom'")
    if "," in resolved.url:
        raise BackendError(f"snapshots.endpoint must name one endpoint, got {resolved.url!r}")
    return resolved


def etcdctl_argv(config: SnapshotConfig, dest: Path) -> list[str]:
    ep = endpoint(config)
    argv = [str(binaries.find("etcdctl", explicit=config.etcdctl)), f"--endpoints={ep.url}"]
    if ep.url.startswith("https://"):
        for flag, path in (("--cacert", ep.cacert), ("--cert", ep.cert), ("--key", ep.key)):
            if path is None:
                continue
            if not path.is_file():
                raise BackendError(f"snapshots: {flag[2:]} file {path} not found (preset {config.preset!r})")
            argv.append(f"{flag}={path}")
    # Dial and command timeouts well inside ours, so the usual failure is a clean error, not our kill.
    dial = max(1, min(10, int(config.timeout_seconds / 4)))
    command = max(1, int(config.timeout_seconds * 0.9))
    argv += [f"--dial-timeout={dial}s", f"--command-timeout={command}s"]
    return [*argv, "snapshot", "save", str(dest)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}  # flags only, no surprises
    env["ETCDCTL_API"] = "3"
    return env


async def save(config: SnapshotConfig, dest: Path) -> procs.Result:
    """Write a raw snapshot to ``dest`` (which must not exist) with the configured backend."""
    try:
        if config.backend == "etcdctl":
            return await procs.run(etcdctl_argv(config, dest), timeout=config.timeout_seconds, env=_env())
        return await _k3s_save(config, dest)
    except (binaries.BinaryNotFound, procs.CommandFailed) as exc:
        raise BackendError(str(exc)) from None


async def _k3s_save(config: SnapshotConfig, dest: Path) -> procs.Result:
    k3s = binaries.find("k3s", explicit=config.k3s)
    workdir = Path(tempfile.mkdtemp(prefix=".k3s-", dir=dest.parent))
    try:
        argv: list[str | Path] = [k3s, "etcd-snapshot", "save", "--dir", workdir, "--name", "edgefleet"]
        result = await procs.run(argv, timeout=config.timeout_seconds)
        os.replace(_only_file(workdir), dest)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _only_file(directory: Path) -> Path:
    written = [p for p in directory.iterdir() if p.is_file()]
    if len(written) != 1:
        raise BackendError(f"k3s etcd-snapshot save: expected one file in {directory}, found {len(written)}")
    return written[0]
