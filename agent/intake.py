"""Bundle intake: a file (CLI, hub download, inbox) → verified, staged, queued for install.

Nothing from a bundle is used before :func:`bundles.verify.verify_and_stage` accepted every
byte against the site's effective trust root and the anti-rollback high-water mark (release,
created) of the last *committed* bundle. Verification runs in a short-lived child process
(:mod:`agent.verifyproc`), so the verifier's ``cryptography`` never stays in the daemon; its
failures come back as the same error classes and messages, and a child that dies is a
rejection (``verifier-failed``).

Trust root: ``<trust_dir>/root.json`` is the operator-installed seed (read-only to the agent under
its systemd unit); rotations carried by verified bundles are stored in the state directory
(``config.trust_chain``) and re-walked from the seed on every load
(:func:`bundles.trust.load_effective`). A stored chain that does not walk from the seed, or one
that yields a lower version than this site already trusted (file deleted or swapped for an older
one), refuses every bundle with a ``trust.refused`` event until an operator fixes it: falling back
to the seed would silently re-trust retired keys. The effective root is recorded under
``site.trust`` for ``edgefleet-agent status``. A rejected bundle changes
nothing but the outbox (a ``bundle.rejected`` event saying why) and, for inbox files, where
the file lies (``inbox/rejected/`` next to a ``.reason`` file).

A version marked bad (its install was rolled back) is refused from the inbox, so a USB stick
left plugged in does not loop install → rollback; an explicit import (CLI, hub command)
clears the mark and tries again.

Inbox: regular files directly in ``config.inbox`` whose size has not changed for
:data:`SETTLE_SECONDS` (still being copied otherwise); names starting with ``.`` or ending in
``.part``/``.tmp`` are ignored. Each processed file is moved, never deleted, to
``inbox/done/`` or ``inbox/rejected/`` (a timestamp prefix keeps names unique).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent import exitcodes, installer, metrics, protocol, sitestatus, verifyproc
from agent.context import AgentContext
from agent.install import journal
from bundles import errors, split

log = structlog.get_logger("edgefleet.intake")

SETTLE_SECONDS = 2.0
#: How long a split bundle's index waits in the inbox for its missing parts before it is rejected.
PART_WAIT_SECONDS = 600.0
KUBE_VERSION_KEY = "kube.version"
STAGE_LOCK = "stage.lock"
_IGNORED_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")


class MarkedBad(errors.BundleError):
    """The bundle's version failed before and was rolled back; re-import it explicitly to retry."""

    reason = "marked-bad"
    exit_code = exitcodes.BUNDLE_REJECTED


@dataclass(frozen=True)
class ImportResult:
    bundle: str
    bundle_id: str
    release: int
    run_id: int
    cleared_bad: bool = False


def store_dir(ctx: AgentContext) -> Path:
    return ctx.config.state_dir / "bundles"


_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm"}


def _verify_in_child(ctx: AgentContext, path: Path) -> dict[str, Any]:
    """Effective trust root, verify + stage, rotation persistence: in a child (``agent.verifyproc``).

    The child's result says how far it got (``phase`` of a failure: ``trust``, ``verify``,
    ``rotation``), the effective root it used and, once staged, what it staged. One staging at a
    time per site, and never while the daemon sweeps stale staging dirs: the staging lock is held
    for the whole run, which also covers the rotation's re-read of the stored chain (the inbox
    unit's process may have stored a longer one meanwhile). A child that died is a rejection; the
    staging directory it may have left is swept under the same lock.
    """
    release, created = journal.highwater(ctx.store)
    request = {
        "op": "bundle", "path": str(path), "seed": str(ctx.config.trust_dir / "root.json"),
        "chain": str(ctx.config.trust_chain),
        "trusted_version": int((ctx.store.get(sitestatus.TRUST_KEY) or {}).get("version") or 0),
        "store_dir": str(store_dir(ctx)), "min_release": release, "min_created": created or None,
        # Compatibility: the cluster's version as the installer last saw it (None before the first
        # contact: then only the architecture is checked) and this node's CPU architecture.
        "kubernetes_version": ctx.store.get(KUBE_VERSION_KEY),
        "arch": _ARCH.get(platform.machine(), platform.machine()),
    }
    with installer.exclusive(ctx.config.state_dir, name=STAGE_LOCK, wait=True):
        try:
            return verifyproc.run(request)
        except verifyproc.VerifierFailed:
            verifyproc.run({"op": "cleanup", "store_dir": str(store_dir(ctx))})
            raise


