"""``edgefleet-sim`` as a process: TLS with a generated CA, bearer token, admin fault injection, exit codes."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from kubernetes_asyncio import client, config
from sim_helpers import Kubectl

import sim.testing
from sim import cli


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sim.cli", *args], capture_output=True, text=True, timeout=60)


def test_tls_token_kubectl_and_admin_cli(tmp_path: Path) -> None:
    with sim.testing.start_process(speed=100, tls=True, token="s3cret", workdir=tmp_path) as site:
        assert site.url.startswith("https://127.0.0.1:")
        k = Kubectl(site.kubeconfig, tmp_path / "cache")
        assert "agent-0" in k("get", "nodes")
        assert (site.kubeconfig.stat().st_mode & 0o777) == 0o600  # it holds the token
        ctx = ssl.create_default_context(cafile=str(tmp_path / "pki" / "ca.crt"))
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(site.url + "/api/v1/nodes", context=ctx, timeout=5)  # noqa: S310
        assert exc.value.code == 401 and json.loads(exc.value.read())["reason"] == "Unauthorized"
        out = _cli("node", "fail", "agent-0", "--kubeconfig", str(site.kubeconfig))
        assert out.returncode == 0 and out.stdout.strip() == "node agent-0: failed"
        deadline = time.monotonic() + 15
        while "NotReady" not in k("get", "node", "agent-0"):
            assert time.monotonic() < deadline, "agent-0 never turned NotReady"
            time.sleep(0.1)
        assert _cli("node", "restore", "agent-0", "--kubeconfig", str(site.kubeconfig)).returncode == 0
        deadline = time.monotonic() + 15
        while "NotReady" in k("get", "node", "agent-0"):
            assert time.monotonic() < deadline, "agent-0 never came back"
            time.sleep(0.1)
        out = _cli("node", "partition", "agent-1", "--kubeconfig", str(site.kubeconfig))
        assert out.returncode == 0 and out.stdout.strip() == "node agent-1: partitioned"
        deadline = time.monotonic() + 15
        while "NotReady" not in k("get", "node", "agent-1"):
            assert time.monotonic() < deadline, "agent-1 never turned NotReady"
            time.sleep(0.1)
        state = json.loads(urllib.request.urlopen(urllib.request.Request(  # noqa: S310
            site.url + "/sim/state", headers={"Authorization": "Bearer s3cret"}), context=ctx, timeout=5).read())
        assert state["nodes"]["agent-1"]["state"] == "partitioned" and state["nodes"]["agent-0"]["state"] == "up"
        assert _cli("node", "restore", "agent-1", "--kubeconfig", str(site.kubeconfig)).returncode == 0
        bad = _cli("node", "fail", "agent-9", "--kubeconfig", str(site.kubeconfig))
        assert bad.returncode == cli.EXIT_ADMIN and 'nodes "agent-9" not found' in bad.stderr
        # a wrong token is refused by the admin endpoint too
        wrong = tmp_path / "wrong.yaml"
        wrong.write_text(site.kubeconfig.read_text().replace("s3cret", "nope"))
        denied = _cli("node", "partition", "agent-1", "--kubeconfig", str(wrong))
        assert denied.returncode == cli.EXIT_ADMIN and "401" in denied.stderr


async def test_kubernetes_asyncio_over_tls_with_token(tmp_path: Path) -> None:
    async with sim.testing.running(tls=True, token="t0k", workdir=tmp_path) as site:
        cfg = client.Configuration()
        await config.load_kube_config(config_file=str(site.kubeconfig), client_configuration=cfg)
        async with client.ApiClient(configuration=cfg) as api:
            nodes = await client.CoreV1Api(api).list_node()
        assert sorted(n.metadata.name for n in nodes.items) == ["agent-0", "agent-1", "server-0"]


def test_bad_arguments_and_busy_port(tmp_path: Path) -> None:
    out = _cli("run", "--kubeconfig-out", str(tmp_path / "k"), "--speed", "0")
    assert out.returncode == 2 and "must be > 0" in out.stderr
    out = _cli("run", "--kubeconfig-out", str(tmp_path / "k"), "--nodes", "a,a")
    assert out.returncode == 2 and "duplicate node names" in out.stderr
    out = _cli("node", "fail", "x", "--kubeconfig", str(tmp_path / "missing.yaml"))
    assert out.returncode == cli.EXIT_USAGE and "kubeconfig not found" in out.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = _cli("run", "--port", str(port), "--kubeconfig-out", str(tmp_path / "k"))
    assert out.returncode == cli.EXIT_PORT and f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert not (tmp_path / "k").exists()
