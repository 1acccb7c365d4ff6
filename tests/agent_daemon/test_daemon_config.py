"""Config mistakes: one line on stderr naming the field, exit code 3, nothing started."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from daemon_helpers import AGENT, agent_env, write_config

from agent import exitcodes


def _run(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGENT, "--config", str(config), "run"], capture_output=True, text=True, timeout=60, env=agent_env(**env)
    )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"http": {"port": 70000}}, "http.port"),
        ({"daemon": {"drain_seconds": -1}}, "daemon.drain_seconds"),
        ({"site_id": "Not A Site"}, "site_id"),
        ({"daemon": {"restart_max_secnds": 3}}, "daemon.restart_max_secnds"),  # typo: unknown keys are errors
    ],
)
def test_bad_field_is_named_in_one_line(tmp_path: Path, overrides: dict[str, object], field: str) -> None:
    result = _run(write_config(tmp_path, **overrides))
    assert result.returncode == exitcodes.CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert field in lines[0]
    assert not (tmp_path / "state").exists(), "a config error must not create state"


def test_env_override_error_names_the_field(tmp_path: Path) -> None:
    result = _run(write_config(tmp_path), EDGEFLEET_AGENT_DAEMON__DRAIN_SECONDS="soon")
    assert result.returncode == exitcodes.CONFIG
    assert len(result.stderr.strip().splitlines()) == 1
    assert "daemon.drain_seconds" in result.stderr


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text("site_id: [unclosed\n")
    result = _run(bad)
    assert result.returncode == exitcodes.CONFIG
    assert "invalid YAML" in result.stderr and len(result.stderr.strip().splitlines()) == 1

    result = _run(tmp_path / "nope.yaml")
    assert result.returncode == exitcodes.CONFIG
    assert "nope.yaml" in result.stderr and len(result.stderr.strip().splitlines()) == 1