def _trust_checked(ctx: AgentContext, *, record: dict[str, Any] | None = None,
                   error: errors.BundleError | None = None) -> None:
    """Record the effective root (or why it was refused) for ``status``; a new refusal is an event.

    The version recorded is a high-water mark: a refusal keeps the last trusted version, so a
    deleted chain file cannot lower it.
    """
    before = ctx.store.get(sitestatus.TRUST_KEY) or {}
    if record is not None:
        record = {**record, "error": None}
    else:
        assert error is not None
        record = {**before, "error": error.message}
        if before.get("error") != error.message:
            ctx.emit("trust.refused", f"bundle trust root refused: {error.message}", severity=protocol.Severity.ERROR,
                     data={"reason": error.reason, "error": error.message})
    if record != before:
        ctx.store.put(sitestatus.TRUST_KEY, record)


def _cleanup(ctx: AgentContext) -> None:
    """Sweep staging/trash dirs a crash left behind (all are dot-named).

    Looks first, so a clean store does not start the verifier child.
    """
    store = store_dir(ctx)
    if not store.is_dir() or not any(child.name.startswith(".") for child in store.iterdir()):
        return
    with installer.exclusive(ctx.config.state_dir, name=STAGE_LOCK, wait=True):
        verifyproc.run({"op": "cleanup", "store_dir": str(store)})


def _reject(ctx: AgentContext, path: Path, exc: errors.BundleError) -> None:
    metrics.BUNDLES_REJECTED.labels(exc.reason).inc()
    ctx.emit("bundle.rejected", f"bundle {path.name} rejected: {exc.message}", severity=protocol.Severity.ERROR,
             data={"file": path.name, "reason": exc.reason, "error": exc.message})


async def import_bundle(ctx: AgentContext, path: Path | str, *, explicit: bool = True) -> ImportResult:
    """Verify and stage ``path``, then queue its install. Raises ``bundles.errors.BundleError`` if refused.

    The hub's ``install-bundle`` command and ``edgefleet-agent bundle import`` call this with
    ``explicit=True``; the inbox with ``explicit=False`` (see the module docstring).
    """
    path = Path(path)
    journal.setup(ctx.store)
    existed = {p.name for p in store_dir(ctx).iterdir()} if store_dir(ctx).is_dir() else set()
    try:
        result = await asyncio.to_thread(_verify_in_child, ctx, path)
    except verifyproc.VerifierFailed as exc:
        _reject(ctx, path, exc)
        raise
    error = verifyproc.error_of(result["error"]) if "error" in result else None
    if result.get("phase") == "trust":
        assert error is not None
        _trust_checked(ctx, error=error)
        _reject(ctx, path, error)
        raise error
    _trust_checked(ctx, record=result["effective"])
    if result.get("phase") == "verify":
        assert error is not None
        if explicit or not _waiting_for_parts(path, error):
            _reject(ctx, path, error)
        raise error
    staged = result["staged"]
    staged_path = Path(staged["path"])
    if result.get("phase") == "rotation":
        assert error is not None
        if staged_path.name not in existed:
            shutil.rmtree(staged_path, ignore_errors=True)
        _reject(ctx, path, error)
        raise error
    if "rotated" in result:
        old, new = result["effective"]["version"], result["rotated"]["version"]
        ctx.emit("trust.rotated", f"bundle trust root rotated from v{old} to v{new}", data={"from": old, "to": new})
        _trust_checked(ctx, record=result["rotated"])
    rec = journal.BundleRecord(
        bundle_id=staged["bundle_id"], bundle=f"{staged['name']}-{staged['version']}", name=staged["name"],
        version=staged["version"], release=staged["release"], created=staged["created"],
        path=str(staged_path), manifest=(staged_path / "manifest.json").read_text(encoding="utf-8"),
    )
    bad = journal.bad_reason(ctx.store, rec.bundle)
    cleared = False
    if bad is not None:
        if not explicit:
            if staged_path.name not in existed:
                shutil.rmtree(staged_path, ignore_errors=True)
            marked = MarkedBad(f"{rec.bundle} was rolled back before ({bad}); import it explicitly to retry")
            _reject(ctx, path, marked)
            raise marked
        journal.clear_bad(ctx.store, rec.bundle)
        cleared = True
        ctx.emit("install.bad_cleared", f"{rec.bundle} re-imported: its bad mark is cleared",
                 data={"bundle": rec.bundle})
    with ctx.store.transaction():
        journal.record_bundle(ctx.store, rec)
        run = journal.new_run(ctx.store, rec)
    ctx.emit("bundle.accepted", f"bundle {rec.bundle} verified and queued for install",
             data={"bundle": rec.bundle, "bundle_id": rec.bundle_id, "release": rec.release,
                   "signers": staged["signers"]})
    installer.publish(ctx)
    return ImportResult(bundle=rec.bundle, bundle_id=rec.bundle_id, release=rec.release, run_id=run.id,
                        cleared_bad=cleared)


