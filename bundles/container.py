"""The bundle container: a (zstd-compressed) ustar stream, read and written without ``tarfile``.

Layout, in this order (docs/bundle-format.md):

1. ``manifest.dsse.json``: the DSSE envelope whose payload is the canonical manifest. First, so a
   verifier can check signatures, expiry, compatibility and anti-rollback before it touches a
   single payload byte.
2. ``root-chain.json`` (optional): ``{"links": [<root envelope>, ...]}``, trust-root rotations.
3. ``payload/<path>`` for every file of the manifest (and, optionally, ``payload/...`` directory
   entries that are ancestors of listed files; the verifier creates directories itself).

Why a hand-written reader: the verifier accepts only plain ustar regular files and directories,
and must refuse everything else (links, devices, FIFOs, pax/GNU extension headers) *before*
reading it. ``tarfile`` parses pax headers into memory, follows its own member semantics and its
extraction filters have had bypasses (CVE-2007-4559, CVE-2025-4517 ...). 120 lines of ustar are
easier to audit.

Compression is detected from the first bytes (zstd frame magic, or a ustar header for "none");
gzip/bzip2/xz and anything else are ``WrongCompression``. The zstd decoder is limited to an 8 MiB
window so a hostile frame cannot make the verifier allocate 128 MiB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

from bundles import errors

ENVELOPE_NAME = "manifest.dsse.json"
CHAIN_NAME = "root-chain.json"
PAYLOAD_PREFIX = "payload/"
BLOCK = 512
CHUNK = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_MAX_WINDOW = 1 << 23
ZSTD_WINDOW_LOG = 21
ZSTD_LEVEL = 9  # docs/bundle-format.md: 26x at 3, 35x at 9 on the IDP; decompression speed is the same

_OTHER_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x04\x22\x4d\x18": "lz4",
    b"PK\x03\x04": "zip",
}
_TYPE_NAMES = {
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "character device",
    b"4": "block device",
    b"6": "FIFO",
    b"7": "contiguous file",
    b"x": "pax extended header",
    b"g": "pax global header",
    b"L": "GNU long name",
    b"K": "GNU long link",
    b"S": "GNU sparse file",
}


def detect_compression(head: bytes) -> str:
    """Return "zstd" or "none" from the first 512 bytes of a bundle; raise for anything else."""
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    for magic, name in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raise errors.WrongCompression(f"bundle is {name}-compressed; v1 bundles are zstd or uncompressed tar")
    if len(head) >= 263 and head[257:262] == b"ustar":
        return "none"
    if len(head) < BLOCK:
        raise errors.Truncated(f"bundle is only {len(head)} bytes")
    raise errors.Garbled("bundle is neither a zstd stream nor a tar archive")


class CappedStream:
    """A decompressed byte stream with a hard cap on the total bytes it will produce.

    The cap is what defeats decompression bombs: before the manifest is verified it covers only
    the envelope and chain members; afterwards it is raised to exactly what the signed manifest
    accounts for (headers + padded file sizes + directory entries + end blocks + slack).
    """

    def __init__(self, raw: BinaryIO, compression: str, *, limit: int) -> None:
        self._raw = raw
        self.compression = compression
        self.total = 0
        self.limit = limit
        self._src: Any
        if compression == "zstd":
            dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
            self._src = dctx.stream_reader(raw, read_size=CHUNK, read_across_frames=True)
        else:
            self._src = raw

    def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` completely unless the stream ends; return the byte count."""
        want = len(buf)
        if self.total + want > self.limit:
            raise errors.DecompressionBomb(
                f"archive expands beyond the {self.limit} bytes the manifest accounts for"
            )
        got = 0
        try:
            while got < want:
                n = self._src.readinto(buf[got:])
                if not n:
                    break
                got += n
        except zstandard.ZstdError as exc:
            raise errors.Garbled(f"zstd stream is corrupt: {exc}") from None
        self.total += got
        return got

    def read_exact(self, n: int, *, what: str) -> bytes:
        buf = bytearray(n)
        if self.readinto(memoryview(buf)) != n:
            raise errors.Truncated(f"archive ends inside {what}")
        return bytes(buf)

    def drain_trailing(self, *, max_bytes: int) -> None:
        """After the end-of-archive blocks only zero padding may follow, and not much of it."""
        buf = bytearray(64 * 1024)
        view = memoryview(buf)
        seen = 0
        while True:
            room = min(len(buf), max_bytes - seen + 1)
            if self.total + room > self.limit:
                room = max(0, self.limit - self.total)
                if room == 0:
                    # Anything at all beyond the accounted bytes is a bomb.
                    probe = bytearray(1)
                    if self._read_raw(memoryview(probe)):
                        raise errors.DecompressionBomb("archive continues after its end-of-archive marker")
                    return
            n = self.readinto(view[:room])
            if not n:
                return
            if any(view[:n]):
                raise errors.Garbled("non-zero data after the end-of-archive marker")
            seen += n
            if seen > max_bytes:
                raise errors.DecompressionBomb(f"over {max_bytes} bytes of padding after the end of the archive")

    def _read_raw(self, buf: memoryview) -> int:
        try:
            return int(self._src.readinto(buf))
        except zstandard.ZstdError as exc:
            raise errors.Garbled(f"zstd stream is corrupt: {exc}") from None


