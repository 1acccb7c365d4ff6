"""The install-time placement record: rendered cache -> inventory ConfigMap -> ``status``.

The tier policy of install_kit.TIERS: tier 2 tolerates the control-plane taint and spreads,
tier 3 spreads, tier 4 is left alone. In site v1 that patches app-a's Deployment ``web`` (tier 2:
toleration + spread) and app-b's StatefulSet ``db`` (tier 3: spread); the tier-3 DaemonSet
(no spread for DaemonSets) and the tier-4 Deployment ``ui`` stay as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from install_kit import agent, context, managed

from agent import installer, intake, kube, placement
from agent.install import cache, inventory, model

WEB = "apps/Deployment/demo-a/web"
DB = "apps/StatefulSet/demo-b/db"
EXPECTED = {WEB: (placement.TOLERATION, placement.SPREAD), DB: (placement.SPREAD,)}


async def test_install_records_placement_in_cache_inventory_and_status(
    site_config: Path, api: Any, bundles: dict[str, Path]
) -> None:
    ctx = context(site_config)
    try:
        await intake.import_bundle(ctx, bundles["1.0.0"])
        run = await installer.run_pending(ctx, api)
        assert run is not None and run.state == "committed", run
        bundle_id = run.bundle_id
    finally:
        ctx.store.close()

    # The child renderer wrote the codes into the cache, per unit, for exactly the patched objects.
    target = cache.cache_dir(ctx.config.state_dir, bundle_id)
    doc = json.loads((target / cache.SPEC_FILE).read_text())
    stored = {key: tuple(codes) for u in doc["units"] for key, codes in u["placement"].items()}
    assert stored == EXPECTED
    spec = cache.read(target, default_timeout=60)
    assert spec is not None
    assert {k: v for u in spec.units for k, v in u.placement.items()} == EXPECTED

    # What the record says is what the cluster got.
    live = await managed(api)
    web_pod = placement.pod_spec(live[WEB])
    assert placement.tolerates_control_plane(web_pod.get("tolerations"))
    assert web_pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert "affinity" not in placement.pod_spec(live["apps/Deployment/demo-a/ui"])

    # The inventory ConfigMap carries the record next to the object keys.
    cm = await kube.get(api, "v1", "ConfigMap", inventory.name_for(bundle_name="site", release=1),
                        namespace=model.SYSTEM_NAMESPACE)
    assert cm is not None
    assert inventory.decode_placement(cm) == EXPECTED
    assert cm["metadata"]["annotations"]["edgefleet.io/placement"] == "tier2=1,tier3=1"
    assert WEB in inventory.decode(cm) and cm["metadata"]["annotations"]["edgefleet.io/state"] == "committed"

    # status: counts per tier by default, the objects on request, everything in --json.
    code, out, err = await agent(site_config, "status")
    assert code == 0, err
    [line] = [ln for ln in out.splitlines() if ln.strip().startswith("placement:")]
    assert "tier 2: 1 (toleration 1, spread 1)" in line and "tier 3: 1 (spread 1)" in line, line
    assert WEB not in out
    code, out, err = await agent(site_config, "status", "--placement")
    assert code == 0, err
    assert f"tier 2 {WEB} (app-a): toleration, spread" in out and f"tier 3 {DB} (app-b): spread" in out
    code, out, err = await agent(site_config, "status", "--json")
    assert code == 0, err
    record = json.loads(out)["placement"]
    assert record["recorded"] and record["bundle_id"] == bundle_id
    assert record["by_tier"] == {"2": {"objects": 1, "toleration": 1, "spread": 1}, "3": {"objects": 1, "spread": 1}}
    assert {o["key"]: tuple(o["changes"]) for o in record["objects"]} == EXPECTED


def test_inventory_without_placement_still_decodes() -> None:
    """An inventory written by an older agent (objects only) reads as before, with no record."""
    refs = {WEB: "app-a", "/v1/ConfigMap/demo-a/x": "app-a"}
    old = {"data": {"objects.json": json.dumps(refs)}}
    assert inventory.decode(old) == refs
    assert inventory.decode_placement(old) == {}
    data, binary = inventory.encode(refs, EXPECTED)
    new = {"data": data, "binaryData": binary}
    assert inventory.decode(new) == refs and inventory.decode_placement(new) == EXPECTED


def test_large_inventory_compresses_each_document() -> None:
    refs = {f"apps/Deployment/ns/w{i:05d}": "big" for i in range(8000)}
    record = {key: (placement.PRIORITY_REPLACED, placement.TOLERATION, placement.SPREAD) for key in refs}
    data, binary = inventory.encode(refs, record)
    assert data == {} and set(binary) == {"objects.json.zst", "placement.json.zst"}
    cm = {"binaryData": binary}
    assert inventory.decode(cm) == refs and inventory.decode_placement(cm) == record


def test_cache_of_an_older_version_is_rendered_again(tmp_path: Path) -> None:
    """A v2 cache has no placement: read() refuses it, which makes ensure() render the bundle again."""
    unit = model.Unit(name="app-a", layer=1, tier=2, namespace="demo-a", depends_on=(), gate_timeout=5)
    unit.set_objects([{"apiVersion": "apps/v1", "kind": "Deployment",
                       "metadata": {"name": "web", "namespace": "demo-a"}}])
    unit.placement = {WEB: EXPECTED[WEB]}
    spec = model.Spec(bundle_id="b1", name="site", version="1", release=1, created="", path="", units=[unit])
    target = tmp_path / "rendered" / "b1"
    cache.write(spec, target, declared={})
    again = cache.read(target, default_timeout=5)
    assert again is not None and again.units[0].placement == {WEB: EXPECTED[WEB]}
    # Keys of the record are the unit's own key strings, and codes are shared: no per-object copies.
    [(key, codes)] = again.units[0].placement.items()
    assert key is again.units[0].keys[0] and codes[0] is placement.TOLERATION
    doc = json.loads((target / cache.SPEC_FILE).read_text())
    doc["version"] = 2
    for u in doc["units"]:
        del u["placement"]
    (target / cache.SPEC_FILE).write_text(json.dumps(doc))
    assert cache.read(target, default_timeout=5) is None


def test_cached_spec_reads_its_documents_from_disk(tmp_path: Path) -> None:
    """A spec read from the cache holds no blob (its files are read on each pass); a missing blob
    file makes read() refuse the cache (ensure() then renders again) instead of failing later."""
    unit = model.Unit(name="app-a", layer=1, tier=2, namespace="demo-a", depends_on=(), gate_timeout=5)
    objects = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i}", "namespace": "demo-a"},
                "data": {"k": "v" * i}} for i in range(3)]
    unit.set_objects(objects)
    empty = model.Unit(name="app-b", layer=1, tier=2, namespace="demo-b", depends_on=(), gate_timeout=5)
    empty.set_objects([])
    spec = model.Spec(bundle_id="b1", name="site", version="1", release=1, created="", path="",
                      units=[unit, empty])
    target = tmp_path / "rendered" / "b1"
    cache.write(spec, target, declared={})
    again = cache.read(target, default_timeout=5)
    assert again is not None
    assert [u.blob for u in again.units] == [b"", b""] and all(u.blob_path for u in again.units)
    assert again.units[0].objects == objects and again.units[1].objects == []
    assert [key for key, _ in again.units[0].documents()] == unit.keys
    assert again.units[0].packed() == unit.blob
    again.units[0].blob_path.unlink()  # type: ignore[union-attr]
    assert cache.read(target, default_timeout=5) is None