def _waiting_for_parts(path: Path, exc: errors.BundleError) -> bool:
    """The index of a split bundle often lands in the inbox before its parts have finished copying
    (a USB copy runs in file order): for a while, a missing part means "not yet", not "rejected"."""
    return isinstance(exc, errors.PartMissing) and _age_seconds(path) < PART_WAIT_SECONDS


def _age_seconds(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _settled(path: Path, now: float) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return now - st.st_mtime >= SETTLE_SECONDS


def _move(path: Path, folder: str, *, parts: list[Path] | None = None) -> Path:
    """Move a processed inbox file to ``folder``; a split bundle moves with its parts into a
    directory of its own, so the index still finds them by name (for a later re-import)."""
    if parts:
        bundle_dir = _move_target(path.parent / folder, path.name + ".d")
        bundle_dir.mkdir(parents=True)
        for part in parts:
            os.replace(part, bundle_dir / part.name)
        os.replace(path, bundle_dir / path.name)
        return bundle_dir / path.name
    dest = _move_target(path.parent / folder, path.name)
    os.replace(path, dest)
    return dest


def _move_target(dest_dir: Path, name: str) -> Path:
    """A free name in ``dest_dir`` (a timestamp prefix keeps repeated imports apart)."""
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{name}"
    n = 1
    while dest.exists():
        dest = dest_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{n}-{name}"
        n += 1
    return dest


async def import_inbox(ctx: AgentContext) -> list[tuple[Path, ImportResult | errors.BundleError]]:
    """Process every settled file in the inbox (oldest first); returns what happened to each."""
    inbox = ctx.config.inbox
    if not inbox.is_dir():
        return []
    now = time.time()
    files = sorted(
        (p for p in inbox.iterdir() if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
         and not p.name.endswith(_IGNORED_SUFFIXES) and _settled(p, now)),
        key=lambda p: p.stat().st_mtime,
    )
    out: list[tuple[Path, ImportResult | errors.BundleError]] = []
    if not files:
        return out
    with installer.exclusive(ctx.config.state_dir, name="inbox.lock", wait=True):
        for path in files:
            if path.exists():  # another process (the .path unit's, the daemon's) may have taken it
                out.append(await _import_file(ctx, path))
    return out


async def _import_file(ctx: AgentContext, path: Path) -> tuple[Path, ImportResult | errors.BundleError]:
    parts = _split_parts(path)
    try:
        result = await import_bundle(ctx, path, explicit=False)
    except errors.BundleError as exc:
        if _waiting_for_parts(path, exc):
            log.info("split bundle incomplete, waiting for its parts", bundle=path.name, error=exc.message)
            return path, exc
        dest = _move(path, "rejected", parts=parts)
        dest.with_name(dest.name + ".reason").write_text(f"{exc.reason}: {exc.message}\n", encoding="utf-8")
        return dest, exc
    return _move(path, "done", parts=parts), result


def _split_parts(path: Path) -> list[Path]:
    """The part files next to a split bundle's index (empty for a plain bundle or an unreadable index)."""
    try:
        if not split.is_split(path):
            return []
        doc = split.load_index(path)
    except (OSError, errors.BundleError):
        return []
    return [path.with_name(p["name"]) for p in doc["parts"] if path.with_name(p["name"]).is_file()]


async def rollback(ctx: AgentContext) -> dict[str, Any]:
    """Hub command ``rollback``: queue a re-install of the last good bundle (the installer runs it)."""
    run = installer.queue_rollback(ctx)
    return {"bundle": run.bundle, "run_id": run.id}


async def clear_bad_version(ctx: AgentContext, version: str) -> dict[str, Any]:
    """Hub command ``clear-bad-version``: ``version`` is ``<bundle name>-<version>``."""
    journal.setup(ctx.store)
    cleared = journal.clear_bad(ctx.store, version)
    if cleared:
        ctx.emit("install.bad_cleared", f"{version} may be installed again", data={"bundle": version})
        installer.publish(ctx)
    return {"bundle": version, "cleared": cleared}


def status(ctx: AgentContext) -> dict[str, Any]:
    """The current install state, for the hub and operators (see :func:`agent.installer.report`)."""
    return installer.report(ctx.store)


async def run(ctx: AgentContext) -> None:
    """Daemon task: watch the inbox (a directory poll: cheap, and works on any filesystem)."""
    journal.setup(ctx.store)
    await asyncio.to_thread(_cleanup, ctx)
    while True:
        for path, result in await import_inbox(ctx):
            log.info("inbox file processed", file=path.name, result=getattr(result, "bundle", None) or str(result))
        await asyncio.sleep(ctx.config.install.inbox_poll_seconds)


# --- CLI ---------------------------------------------------------------------------------------


def _cmd_import(ctx: AgentContext, args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(import_bundle(ctx, Path(args.file)))
    except errors.BundleError as exc:
        print(f"edgefleet-agent: {args.file}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    note = " (its bad mark was cleared)" if result.cleared_bad else ""
    print(f"{result.bundle} verified and queued for install{note}")
    return asyncio.run(installer.drive(ctx)) if args.wait else exitcodes.OK


def _cmd_import_inbox(ctx: AgentContext, args: argparse.Namespace) -> int:
    results = asyncio.run(import_inbox(ctx))
    code = exitcodes.OK
    for path, result in results:
        if isinstance(result, errors.BundleError) and path.parent == ctx.config.inbox:
            print(f"{path.name}: waiting for missing parts: {result.message}", file=sys.stderr)
        elif isinstance(result, errors.BundleError):
            print(f"{path.name}: rejected: {result.message}", file=sys.stderr)
            code = result.exit_code
        else:
            print(f"{path.name}: {result.bundle} queued for install")
    if args.wait and any(not isinstance(r, errors.BundleError) for _, r in results):
        waited = asyncio.run(installer.drive(ctx))
        code = code or waited
    return code


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("bundle", help="import signed bundles (verify, stage, queue the install)")
    sub = parser.add_subparsers(dest="bundle_command", required=True, metavar="ACTION")
    p = sub.add_parser("import", help="verify a bundle file and queue its install")
    p.add_argument("file")
    p.add_argument("--wait", action="store_true", help="install it in this process and wait for the result")
    p.set_defaults(func=installer.cli_command(_cmd_import))
    p = sub.add_parser("import-inbox", help="import every bundle file waiting in the inbox (the .path unit runs this)")
    p.add_argument("--wait", action="store_true", help="install in this process and wait for the result")
    p.set_defaults(func=installer.cli_command(_cmd_import_inbox))
