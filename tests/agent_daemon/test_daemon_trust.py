"""Trust-root rotation under the real unit layout: the seed is read-only, the rotation lives in the state dir.

The daemon runs with its trust directory on a read-only bind mount (what ``ProtectSystem=strict``
makes of ``/etc/edgefleet/trust``; as non-root, plain file modes), so the only place a rotation
can be kept is the state directory. Bundles are real, signed, and reach the daemon through its inbox.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import (
    AGENT,
    Keys,
    agent_env,
    bundle,
    context,
    daemon,
    drop,
    events,
    make_trust,
    outcome,
    status,
    stored_events,
    write_config,
)

from agent import intake, sitestatus
from bundles import errors, keys, trust


def rotation(old: Keys, new: Any, *, version: int = 2) -> bytes:
    """Root ``version`` listing ``new``'s key alone, signed by the old council and the new (threshold 1 each)."""
    root = trust.make_root(release=[new.public_key()], threshold=1, version=version,
                           expires=datetime.now(UTC) + timedelta(days=365))
    return trust.sign_root(root, keys=[old.private, new]).to_json()


def read_only_prefix(trust_dir: Path) -> list[str]:
    """A command prefix that runs its command with ``trust_dir`` read-only, as the systemd unit does."""
    if os.geteuid() == 0:  # root ignores file modes: a read-only bind mount in a private mount namespace
        script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
        return ["unshare", "--mount", "sh", "-c", script, str(trust_dir)]
    trust_dir.chmod(0o555)
    (trust_dir / "root.json").chmod(0o444)
    return []


def test_rotation_survives_restart_with_a_read_only_trust_dir_and_tampering_is_refused(tmp_path: Path) -> None:
    trust_dir, state = tmp_path / "trust", tmp_path / "state"
    old = make_trust(trust_dir)
    new = keys.generate()
    seed = hashlib.sha256(old.root_path.read_bytes()).hexdigest()
    config = write_config(tmp_path, trust_dir=str(trust_dir), install={"inbox_poll_seconds": 0.2})
    inbox = state / "inbox"
    prefix = read_only_prefix(trust_dir)
    probe = subprocess.run([*prefix, "sh", "-c", f"echo x > {trust_dir}/probe"], capture_output=True, text=True)
    assert probe.returncode != 0, "the test must run the agent with a read-only trust dir"

    rotating = bundle(tmp_path, signer=new, release=1, chain=[rotation(old, new)])
    with daemon(config, prefix) as proc:
        assert outcome(inbox, drop(inbox, rotating).name, proc) == "done"
    assert hashlib.sha256(old.root_path.read_bytes()).hexdigest() == seed, "the seed is never written"
    assert trust.load_effective(old.root_path, state / "trust" / "root-chain.json").root.version == 2
    assert [e["data"] for e in stored_events(state, "trust.rotated")] == [{"from": 1, "to": 2}]

    # After a restart the rotation still holds: the new key alone is enough, the old one no longer is.
    with daemon(config, prefix) as proc:
        assert outcome(inbox, drop(inbox, bundle(tmp_path, signer=new, release=2)).name, proc) == "done"
        assert outcome(inbox, drop(inbox, bundle(tmp_path, signer=old.private, release=3)).name, proc) == "rejected"
        report = status(config)
    assert {k: report["trust"][k] for k in ("version", "seed_version", "rotations", "error")} == {
        "version": 2, "seed_version": 1, "rotations": 1, "error": None}
    rejected = stored_events(state, "bundle.rejected")
    assert [e["data"]["reason"] for e in rejected] == [errors.UnknownKey.reason]

    # A stored chain edited behind the agent's back is refused, loudly, not skipped.
    chain_file = state / "trust" / "root-chain.json"
    doc = json.loads(chain_file.read_bytes())
    sig = doc["links"][0]["signatures"][0]
    raw = base64.b64decode(sig["sig"])
    sig["sig"] = base64.b64encode(bytes([raw[0] ^ 1]) + raw[1:]).decode()  # one bit of the old council's signature
    chain_file.write_text(json.dumps(doc))
    with pytest.raises(errors.RootInvalid):
        trust.load_effective(old.root_path, chain_file)
    with daemon(config, prefix) as proc:
        assert outcome(inbox, drop(inbox, bundle(tmp_path, signer=new, release=4)).name, proc) == "rejected"
        report = status(config)
        human = subprocess.run([*AGENT, "--config", str(config), "status"], capture_output=True, text=True,
                               timeout=60, env=agent_env(), check=True).stdout
    assert report["trust"]["version"] == 2 and "does not chain from the seed" in report["trust"]["error"]
    assert "trust:     root v2" in human and "REFUSED now" in human
    refused = stored_events(state, "trust.refused")
    assert len(refused) == 1 and str(chain_file) in refused[0]["data"]["error"]
    assert stored_events(state, "bundle.rejected")[-1]["data"]["reason"] == errors.RootInvalid.reason
    reason_file = next((inbox / "rejected").glob("*r4.bundle.reason"))
    assert "does not chain from the seed" in reason_file.read_text()


async def test_deleting_the_stored_chain_does_not_roll_trust_back(tmp_path: Path) -> None:
    """Without the chain file the seed alone would verify old-key bundles again: the site refuses instead."""
    trust_dir = tmp_path / "trust"
    old = make_trust(trust_dir)
    new = keys.generate()
    config = write_config(tmp_path, trust_dir=str(trust_dir))
    ctx = context(config)
    try:
        result = await intake.import_bundle(ctx, bundle(tmp_path, signer=new, release=1, chain=[rotation(old, new)]))
        assert result.release == 1 and ctx.config.trust_chain.is_file()
        ctx.config.trust_chain.unlink()
        with pytest.raises(errors.RootInvalid, match="already trusted v2"):
            await intake.import_bundle(ctx, bundle(tmp_path, signer=old.private, release=2))
        assert ctx.store.get(sitestatus.TRUST_KEY)["version"] == 2
        assert [e["data"]["reason"] for e in events(ctx.store, "trust.refused")] == [errors.RootInvalid.reason]
        # The fix an operator can make without the lost file: the newest root becomes the seed.
        trust.save_root(old.root_path, rotation(old, new))
        assert (await intake.import_bundle(ctx, bundle(tmp_path, signer=new, release=3))).release == 3
        assert ctx.store.get(sitestatus.TRUST_KEY)["error"] is None
    finally:
        ctx.store.close()
