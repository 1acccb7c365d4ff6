"""``snapshot restore-plan``: the exact commands to restore a verified snapshot on this site.

The plan is printed, never executed: restoring etcd rewinds the whole cluster and is a
human decision. Everything the plan can know is filled in (paths, member name, peer URL,
tool versions); what it cannot know is flagged with ``<...>`` placeholders and a note.

Version rules (also in docs/runbooks/etcd-restore.md): restore with an ``etcdutl`` of the same
minor version as the etcd that will serve the data; ``--bump-revision``/``--mark-compacted``
need etcdutl ≥ 3.5.10; k3s restores with the k3s binary of the cluster (same minor as the
one that took the snapshot, or the next minor when upgrading).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

KUBEADM_MANIFEST = Path("/etc/kubernetes/manifests/etcd.yaml")
K3S_TOKEN = Path("/var/lib/rancher/k3s/server/token")
K3S_DB = Path("/var/lib/rancher/k3s/server/db")
BUMP_REVISION = 1_000_000_000  # ~a week at 1,500 writes/s: above anything written after the snapshot


@dataclass(frozen=True)
class EtcdMember:
    """What the kubeadm etcd static pod says about this member (``None``: unknown)."""

    name: str | None = None
    peer_url: str | None = None
    data_dir: str = "/var/lib/etcd"
    image_version: str | None = None


@dataclass
class Plan:
    distribution: str
    snapshot: Path
    steps: list[tuple[str, list[str]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def render(self, *, header: list[str]) -> str:
        out = [*header, ""]
        for warning in self.warnings:
            out.append(f"WARNING: {warning}")
        if self.warnings:
            out.append("")
        for number, (title, commands) in enumerate(self.steps, start=1):
            out.append(f"{number}. {title}")
            out.extend(f"     {command}" for command in commands)
            out.append("")
        if self.notes:
            out.append("Notes:")
            out.extend(f"  - {note}" for note in self.notes)
        return "\n".join(out).rstrip() + "\n"


def read_member(manifest: Path) -> EtcdMember:
    """Parse the kubeadm etcd static pod manifest; a missing or odd file yields unknowns."""
    try:
        doc: Any = yaml.safe_load(manifest.read_text(encoding="utf-8"))
        container = doc["spec"]["containers"][0]
        args = [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]
        image = str(container.get("image", ""))
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, AttributeError):
        return EtcdMember()
    flags: dict[str, str] = {}
    for arg in args:
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            flags[key] = value
    match = re.search(r":v?(\d+\.\d+\.\d+)", image)
    return EtcdMember(
        name=flags.get("name"),
        peer_url=flags.get("initial-advertise-peer-urls", "").split(",")[0] or None,
        data_dir=flags.get("data-dir", "/var/lib/etcd"),
        image_version=match.group(1) if match else None,
    )


def minor(version: str | None) -> str | None:
    if not version:
        return None
    match = re.match(r"v?(\d+)\.(\d+)", version)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def k3s_plan(snapshot: Path, *, token_file: Path = K3S_TOKEN) -> Plan:
    q = shlex.quote
    plan = Plan(distribution="k3s", snapshot=snapshot)
    plan.steps = [
        ("Stop k3s on the server node (workers keep running and reconnect later):", ["systemctl stop k3s"]),
        (
            "Only if the site has more than one server: on every OTHER server, stop k3s and move its datastore away:",
            ["systemctl stop k3s", f"mv {K3S_DB} {K3S_DB}.before-restore"],
        ),
        (
            "Restore on this server (runs etcd, resets membership to this node, then exits):",
            [
                f"k3s server --cluster-reset --cluster-reset-restore-path={q(str(snapshot))} "
                f'--token="$(cat {token_file})"'
            ],
        ),
        ("Start k3s again and check the cluster:", ["systemctl start k3s", "kubectl get nodes", "kubectl get pods -A"]),
        (
            "Only with more than one server: start k3s on the other servers; they rejoin from scratch:",
            ["systemctl start k3s"],
        ),
    ]
    plan.notes = [
        "Server token caveat: k3s encrypts its bootstrap data (cluster CA keys, service-account key) inside etcd "
        f"with the server token. Restore with the token the snapshot was taken with ({token_file} on the original "
        "server). On a rebuilt node, or after a token rotation, pass the ORIGINAL token with --token, or the restore "
        "fails with 'bootstrap data already found and encrypted with different token'. Back the token up with the "
        "snapshots (not on the same disk).",
        "Use the k3s version that took the snapshot (same minor release). Upgrade after the restore, not during it.",
        "Everything written to the cluster after the snapshot is lost, including Secrets created since then.",
        "edgefleet's own state (bundles installed, degradation records) is outside etcd and is not rewound: run "
        "`edgefleet-agent status` afterwards; the supervisor re-applies the installed bundle over the restored state.",
    ]
    return plan


def kubeadm_plan(
    snapshot: Path, *, member: EtcdMember, etcdutl_version: str | None, supports_bump: bool, stamp: str
) -> Plan:
    q = shlex.quote
    name = member.name or "<member-name>"
    peer = member.peer_url or "https://<node-ip>:2380"
    data_dir = member.data_dir
    restored = f"{data_dir}.restored-{stamp}"
    manifests = "/etc/kubernetes/manifests"
    parked = f"/etc/kubernetes/manifests.stopped-{stamp}"
    plan = Plan(distribution="kubeadm", snapshot=snapshot)
    plan.steps = [
        (
            "Stop the control plane: move the static pod manifests away (kubelet stops those pods):",
            [f"mkdir -p {parked}", f"mv {manifests}/*.yaml {parked}/"],
        ),
        (
            "Wait until etcd and kube-apiserver are gone (prints nothing when done):",
            ["crictl ps --name 'etcd|kube-apiserver|kube-controller-manager|kube-scheduler' -q"],
        ),
        (
            "Restore into a fresh data directory, bumping revisions past anything clients have seen:",
            [
                f"etcdutl snapshot restore {q(str(snapshot))} --data-dir {q(restored)} --name {q(name)} "
                f"--initial-cluster {q(f'{name}={peer}')} --initial-advertise-peer-urls {q(peer)} "
                f"--bump-revision {BUMP_REVISION} --mark-compacted"
            ],
        ),
        (
            "Swap the data directories (the old one is kept until the cluster is verified):",
            [f"mv {q(data_dir)} {q(data_dir + '.before-restore-' + stamp)}", f"mv {q(restored)} {q(data_dir)}"],
        ),
        (
            "Start the control plane again and check it:",
            [
                f"mv {parked}/*.yaml {manifests}/",
                "systemctl restart kubelet",
                "kubectl get nodes",
                "kubectl get pods -A",
            ],
        ),
    ]
    plan.notes = [
        "--bump-revision with --mark-compacted makes every watch (controllers, kubelets, informers) see a compaction "
        "and relist, instead of silently missing what changed after the snapshot.",
        "With several control-plane nodes: stop all of them first, restore the SAME snapshot on each with its own "
        "--name/--initial-advertise-peer-urls and the full --initial-cluster list, then start them together.",
        "Restart kubelet on the worker nodes afterwards, so they drop cached pod state from after the snapshot.",
    ]
    if member.name is None or member.peer_url is None:
        plan.warnings.append(
            f"could not read the member name / peer URL from {KUBEADM_MANIFEST}: fill in the <...> placeholders "
            "from the etcd static pod manifest (--name, --initial-advertise-peer-urls)"
        )
    if not supports_bump:
        plan.warnings.append(
            f"this etcdutl ({etcdutl_version or 'unknown version'}) has no --bump-revision/--mark-compacted: use "
            "etcdutl 3.5.10 or newer (same minor as the cluster's etcd) to run the restore step"
        )
    if member.image_version and etcdutl_version and minor(member.image_version) != minor(etcdutl_version):
        plan.warnings.append(
            f"etcdutl {etcdutl_version} does not match the cluster's etcd {member.image_version}: restore with an "
            f"etcdutl of the etcd {minor(member.image_version)} series"
        )
    return plan


def stamp(now: datetime | None = None) -> str:
    return f"{(now or datetime.now(UTC)).astimezone(UTC):%Y%m%dT%H%M%SZ}"
