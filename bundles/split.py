"""Split bundles: one bundle as several part files, for FAT32 USB sticks (4 GiB - 1 per file).

Public surface (stable):

- ``split(bundle, *, max_part_size=DEFAULT_MAX_PART) -> list[Path]``: replace ``X.efb`` by a small
  JSON index under the same name plus ``X.efb.001.part`` ... (only when it is larger than
  ``max_part_size``; otherwise nothing changes and ``[bundle]`` is returned).
- ``is_index(head)``: do these first bytes start a split index?
- ``open_parts(index_path) -> PartsReader``: a read-only stream of the reassembled bundle. Every
  part's presence and size is checked when it is opened, each part's sha256 while it streams;
  a verification failure is re-attributed to the first damaged part (``errors.PartDamaged``),
  and a missing part is ``errors.PartMissing``, both naming the part.
- ``check(index_path)``: hash every part now (``edgefleet-bundle verify`` of a split bundle names
  the damaged part even when the damage would otherwise surface as, say, a corrupt zstd frame).

The index is *not* trusted: it only tells the reader where the bytes are. The signed manifest
inside the reassembled stream is verified exactly as for a single file, so a forged index can at
most make a good bundle fail. Part names in the index must be plain file names next to it.

``verify._open`` uses ``open_parts`` whenever a bundle file starts with ``{``, so the verifier,
the agent's inbox and the hub all accept split bundles with no other change. Parts end in
``.part``, which the agent's inbox ignores: it imports the index (named like the bundle) once the
parts are there; copy the parts first, the index last.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from pathlib import Path
from types import TracebackType
from typing import Any

from bundles import errors

DEFAULT_MAX_PART = (4 << 30) - (1 << 20)  # just under FAT32's 4 GiB - 1 file size limit
KIND = "edgefleet-split-bundle"
MAX_PARTS = 10_000
_PART_NAME = re.compile(r"^[A-Za-z0-9._@+=,~-]+\.part$")
CHUNK = 1 << 20


def is_index(head: bytes) -> bool:
    return head.lstrip()[:1] == b"{"


def split(bundle: Path, *, max_part_size: int = DEFAULT_MAX_PART) -> list[Path]:
    if max_part_size < 1 << 16:
        raise errors.UsageError(f"--max-part-size {max_part_size} is below 64 KiB")
    try:
        size = bundle.stat().st_size
    except OSError as exc:
        raise errors.Unreadable(f"cannot read bundle {bundle}: {exc.strerror}") from None
    if size <= max_part_size:
        return [bundle]
    count = (size + max_part_size - 1) // max_part_size
    if count > MAX_PARTS:
        raise errors.UsageError(f"{count} parts would exceed {MAX_PARTS}; raise --max-part-size")
    width = max(3, len(str(count)))
    parts: list[dict[str, Any]] = []
    paths: list[Path] = []
    total = hashlib.sha256()
    try:
        with open(bundle, "rb") as src:
            for i in range(count):
                name = f"{bundle.name}.{i + 1:0{width}d}.part"
                path = bundle.with_name(name)
                h = hashlib.sha256()
                left = min(max_part_size, size - i * max_part_size)
                tmp = path.with_name(f".{name}.tmp")
                with open(tmp, "wb") as out:
                    while left:
                        chunk = src.read(min(CHUNK, left))
                        if not chunk:
                            raise errors.Truncated(f"{bundle} shrank while being split")
                        h.update(chunk)
                        total.update(chunk)
                        out.write(chunk)
                        left -= len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, path)
                parts.append({"name": name, "size": path.stat().st_size, "sha256": h.hexdigest()})
                paths.append(path)
        index = {"kind": KIND, "schemaVersion": 1, "size": size, "sha256": total.hexdigest(), "parts": parts}
        tmp = bundle.with_name(f".{bundle.name}.index.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, bundle)  # the index takes the bundle's name last: a crash leaves a whole bundle
    except OSError as exc:  # disk full, read-only stick: the bundle stays whole, no stray part left
        for leftover in [*paths, *bundle.parent.glob(f".{bundle.name}.*.tmp")]:
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
        raise errors.StoreError(f"cannot split {bundle}: {exc.strerror or exc} ({exc.filename})") from None
    return [bundle, *paths]


def load_index(index_path: Path) -> dict[str, Any]:
    try:
        raw = index_path.read_bytes()
        if len(raw) > 4 << 20:
            raise ValueError("index over 4 MiB")
        doc = json.loads(raw)
    except OSError as exc:
        raise errors.Unreadable(f"cannot read split index {index_path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep to decode
        raise errors.Garbled(f"{index_path.name} is neither a bundle nor a split index: {exc}") from None
    parts = doc.get("parts") if isinstance(doc, dict) else None
    if not isinstance(parts, list) or doc.get("kind") != KIND or not parts or len(parts) > MAX_PARTS:
        raise errors.Garbled(f"{index_path.name} is neither a bundle nor a split index")
    for p in parts:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not _PART_NAME.match(p["name"]) \
                or not isinstance(p.get("size"), int) or p["size"] <= 0 or not isinstance(p.get("sha256"), str):
            raise errors.Garbled(f"{index_path.name}: malformed part entry")
    out: dict[str, Any] = doc
    return out


def _label(index_path: Path, doc: dict[str, Any], i: int) -> str:
    return f"part {i + 1} of {len(doc['parts'])} ({doc['parts'][i]['name']})"


def check(index_path: Path) -> None:
    """Every part present, of the right size and sha256; raises naming the first bad part."""
    doc = load_index(index_path)
    for i in range(len(doc["parts"])):
        _check_part(index_path, doc, i, full=True)


def _check_part(index_path: Path, doc: dict[str, Any], i: int, *, full: bool) -> Path:
    p = doc["parts"][i]
    path = index_path.with_name(p["name"])
    try:
        size = path.stat().st_size
    except OSError:
        raise errors.PartMissing(f"{_label(index_path, doc, i)} of {index_path.name} is missing") from None
    if size != p["size"]:
        raise errors.PartDamaged(
            f"{_label(index_path, doc, i)} of {index_path.name} is damaged: {size} bytes, expected {p['size']}"
        )
    if full:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        if h.hexdigest() != p["sha256"]:
            raise errors.PartDamaged(f"{_label(index_path, doc, i)} of {index_path.name} is damaged: sha256 mismatch")
    return path


class PartsReader(io.RawIOBase):
    """The parts of a split bundle as one sequential stream (``seek(0)`` only, for sniffing)."""

    def __init__(self, index_path: Path) -> None:
        super().__init__()
        self.index_path = index_path
        self.doc = load_index(index_path)
        for i in range(len(self.doc["parts"])):  # cheap: names a missing or truncated part up front
            _check_part(index_path, self.doc, i, full=False)
        self._i = -1
        self._fh: Any = None
        self._h = hashlib.sha256()
        self._next()

    def _next(self) -> bool:
        if self._fh is not None:
            self._fh.close()
            if self._h.hexdigest() != self.doc["parts"][self._i]["sha256"]:
                raise errors.PartDamaged(
                    f"{_label(self.index_path, self.doc, self._i)} of {self.index_path.name} is damaged: "
                    "sha256 mismatch"
                )
        self._i += 1
        self._fh = None
        if self._i >= len(self.doc["parts"]):
            return False
        self._fh = open(_check_part(self.index_path, self.doc, self._i, full=False), "rb")  # noqa: SIM115
        self._h = hashlib.sha256()
        return True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        if offset != 0 or whence != 0:
            raise io.UnsupportedOperation("split bundles are read sequentially")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._i = -1
        self._next()
        return 0

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        while self._fh is not None:
            n = self._fh.readinto(view)
            if n:
                self._h.update(view[:n])
                return int(n)
            if not self._next():
                break
        return 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        super().close()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        if isinstance(exc, errors.BundleError) and not isinstance(exc, errors.PartMissing | errors.PartDamaged):
            check(self.index_path)  # raises PartDamaged naming the part, replacing a vaguer error


def open_parts(index_path: Path) -> PartsReader:
    return PartsReader(index_path)


def is_split(path: Path) -> bool:
    """True when ``path`` is a split index (a small JSON file of our kind)."""
    try:
        if path.stat().st_size >= 4 << 20:
            return False
        with open(path, "rb") as fh:
            if not is_index(fh.read(64)):
                return False
        return load_index(path).get("kind") == KIND
    except (OSError, errors.BundleError):
        return False


def join(index_path: Path, out: Path) -> Path:
    """Reassemble the parts into ``out`` (every part checked on the way); atomic."""
    doc = load_index(index_path)
    tmp = out.with_name(f".{out.name}.join.tmp")
    total = hashlib.sha256()
    try:
        with open_parts(index_path) as reader, open(tmp, "wb") as fh:
            buf = bytearray(CHUNK)
            while n := reader.readinto(buf):
                total.update(buf[:n])
                fh.write(buf[:n])
            fh.flush()
            os.fsync(fh.fileno())
        if total.hexdigest() != doc.get("sha256"):
            raise errors.PartDamaged(f"{index_path.name}: the reassembled bundle does not match the index's sha256")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise errors.StoreError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
