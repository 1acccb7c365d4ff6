"""What agent.kube does to keep the agent small (docs/operations.md, "Memory").

* It defers the libraries kubernetes-asyncio imports for code paths the agent never takes:
  urllib3, dateutil's parser and multiprocessing's ThreadPool (~2 MiB at start) must stay
  unloaded after ``import agent.daemon`` and still work, unchanged, for code that does use them
  (including kubernetes-asyncio's own ``from x import y`` names). Fresh interpreters, since the
  test process itself may have imported them already.
* :func:`agent.kube.shared` gives the daemon's tasks one client (one TLS context and pool) per
  kubeconfig, closed with its last user, and a new one after the kubeconfig file changed.
* :func:`agent.jsonpick.top_level` decodes a few top-level fields of a big object (a CRD's status)
  without building the rest: it must agree with ``json.loads`` on any JSON object, and refuse
  what is not one.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sim.testing
from agent import jsonpick, kube
from agent.install import model

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         timeout=120)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_daemon_import_leaves_them_unloaded() -> None:
    result = _run(
        "import json, sys\n"
        "import agent.daemon\n"
        "loaded = [m for m in ('urllib3.poolmanager', 'dateutil.parser._parser', 'dateutil.tz') if m in sys.modules]\n"
        "print(json.dumps({'loaded': loaded, 'pool': 'Pool' in vars(sys.modules['multiprocessing.pool'])}))"
    )
    assert result == {"loaded": [], "pool": False}


def test_deferred_modules_work_when_used() -> None:
    result = _run(
        "import asyncio, json\n"
        "import agent.daemon\n"
        "from kubernetes_asyncio.client import api_client, configuration\n"
        "parsed = api_client.parse('2024-01-02T03:04:05Z').isoformat()\n"
        "c = configuration.Configuration(); c.username, c.password = 'u', 'p'\n"
        "auth = c.get_basic_auth_token()\n"
        "async def pooled():\n"
        "    client = api_client.ApiClient()\n"
        "    try:\n"
        "        return client.pool.apply(lambda: 42)\n"
        "    finally:\n"
        "        client.pool.close(); await client.close()\n"
        "answer = asyncio.run(pooled())\n"
        "import urllib3, dateutil.parser\n"
        "from multiprocessing.pool import ThreadPool, Pool\n"
        "print(json.dumps({'parsed': parsed, 'auth': auth, 'answer': answer,\n"
        "                  'urllib3': isinstance(urllib3.PoolManager, type),\n"
        "                  'iso': dateutil.parser.isoparse('2024-01-02').year, 'pool': Pool.__name__}))"
    )
    assert result == {
        "parsed": "2024-01-02T03:04:05+00:00", "auth": "Basic dTpw", "answer": 42, "urllib3": True, "iso": 2024,
        "pool": "Pool",
    }


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)
_tricky_keys = st.sampled_from(["status", "spec", 'st"a', "{", "]", "\\", "x y", ""])


@given(doc=st.dictionaries(_tricky_keys | st.text(max_size=8), _json, max_size=6), indent=st.sampled_from([None, 2]))
def test_top_level_agrees_with_json_loads(doc: dict[str, Any], indent: int | None) -> None:
    text = json.dumps(doc, indent=indent)
    for fields in (("status",), ("spec", 'st"a'), tuple(doc)):
        want = {k: v for k, v in json.loads(text).items() if k in fields}
        assert jsonpick.top_level(text, fields) == want
        raw = json.dumps(doc, indent=indent, ensure_ascii=False).encode()  # undecoded, as API answers are read
        assert jsonpick.top_level(raw, fields) == want


def test_top_level_without_drops_a_key_at_every_depth() -> None:
    page = {"metadata": {"continue": ""}, "items": [
        {"metadata": {"name": "a", "managedFields": [{"manager": "x"}]}, "spec": {"managedFields": 1}},
        {"metadata": {"name": "b"}, "data": {"k": '"managedFields": [1]'}},
    ]}
    got = jsonpick.top_level(json.dumps(page).encode(), ("items",), without=("managedFields",))
    assert got == {"items": [{"metadata": {"name": "a"}, "spec": {}},
                             {"metadata": {"name": "b"}, "data": {"k": '"managedFields": [1]'}}]}


def test_top_level_skips_brackets_and_quotes_inside_strings() -> None:
    text = '{"spec": {"a": ["}]", "\\"{["], "b": {"c": "]}"}}, "status": {"conditions": [{"type": "Established"}]}}'
    assert jsonpick.top_level(text, ("status",)) == {"status": {"conditions": [{"type": "Established"}]}}


@pytest.mark.parametrize("text", ["[1]", '{"a": 1', '{"a" 1}', '{"a": [1, 2}', '{"a": {"b": [}', "", '{"a": 1,}'])
def test_top_level_refuses_what_is_not_a_json_object(text: str) -> None:
    with pytest.raises(ValueError):
        jsonpick.top_level(text, ("status",))
    with pytest.raises(ValueError):
        jsonpick.top_level(text.encode(), ("status",))


async def test_shared_client_per_kubeconfig(tmp_path: Path) -> None:
    async with sim.testing.running(nodes=["server-0"]) as site:
        async with kube.shared(site.kubeconfig) as first, kube.shared(site.kubeconfig) as second:
            assert first is second
            assert (await kube.ping(first)).get("gitVersion")
            # k3s rewrites its kubeconfig when it rotates certificates: newcomers get a new client.
            site.kubeconfig.write_text(site.kubeconfig.read_text() + "\n")
            async with kube.shared(site.kubeconfig) as third:
                assert third is not first
                assert (await kube.ping(third)).get("gitVersion")
            assert third.rest_client.pool_manager.closed  # its last user left
            assert not first.rest_client.pool_manager.closed  # still in use
            assert (await kube.ping(first)).get("gitVersion")
        assert first.rest_client.pool_manager.closed
        async with kube.shared(site.kubeconfig) as fourth:
            assert fourth is not first


def _big_crd(props: int = 1500) -> dict[str, Any]:
    """A CRD with a ~700 KB schema of many small nodes, like the IDP platform's largest ones."""
    leaf = {"type": "object", "description": "what it does",
            "properties": {"name": {"type": "string"}, "port": {"type": "integer", "format": "int32"},
                           "tags": {"type": "array", "items": {"type": "string"}},
                           "mode": {"type": "string", "enum": ["a", "b", "c"]}}}
    schema = {"type": "object", "properties": {f"field{i}": leaf for i in range(props)}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com", "labels": {"app.kubernetes.io/managed-by": "edgefleet"}},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
                 "versions": [{"name": "v1", "served": True, "storage": True,
                               "schema": {"openAPIV3Schema": {"type": "object",
                                                              "properties": {"spec": schema}}}}]},
    }


