"""Kubernetes resource quantities ("100m", "1.5", "128Mi", "1G", "2e3") as floats."""

from __future__ import annotations

import re

_SUFFIX = {
    "": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60,
}
_RE = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")


def parse(value: object) -> float:
    """Parse a quantity; raises ValueError on garbage (the API server would answer 422)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid quantity {value!r}")
    if isinstance(value, int | float):
        return float(value)
    m = _RE.match(str(value).strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
                         f": {value!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def fmt_memory(num_bytes: float) -> str:
    return f"{int(num_bytes // 1024)}Ki"


def fmt_cpu(cores: float) -> str:
    return str(int(cores)) if cores == int(cores) else f"{round(cores * 1000)}m"
