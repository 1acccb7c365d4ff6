"""Install-time placement by tier: priority class, the control-plane lifeboat, spread.

The installer calls :func:`apply_tier_policy` on every rendered object before server-side
apply. It is a pure function (the input is never mutated) and idempotent
(``apply(apply(x)) == apply(x)``), so re-applying a bundle or repairing drift never piles up
tolerations or affinity terms.

What it does to workloads (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob,
bare Pod), per the bundle's tier policy ``{priorityClassName, tolerateControlPlane, spread}``:

* ``priorityClassName``: set on the pod spec. An upstream value that differs is *replaced*:
  the tier order (2 outranks 3 outranks 4) is what lets Kubernetes' own preemption agree with
  the degradation plan, and upstream classes do not follow it (in the IDP Blueprint, Argo
  Events' ``platform-events`` and Kyverno's ``platform-policy`` outrank Prometheus'
  ``platform-observability``). A policy without a class leaves upstream's alone.
* ``tolerateControlPlane``: adds ``node-role.kubernetes.io/control-plane:NoSchedule``
  (operator ``Exists``) unless an existing toleration already covers it. Tolerations are never
  removed: DaemonSets (node agents) legitimately tolerate every taint, and a lower tier that
  lands on the server node is preempted there by tier 2's higher priority anyway.
* ``spread``: adds a *preferred* pod anti-affinity term (weight 100, topology
  ``kubernetes.io/hostname``) selecting the workload's own pods (its ``spec.selector``
  ``matchLabels``), so replicas spread over nodes while capacity allows and still consolidate
  onto one node when it does not. Skipped for DaemonSets (one pod per node by construction),
  Jobs and CronJobs (run-to-completion) and for workloads without a usable selector. An
  upstream *required* anti-affinity is kept as is: it is upstream's explicit intent, and the
  degradation planner honours it (at most one such pod per node).

What changed is reported as short codes (:data:`CHANGES`), which the installer keeps per object
in the rendered cache and the inventory ConfigMap: a code, not the patched object or a sentence,
because the daemon holds the current and the last good bundle's inventory within its 64 MiB.

Every other object, and every other field, is returned unchanged. Required node affinity or a
``nodeSelector`` that excludes the server node is *not* relaxed for tier 2; the degradation
planner sees it and reports that tier 2 cannot reach the lifeboat instead of silently
rewriting scheduling intent.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CONTROL_PLANE_TAINT = "node-role.kubernetes.io/control-plane"
HOSTNAME_TOPOLOGY = "kubernetes.io/hostname"
SPREAD_WEIGHT = 100
CONTROL_PLANE_TOLERATION: dict[str, str] = {
    "key": CONTROL_PLANE_TAINT,
    "operator": "Exists",
    "effect": "NoSchedule",
}

#: kind → path from the object root to the pod spec.
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "Pod": ("spec",),
}
#: Kinds whose replicas spread over nodes: long-running, replicated by count.
SPREAD_KINDS = frozenset({"Deployment", "StatefulSet", "ReplicaSet"})

#: Change codes of :func:`patch`. ``priority``: the tier's class set where upstream had none;
#: ``priority-replaced``: an upstream class that disagreed with the tier order was replaced.
PRIORITY = "priority"
PRIORITY_REPLACED = "priority-replaced"
TOLERATION = "toleration"
SPREAD = "spread"
CHANGES: tuple[str, ...] = (PRIORITY, PRIORITY_REPLACED, TOLERATION, SPREAD)
#: Each code once, so the same code read back from JSON for many objects is one string object.
_INTERNED = {code: code for code in CHANGES}


class PolicyError(ValueError):
    """The tier policy is unusable (missing tier, wrong types); one line naming what."""


def policy_fields(policy: Any, *, tier: int) -> tuple[str | None, bool, bool]:
    """Normalise a tier policy to ``(priorityClassName, tolerateControlPlane, spread)``.

    Accepts the bundle manifest's ``TierPolicy`` model (snake_case or camelCase attributes),
    a mapping with the manifest's camelCase keys, or a mapping of tier → either of those
    (keys ``2`` or ``"2"``), so the installer can pass the manifest's whole ``tiers`` table.
    """
    if isinstance(policy, Mapping):
        if tier in policy:
            return policy_fields(policy[tier], tier=tier)
        if str(tier) in policy:
            return policy_fields(policy[str(tier)], tier=tier)
        if policy and all(str(k).isdigit() for k in policy):
            raise PolicyError(f"tier policy has no entry for tier {tier} (tiers: {sorted(policy, key=str)})")
        get = policy.get
    elif hasattr(policy, "model_dump"):
        dumped = policy.model_dump(by_alias=True)
        snake = policy.model_dump()
        return policy_fields({**snake, **dumped}, tier=tier)
    else:

        def get(name: str, default: Any = None) -> Any:
            return getattr(policy, name, default)

    pcn = _first(get, "priorityClassName", "priority_class_name", "priority_class")
    tolerate = _first(get, "tolerateControlPlane", "tolerate_control_plane")
    spread = _first(get, "spread")
    if pcn is not None and (not isinstance(pcn, str) or not pcn):
        raise PolicyError(f"tier {tier} policy: priorityClassName must be a non-empty string, got {pcn!r}")
    for name, value in (("tolerateControlPlane", tolerate), ("spread", spread)):
        if value is not None and not isinstance(value, bool):
            raise PolicyError(f"tier {tier} policy: {name} must be a boolean, got {value!r}")
    return pcn, bool(tolerate), bool(spread)


def _first(get: Any, *names: str) -> Any:
    for name in names:
        value = get(name, None)
        if value is not None:
            return value
    return None


def pod_spec(obj: Mapping[str, Any]) -> Any:
    """The pod spec of a workload object, or None for anything else (read-only helper)."""
    path = POD_SPEC_PATHS.get(str(obj.get("kind", "")))
    if path is None:
        return None
    node: Any = obj
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node if isinstance(node, Mapping) else None


def apply_tier_policy(obj: dict[str, Any], *, tier: int, policy: Any) -> dict[str, Any]:
    """Return a copy of ``obj`` with the tier's placement applied (see the module docstring)."""
    return patch(obj, tier=tier, policy=policy)[0]