async def test_a_rendered_document_is_applied_as_stored_without_parsing_its_body() -> None:
    """apply_document sends the stored JSON as the body: the live CRD has the document's spec,
    and its peak memory is well below what parsing the document and applying the dict costs."""
    import tracemalloc

    from agent.install import apply

    document = json.dumps(_big_crd(), separators=(",", ":")).encode()
    assert len(document) > 300_000
    # The sim in its own process: tracemalloc would count its side of the request too.
    with sim.testing.start_process(nodes=["server-0"]) as site:
        async with kube.connect(site.kubeconfig) as api:
            await kube.ping(api)
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            await apply.apply_object(api, json.loads(document), deadline=float("inf"))
            parsed_peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            head, _ = await apply.apply_document(api, document, deadline=float("inf"))
            raw_peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()
            assert head == jsonpick.head(document) and head["kind"] == "CustomResourceDefinition"
            live = await kube.get(api, "apiextensions.k8s.io/v1", "CustomResourceDefinition", "widgets.example.com")
            assert live is not None and live["spec"]["versions"] == json.loads(document)["spec"]["versions"]
            assert live["metadata"]["managedFields"][0]["manager"] == "edgefleet"
    # Raw: the body and the answer's text pass through (a few times the document), never its dicts.
    assert raw_peak < parsed_peak / 2, (raw_peak, parsed_peak, len(document))


