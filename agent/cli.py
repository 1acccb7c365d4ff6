"""``edgefleet-agent``: the daemon and the operator's commands at the node.

Each command module contributes its subcommands through ``add_commands(subparsers)``; a
subcommand sets ``func(args) -> int`` (the exit code, see :mod:`agent.exitcodes`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from agent import exitcodes

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _registrars() -> list[Registrar]:
    # Imported here so `edgefleet-agent --help` stays cheap and one broken module is loud.
    from agent import daemon, installer, intake, snapshots, status_cli

    registrars: list[Registrar] = [
        daemon.add_commands, status_cli.add_commands, snapshots.add_commands, intake.add_commands,
        installer.add_commands,
    ]
    return registrars


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefleet-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="/etc/edgefleet/agent.yaml", help="agent config file (YAML)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _registrars():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return exitcodes.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