@dataclass(frozen=True)
class Header:
    name: str
    size: int
    mode: int
    typeflag: bytes

    @property
    def is_file(self) -> bool:
        return self.typeflag in (b"0", b"\x00")

    @property
    def is_dir(self) -> bool:
        return self.typeflag == b"5"

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES.get(self.typeflag, f"type {self.typeflag!r}")


def _octal(field: bytes, *, what: str) -> int:
    if field[:1] and field[0] & 0x80:
        raise errors.Garbled(f"tar header uses base-256 {what} (unsupported)")
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise errors.Garbled(f"tar header {what} is not octal") from None


def parse_header(block: bytes) -> Header:
    """Parse one 512-byte header (the caller has already ruled out an all-zero block)."""
    stored = _octal(block[148:156], what="checksum")
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise errors.Garbled("tar header checksum mismatch")
    if block[257:262] != b"ustar":
        raise errors.Garbled("tar header is not ustar")
    try:
        name = block[0:100].split(b"\x00", 1)[0].decode("utf-8")
        prefix = block[345:500].split(b"\x00", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise errors.UnsafePath("tar member name is not UTF-8") from None
    full = f"{prefix}/{name}" if prefix else name
    return Header(
        name=full,
        size=_octal(block[124:136], what="size"),
        mode=_octal(block[100:108], what="mode"),
        typeflag=block[156:157],
    )


def next_header(stream: CappedStream) -> Header | None:
    """The next member header, or None at the end-of-archive marker (two zero blocks)."""
    buf = bytearray(BLOCK)
    n = stream.readinto(memoryview(buf))
    if n == 0:
        raise errors.Truncated("archive ends without an end-of-archive marker")
    if n < BLOCK:
        raise errors.Truncated("archive ends inside a tar header")
    if not any(buf):
        second = bytearray(BLOCK)
        m = stream.readinto(memoryview(second))
        if m < BLOCK:
            raise errors.Truncated("archive ends inside the end-of-archive marker")
        if any(second):
            raise errors.Garbled("a zero block is followed by data (corrupt archive)")
        return None
    return parse_header(bytes(buf))


def padding(size: int) -> int:
    return (-size) % BLOCK


# --- writing ---------------------------------------------------------------------------------------


def make_header(name: str, size: int, *, mode: int = 0o644, typeflag: bytes = b"0") -> bytes:
    """A deterministic ustar header (uid/gid 0, mtime 0, no user names): reproducible bundles."""
    raw = name.encode("utf-8")
    if len(raw) <= 100:
        prefix, base = b"", raw
    else:
        cut = raw.rfind(b"/", 0, 156)
        if cut <= 0 or len(raw) - cut - 1 > 100:
            raise ValueError(f"path too long for ustar: {name}")
        prefix, base = raw[:cut], raw[cut + 1 :]
    block = bytearray(BLOCK)
    block[0 : len(base)] = base
    block[100:108] = b"%07o\x00" % mode
    block[108:116] = b"0000000\x00"
    block[116:124] = b"0000000\x00"
    block[124:136] = b"%011o\x00" % size
    block[136:148] = b"00000000000\x00"
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[257:263] = b"ustar\x00"
    block[263:265] = b"00"
    block[345 : 345 + len(prefix)] = prefix
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


class Writer:
    """Write a bundle container: members in call order, then the end-of-archive marker."""

    def __init__(self, out: BinaryIO, *, compression: str = "zstd", level: int = ZSTD_LEVEL) -> None:
        self._out = out
        self._zw: zstandard.ZstdCompressionWriter | None = None
        self._sink: BinaryIO | zstandard.ZstdCompressionWriter
        if compression == "zstd":
            params = zstandard.ZstdCompressionParameters.from_level(
                level, window_log=ZSTD_WINDOW_LOG, threads=0, write_checksum=True
            )
            cctx = zstandard.ZstdCompressor(compression_params=params)
            self._zw = cctx.stream_writer(out, closefd=False)
            self._sink = self._zw
        elif compression == "none":
            self._sink = out
        else:
            raise ValueError(f"unknown compression {compression}")

    def add_bytes(self, name: str, data: bytes, *, mode: int = 0o644) -> None:
        self._sink.write(make_header(name, len(data), mode=mode))
        self._sink.write(data)
        self._sink.write(b"\x00" * padding(len(data)))

    def add_file(self, name: str, path: str | os.PathLike[str], *, size: int, mode: int = 0o644) -> None:
        self._sink.write(make_header(name, size, mode=mode))
        written = 0
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                self._sink.write(chunk)
                written += len(chunk)
        if written != size:
            raise ValueError(f"{path} changed size while being written ({written} != {size})")
        self._sink.write(b"\x00" * padding(size))

    def add_raw(self, data: bytes) -> None:
        """Append pre-formed tar bytes (used by ``sign`` to copy the untouched rest of an archive)."""
        self._sink.write(data)

    def close(self) -> None:
        self._sink.write(b"\x00" * (2 * BLOCK))
        if self._zw is not None:
            self._zw.flush(zstandard.FLUSH_FRAME)
            self._zw.close()  # type: ignore[no-untyped-call]
        self._out.flush()


def skip_padding(stream: CappedStream, size: int) -> None:
    pad = padding(size)
    if pad:
        stream.read_exact(pad, what="member padding")


