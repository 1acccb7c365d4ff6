"""`python -m hub.demo` end to end: three sim sites with real agents install the signed IDP bundle,
reported through the real broker into the hub API; Ctrl-C stops everything; a second run works."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _start(work: Path, platform: Path, *extra: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hub.demo", "--platform-dir", str(platform), "--work-dir", str(work),
         "--port", "0", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _stop(proc: subprocess.Popen[str], work: Path) -> None:
    """After a failed assertion: Ctrl-C first (the demo stops its children), and if the demo is beyond
    that, kill it and stop the children it recorded, so a failing test leaves no fleet running."""
    from hub import demo

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    demo.reap_previous(work)


def _leftovers(work: Path) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(work) in cmd:
                found.append(f"{entry.name}: {cmd[:200]}")
    return found


def _sites(url: str) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"{url}/api/v1/sites", timeout=5) as r:
        items: list[dict[str, object]] = json.loads(r.read())["items"]
        return items


def _screenshots(url: str) -> None:
    from dash_harness import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            page.goto(f"{url}/dashboard/")
            page.wait_for_selector("#sites tbody tr[data-site='site-3']")
            page.screenshot(path=str(ARTIFACTS / "demo-overview.png"), full_page=True)
            page.goto(f"{url}/dashboard/sites/site-1")
            page.wait_for_selector(".comp[data-component='argo-cd']")
            page.wait_for_selector("#snapshots tbody tr:not(.empty)")
            page.screenshot(path=str(ARTIFACTS / "demo-site.png"), full_page=True)
        finally:
            browser.close()


@pytest.mark.slow
def test_demo_three_sites_install_then_ctrl_c_and_rerun(tmp_path: Path, platform: Path) -> None:
    work = tmp_path / "demo"
    proc, lines = _start(work, platform, "--duration", "600")
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None:
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "no dashboard URL printed:\n" + "".join(lines)
            m = re.search(r"dashboard at\s+(http://127\.0\.0\.1:\d+)/dashboard/", "".join(lines))
            url = m.group(1) if m else None
            time.sleep(0.5)
        deadline = time.monotonic() + 400
        while True:
            assert proc.poll() is None, "".join(lines)
            sites = _sites(url)
            done = sorted(str(s["site"]) for s in sites if s["bundle_version"] == "1.0.0")
            if done == ["site-1", "site-2", "site-3"]:
                break
            assert time.monotonic() < deadline, f"sites {sites}\n" + "".join(lines)
            time.sleep(2)
        assert {s["bundle_name"] for s in sites} == {"idp-platform"}
        assert all(s["online"] for s in sites)
        # Snapshot now, end to end: hub -> broker -> agent -> etcdctl against the site's real etcd -> event.
        token = re.search(r"operator token .*:\s+(\S+)", "".join(lines)).group(1)  # type: ignore[union-attr]
        req = urllib.request.Request(f"{url}/api/v1/sites/site-1/commands", data=b'{"name": "snapshot-now"}',
                                     method="POST", headers={"Authorization": f"Bearer {token}",
                                                             "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            cmd_id = json.loads(r.read())["cmd_id"]
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(f"{url}/api/v1/commands/{cmd_id}", timeout=5) as r:
                cmd = json.loads(r.read())
            with urllib.request.urlopen(f"{url}/api/v1/events?site=site-1&type=snapshot.", timeout=5) as r:
                snaps = [e for e in json.loads(r.read())["items"] if e["type"] == "snapshot.succeeded"
                         and e["ts"] > cmd["issued"]]
            if cmd["state"] == "accepted" and snaps:
                break
            assert time.monotonic() < deadline, f"{cmd} {snaps}"
            time.sleep(1)
        _screenshots(url)
        # The dashboard is served, offline (no external URL in the page).
        with urllib.request.urlopen(f"{url}/dashboard/", timeout=5) as r:
            page = r.read().decode()
        assert "/dashboard/static/app.js" in page and "http" not in page.replace("http-equiv", "")
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(90) == 0, "".join(lines)
    finally:
        _stop(proc, work)
    time.sleep(0.5)
    assert _leftovers(work) == [], "processes left behind after Ctrl-C"
    assert "stopped" in lines[-1]

    # A second run in the same work dir starts from scratch and works (one site, to keep it short),
    # this time on the embedded amqtt broker (MQTT 3.1.1) a machine without mosquitto would get.
    proc2, lines2 = _start(work, platform, "--sites", "1", "--until-installed", "--duration", "300",
                           "--broker", "amqtt")
    try:
        assert proc2.wait(400) == 0, "".join(lines2)
    finally:
        _stop(proc2, work)
    assert any("all 1 sites have the bundle installed" in line for line in lines2), "".join(lines2)
    assert any("EMBEDDED amqtt, DEMO ONLY" in line for line in lines2)
    assert _leftovers(work) == []


def test_demo_missing_platform_dir_is_one_clear_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "hub.demo", "--platform-dir", str(tmp_path / "nope"), "--work-dir", str(tmp_path / "w")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "platform dir" in r.stderr and "does not exist" in r.stderr
    assert not (tmp_path / "w").exists(), "nothing may be created before the input is checked"


def test_demo_script_commands_are_accepted_by_the_tools(tmp_path: Path) -> None:
    """The things-to-try the demo prints are real commands: the sim's own parser accepts every
    `edgefleet-sim node ...` line, against the kubeconfig path the demo writes for site-1."""
    import shlex

    from hub import demo
    from sim import cli as sim_cli

    work = tmp_path / "demo"
    text = demo.script(url="http://127.0.0.1:8080", token="t0k3n", work=work,
                       broker=demo.Broker(kind="mosquitto", port=1883, argv=[]), snapshots=True)
    sim_lines = [shlex.split(line) for line in text.splitlines() if " node " in line and "--kubeconfig" in line]
    actions = []
    for argv in sim_lines:
        args = sim_cli.build_parser().parse_args(argv[argv.index("node"):])
        assert args.kubeconfig == work / "site-1" / "kubeconfig.yaml"
        assert args.name in demo.NODES
        actions.append(args.action)
    assert sorted(set(actions)) == ["fail", "restore"]
    assert f"kill $(cat {work}/broker.pid)" in text and demo.SNAPSHOT_SCHEDULE in text
    assert "/dashboard/" in text and "t0k3n" in text


def _overview(url: str) -> dict[str, dict[str, object]]:
    with urllib.request.urlopen(f"{url}/dashboard/api/overview", timeout=5) as r:
        return {str(s["site"]): s for s in json.loads(r.read())["sites"]}


@pytest.mark.slow
def test_demo_broker_cut_sites_go_stale_and_report_again(tmp_path: Path, platform: Path) -> None:
    """Step 2 of the printed script: `kill $(cat .demo/broker.pid)`. The demo restarts the broker after
    a while; meanwhile the site shows stale on the dashboard, afterwards it reports again."""
    work = tmp_path / "demo"
    proc, lines = _start(work, platform, "--sites", "1", "--no-etcd", "--duration", "400")

    def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + "".join(lines)
            time.sleep(0.5)

    try:
        found: list[str] = []

        def url_printed() -> bool:
            m = re.search(r"dashboard at\s+(http://127\.0\.0\.1:\d+)/dashboard/", "".join(lines))
            found.extend([m.group(1)] if m else [])
            return bool(m)

        wait_for("the dashboard URL", url_printed, 180)
        url = found[0]
        wait_for("site-1 reporting", lambda: _overview(url).get("site-1", {}).get("online") is True, 120)
        os.kill(int((work / "broker.pid").read_text()), signal.SIGTERM)  # what the script says to do
        wait_for("the demo to notice", lambda: any("broker is down" in line for line in lines), 30)
        wait_for("site-1 stale", lambda: _overview(url)["site-1"]["display"] == "stale", 60)
        wait_for("the broker back", lambda: any("broker is back" in line for line in lines), 60)
        wait_for("site-1 reporting again",
                 lambda: _overview(url)["site-1"]["display"] != "stale" and _overview(url)["site-1"]["online"] is True,
                 60)
        # The console says so too (its watcher polls the store once a second).
        for said in ("site-1: STALE (no reports)", "site-1: reporting again"):
            wait_for(f"'{said}' on the console", lambda said=said: any(said in line for line in lines), 10)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0, "".join(lines)
    finally:
        _stop(proc, work)
    time.sleep(0.5)
    assert _leftovers(work) == [], "processes left behind after Ctrl-C"


@pytest.mark.slow
def test_demo_node_failure_turns_the_site_yellow_red_and_back(tmp_path: Path, platform: Path) -> None:
    """Step 1 of the printed script, with the commands it prints: fail one worker (Yellow), the second
    (Red), restore both (Green again), as the dashboard's overview shows it."""
    work = tmp_path / "demo"
    proc, lines = _start(work, platform, "--sites", "1", "--no-etcd", "--duration", "900")

    def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + "".join(lines)
            time.sleep(1)

    def display() -> object:
        return _overview(url).get("site-1", {}).get("display")

    try:
        wait_for("the things to try", lambda: any("Things to try" in line for line in lines), 240)
        url = re.search(r"dashboard at\s+(http://127\.0\.0\.1:\d+)/dashboard/", "".join(lines)).group(1)  # type: ignore[union-attr]
        printed = [line.strip() for line in lines if " node " in line and "--kubeconfig" in line]
        wait_for("the bundle installed", lambda: any("bundle idp-platform-1.0.0 installed" in ln for ln in lines), 400)
        wait_for("site-1 green", lambda: display() == "green", 120)
        for command, state in zip(printed, ("yellow", "red", None, "green"), strict=True):
            subprocess.run(shlex.split(command), check=True, timeout=60, capture_output=True)
            if state is not None:
                wait_for(f"site-1 {state} after `{command}`", lambda state=state: display() == state, 180)
    finally:
        _stop(proc, work)
    assert proc.returncode == 0, "".join(lines)
    assert _leftovers(work) == []
