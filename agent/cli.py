"""``edgefleet-agent``: the daemon and the operator's commands at the node.

Each command module contributes its subcommands through ``add_commands(subparsers)``; a
subcommand sets ``func(args) -> int`` (the exit code, see :mod:`agent.exitcodes`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from agent import exitcodes

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

#: The module that registers each top-level command (its ``add_commands``).
COMMAND_MODULES = {
    "run": "agent.daemon", "status": "agent.status_cli", "snapshot": "agent.snapshots", "bundle": "agent.intake",
    "install": "agent.installer",
}


def _registrars(command: str | None = None) -> list[Registrar]:
    """The registrars of ``command``'s module only, or of every module (``--help``, unknown commands).

    Why not always all: the daemon (``run``) would import the snapshot and install CLIs and what
    they import (APScheduler, the uploader's urllib/email, ...) for nothing: memory it keeps for
    its lifetime. Imported here, not at module level, so ``edgefleet-agent --help`` stays cheap
    and one broken module is loud.
    """
    names = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else list(dict.fromkeys(COMMAND_MODULES.values()))
    return [importlib.import_module(name).add_commands for name in names]


def _command_of(argv: Sequence[str]) -> str | None:
    """The top-level command in ``argv`` (the first word that is not an option or ``--config``'s value)."""
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
        elif arg in ("-h", "--help"):
            return None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given ``argv``, with only the subcommands of the command it names."""
    parser = argparse.ArgumentParser(prog="edgefleet-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="/etc/edgefleet/agent.yaml", help="agent config file (YAML)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _registrars(None if argv is None else _command_of(argv)):
        register(subparsers)
    return parser


def _without_rich() -> None:
    """Off a TTY, make ``rich`` look absent before anything imports structlog.

    structlog.dev (imported by structlog itself) loads rich, when installed, for pretty console
    tracebacks: ~4 MiB of RSS in every agent process (the daemon, whose stdout is the journal;
    ``bundle import`` run by the inbox unit or a script). Nodes do not have rich; development
    venvs do (typer pulls it in), so without this the figures measured there are not a node's.
    On a TTY an operator keeps the pretty tracebacks. structlog's documented fallback when rich
    is missing is plain tracebacks.
    """
    if "rich" not in sys.modules and not sys.stdout.isatty():
        sys.modules["rich"] = None  # type: ignore[assignment]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _without_rich()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return exitcodes.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
