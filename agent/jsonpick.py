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
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

#: What identifies an object (the REST path, labels, the implied health check), not its body.
HEAD = ("apiVersion", "kind", "metadata")

@dataclass(frozen=True)
class _Syntax:
    """The patterns, compiled once for ``str`` and once for ``bytes`` (JSON's structural characters
    are ASCII, and UTF-8 never uses ASCII bytes inside a multi-byte character, so the same scan
    works on the raw bytes of an answer, which then need not be decoded as a whole)."""

    ws: re.Pattern[Any]
    flat: re.Pattern[Any]
    string: re.Pattern[Any]
    scalar: re.Pattern[Any]


def _syntax(kind: type) -> _Syntax:
    def c(pattern: str) -> re.Pattern[Any]:
        return re.compile(pattern.encode() if kind is bytes else pattern, re.S)

    return _Syntax(
        ws=c(r"\s*"),
        # A run of anything but brackets, strings skipped whole (possessive: no backtracking state).
        flat=c(r'(?:[^"{}\[\]]++|"(?:[^"\\]++|\\.)*+")*+'),
        string=c(r'"(?:[^"\\]++|\\.)*+"'),
        scalar=c(r"[^,}\]\s]+"),
    )


_SYNTAX = {str: _syntax(str), bytes: _syntax(bytes)}


def top_level(text: str | bytes | bytearray, fields: Collection[str], *,
              without: Collection[str] = ()) -> dict[str, Any]:
    """The given top-level fields of the JSON object ``text``; every other value is skipped unparsed.

    Skipping follows JSON's syntax (strings with escapes, nesting) without building values; it
    trusts its source (the API server, the agent's own rendered cache) for well-formed JSON, and
    raises ValueError where ``text`` is visibly not a JSON object (it does not, e.g., check that
    brackets match in skipped parts). It stops as soon as it has every field: the rest of the
    object (a CRD's ~700 KB of schema after its metadata) is not even looked at. ``text`` may be
    the undecoded bytes: only the values returned are decoded.

    ``without``: keys dropped from every object inside the values as they are decoded, e.g. the
    ``managedFields`` of each item of a LIST (often a third of an object, never used by the
    agent): each is freed as soon as its object is built, so the answer never holds them all.
    """
    syntax = _SYNTAX[str if isinstance(text, str) else bytes]
    out: dict[str, Any] = {}
    i = _ws(syntax, text, 0)
    if _at(text, i) != "{":
        raise ValueError("not a JSON object")
    i = _ws(syntax, text, i + 1)
    if _at(text, i) == "}":
        return out
    while True:
        key_end = syntax.string.match(text, i)
        if _at(text, i) != '"' or key_end is None:
            raise ValueError(f"expected a key at {i}")
        key = json.loads(text[i : key_end.end()])
        i = _ws(syntax, text, key_end.end())
        if _at(text, i) != ":":
            raise ValueError(f"expected ':' at {i}")
        i = _ws(syntax, text, i + 1)
        end = _skip(syntax, text, i)
        if key in fields:
            out[key] = json.loads(text[i:end], object_pairs_hook=_dropping(without)) if without else \
                json.loads(text[i:end])
            if len(out) == len(fields):
                return out
        i = _ws(syntax, text, end)
        if _at(text, i) == "}":
            return out
        if _at(text, i) != ",":
            raise ValueError(f"expected ',' or '}}' at {i}")
        i = _ws(syntax, text, i + 1)


def _dropping(keys: Collection[str]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        return {key: value for key, value in pairs if key not in keys}

    return build


def _at(text: str | bytes | bytearray, i: int) -> str:
    """The character at ``i`` ('' past the end); for bytes, the byte as a character."""
    if i >= len(text):
        return ""
    char = text[i]
    return chr(char) if isinstance(char, int) else char


def _ws(syntax: _Syntax, text: str | bytes | bytearray, i: int) -> int:
    space = syntax.ws.match(text, i)
    return space.end() if space else i


def _skip(syntax: _Syntax, text: str | bytes | bytearray, i: int) -> int:
    """The index just after the JSON value that starts at ``i``."""
    first = _at(text, i)
    if first not in ("{", "["):  # a scalar: a string, or a number/true/false/null
        scalar = (syntax.string if first == '"' else syntax.scalar).match(text, i)
        if scalar is None or scalar.end() == i:
            raise ValueError(f"expected a value at {i}")
        return scalar.end()
    depth = 0
    while True:
        flat = syntax.flat.match(text, i)
        i = flat.end() if flat else i
        if i >= len(text):
            raise ValueError("unterminated JSON value")
        depth += 1 if _at(text, i) in "{[" else -1
        i += 1
        if depth == 0:
            return i


def head(document: bytes | str) -> dict[str, Any]:
    """An object's :data:`HEAD` fields (``apiVersion``, ``kind``, ``metadata``) from its JSON.

    They come first in practice (the rendered cache keeps the manifests' key order, the API
    server writes them first), so the rest of a big document is neither decoded nor scanned.
    """
    return top_level(document, HEAD)