def patch(obj: dict[str, Any], *, tier: int, policy: Any) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Like :func:`apply_tier_policy`, plus the codes (:data:`CHANGES`) of what changed, for the inventory.

    An empty tuple means the object already conformed (or is not a workload). Workloads come
    back as a fresh copy either way; anything else is returned as is (it is never modified).
    """
    kind = str(obj.get("kind", ""))
    path = POD_SPEC_PATHS.get(kind)
    if path is None:
        return obj, ()
    pcn, tolerate, spread = policy_fields(policy, tier=tier)
    out = copy.deepcopy(obj)
    spec = _ensure_path(out, path)
    changes: list[str] = []

    if pcn is not None and spec.get("priorityClassName") != pcn:
        old = spec.get("priorityClassName")
        spec["priorityClassName"] = pcn
        # An explicit numeric priority set upstream would contradict the class (the API
        # server rejects a mismatch), so it goes along with the class it belonged to.
        if "priority" in spec:
            del spec["priority"]
        changes.append(PRIORITY_REPLACED if old else PRIORITY)

    if tolerate and not tolerates_control_plane(spec.get("tolerations")):
        tolerations = spec.get("tolerations")
        spec["tolerations"] = [*(tolerations if isinstance(tolerations, list) else []), dict(CONTROL_PLANE_TOLERATION)]
        changes.append(TOLERATION)

    if spread and kind in SPREAD_KINDS:
        selector = _selector_labels(out)
        if selector and not _has_spread(spec, selector):
            term = {
                "weight": SPREAD_WEIGHT,
                "podAffinityTerm": {
                    "labelSelector": {"matchLabels": dict(selector)},
                    "topologyKey": HOSTNAME_TOPOLOGY,
                },
            }
            affinity = _ensure_dict(spec, "affinity")
            anti = _ensure_dict(affinity, "podAntiAffinity")
            preferred = anti.get("preferredDuringSchedulingIgnoredDuringExecution")
            anti["preferredDuringSchedulingIgnoredDuringExecution"] = [
                *(preferred if isinstance(preferred, list) else []),
                term,
            ]
            changes.append(SPREAD)

    return out, tuple(changes)


def read_changes(raw: Any) -> tuple[str, ...]:
    """Change codes as stored (a JSON list), interned; codes this agent does not know are kept.

    Unknown codes come from a newer agent's cache or inventory: shown as they are rather than
    dropped, since they still say the object was patched.
    """
    if not isinstance(raw, list):
        return ()
    return tuple(_INTERNED.get(str(code), str(code)) for code in raw)


def tier_counts(objects: Iterable[tuple[int, Sequence[str]]]) -> dict[int, dict[str, int]]:
    """tier → {"objects": patched objects, code: objects with that change}, from (tier, codes) pairs.

    The concise view for ``edgefleet-agent status`` and the inventory's annotation; objects
    without changes are not counted (they already conformed, or are not workloads).
    """
    out: dict[int, dict[str, int]] = {}
    for tier, codes in objects:
        if not codes:
            continue
        counts = out.setdefault(tier, {"objects": 0})
        counts["objects"] += 1
        for code in codes:
            counts[code] = counts.get(code, 0) + 1
    return dict(sorted(out.items()))


def tolerates_control_plane(tolerations: Any) -> bool:
    """Whether a toleration list lets a pod schedule onto the tainted server node."""
    return tolerates(tolerations, key=CONTROL_PLANE_TAINT, value="", effect="NoSchedule")


def tolerates(tolerations: Any, *, key: str, value: str, effect: str) -> bool:
    """Kubernetes' toleration matching for one taint (``v1.Toleration.ToleratesTaint``)."""
    if not isinstance(tolerations, list):
        return False
    for t in tolerations:
        if not isinstance(t, Mapping):
            continue
        t_effect = t.get("effect") or ""
        if t_effect and t_effect != effect:
            continue
        t_key = t.get("key") or ""
        operator = t.get("operator") or "Equal"
        if not t_key:
            if operator == "Exists":
                return True
            continue
        if t_key != key:
            continue
        if operator == "Exists" or (operator == "Equal" and (t.get("value") or "") == value):
            return True
    return False


