"""The rendered-spec cache: render a bundle once, in a child process, and keep the result on disk.

Why a child process: parsing a full platform bundle's YAML (~25 MB, big CRDs) and rendering it
takes seconds and ~60 MB of Python heap. In the daemon that heap would stay (CPython seldom
returns fragmented arenas to the OS), so the agent would idle at twice its budget. A child
renders, writes ``<state_dir>/rendered/<bundle id>/`` and exits, giving the memory back; the
daemon reads only the compact result (per component: zstd-compressed JSON, metadata in
``spec.json``). It is derived from the verified, staged bundle and written atomically
(temp dir + rename) in the agent's private state directory, so it is as trusted as the store.

Run by hand (debugging): ``python -m agent.install.cache <staged bundle dir> <cache dir>``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent import placement
from agent.install import model

#: 2: one JSON document per line in the blobs (see model.pack); 3: per-unit ``placement``
#: (object key → change codes). Older caches are rendered again, so the inventory never shows
#: "nothing patched" for a bundle merely rendered by an older agent. 4: blobs with a 256 KiB zstd
#: window (model.compress), so streaming a component's documents stays small.
VERSION = 4
SPEC_FILE = "spec.json"


def cache_dir(state_dir: Path, bundle_id: str) -> Path:
    return state_dir / "rendered" / bundle_id


def write(spec: model.Spec, target: Path, *, declared: dict[str, float | None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".render-", dir=target.parent))
    try:
        units = []
        for i, unit in enumerate(spec.units):
            blob = f"{i:03d}-{unit.name}.json.zst"
            (tmp / blob).write_bytes(unit.packed())
            units.append({
                "name": unit.name, "layer": unit.layer, "tier": unit.tier, "namespace": unit.namespace,
                "depends_on": list(unit.depends_on), "declared_timeout": declared.get(unit.name),
                "checks": unit.checks, "images": unit.images, "keys": unit.keys,
                "kinds": sorted(list(k) for k in unit.kinds), "gate_checks": unit.gate_checks, "blob": blob,
                "placement": {key: list(codes) for key, codes in sorted(unit.placement.items())},
            })
        doc = {
            "version": VERSION, "bundle_id": spec.bundle_id, "name": spec.name, "version_": spec.version,
            "release": spec.release, "created": spec.created, "path": spec.path,
            "units": units,
        }
        with (tmp / SPEC_FILE).open("w", encoding="utf-8") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read(target: Path, *, default_timeout: float) -> model.Spec | None:
    """The cached spec (its blobs stay on disk), or None if there is none, it is from another cache
    version or a blob file is missing."""
    try:
        doc = json.loads((target / SPEC_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if doc.get("version") != VERSION:
        return None
    units = []
    for u in doc["units"]:
        timeout = u["declared_timeout"]
        keys = u["keys"]
        if not (target / u["blob"]).is_file():  # read on each use from now on: missing means render again
            return None
        units.append(model.Unit(
            name=u["name"], layer=u["layer"], tier=u["tier"], namespace=u["namespace"],
            depends_on=tuple(u["depends_on"]), gate_timeout=float(timeout) if timeout else default_timeout,
            checks=u["checks"], images=u["images"], blob_path=target / u["blob"], keys=keys,
            kinds={(k[0], k[1]) for k in u["kinds"]}, gate_checks=u["gate_checks"],
            placement=read_placement(u.get("placement"), keys=keys),
        ))
    return model.Spec(
        bundle_id=doc["bundle_id"], name=doc["name"], version=doc["version_"], release=doc["release"],
        created=doc["created"], path=doc["path"], units=units,
    )


def read_placement(raw: Any, *, keys: list[str]) -> dict[str, tuple[str, ...]]:
    """A unit's stored placement record, keyed by the unit's own key strings (no second copy of each).

    Entries for keys the unit does not have are dropped: the record describes the unit's objects.
    """
    if not isinstance(raw, dict):
        return {}
    own = {key: key for key in keys}
    return {own[key]: placement.read_changes(codes) for key, codes in raw.items() if key in own}


def render_to(staged: Path, target: Path) -> None:
    """Render the staged bundle into ``target`` (in this process)."""
    from agent.install import source

    manifest_json = (staged / "manifest.json").read_text(encoding="utf-8")
    spec = source.load_spec(manifest_json=manifest_json, bundle_id=staged.name, path=str(staged),
                            default_timeout=0.0)
    write(spec, target, declared=source.declared_timeouts(manifest_json))


class RenderError(Exception):
    pass


async def ensure(staged: Path, target: Path, *, default_timeout: float) -> model.Spec:
    """The bundle's spec: from the cache, else rendered by a child process first."""
    spec = read(target, default_timeout=default_timeout)
    if spec is not None:
        return spec
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.install.cache", str(staged), str(target),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        lines = [line for line in err.decode(errors="replace").strip().splitlines() if line.strip()]
        raise RenderError(lines[-1] if lines else f"renderer exited with {proc.returncode}")
    spec = read(target, default_timeout=default_timeout)
    if spec is None:
        raise RenderError(f"renderer wrote no spec into {target}")
    return spec


def _main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m agent.install.cache STAGED_DIR CACHE_DIR", file=sys.stderr)
        return 2
    try:
        render_to(Path(argv[0]), Path(argv[1]))
    except Exception as exc:
        print(f"render failed: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


