"""Bundle side: images collected, resolved, arch-filtered, laid out as an OCI layout and verified."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import img_kit
import pytest
from img_kit import APP, TOOL, WIDGET

from bundles import errors, oci, trust, verify
from bundles import images as bundle_images


def test_parse_ref_normalizes_like_docker() -> None:
    assert str(bundle_images.parse_ref("nginx")) == "docker.io/library/nginx:latest"
    assert str(bundle_images.parse_ref("grafana/grafana:11")) == "docker.io/grafana/grafana:11"
    assert str(bundle_images.parse_ref("localhost:5000/a/b:1")) == "localhost:5000/a/b:1"
    pinned = bundle_images.parse_ref("quay.io/x/y:1@sha256:" + "a" * 64)
    assert (pinned.registry, pinned.repository, pinned.tag) == ("quay.io", "x/y", "1")
    with pytest.raises(ValueError):
        bundle_images.parse_ref("Upper/Case:1")
    with pytest.raises(ValueError):
        bundle_images.parse_ref("a b")
    for bad in ("docker.io/../etc:1", "quay.io/a//b", "ho st/x:1", "x/-a:1"):
        with pytest.raises(ValueError):
            bundle_images.parse_ref(bad)


def test_build_carries_every_image_as_a_verified_oci_layout(tmp_path: Path) -> None:
    src = tmp_path / "src"
    made = img_kit.make_source(src)
    s = img_kit.Signer(tmp_path)
    res = s.build(tmp_path / "b.efb", source=src)
    m = res.manifest
    assert set(m.component("app").images) == {APP, TOOL}

    staged = verify.verify_and_stage(res.path, root=trust.load_root(s.root_path), store_dir=tmp_path / "store")
    layout = staged.payload_dir / "images"
    meta = bundle_images.load_meta(layout)
    refs = {i["ref"]: i for i in meta["images"]}
    assert set(refs) == {bundle_images.normalize(x) for x in (APP, TOOL, WIDGET)}  # pod templates + CR field
    assert refs[bundle_images.normalize(WIDGET)]["components"] == ["extra"]
    assert refs[bundle_images.normalize(TOOL)]["components"] == ["app", "extra"]
    assert refs[APP]["digest"] == made["app"].digest and refs[APP]["tag"] == "1.0"
    # every blob: listed in the signed manifest, content-addressed, stored once
    listed = {f.path: f for f in m.files}
    blobs = [b["digest"] for b in meta["blobs"]]
    assert len(blobs) == len(set(blobs))
    for d in blobs:
        entry = listed[f"images/blobs/sha256/{oci.check_digest(d)}"]
        assert "sha256:" + entry.sha256 == d
        oci.verify_blob(oci.blob_path(layout, d), d, entry.size)
    # base layer shared by app (both arches) and tool: one file
    app_layers = set(refs[APP]["blobs"]) & set(refs[bundle_images.normalize(TOOL)]["blobs"])
    assert len(app_layers) == 1
    # the staged directory is a valid OCI layout of exactly these images
    index = {d.annotations[oci.REF_NAME]: d.digest for d in oci.read_index(layout)}
    assert index == {r: i["digest"] for r, i in refs.items()}


def test_arch_filter_keeps_only_the_bundle_arch(tmp_path: Path) -> None:
    src = tmp_path / "src"
    made = img_kit.make_source(src)
    s = img_kit.Signer(tmp_path)
    res = s.build(tmp_path / "b.efb", source=src, arches=("arm64",))
    assert res.manifest.compat.architectures == ("arm64",)
    staged = verify.verify_and_stage(res.path, root=trust.load_root(s.root_path), store_dir=tmp_path / "store")
    layout = staged.payload_dir / "images"
    app = next(i for i in bundle_images.load_meta(layout)["images"] if i["ref"] == APP)
    assert app["sourceDigest"] == made["app"].digest and app["digest"] != made["app"].digest
    index = oci.read_json(layout, oci.Descriptor(oci.MT_INDEX, app["digest"], app["size"]))
    assert [c["digest"] for c in index["manifests"]] == [made["app-arm64"].digest]
    assert made["app-amd64"].digest not in app["blobs"]


def test_single_arch_image_of_another_arch_is_refused_naming_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    img_kit.make_source(src, arm_tools=False)
    with pytest.raises(errors.BuildError, match=r"image busybox:1.36 .*is amd64, the bundle wants arm64"):
        img_kit.Signer(tmp_path).build(tmp_path / "d.efb", source=src, arches=("arm64",))


def test_missing_image_is_a_build_error_naming_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    img_kit.make_source(src)
    s = img_kit.Signer(tmp_path)
    with pytest.raises(errors.BuildError, match=r"image registry.example.com/team/app:9.9 \(component app\) is not in"):
        s.build(tmp_path / "b.efb", source=src, app_image="registry.example.com/team/app:9.9")
    assert not (tmp_path / "b.efb").exists()
    # without images the same profile builds (today's behaviour; references still recorded)
    res = s.build(tmp_path / "n.efb", source=None, app_image="registry.example.com/team/app:9.9")
    assert not [f for f in res.manifest.files if f.path.startswith("images/")]


def test_corrupt_source_blob_is_refused_at_build(tmp_path: Path) -> None:
    src = tmp_path / "src"
    made = img_kit.make_source(src, arm_tools=False)
    cfg = json.loads(oci.blob_path(src, made["widget"].digest).read_bytes())["layers"][0]["digest"]
    p = oci.blob_path(src, cfg)
    data = bytearray(p.read_bytes())
    data[100] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(errors.BuildError, match=r"image quay.io/acme/widget:2.1: blob .* does not match"):
        img_kit.Signer(tmp_path).build(tmp_path / "b.efb", source=src)


def test_tampered_blob_in_bundle_is_rejected_store_untouched(tmp_path: Path) -> None:
    src = tmp_path / "src"
    img_kit.make_source(src)
    s = img_kit.Signer(tmp_path)
    res = s.build(tmp_path / "b.efb", source=src)
    raw = bytearray(res.path.read_bytes())
    blob = next(f for f in res.manifest.files if f.path.startswith("images/blobs/") and f.size > 60000)
    # find the blob's bytes in the (uncompressed) container and flip one
    digest_hex = blob.sha256
    data = oci.blob_path(src, "sha256:" + digest_hex).read_bytes()
    at = bytes(raw).find(data[:4096])
    assert at > 0
    raw[at + 5000] ^= 0xFF
    bad = tmp_path / "bad.efb"
    bad.write_bytes(bytes(raw))
    assert hashlib.sha256(bytes(raw)).hexdigest() != hashlib.sha256(res.path.read_bytes()).hexdigest()
    store = tmp_path / "store"
    with pytest.raises(errors.DigestMismatch, match=f"images/blobs/sha256/{digest_hex}"):
        verify.verify_and_stage(bad, root=trust.load_root(s.root_path), store_dir=store)
    assert [p.name for p in store.iterdir()] == []


@pytest.mark.slow  # renders the whole IDP (~30 s on a loaded CI machine)
def test_idp_profile_names_its_custom_resource_images(tmp_path: Path, platform: Path) -> None:
    from bundles import build

    prof = build.load_profile(build.DEFAULT_PROFILE)
    rendered = build.render(prof, platform=platform / "idp-blueprint", mirror=platform / "mirror", work=tmp_path,
                            allow_unrendered=True, prefer_mirror=True)
    refs = bundle_images.referenced(rendered.components, rendered.sources, prof.image_fields)
    assert refs["quay.io/prometheus/prometheus:v3.5.0"] == ["prometheus"]  # a Prometheus CR field
    assert "roucru/idp-blueprint:ops" in refs  # a WorkflowTemplate script image
    for r in refs:
        bundle_images.parse_ref(r)
    empty = tmp_path / "empty"
    oci.init_layout(empty)
    with pytest.raises(errors.BuildError, match=r"^image \S+ \(component [a-z-]+(, [a-z-]+)*\) is not in oci:"):
        bundle_images.add_images(rendered.components, rendered.sources, fields=prof.image_fields,
                                 options=bundle_images.Options(source=f"oci:{empty}", arches=("amd64",)),
                                 work=tmp_path / "_images")



def _crd(group: str, kind: str) -> dict[str, object]:
    plural = kind.lower() + "s"
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


def _obj(api: str, kind: str, name: str, **body: object) -> dict[str, object]:
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": "demo"}, **body}


def test_images_collected_from_every_pod_template_kind_and_named_cr_fields(tmp_path: Path) -> None:
    """Deployments, StatefulSets, DaemonSets, Jobs, CronJobs and Pods (containers, init and ephemeral
    containers), plus the custom-resource fields the profile names; nothing else that looks like an image."""
    import yaml

    from bundles import build

    def pod(image: str, **extra: object) -> dict[str, object]:
        return {"containers": [{"name": "c", "image": image}], **extra}

    sel = {"selector": {"matchLabels": {"app": "x"}}}
    tmpl = {"metadata": {"labels": {"app": "x"}}}
    once = {"restartPolicy": "Never"}
    objects = [
        _obj("apps/v1", "Deployment", "d", spec={**sel, "template": {**tmpl, "spec": pod(
            "deploy:1", initContainers=[{"name": "i", "image": "init:1"}])}}),
        _obj("apps/v1", "StatefulSet", "s", spec={**sel, "serviceName": "s",
                                                  "template": {**tmpl, "spec": pod("sts:1")}}),
        _obj("apps/v1", "DaemonSet", "ds", spec={**sel, "template": {**tmpl, "spec": pod("ds:1")}}),
        _obj("batch/v1", "Job", "j", spec={"template": {"spec": pod("job:1", **once)}}),
        _obj("batch/v1", "CronJob", "cj", spec={"schedule": "* * * * *", "jobTemplate": {"spec": {
            "template": {"spec": pod("cron:1", **once)}}}}),
        _obj("v1", "Pod", "p", spec=pod("pod:1", ephemeralContainers=[{"name": "e", "image": "debug:1"}])),
        _obj("v1", "ConfigMap", "cm", data={"image": "not-an-image:1"}),
        _obj("example.io/v1", "Widget", "w", spec={"image": "named-field:1", "other": {"image": "unnamed:1"}}),
        _obj("other.io/v1", "Gadget", "g", spec={"image": "wrong-group:1"}),
    ]
    doc = {
        "name": "kinds", "tiers": {1: {}},
        "imageFields": [{"kind": "Widget", "group": "example.io", "path": "spec.image"},
                        {"kind": "Gadget", "group": "example.io", "path": "spec.image"}],
        "components": [
            {"name": "base", "layer": 0, "tier": 1, "sources": [{"inline": "base.yaml", "objects": [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}},
                _crd("example.io", "Widget"), _crd("other.io", "Gadget")]}]},
            {"name": "kinds", "layer": 1, "tier": 1, "namespace": "demo", "dependsOn": ["base"],
             "sources": [{"inline": "kinds.yaml", "objects": objects}]},
        ],
    }
    prof_path = tmp_path / "kinds.yaml"
    prof_path.write_text(yaml.safe_dump(doc))
    prof = build.load_profile(prof_path)
    rendered = build.render(prof, platform=tmp_path, mirror=None, work=tmp_path / "w")
    comp = next(c for c in rendered.components if c.name == "kinds")
    assert set(comp.images) == {"deploy:1", "init:1", "sts:1", "ds:1", "job:1", "cron:1", "pod:1", "debug:1"}
    refs = bundle_images.referenced(rendered.components, rendered.sources, prof.image_fields)
    assert set(refs) == set(comp.images) | {"named-field:1"}
    assert refs["named-field:1"] == ["kinds"]