def _selector_labels(obj: Mapping[str, Any]) -> dict[str, str]:
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return {}
    selector = spec.get("selector")
    if isinstance(selector, Mapping) and isinstance(selector.get("matchLabels"), Mapping):
        return {str(k): str(v) for k, v in selector["matchLabels"].items()}
    return {}


def _has_spread(spec: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    affinity = spec.get("affinity")
    anti = affinity.get("podAntiAffinity") if isinstance(affinity, Mapping) else None
    if not isinstance(anti, Mapping):
        return False
    for item in anti.get("preferredDuringSchedulingIgnoredDuringExecution") or []:
        term = item.get("podAffinityTerm") if isinstance(item, Mapping) else None
        if _same_spread(term, selector):
            return True
    # A required spread over hostnames already says more than our preference would.
    required = anti.get("requiredDuringSchedulingIgnoredDuringExecution") or []
    return any(_same_spread(term, selector) for term in required)


def _same_spread(term: Any, selector: Mapping[str, str]) -> bool:
    if not isinstance(term, Mapping) or term.get("topologyKey") != HOSTNAME_TOPOLOGY:
        return False
    label_selector = term.get("labelSelector")
    if not isinstance(label_selector, Mapping) or label_selector.get("matchExpressions"):
        return False
    labels = label_selector.get("matchLabels")
    return isinstance(labels, Mapping) and {str(k): str(v) for k, v in labels.items()} == dict(selector)


def _ensure_dict(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        value = {}
        parent[key] = value
    return value


def _ensure_path(root: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = root
    for key in path:
        node = _ensure_dict(node, key)
    return node