async def test_an_answer_is_read_only_as_far_as_the_head_it_is_asked_for() -> None:
    """kube.apply(fields=("metadata",)) of a big CRD stops reading the answer once its metadata is
    in (the rest of the connection is dropped): the metadata is complete and right, and the
    client goes on working over fresh connections; other fields still read the whole answer."""
    crd = _big_crd()
    async with sim.testing.running(nodes=["server-0"]) as site, kube.connect(site.kubeconfig) as api:
        reads: list[int] = []
        real_pick = kube._pick

        async def counting_pick(response: Any, fields: Any, *, without: Any) -> Any:
            picked = await real_pick(response, fields, without=without)
            reads.append(response.content.total_bytes)
            return picked

        kube._pick = counting_pick  # type: ignore[assignment]
        try:
            answer = await kube.apply(api, crd, fields=("metadata",))
            status = await kube.get(api, "apiextensions.k8s.io/v1", "CustomResourceDefinition",
                                    "widgets.example.com", fields=("status",))
        finally:
            kube._pick = real_pick  # type: ignore[assignment]
        live = await kube.get(api, "apiextensions.k8s.io/v1", "CustomResourceDefinition", "widgets.example.com")
        assert live is not None and answer["metadata"]["uid"] == live["metadata"]["uid"]
        assert answer["metadata"]["managedFields"] == live["metadata"]["managedFields"][:1]  # then the status
        assert status is not None and "conditions" in status["status"]
        whole = len(json.dumps(live, separators=(",", ":")))
        assert reads[0] < whole / 2 and reads[1] > whole * 0.8, (reads, whole)
        for _ in range(3):  # the dropped connection is not reused half-read
            assert (await kube.apply(api, crd, fields=("metadata",)))["metadata"]["name"] == "widgets.example.com"


async def test_forget_a_group_drops_every_version_of_it() -> None:
    async with sim.testing.running(nodes=["server-0"]) as site, kube.connect(site.kubeconfig) as api:
        await kube.resource_for(api, "apps/v1", "Deployment")
        await kube.resource_for(api, "v1", "ConfigMap")
        with pytest.raises(kube.UnknownKind):
            await kube.resource_for(api, "example.com/v1", "Widget")
        await kube.apply(api, _big_crd(props=3))
        kube.forget(api, group="example.com")
        cached = kube._discoveries[api].by_gv
        assert "example.com/v1" not in cached and {"apps/v1", "v1"} <= set(cached)


@settings(max_examples=40, deadline=None)
@given(pad=st.text(min_size=1, max_size=40), repeat=st.integers(min_value=0, max_value=3000),
       before=st.booleans(), spec=st.text(max_size=50))
def test_head_of_bytes_reads_a_prefix_and_agrees_with_json_loads(pad: str, repeat: int, before: bool,
                                                                   spec: str) -> None:
    """:func:`jsonpick.head` of a document's bytes: metadata of any length with multi-byte
    characters, and fields in any order, give what json.loads does."""
    meta = {"name": "x", "annotations": {"a": pad * repeat}}
    doc: dict[str, Any] = {"spec": {"s": spec * 100}} if before else {}
    doc.update({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"d": pad * repeat}})
    raw = json.dumps(doc, ensure_ascii=False).encode()
    assert jsonpick.head(raw) == {k: doc[k] for k in jsonpick.HEAD}


def test_head_without_metadata_reads_to_the_end() -> None:
    raw = json.dumps({"apiVersion": "v1", "kind": "X", "spec": "é" * 50_000}, ensure_ascii=False).encode()
    assert jsonpick.head(raw) == {"apiVersion": "v1", "kind": "X"}


def test_stored_lines_stream_across_chunk_boundaries() -> None:
    """Documents of a unit come back one by one (model.iter_lines), whatever their size relative
    to the decompressor's 64 KiB reads, the same as unpacked at once."""
    objects = [{"kind": "K", "metadata": {"name": str(i)}, "data": "y" * size}
               for i, size in enumerate([0, 10, 65_536 - 40, 65_536, 200_000, 3, 131_072])]
    blob = model.pack(objects)
    lines = list(model.iter_lines(blob))
    assert [json.loads(line) for line in lines] == objects
    assert list(model.iter_lines(b"")) == list(model.iter_lines(model.pack([]))) == []


async def test_gather_bounded_pulls_lazily_and_stops_at_the_first_failure() -> None:
    """At most ``limit`` items are out of a lazy iterable at once (each a document in memory), and
    a failure ends the run with that failure, the items not yet started never taken."""
    from agent.install import apply

    taken: list[int] = []
    finished: list[int] = []
    out_at_once: list[int] = []

    def items() -> Any:
        for i in range(40):
            taken.append(i)
            out_at_once.append(len(taken) - len(finished))
            yield i

    async def fn(i: int) -> None:
        await asyncio.sleep(0.001 * (i % 3))
        finished.append(i)

    await apply.gather_bounded(items(), fn, limit=4)
    assert len(taken) == 40 and sorted(finished) == list(range(40))
    assert max(out_at_once) == 4

    taken.clear()

    async def failing(i: int) -> None:
        await asyncio.sleep(0.001)
        if i == 5:
            raise apply.ApplyFailed("no")

    with pytest.raises(ExceptionGroup) as err:
        await apply.gather_bounded(items(), failing, limit=4)
    assert err.group_contains(apply.ApplyFailed)
    assert len(taken) < 40
