"""One snapshot against a real etcd: success, verification failures, disk guard, timeouts, TLS, crash leftovers."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import stat
import textwrap
from pathlib import Path

import pytest
from snapshot_helpers import MakeCtx, agent_cli, events, put_keys, put_random, snapshot_files, write_config

from agent import exitcodes, sitestatus
from agent.snapshots import binaries, catalog, devetcd, take, verify


def _stub(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for a reaper (PID 1 in a container may never reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("compress", [True, False])
async def test_snapshot_is_taken_verified_recorded_and_reported(etcd: devetcd.Node, make_ctx: MakeCtx, compress: bool):
    await put_keys(etcd, 20)
    ctx = make_ctx(etcd.url, compress=compress)
    outcome = await take.take(ctx, trigger="manual")
    assert outcome.ok, outcome.message
    entry = outcome.entry
    assert entry is not None and entry.verified and entry.total_keys >= 20 and entry.revision >= 21
    assert entry.path.name.endswith(".db.zst" if compress else ".db")
    assert snapshot_files(ctx) == [entry.path.name]  # nothing else: no .part leftovers
    assert catalog.entries(ctx.store) == [entry]
    # The stored file re-verifies against the catalog fingerprint.
    status, digest = await verify.verify_stored(
        entry.path, etcdutl=binaries.find("etcdutl"), timeout=30, expected_sha256=entry.sha256
    )
    assert status.revision == entry.revision and digest.sha256 == entry.sha256
    assert digest.file_size == entry.path.stat().st_size
    info = ctx.store.get(sitestatus.SNAPSHOT_KEY)
    assert info["revision"] == entry.revision and info["failures"] == 0 and info["size_bytes"] == entry.file_size
    assert info["max_age_seconds"] == 12 * 3600  # default every 6 h: two intervals
    [event] = events(ctx)
    assert event["type"] == "snapshot.succeeded" and event["data"]["revision"] == entry.revision
    assert ctx.report_now.is_set()


async def _take_with_damage(etcd: devetcd.Node, make_ctx: MakeCtx, tmp_path: Path, monkeypatch, damage: str):
    """A wrapper etcdctl on PATH: runs the real one, then writes a damaged copy as etcdctl does (.part, rename)."""
    real = binaries.find("etcdctl")
    _stub(
        tmp_path / "bin",
        "etcdctl",
        f"""\
        set -e
        for last; do :; done
        {real} "$@"
        python3 - "$last" <<'PY'
        import os, sys
        path = sys.argv[1]
        data = bytearray(open(path, "rb").read())
        os.unlink(path)
        if "{damage}" == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0xFF
        with open(path + ".part", "wb") as f:
            f.write(data)
        os.rename(path + ".part", path)
        PY
        """,
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    await put_keys(etcd, 50)
    ctx = make_ctx(etcd.url)
    outcome = await take.take(ctx, trigger="manual")
    return ctx, outcome


@pytest.mark.parametrize("damage", ["truncate", "flip"])
async def test_damaged_snapshot_is_a_failure(etcd, make_ctx, tmp_path, monkeypatch, damage):
    ctx, outcome = await _take_with_damage(etcd, make_ctx, tmp_path, monkeypatch, damage)
    assert not outcome.ok and outcome.kind == "failed"
    assert "trailer" in outcome.message or "etcdutl" in outcome.message or "truncated" in outcome.message
    assert catalog.entries(ctx.store) == []
    assert snapshot_files(ctx) == []  # the damaged file is not kept as if it were a snapshot
    [event] = events(ctx)
    assert event["type"] == "snapshot.failed" and event["severity"] == "error"
    assert ctx.store.get(sitestatus.SNAPSHOT_KEY)["failures"] == 1


async def test_stored_snapshot_damage_is_caught(etcd, make_ctx, tmp_path):
    await put_keys(etcd, 10)
    ctx = make_ctx(etcd.url, compress=False)
    entry = (await take.take(ctx, trigger="manual")).entry
    assert entry is not None
    etcdutl = binaries.find("etcdutl")
    data = entry.path.read_bytes()
    flipped = tmp_path / "flipped.db"
    flipped.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(data[: len(data) - 4096])
    for bad in (flipped, truncated):
        with pytest.raises(verify.VerificationFailed):
            await verify.verify_stored(bad, etcdutl=etcdutl, timeout=30, expected_sha256=None)
    # A compressed copy whose zstd stream is cut off is caught too.
    ctx2 = make_ctx(etcd.url, compress=True, directory=tmp_path / "zst")
    zentry = (await take.take(ctx2, trigger="manual")).entry
    assert zentry is not None
    cut = tmp_path / "cut.db.zst"
    cut.write_bytes(zentry.path.read_bytes()[:-200])
    with pytest.raises(verify.VerificationFailed):
        await verify.verify_stored(cut, etcdutl=etcdutl, timeout=30, expected_sha256=zentry.sha256)


async def test_disk_guard_refuses_below_threshold_and_below_twice_the_last_size(etcd, make_ctx):
    await put_keys(etcd, 10)
    ctx = make_ctx(etcd.url, min_free_bytes=10 << 20)
    refused = await take.take(ctx, trigger="scheduled", free_bytes=lambda _p: 5 << 20)
    assert refused.kind == "refused" and "threshold" in refused.message
    assert snapshot_files(ctx) == [] and catalog.entries(ctx.store) == []
    [event] = events(ctx)
    assert event["type"] == "snapshot.refused" and event["severity"] == "warning"

    first = await take.take(ctx, trigger="scheduled", free_bytes=lambda _p: 1 << 40)
    assert first.ok and first.entry is not None
    size = first.entry.size
    ctx.config.snapshots.min_free_bytes = 0
    refused = await take.take(ctx, trigger="scheduled", free_bytes=lambda _p: size * 2 - 1)
    assert refused.kind == "refused" and "twice the last snapshot" in refused.message
    assert len(catalog.entries(ctx.store)) == 1
    assert ctx.store.get(sitestatus.SNAPSHOT_KEY)["failures"] == 1


async def test_etcd_down_is_a_clear_failure(make_ctx):
    ctx = make_ctx(f"http://127.0.0.1:{devetcd.free_port()}", timeout_seconds=4)
    outcome = await take.take(ctx, trigger="scheduled")
    assert outcome.kind == "failed" and "etcdctl snapshot" in outcome.message
    assert snapshot_files(ctx) == []
    assert [e["type"] for e in events(ctx)] == ["snapshot.failed"]


async def test_hung_etcdctl_is_killed_and_the_next_run_works(etcd, make_ctx, tmp_path, monkeypatch):
    pids = tmp_path / "pids"
    _stub(
        tmp_path / "bin",
        "etcdctl",
        f"""\
        sleep 300 &
        echo $! >> {pids}
        echo $$ >> {pids}
        wait
        """,
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    await put_keys(etcd, 5)
    ctx = make_ctx(etcd.url, timeout_seconds=1.5)
    outcome = await take.take(ctx, trigger="scheduled")
    assert outcome.kind == "failed" and "timed out after 1.5s" in outcome.message
    for pid in map(int, pids.read_text().split()):  # the stub AND its child are gone
        assert not _alive(pid)
    assert snapshot_files(ctx) == []

    monkeypatch.undo()  # the real etcdctl again
    ctx.config.snapshots.timeout_seconds = 30
    assert (await take.take(ctx, trigger="retry")).ok
    assert ctx.store.get(sitestatus.SNAPSHOT_KEY)["failures"] == 0


async def test_retention_keeps_the_newest_n(etcd, make_ctx):
    ctx = make_ctx(etcd.url, keep=2)
    taken = []
    for i in range(4):
        await etcd.ctl("put", f"/k/{i}", "v")
        outcome = await take.take(ctx, trigger="scheduled")
        assert outcome.ok and outcome.entry is not None
        taken.append(outcome.entry.name)
    assert snapshot_files(ctx) == sorted(taken[-2:])
    assert [e.name for e in catalog.entries(ctx.store)] == taken[:-3:-1]
    assert events(ctx)[-1]["data"]["removed"] == [taken[1]]


async def test_reconcile_after_a_crash(etcd, make_ctx):
    await put_keys(etcd, 5)
    ctx = make_ctx(etcd.url)
    kept = (await take.take(ctx, trigger="scheduled")).entry
    orphan = (await take.take(ctx, trigger="scheduled")).entry
    gone = (await take.take(ctx, trigger="scheduled")).entry
    assert kept and orphan and gone
    directory = ctx.config.snapshot_dir
    # Crash between rename and catalog row: a complete file without a row.
    catalog.remove(ctx.store, orphan.name)
    # Crash mid-save: partial files.
    (directory / "etcd-20260101T000000.000Z.db.part").write_bytes(b"partial")
    (directory / ".verify-x.db").write_bytes(b"temp")
    # Somebody deleted a file by hand.
    gone.path.unlink()
    # And a damaged unrecorded file that must not be adopted.
    (directory / "etcd-20250101T000000.000Z.db").write_bytes(b"junk" * 5000)
    await take.reconcile(ctx)
    names = {e.name: e for e in catalog.entries(ctx.store)}
    assert set(names) == {kept.name, orphan.name}
    assert names[orphan.name].trigger == "adopted" and names[orphan.name].sha256 == orphan.sha256
    assert names[orphan.name].file_sha256 == orphan.file_sha256
    assert snapshot_files(ctx) == sorted([kept.name, orphan.name, "etcd-20250101T000000.000Z.db"])


def _entry(name: str, hours_ago: float, *, verified: bool = True) -> catalog.Entry:
    now = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    return catalog.Entry(
        name=name,
        path=Path(name),
        taken=now - dt.timedelta(hours=hours_ago),
        duration=1,
        backend="etcdctl",
        trigger="scheduled",
        revision=1,
        total_keys=1,
        etcd_hash=1,
        size=1,
        sha256="",
        file_size=1,
        file_sha256="",
        compressed=True,
        verified=verified,
        verified_at=now,
    )


def test_retention_rules():
    now = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    entries = [_entry("a", 1), _entry("b", 7), _entry("c", 13), _entry("d", 50), _entry("bad", 2, verified=False)]
    names = lambda xs: sorted(e.name for e in xs)  # noqa: E731
    assert names(catalog.expired(entries, keep=2, max_age=None, now=now)) == ["bad", "c", "d"]
    assert names(catalog.expired(entries, keep=None, max_age=dt.timedelta(hours=10), now=now)) == ["bad", "c", "d"]
    assert names(catalog.expired(entries, keep=3, max_age=dt.timedelta(hours=24), now=now)) == ["bad", "d"]
    assert names(catalog.expired(entries, keep=None, max_age=None, now=now)) == ["bad"]
    # Everything is too old (clock jumped, or snapshots failing for weeks): the newest verified stays.
    later = now + dt.timedelta(days=365)
    assert names(catalog.expired(entries, keep=None, max_age=dt.timedelta(days=1), now=later)) == ["b", "bad", "c", "d"]
    # The newest is unverified: it goes, and the newest *verified* one is protected instead.
    broken = [_entry("new", 0, verified=False), _entry("old", 100)]
    assert names(catalog.expired(broken, keep=1, max_age=dt.timedelta(hours=1), now=now)) == ["new"]


async def test_digest_is_streamed_while_etcdctl_writes(etcd, make_ctx, tmp_path):
    await asyncio.to_thread(put_random, etcd, 24)  # ~24 MB, so the download takes long enough to be followed
    ctx = make_ctx(etcd.url, compress=True)
    ctx.config.snapshot_dir.mkdir(parents=True)
    dest = ctx.config.snapshot_dir / "x.db.part"
    draining = await take._save(ctx, dest, growing=dest.with_name("x.db.part.part"), compress_to=tmp_path / "a.zst")
    assert draining is not None
    streamed = await draining
    assert streamed is not None  # the follower vouched for what it read during the download
    after = verify.digest_raw(dest, compress_to=tmp_path / "b.zst")
    assert (streamed.size, streamed.sha256) == (after.size, after.sha256) == (dest.stat().st_size, after.sha256)
    assert (tmp_path / "a.zst").read_bytes() == (tmp_path / "b.zst").read_bytes()


async def test_k3s_backend_moves_the_file_k3s_wrote(etcd, make_ctx, tmp_path):
    """`k3s etcd-snapshot save --dir D --name N` writes D/N-<node>-<time>; a stub does that with the real etcdctl."""
    real = binaries.find("etcdctl")
    calls = tmp_path / "k3s-calls"
    stub = _stub(
        tmp_path / "k3s-bin",
        "k3s",
        f"""\
        set -e
        echo "$@" >> {calls}
        [ "$1 $2" = "etcd-snapshot save" ] || exit 64
        shift 2
        while [ $# -gt 0 ]; do
          case "$1" in --dir) dir=$2; shift 2;; --name) name=$2; shift 2;; *) shift;; esac
        done
        {real} --endpoints={etcd.url} snapshot save "$dir/$name-server-0-1764300000" >/dev/null
        """,
    )
    await put_keys(etcd, 7)
    ctx = make_ctx(etcd.url, backend="k3s", k3s=stub)
    outcome = await take.take(ctx, trigger="scheduled")
    assert outcome.ok, outcome.message
    assert outcome.entry is not None and outcome.entry.backend == "k3s" and outcome.entry.total_keys >= 7
    assert "etcd-snapshot save --dir" in calls.read_text() and "--name edgefleet" in calls.read_text()
    assert snapshot_files(ctx) == [outcome.entry.name]  # k3s's private work dir is gone
    assert not [p for p in ctx.config.snapshot_dir.iterdir() if p.name.startswith(".k3s-")]


async def test_a_repeated_clock_time_never_overwrites_a_snapshot(etcd, make_ctx):
    ctx = make_ctx(etcd.url)
    when = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
    first = await take.take(ctx, trigger="manual", now=when)
    second = await take.take(ctx, trigger="manual", now=when)  # the clock stepped back to the same instant
    assert first.ok and second.ok and first.entry and second.entry
    assert first.entry.name == "etcd-20260101T120000.000Z.db" and second.entry.name == "etcd-20260101T120000.001Z.db"
    assert snapshot_files(ctx) == [first.entry.name, second.entry.name]


async def test_one_snapshot_at_a_time_per_directory(etcd, make_ctx, tmp_path, monkeypatch):
    """Single flight: concurrent takers run their etcdctl one after the other, a taker that may not
    wait is refused as busy, and another process (`snapshot now`) is held off by the same lock."""
    real = binaries.find("etcdctl")
    runs = tmp_path / "etcdctl-runs"
    _stub(
        tmp_path / "bin",
        "etcdctl",
        f"""\
        echo "start $$" >> {runs}
        {real} "$@"
        rc=$?
        echo "end $$" >> {runs}
        exit $rc
        """,
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    await asyncio.to_thread(put_random, etcd, 8)  # big enough that overlapping saves would interleave
    ctx = make_ctx(etcd.url)
    outcomes = await asyncio.gather(*(take.take(ctx, trigger="on-demand") for _ in range(3)))
    assert all(o.ok for o in outcomes), [o.message for o in outcomes]
    marks = [line.split()[0] for line in runs.read_text().splitlines()]
    assert marks == ["start", "end"] * 3, marks

    directory = ctx.config.snapshot_dir
    async with take.locked(directory, wait=0):
        busy = await take.take(ctx, trigger="on-demand", lock_wait=0.3)
        assert busy.kind == "failed" and "another snapshot is running" in busy.message
        # The CLI in another process waits 2 x timeout_seconds for the lock, then gives up.
        config = write_config(tmp_path, etcd.url, directory=str(directory), timeout_seconds=1)
        code, out, err = await agent_cli(config, "snapshot", "now")
        assert code == exitcodes.SNAPSHOT_FAILED and out == "" and "another snapshot is running" in err
    assert len(catalog.entries(ctx.store)) == 3  # the refused attempts wrote nothing
    code, _, err = await agent_cli(config, "snapshot", "now")
    assert code == exitcodes.OK, err


async def test_metrics_follow_snapshots(etcd, make_ctx):
    """The snapshot gauges (last success, age, size, failures) and the result counter after a real
    success and a real failure, as /metrics would show them."""
    from prometheus_client import REGISTRY

    from agent import metrics

    def value(name: str, labels: dict[str, str] | None = None) -> float:
        got = REGISTRY.get_sample_value(name, labels or {})
        return 0.0 if got is None else got

    counted = {kind: value("edgefleet_agent_snapshots_total", {"result": kind}) for kind in ("succeeded", "failed")}
    await put_keys(etcd, 5)
    ctx = make_ctx(etcd.url)
    entry = (await take.take(ctx, trigger="manual")).entry
    assert entry is not None
    metrics.refresh(ctx.store, now=entry.taken.timestamp() + 90)
    assert value("edgefleet_agent_snapshot_last_success_timestamp_seconds") == pytest.approx(entry.taken.timestamp())
    assert value("edgefleet_agent_snapshot_age_seconds") == pytest.approx(90)
    assert value("edgefleet_agent_snapshot_size_bytes") == entry.file_size > 0
    assert value("edgefleet_agent_snapshot_consecutive_failures") == 0
    assert value("edgefleet_agent_snapshots_total", {"result": "succeeded"}) == counted["succeeded"] + 1

    ctx.config.snapshots.endpoint = f"http://127.0.0.1:{devetcd.free_port()}"  # etcd "down"
    ctx.config.snapshots.timeout_seconds = 3
    assert (await take.take(ctx, trigger="scheduled")).kind == "failed"
    metrics.refresh(ctx.store, now=entry.taken.timestamp() + 120)
    assert value("edgefleet_agent_snapshot_consecutive_failures") == 1
    assert value("edgefleet_agent_snapshot_last_success_timestamp_seconds") == pytest.approx(entry.taken.timestamp())
    assert value("edgefleet_agent_snapshot_age_seconds") == pytest.approx(120)
    assert value("edgefleet_agent_snapshots_total", {"result": "failed"}) == counted["failed"] + 1
