"""Staging through bundles.streaming: O_DIRECT for aligned blocks, page cache for the rest."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_kit import NOW, Kit, snapshot

from bundles import errors, streaming, trust, verify

ROOT = Path(__file__).resolve().parents[2]


def test_files_spanning_buffers_with_unaligned_tails_stage_byte_identical(kit: Kit) -> None:
    rng = random.Random(7)
    buf = streaming.BUF_BYTES
    sizes = {"blobs/two-buffers-and-a-tail.bin": 2 * buf + 3 * streaming.ALIGN + 123,
             "blobs/exactly-one-buffer.bin": buf, "blobs/under-one-block.bin": 100, "blobs/empty.bin": 0}
    files = kit.files({p: rng.randbytes(n) for p, n in sizes.items()})
    staged = verify.verify_and_stage(kit.bundle(files), root=kit.root, store_dir=kit.store, now=NOW)
    for rel, data in files.items():
        assert (staged.payload_dir / rel).read_bytes() == data, rel
    assert verify.recheck_staged(staged.path) == staged.manifest


def test_a_write_the_kernel_refuses_for_o_direct_falls_back_to_buffered(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        staged = streaming.StagedFile(fd)
        if sys.platform == "linux":
            assert staged.direct, "O_DIRECT refused on the test's tmp filesystem: only the buffered path runs"
        block = memoryview(bytearray(range(256)) * 64)  # 16 KiB from an aligned-length buffer
        misaligned = memoryview(bytearray(1) + bytearray(block))[1:]  # same bytes, address off by one
        staged.write(misaligned)  # O_DIRECT: EINVAL from the kernel, then buffered
        staged.write(block)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert not staged.direct
    assert (tmp_path / "f").read_bytes() == bytes(block) * 2


CHILD = r"""
import datetime as dt, resource, signal, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from bundles import errors, trust, verify
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead
limit = int(sys.argv[5])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    verify.verify_and_stage(sys.argv[2], root=trust.load_root(Path(sys.argv[3])), store_dir=sys.argv[4],
                            now=dt.datetime.fromisoformat(sys.argv[6]))
except errors.StoreError as exc:
    print(exc.message)
    sys.exit(3)
"""


def test_a_write_failing_on_the_write_thread_is_a_store_error_and_leaves_nothing(kit: Kit) -> None:
    big = random.Random(3).randbytes(3 * streaming.BUF_BYTES)
    path = kit.bundle(kit.files({"blobs/big.bin": big}))
    root = kit.tmp / "root.json"
    trust.save_root(root, kit.root_bytes)
    before = snapshot(kit.store)
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), str(path), str(root), str(kit.store),
         str(streaming.BUF_BYTES + streaming.ALIGN), NOW.isoformat()],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 3, res.stderr
    assert res.stdout.startswith("writing blobs/big.bin to staging failed: File too large"), res.stdout
    assert snapshot(kit.store) == before


def test_a_digest_mismatch_is_reported_before_a_later_members_fault(kit: Kit) -> None:
    """The digest is compared on the hash thread, possibly after the next header was read: the
    fault earlier in the stream must still be the one reported, whatever the threads' timing."""
    big = random.Random(5).randbytes(3 * streaming.BUF_BYTES)
    members = kit.members(kit.files({"blobs/big.bin": big}))
    name, data = members[-1]
    assert name == "payload/blobs/big.bin"
    members[-1] = (name, data[:-1] + bytes([data[-1] ^ 1]))
    members.append(("payload/not-listed.yaml", b"kind: Pod\n"))
    before = snapshot(kit.store)
    for _ in range(3):
        with pytest.raises(errors.DigestMismatch, match="blobs/big.bin"):
            verify.verify_and_stage(kit.raw(members), root=kit.root, store_dir=kit.store, now=NOW)
        assert snapshot(kit.store) == before
