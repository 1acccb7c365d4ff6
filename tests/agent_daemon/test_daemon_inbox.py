"""The daemon's inbox task, live: files dropped into a running agent's inbox are imported or rejected.

No restart and no CLI in between: the ``intake`` task of ``edgefleet-agent run`` polls the inbox
(every 0.2 s here). Bundles are real, signed with the site's key (tests/agent_install's kit).
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

from daemon_helpers import Comp, bundle, daemon, drop, make_trust, outcome, stored_events, write_config

from agent import intake
from bundles import errors, split


def test_inbox_imports_a_bundle_and_rejects_a_bad_file_while_running(tmp_path: Path) -> None:
    key = make_trust(tmp_path / "trust").private
    config = write_config(tmp_path, trust_dir=str(tmp_path / "trust"), install={"inbox_poll_seconds": 0.2})
    inbox = tmp_path / "state" / "inbox"
    good = bundle(tmp_path, signer=key, release=1)
    junk = tmp_path / "holiday-photos.efb"
    junk.write_bytes(os.urandom(4096))

    with daemon(config, []) as proc:
        assert outcome(inbox, drop(inbox, good).name, proc) == "done"
        assert outcome(inbox, drop(inbox, junk).name, proc) == "rejected"
        # A file still being copied (fresh mtime) or named as a partial copy is left alone meanwhile.
        (inbox / "copying.efb.part").write_bytes(b"half")

    accepted = stored_events(tmp_path / "state", "bundle.accepted")
    assert [e["data"]["bundle"] for e in accepted] == ["site-1.0.1"]
    rejected = stored_events(tmp_path / "state", "bundle.rejected")
    assert [e["data"]["file"] for e in rejected] == [junk.name]
    reason = next((inbox / "rejected").glob(f"*{junk.name}.reason")).read_text()
    assert reason.startswith(f"{rejected[0]['data']['reason']}: ")
    assert (inbox / "copying.efb.part").is_file(), "partial copies are not touched"


def _big_comps() -> list[Comp]:
    """Incompressible content, so the bundle is over split's 64 KiB minimum part size."""
    blob = base64.b64encode(os.urandom(200_000)).decode()
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "blob"}, "data": {"blob": blob}}
    return [Comp("blob", 0, 1, [cm], namespace="default")]


def test_split_bundle_waits_for_late_parts_then_imports(tmp_path: Path) -> None:
    key = make_trust(tmp_path / "trust").private
    config = write_config(tmp_path, trust_dir=str(tmp_path / "trust"), install={"inbox_poll_seconds": 0.2})
    inbox = tmp_path / "state" / "inbox"
    index, *parts = split.split(bundle(tmp_path, signer=key, release=2, comps=_big_comps()), max_part_size=1 << 16)
    assert len(parts) >= 2
    # A second split bundle whose parts never come: its index is older than the part wait.
    orphan, *orphan_parts = split.split(bundle(tmp_path, signer=key, release=3, comps=_big_comps()),
                                        max_part_size=1 << 16)

    with daemon(config, []) as proc:
        drop(inbox, index)
        stale = drop(inbox, orphan)
        past = time.time() - intake.PART_WAIT_SECONDS - 60
        os.utime(stale, (past, past))
        # A plain bundle dropped after the index: once it is processed, the daemon has looked at
        # the (older, so listed first) index in the same pass, and left it waiting.
        assert outcome(inbox, drop(inbox, bundle(tmp_path, signer=key, release=1)).name, proc) == "done"
        assert outcome(inbox, orphan.name, proc) == "rejected"
        assert (inbox / index.name).is_file(), "an index whose parts are still coming is not rejected"
        for part in parts[:-1]:
            drop(inbox, part)
        assert outcome(inbox, drop(inbox, bundle(tmp_path, signer=key, release=4)).name, proc) == "done"
        assert (inbox / index.name).is_file(), "one part still missing: still waiting"
        drop(inbox, parts[-1])
        assert outcome(inbox, index.name, proc) == "done"

    moved = next((inbox / "done").glob(f"*{index.name}.d"))
    assert sorted(p.name for p in moved.iterdir()) == sorted(p.name for p in [index, *parts])
    accepted = [e["data"]["bundle"] for e in stored_events(tmp_path / "state", "bundle.accepted")]
    assert accepted == ["site-1.0.1", "site-1.0.4", "site-1.0.2"]
    rejected = stored_events(tmp_path / "state", "bundle.rejected")
    assert [(e["data"]["file"], e["data"]["reason"]) for e in rejected] == [(orphan.name, errors.PartMissing.reason)]
    reason = next((inbox / "rejected").glob(f"*{orphan.name}.reason")).read_text()
    assert reason.startswith(f"{errors.PartMissing.reason}: ") and orphan_parts[0].name in reason
