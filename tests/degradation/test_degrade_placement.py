"""agent.placement: install-time tier policy on rendered objects (pure, idempotent)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import placement

T2 = {"priorityClassName": "edgefleet-tier-2", "tolerateControlPlane": True, "spread": True}
T3 = {"priorityClassName": "edgefleet-tier-3", "tolerateControlPlane": False, "spread": True}
T4 = {"priorityClassName": "edgefleet-tier-4", "tolerateControlPlane": False, "spread": False}
CP_TOL = {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}


def deployment(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "apps"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c"}], **spec}},
        },
    }


def test_tier2_gets_class_toleration_and_spread() -> None:
    obj = deployment()
    out = placement.apply_tier_policy(obj, tier=2, policy=T2)
    spec = out["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "edgefleet-tier-2"
    assert spec["tolerations"] == [CP_TOL]
    (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"] == {
        "labelSelector": {"matchLabels": {"app": "web"}},
        "topologyKey": "kubernetes.io/hostname",
    }
    assert obj == deployment(), "the input must not be mutated"


def test_tier3_spread_without_toleration_tier4_neither() -> None:
    spec3 = placement.apply_tier_policy(deployment(), tier=3, policy=T3)["spec"]["template"]["spec"]
    assert "tolerations" not in spec3 and "affinity" in spec3
    spec4 = placement.apply_tier_policy(deployment(), tier=4, policy=T4)["spec"]["template"]["spec"]
    assert spec4["priorityClassName"] == "edgefleet-tier-4"
    assert "tolerations" not in spec4 and "affinity" not in spec4


def test_conflicting_priority_class_is_replaced_with_its_numeric_priority() -> None:
    obj = deployment(priorityClassName="platform-events", priority=200000)
    out, changes = placement.patch(obj, tier=2, policy=T2)
    spec = out["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "edgefleet-tier-2" and "priority" not in spec
    assert changes == (placement.PRIORITY_REPLACED, placement.TOLERATION, placement.SPREAD)


def test_policy_without_class_keeps_upstream_class() -> None:
    out = placement.apply_tier_policy(
        deployment(priorityClassName="platform-infrastructure"), tier=1, policy={"tolerateControlPlane": False}
    )
    assert out["spec"]["template"]["spec"]["priorityClassName"] == "platform-infrastructure"


def test_existing_tolerations_are_kept_and_covering_ones_not_duplicated() -> None:
    keep = {"key": "dedicated", "operator": "Equal", "value": "x", "effect": "NoSchedule"}
    out = placement.apply_tier_policy(deployment(tolerations=[keep]), tier=2, policy=T2)
    assert out["spec"]["template"]["spec"]["tolerations"] == [keep, CP_TOL]
    cp_exists = {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}
    for covering in ([{"operator": "Exists"}], [cp_exists]):
        out = placement.apply_tier_policy(deployment(tolerations=covering), tier=2, policy=T2)
        assert out["spec"]["template"]["spec"]["tolerations"] == covering


def test_lower_tier_tolerations_are_never_removed() -> None:
    out = placement.apply_tier_policy(deployment(tolerations=[CP_TOL]), tier=4, policy=T4)
    assert out["spec"]["template"]["spec"]["tolerations"] == [CP_TOL]


def test_upstream_affinity_is_kept_and_spread_added_once() -> None:
    node_aff = {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 100,
                "preference": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["infra"]}]},
            }
        ]
    }
    obj = deployment(affinity={"nodeAffinity": node_aff})
    once = placement.apply_tier_policy(obj, tier=2, policy=T2)
    twice = placement.apply_tier_policy(once, tier=2, policy=T2)
    assert once == twice
    assert once["spec"]["template"]["spec"]["affinity"]["nodeAffinity"] == node_aff


def test_required_hostname_anti_affinity_counts_as_spread() -> None:
    req = [{"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]
    obj = deployment(affinity={"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": req}})
    out, changes = placement.patch(obj, tier=3, policy=T3)
    assert placement.SPREAD not in changes
    assert out["spec"]["template"]["spec"]["affinity"] == obj["spec"]["template"]["spec"]["affinity"]


@pytest.mark.parametrize("kind", ["DaemonSet", "Job"])
def test_no_spread_for_daemonsets_and_jobs(kind: str) -> None:
    obj = deployment()
    obj["kind"] = kind
    out = placement.apply_tier_policy(obj, tier=2, policy=T2)
    spec = out["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "edgefleet-tier-2" and spec["tolerations"] == [CP_TOL]
    assert "affinity" not in spec


def test_cronjob_pod_template_is_patched() -> None:
    obj = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "scan"},
        "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": {"spec": {"containers": []}}}}},
    }
    out = placement.apply_tier_policy(obj, tier=2, policy=T2)
    spec = out["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "edgefleet-tier-2" and spec["tolerations"] == [CP_TOL]


@pytest.mark.parametrize("kind", ["ConfigMap", "Service", "PriorityClass", "CustomResourceDefinition", "Prometheus"])
def test_other_objects_untouched(kind: str) -> None:
    obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": "x"}, "spec": {"template": {"spec": {}}}}
    out, changes = placement.patch(obj, tier=2, policy=T2)
    assert out == obj and changes == ()


def test_policy_forms_table_model_and_errors() -> None:
    table = {"2": T2, "3": T3}
    assert placement.policy_fields(table, tier=2) == ("edgefleet-tier-2", True, True)
    assert placement.policy_fields({3: T3}, tier=3) == ("edgefleet-tier-3", False, True)

    class Model:  # attribute access, as a pydantic model without aliases would offer
        priority_class_name = "pc"
        tolerate_control_plane = True
        spread = False

    assert placement.policy_fields(Model(), tier=2) == ("pc", True, False)
    with pytest.raises(placement.PolicyError, match="no entry for tier 4"):
        placement.policy_fields(table, tier=4)
    with pytest.raises(placement.PolicyError, match="spread must be a boolean"):
        placement.policy_fields({"spread": "yes"}, tier=2)


def test_pydantic_model_with_aliases() -> None:
    from pydantic import BaseModel, ConfigDict, Field

    class TierPolicy(BaseModel):
        model_config = ConfigDict(populate_by_name=True)
        priority_class_name: str | None = Field(default=None, alias="priorityClassName")
        tolerate_control_plane: bool = Field(default=False, alias="tolerateControlPlane")
        spread: bool = False

    policy = TierPolicy(priorityClassName="pc2", tolerateControlPlane=True, spread=True)
    out = placement.apply_tier_policy(deployment(), tier=2, policy=policy)
    assert out["spec"]["template"]["spec"]["tolerations"] == [CP_TOL]


_tolerations = st.lists(
    st.fixed_dictionaries(
        {"key": st.sampled_from(["", "node-role.kubernetes.io/control-plane", "other"])},
        optional={
            "operator": st.sampled_from(["Exists", "Equal"]),
            "effect": st.sampled_from(["", "NoSchedule", "NoExecute"]),
            "value": st.sampled_from(["", "x"]),
        },
    ),
    max_size=3,
)


@settings(max_examples=200, deadline=None)
@given(
    tolerations=_tolerations,
    pcn=st.sampled_from([None, "platform-observability", "edgefleet-tier-2"]),
    tier=st.sampled_from([2, 3, 4]),
    kind=st.sampled_from(sorted(placement.POD_SPEC_PATHS)),
)
def test_idempotent_pure_and_conformant(
    tolerations: list[dict[str, str]], pcn: str | None, tier: int, kind: str
) -> None:
    obj = deployment(tolerations=tolerations, **({"priorityClassName": pcn} if pcn else {}))
    if kind == "CronJob":
        obj["spec"] = {"jobTemplate": {"spec": obj["spec"]}}
    elif kind == "Pod":
        obj["spec"] = obj["spec"]["template"]["spec"]
    obj["kind"] = kind
    before = copy.deepcopy(obj)
    policy = {2: T2, 3: T3, 4: T4}
    once = placement.apply_tier_policy(obj, tier=tier, policy=policy)
    assert obj == before
    twice, changes = placement.patch(once, tier=tier, policy=policy)
    assert twice == once and changes == ()
    spec = placement.pod_spec(once)
    assert spec["priorityClassName"] == f"edgefleet-tier-{tier}"
    assert placement.tolerates_control_plane(spec.get("tolerations")) >= (tier == 2)
    # Every upstream toleration survives.
    assert all(t in spec["tolerations"] for t in tolerations)


def test_idp_blueprint_argocd_deployments(platform: Path) -> None:
    """The real Argo CD manifests: every workload conforms after the policy, nothing else changes."""
    docs = [
        d
        for d in yaml.load_all(
            (platform / "mirror/argo-cd/v3.1.8/manifests/install.yaml").read_text(),
            Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader),
        )
        if isinstance(d, dict)
    ]
    workloads = 0
    for doc in docs:
        out, changes = placement.patch(doc, tier=2, policy=T2)
        if doc["kind"] in ("Deployment", "StatefulSet"):
            workloads += 1
            assert changes
            assert placement.tolerates_control_plane(placement.pod_spec(out)["tolerations"])
        else:
            assert out == doc
    assert workloads >= 7


def test_bundle_manifest_tier_policies_from_the_profile() -> None:
    """The bundle manifest's own TierPolicy model and the shipped profile's tier table."""
    from bundles.manifest import TierPolicy

    profile = yaml.safe_load((Path(__file__).resolve().parents[2] / "bundles/profiles/idp-platform.yaml").read_text())
    tiers = {int(k): TierPolicy.model_validate(v) for k, v in profile["tiers"].items()}
    classes = {t: placement.policy_fields(p, tier=t)[0] for t, p in tiers.items()}
    assert all(classes.values())
    spec2 = placement.pod_spec(placement.apply_tier_policy(deployment(), tier=2, policy=tiers))
    assert spec2["priorityClassName"] == classes[2] and placement.tolerates_control_plane(spec2["tolerations"])
    spec4 = placement.pod_spec(placement.apply_tier_policy(deployment(), tier=4, policy=tiers[4]))
    assert spec4["priorityClassName"] == classes[4] and "tolerations" not in spec4 and "affinity" not in spec4


def test_profile_priority_classes_follow_the_tiers(platform: Path) -> None:
    """Kubernetes' own preemption must agree with the degradation order: tier 1 >= 2 > 3 > 4."""
    profile = yaml.safe_load((Path(__file__).resolve().parents[2] / "bundles/profiles/idp-platform.yaml").read_text())
    values: dict[str, int] = {}
    for doc in yaml.safe_load_all((platform / "idp-blueprint/IT/priorityclasses/priorityclasses.yaml").read_text()):
        if isinstance(doc, dict) and doc.get("kind") == "PriorityClass":
            values[doc["metadata"]["name"]] = int(doc["value"])
    for comp in profile["components"]:
        for source in comp.get("sources") or []:
            for obj in source.get("objects") or []:
                if obj.get("kind") == "PriorityClass":
                    values[obj["metadata"]["name"]] = int(obj["value"])
    tier_value = {int(t): values[p["priorityClassName"]] for t, p in profile["tiers"].items()}
    assert tier_value[1] >= tier_value[2] > tier_value[3] > tier_value[4], tier_value
