"""Reading a few top-level fields of a big JSON object without building the rest.

Why: the agent handles objects whose bulk it never needs: a CRD is up to ~700 KB of schema in the
IDP platform, and the agent wants its name, or its ``status``, or the API server's ``metadata``
in an answer that repeats the whole object. Parsed, such an object is megabytes of dicts, and
CPython keeps the heap a burst like that fragments for the rest of the process's life.
Stdlib only (:mod:`agent.install.model` uses it and must stay light).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

#: What identifies an object (the REST path, labels, the implied health check), not its body.
HEAD = ("apiVersion", "kind", "metadata")

_WS = re.compile(r"\s*")
#: A run of anything but brackets, strings skipped whole (possessive: no backtracking state).
_FLAT = re.compile(r'(?:[^"{}\[\]]++|"(?:[^"\\]++|\\.)*+")*+', re.S)
_decoder = json.JSONDecoder()


def top_level(text: str, fields: Collection[str]) -> dict[str, Any]:
    """The given top-level fields of the JSON object ``text``; every other value is skipped unparsed.

    Skipping follows JSON's syntax (strings with escapes, nesting) without building values; it
    trusts its source (the API server, the agent's own rendered cache) for well-formed JSON, and
    raises ValueError where ``text`` is visibly not a JSON object (it does not, e.g., check that
    brackets match in skipped parts). It stops as soon as it has every field: the rest of the
    object (a CRD's ~700 KB of schema after its metadata) is not even looked at.
    """
    out: dict[str, Any] = {}
    i = _ws(text, 0)
    if text[i : i + 1] != "{":
        raise ValueError("not a JSON object")
    i = _ws(text, i + 1)
    if text[i : i + 1] == "}":
        return out
    while True:
        if text[i : i + 1] != '"':
            raise ValueError(f"expected a key at {i}")
        key, i = _decoder.raw_decode(text, i)
        i = _ws(text, i)
        if text[i : i + 1] != ":":
            raise ValueError(f"expected ':' at {i}")
        i = _ws(text, i + 1)
        if key in fields:
            out[key], i = _decoder.raw_decode(text, i)
            if len(out) == len(fields):
                return out
        else:
            i = _skip(text, i)
        i = _ws(text, i)
        if text[i : i + 1] == "}":
            return out
        if text[i : i + 1] != ",":
            raise ValueError(f"expected ',' or '}}' at {i}")
        i = _ws(text, i + 1)


def _ws(text: str, i: int) -> int:
    space = _WS.match(text, i)
    return space.end() if space else i


def _skip(text: str, i: int) -> int:
    """The index just after the JSON value that starts at ``i``."""
    if text[i : i + 1] not in ("{", "["):
        return _decoder.raw_decode(text, i)[1]  # a scalar: small
    depth = 0
    while True:
        flat = _FLAT.match(text, i)
        i = flat.end() if flat else i
        if i >= len(text):
            raise ValueError("unterminated JSON value")
        depth += 1 if text[i] in "{[" else -1
        i += 1
        if depth == 0:
            return i


def head(document: bytes | str) -> dict[str, Any]:
    """An object's :data:`HEAD` fields (``apiVersion``, ``kind``, ``metadata``) from its JSON.

    They come first in practice (the rendered cache keeps the manifests' key order, the API
    server writes them first), so a document given as bytes is decoded a prefix at a time,
    doubling it while the fields run past its end, instead of all at once.
    """
    if isinstance(document, str):
        return top_level(document, HEAD)
    size = 8192
    while size < len(document):
        try:
            # A cut inside a multi-byte character drops it; a parse that needed it runs out of text.
            return top_level(document[:size].decode("utf-8", "ignore"), HEAD)
        except (ValueError, IndexError):
            size *= 4
    return top_level(document.decode(), HEAD)

