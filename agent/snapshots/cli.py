"""``edgefleet-agent snapshot now|list|restore-plan``.

``snapshot now`` takes the snapshot in this process rather than asking the daemon: it works
with the daemon stopped (the usual state before maintenance) and reports the real outcome
as its exit code. The directory lock keeps it from overlapping a scheduled run; it waits for
a running one to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

import structlog

from agent import config as agent_config
from agent import exitcodes, logs
from agent.context import AgentContext
from agent.snapshots import binaries, catalog, procs, restore, status, take, verify
from agent.state import StateStore


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("snapshot", help="etcd snapshots: take, list, plan a restore")
    commands = parser.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")

    now = commands.add_parser("now", help="take, verify and record a snapshot now")
    now.set_defaults(func=_cmd_now)

    listing = commands.add_parser("list", help="list the snapshots in the catalog, newest first")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=_cmd_list)

    plan = commands.add_parser("restore-plan", help="verify a snapshot and print the commands to restore it")
    plan.add_argument("snapshot", help="catalog name (see `snapshot list`) or path of a snapshot file")
    plan.add_argument(
        "--distribution", choices=["k3s", "kubeadm"], help="default: from snapshots.backend/preset in the config"
    )
    plan.add_argument("--etcd-manifest", type=Path, default=restore.KUBEADM_MANIFEST, help=argparse.SUPPRESS)
    plan.set_defaults(func=_cmd_restore_plan)


def _fail(code: int, message: str) -> int:
    print(f"edgefleet-agent snapshot: {message}", file=sys.stderr)
    return code


def _open(args: argparse.Namespace) -> tuple[agent_config.AgentConfig, StateStore]:
    # The command prints its own result; events still reach the outbox. Keep stdout for results.
    logs.setup(level=logging.CRITICAL)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    cfg = agent_config.load(Path(args.config))
    store = StateStore.open(cfg.state_dir)
    catalog.setup(store)
    return cfg, store


def _cmd_now(args: argparse.Namespace) -> int:
    try:
        cfg, store = _open(args)
    except agent_config.ConfigError as exc:
        return _fail(exitcodes.CONFIG, str(exc))
    try:
        ctx = AgentContext(config=cfg, store=store)
        outcome = asyncio.run(take.take(ctx, trigger="manual", lock_wait=cfg.snapshots.timeout_seconds * 2))
    finally:
        store.close()
    if not outcome.ok:
        return _fail(exitcodes.SNAPSHOT_FAILED, f"{outcome.kind}: {outcome.message}")
    entry = outcome.entry
    assert entry is not None
    print(f"{entry.path}  revision {entry.revision}  {entry.total_keys} keys  {entry.file_size} bytes  verified")
    return exitcodes.OK


def _cmd_list(args: argparse.Namespace) -> int:
    try:
        cfg, store = _open(args)
    except agent_config.ConfigError as exc:
        return _fail(exitcodes.CONFIG, str(exc))
    try:
        entries = catalog.entries(store)
        info = status.info(store, cfg.snapshots, now=datetime.now(UTC))
        fails = status.failures(store)
    finally:
        store.close()
    if args.json:
        doc = {
            "status": info.model_dump(mode="json"),
            "last_error": fails["last_error"] if fails["consecutive"] else None,
            "snapshots": [
                {
                    "name": e.name,
                    "path": str(e.path),
                    "taken": e.taken.isoformat(),
                    "revision": e.revision,
                    "keys": e.total_keys,
                    "etcd_hash": e.etcd_hash,
                    "size_bytes": e.size,
                    "file_bytes": e.file_size,
                    "sha256": e.sha256,
                    "duration_seconds": round(e.duration, 3),
                    "backend": e.backend,
                    "trigger": e.trigger,
                    "verified": e.verified,
                }
                for e in entries
            ],
        }
        print(json.dumps(doc, indent=2))
        return exitcodes.OK
    print(f"{'NAME':<36} {'TAKEN (UTC)':<20} {'REVISION':>10} {'KEYS':>8} {'SIZE':>12} {'BACKEND':<8} VERIFIED")
    for e in entries:
        print(
            f"{e.name:<36} {e.taken:%Y-%m-%d %H:%M:%S} {e.revision:>10} {e.total_keys:>8} {e.file_size:>12} "
            f"{e.backend:<8} {'yes' if e.verified else 'NO'}"
        )
    if not entries:
        print("(no snapshots)")
    if fails["consecutive"]:
        print(f"\n{fails['consecutive']} failed attempt(s) since the last success; last error: {fails['last_error']}")
    return exitcodes.OK


def _cmd_restore_plan(args: argparse.Namespace) -> int:
    try:
        cfg, store = _open(args)
    except agent_config.ConfigError as exc:
        return _fail(exitcodes.CONFIG, str(exc))
    try:
        return _restore_plan(args, cfg, store)
    finally:
        store.close()


def _distribution(args: argparse.Namespace, cfg: agent_config.AgentConfig) -> str | None:
    if args.distribution:
        return str(args.distribution)
    if cfg.snapshots.backend == "k3s":
        return "k3s"
    return cfg.snapshots.preset if cfg.snapshots.preset in ("k3s", "kubeadm") else None


async def _etcdutl_facts(etcdutl: Path) -> tuple[str | None, bool]:
    """(version, supports --bump-revision) of the etcdutl we found."""
    version: str | None = None
    try:
        out = (await procs.run([etcdutl, "version"], timeout=30)).stdout.decode("utf-8", "replace")
        version = out.split("etcdutl version:")[1].split()[0] if "etcdutl version:" in out else None
        helptext = (await procs.run([etcdutl, "snapshot", "restore", "--help"], timeout=30)).stdout
    except procs.CommandFailed:
        return version, False
    return version, b"--bump-revision" in helptext


def _restore_plan(args: argparse.Namespace, cfg: agent_config.AgentConfig, store: StateStore) -> int:
    distribution = _distribution(args, cfg)
    if distribution is None:
        return _fail(exitcodes.USAGE, "preset 'custom': say --distribution k3s or --distribution kubeadm")
    entry = catalog.get(store, args.snapshot)
    path = entry.path if entry else Path(args.snapshot).resolve()
    if entry is None:
        entry = next((e for e in catalog.entries(store) if e.path == path), None)
    if not path.is_file():
        return _fail(exitcodes.NOT_FOUND, f"{args.snapshot}: not in the catalog and no such file")
    try:
        etcdutl = binaries.find("etcdutl", explicit=cfg.snapshots.etcdutl)
    except binaries.BinaryNotFound as exc:
        return _fail(exitcodes.UNAVAILABLE, f"cannot verify the snapshot: {exc}")

    compressed = path.name.endswith(verify.ZST_SUFFIX)
    raw_path = path
    if compressed:
        restore_dir = cfg.snapshot_dir / "restore"
        restore_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        raw_path = restore_dir / path.name.removesuffix(verify.ZST_SUFFIX)
        need = (entry.size if entry else path.stat().st_size * 4) + (64 << 20)
        if shutil.disk_usage(restore_dir).free < need:
            return _fail(exitcodes.SNAPSHOT_FAILED, f"not enough free space in {restore_dir} to decompress {path.name}")
        raw_path.unlink(missing_ok=True)
    try:
        etcd_status, digest = asyncio.run(
            verify.verify_stored(
                path,
                etcdutl=etcdutl,
                timeout=cfg.snapshots.timeout_seconds,
                expected_sha256=entry.sha256 if entry else None,
                keep_raw=raw_path if compressed else None,
            )
        )
    except verify.VerificationFailed as exc:
        if entry is not None:
            catalog.mark_verified(store, entry.name, verified=False, at=datetime.now(UTC))
        return _fail(exitcodes.SNAPSHOT_FAILED, f"{path.name} fails verification, do not restore it: {exc}")
    if entry is not None:
        catalog.mark_verified(store, entry.name, verified=True, at=datetime.now(UTC))

    header = [
        f"# Restore plan for site {cfg.site_id} ({distribution})",
        f"# Snapshot: {path}" + (f"  (decompressed and verified: {raw_path})" if compressed else ""),
        f"# Verified now: revision {etcd_status.revision}, {etcd_status.total_keys} keys, etcd hash "
        f"{etcd_status.etcd_hash}, sha256 {digest.sha256}"
        + (", matches the catalog" if entry else " (not in the catalog: nothing to compare with)"),
    ]
    if entry is not None:
        header.append(f"# Taken {entry.taken:%Y-%m-%d %H:%M:%S} UTC by {entry.backend}")
    if distribution == "k3s":
        plan = restore.k3s_plan(raw_path)
    else:
        version, supports_bump = asyncio.run(_etcdutl_facts(etcdutl))
        header.append(f"# etcdutl used for checking: {etcdutl} ({version or 'unknown version'})")
        plan = restore.kubeadm_plan(
            raw_path,
            member=restore.read_member(args.etcd_manifest),
            etcdutl_version=version,
            supports_bump=supports_bump,
            stamp=restore.stamp(),
        )
    print(plan.render(header=header), end="")
    return exitcodes.OK
