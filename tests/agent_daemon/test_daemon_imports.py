"""What the daemon process loads at start: only what an idle daemon needs (memory it keeps for life)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import asyncio, sys
from pathlib import Path
from agent import cli, config, snapshots
from agent.context import AgentContext
from agent.state import StateStore
cli.build_parser(["--config", "x", "run"])
cfg = config.AgentConfig(site_id="probe", state_dir=Path(sys.argv[1]), snapshots={"enabled": False})
asyncio.run(snapshots.run(AgentContext(config=cfg, store=StateStore.open(cfg.state_dir))))
print(sorted({m.split(".")[0] for m in sys.modules if m.startswith(("apscheduler", "tzlocal", "cryptography"))}))
print(sorted(m for m in sys.modules if m.startswith("agent.snapshots.")))
"""


def test_run_loads_neither_the_snapshot_scheduler_nor_the_other_clis(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "state")], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.splitlines()[-2:] == ["[]", "['agent.snapshots.catalog']"]


def test_snapshot_command_still_registers_its_subcommands() -> None:
    from agent import cli

    parser = cli.build_parser(["snapshot", "list"])
    assert parser.parse_args(["snapshot", "list"]).command == "snapshot"
    assert set(cli.COMMAND_MODULES) == {"run", "status", "snapshot", "bundle", "install"}



def test_agent_commands_off_a_tty_do_not_load_rich() -> None:
    """rich (in development venvs through typer, not on nodes) is ~5 MiB an agent process would keep."""
    pytest.importorskip("rich")
    probe = "import sys, structlog\nprint(sys.modules.get('rich') is not None)"
    through_cli = "from agent import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n" + probe
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
            for code in (through_cli, probe)]
    assert [out.stdout.splitlines()[-1] for out in outs] == ["False", "True"]
