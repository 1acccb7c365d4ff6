"""What the daemon process loads at start: only what an idle daemon needs (memory it keeps for life)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
