"""``edgefleet-hub``: run the hub, create its command key, migrate its database.

Exit codes (:mod:`agent.exitcodes`): 0 ok, 2 usage, 3 bad config or key, 6 database or broker
unavailable at start, 70 internal error. Every failure prints one line naming what was wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
import structlog

from agent import exitcodes
from agent import logs as agent_logs
from hub import commands, service
from hub import config as hub_config
from hub.store import open_store


def _fail(message: str, code: int) -> int:
    print(f"edgefleet-hub: {message}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace) -> hub_config.HubConfig:
    path = Path(args.config) if args.config else None
    if path is None and hub_config.DEFAULT_PATH.is_file():
        path = hub_config.DEFAULT_PATH
    return hub_config.load(path)


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
    except hub_config.ConfigError as exc:
        return _fail(str(exc), exitcodes.CONFIG)
    agent_logs.setup(cfg.log_format)
    try:
        asyncio.run(_serve(cfg))
    except commands.CommandError as exc:
        return _fail(f"commands.key_file: {exc}", exitcodes.CONFIG)
    except sa.exc.OperationalError as exc:
        return _fail(
            f"database unavailable ({cfg.db_url.split('://', 1)[0]}): {str(exc.orig)[:200]}", exitcodes.UNAVAILABLE
        )
    except OSError as exc:
        return _fail(f"cannot start: {exc}", exitcodes.UNAVAILABLE)
    return exitcodes.OK


async def _serve(cfg: hub_config.HubConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with service.running(cfg):
        await stop.wait()
        structlog.get_logger("edgefleet.hub").info("stopping")


def _cmd_keygen(args: argparse.Namespace) -> int:
    try:
        key, pub, keyid = commands.keygen(Path(args.out), overwrite=args.force)
    except commands.CommandError as exc:
        return _fail(str(exc), exitcodes.CONFIG)
    except OSError as exc:
        return _fail(f"cannot write key into {args.out}: {exc.strerror}", exitcodes.CONFIG)
    print(f"private key: {key} (mode 0600; set commands.key_file to it)")
    print(f"public key:  {pub} (install on every site as <trust_dir>/hub-command.pub)")
    print(f"key id:      {keyid}")
    return exitcodes.OK


def _cmd_migrate(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
    except hub_config.ConfigError as exc:
        return _fail(str(exc), exitcodes.CONFIG)
    try:
        store = open_store(cfg.db_url, migrate=True)
    except sa.exc.OperationalError as exc:
        return _fail(f"database unavailable: {str(exc.orig)[:200]}", exitcodes.UNAVAILABLE)
    try:
        print(f"database schema at revision {store.current_revision()}")
    finally:
        store.close()
    return exitcodes.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefleet-hub", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=None, help=f"hub config file (YAML); default {hub_config.DEFAULT_PATH} if it exists"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the hub: MQTT ingest, fleet store, API")
    run.set_defaults(func=_cmd_run)
    keygen = sub.add_parser("keygen", help="create the Ed25519 command key (hub-command.key + hub-command.pub)")
    keygen.add_argument("--out", required=True, help="directory for hub-command.key and hub-command.pub")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key (sites must get the new .pub)")
    keygen.set_defaults(func=_cmd_keygen)
    migrate = sub.add_parser("migrate", help="upgrade the database schema to the newest revision (Alembic)")
    migrate.set_defaults(func=_cmd_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        return exitcodes.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
