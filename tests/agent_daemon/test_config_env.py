"""Environment overrides of the agent's config (``EDGEFLEET_AGENT_*``), read by agent/config.py itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent import config


def _file(tmp_path: Path, **doc: object) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"site_id": "store-1", **doc}))
    return path


def test_env_wins_and_merges_into_the_file_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _file(tmp_path, link={"host": "hub.file", "port": 1884}, daemon={"drain_seconds": 5})
    monkeypatch.setenv("EDGEFLEET_AGENT_LINK__HOST", "hub.env")
    monkeypatch.setenv("edgefleet_agent_daemon__restart_max_seconds", "7")  # names are case-insensitive
    monkeypatch.setenv("EDGEFLEET_AGENT_SITE_ID", "store-2")
    monkeypatch.setenv("EDGEFLEET_AGENT_IMAGES__GC_COMMAND", '["crictl", "rmi", "--prune"]')  # a list is JSON
    monkeypatch.setenv("EDGEFLEET_AGENT_NOT_A_FIELD", "x")  # not ours: ignored, as pydantic-settings does
    cfg = config.load(path)
    assert cfg.site_id == "store-2"
    assert (cfg.link.host, cfg.link.port) == ("hub.env", 1884)  # the file's port survives the merge
    assert (cfg.daemon.drain_seconds, cfg.daemon.restart_max_seconds) == (5, 7)
    assert cfg.images.gc_command == ["crictl", "rmi", "--prune"]


def test_a_whole_section_as_json_merges_with_its_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_AGENT_HTTP", '{"port": 9999, "host": "127.0.0.2"}')
    monkeypatch.setenv("EDGEFLEET_AGENT_HTTP__PORT", "9998")
    cfg = config.load(_file(tmp_path))
    assert (cfg.http.host, cfg.http.port) == ("127.0.0.2", 9998)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("EDGEFLEET_AGENT_HTTP__PORT", "70000", "environment EDGEFLEET_AGENT_HTTP__PORT"),
        ("EDGEFLEET_AGENT_LINK__HOTS", "hub", "link.hots"),  # a typo below the top level is an error
        ("EDGEFLEET_AGENT_IMAGES__GC_COMMAND", "[crictl", "EDGEFLEET_AGENT_IMAGES__GC_COMMAND: not valid JSON"),
    ],
)
def test_bad_env_value_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(config.ConfigError) as err:
        config.load(_file(tmp_path))
    assert expected in str(err.value) and "\n" not in str(err.value)
