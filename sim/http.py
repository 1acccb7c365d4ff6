"""The HTTP face of the sim: Kubernetes REST paths, content negotiation, watch streams and auth.

Paths follow the real server: ``/api/v1[/namespaces/{ns}]/{resource}[/{name}[/{subresource}]]`` and the same
under ``/apis/{group}/{version}``. Errors are ``Status`` objects. Responses are built from the stored JSON bytes
(no re-serialisation) unless a Table or another version of a custom resource is asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sim import errors, openapi, protobuf, resources, tables
from sim.store import Entry, Gone, dumps

if TYPE_CHECKING:
    from sim.cluster import Cluster

JSON = "application/json"
AGG_V2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
BOOKMARK_SECONDS = 1.0
PB_OPENAPI_V2 = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"


def _json(doc: Any, status: int = 200, content_type: str = JSON) -> web.Response:
    return web.Response(body=dumps(doc), status=status, headers={"Content-Type": content_type})


def _raw(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, headers={"Content-Type": JSON})


def _error(exc: errors.ApiError) -> web.Response:
    return _json(exc.status(), exc.code)


def _wants_table(request: web.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


def _manager(request: web.Request) -> str:
    m = request.query.get("fieldManager")
    if m:
        return m
    ua = request.headers.get("User-Agent", "unknown")
    return ua.split("/", 1)[0] or "unknown"


def _bool(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


def _served(entry: Entry, res: resources.Resource) -> bytes:
    """Object bytes for ``res``'s version (custom resources stored under another served version)."""
    if not res.custom:
        return entry.raw
    want = f'"apiVersion":"{res.api_version}"'.encode()
    if want in entry.raw[:256] or entry.raw.find(want) >= 0:
        return entry.raw
    obj = entry.copy()
    obj["apiVersion"] = res.api_version
    return dumps(obj)


class Handlers:
    def __init__(self, cluster: Cluster, *, token: str | None) -> None:
        self.cluster = cluster
        self.token = token
        self.api = cluster.api
        self.registry = cluster.registry

    # --- middleware --------------------------------------------------------------------------------------------
    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.token and request.path not in ("/healthz", "/livez", "/readyz"):
            header = request.headers.get("Authorization", "")
            given = header[7:] if header.startswith("Bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return _json(errors.ApiError(401, "Unauthorized").status(), 401)
        started = time.perf_counter()
        self.cluster.requests += 1
        try:
            return await handler(request)
        except errors.ApiError as exc:
            return _error(exc)
        except web.HTTPException:
            raise
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:
            self.cluster.log(f"internal error on {request.method} {request.path_qs}: {exc!r}")
            return _error(errors.ApiError(500, f"Internal error occurred: {exc}"))
        finally:
            if not _bool(request.query.get("watch")):  # a watch's lifetime is not server work
                self.cluster.server_seconds += time.perf_counter() - started

    # --- discovery ---------------------------------------------------------------------------------------------
    async def version(self, request: web.Request) -> web.Response:
        return _json({"major": "1", "minor": "33", "gitVersion": "v1.33.4+k3s1", "gitCommit": "sim",
                      "gitTreeState": "clean", "buildDate": "2025-08-28T00:00:00Z", "goVersion": "go1.24.5",
                      "compiler": "gc", "platform": "linux/amd64", "emulationMajor": "1", "emulationMinor": "33",
                      "minCompatibilityMajor": "1", "minCompatibilityMinor": "32"})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def _aggregated(self, request: web.Request) -> bool:
        return "as=APIGroupDiscoveryList" in request.headers.get("Accept", "")

    async def api_root(self, request: web.Request) -> web.Response:
        if self._aggregated(request):
            return _json(resources.aggregated(self.registry, legacy=True), content_type=AGG_V2)
        return _json(resources.api_versions())

    async def apis_root(self, request: web.Request) -> web.Response:
        if self._aggregated(request):
            return _json(resources.aggregated(self.registry, legacy=False), content_type=AGG_V2)
        return _json(resources.api_group_list(self.registry))

    async def openapi_v2(self, request: web.Request) -> web.Response:
        """An empty OpenAPI v2 document: kubectl falls back to it (client-side validation) only for kinds the
        v3 documents do not cover (removed APIs, kinds without a CRD, ``List``), and skips validating kinds it
        does not find in it, so those objects then fail on the resource mapping exactly as on a real server."""
        if "protobuf" in request.headers.get("Accept", ""):
            return web.Response(body=b"", headers={"Content-Type": PB_OPENAPI_V2})
        return _json({"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.33.4+k3s1"}, "paths": {},
                      "definitions": {}})

    async def openapi_v3_root(self, request: web.Request) -> web.Response:
        return _json(openapi.root(self.registry))

    async def openapi_v3(self, request: web.Request) -> web.Response:
        doc = openapi.document(self.cluster, request.match_info["gv"])
        if doc is None:
            raise errors.not_found_resource()
        return web.Response(body=doc, headers={"Content-Type": JSON})

    # --- admin -------------------------------------------------------------------------------------------------
    async def admin_node(self, request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        if action not in ("fail", "restore", "partition"):
            raise errors.bad_request(f"unknown node action {action!r} (fail, restore, partition)")
        if name not in self.cluster.nodes:
            raise errors.not_found("nodes", name)
        await getattr(self.cluster, f"{action}_node")(name)
        return _json({"node": name, "action": action, "state": self.cluster.nodes[name].state})

    async def admin_state(self, request: web.Request) -> web.Response:
        return _json(self.cluster.describe())

    async def admin_compact(self, request: web.Request) -> web.Response:
        self.cluster.store.compact()
        return _json({"compacted": self.cluster.store.compacted})

    # --- resources ---------------------------------------------------------------------------------------------
    async def resource(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if not parts or parts[0] not in ("api", "apis"):
            raise errors.not_found_resource()
        if parts[0] == "api":
            if len(parts) < 2:
                raise errors.not_found_resource()
            group, version, rest = "", parts[1], parts[2:]
        else:
            if len(parts) == 2:
                if not self.registry.group_versions(parts[1]):
                    raise errors.not_found_resource()
                return _json(resources.api_group(self.registry, parts[1]))
            if len(parts) < 3:
                raise errors.not_found_resource()
            group, version, rest = parts[1], parts[2], parts[3:]
        if not self.registry.group_versions(group) or version not in self.registry.group_versions(group):
            raise errors.not_found_resource()
        if not rest:
            return _json(resources.resource_list(self.registry, group, version))
        namespace = ""
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else ""), (rest[2] if len(rest) > 2 else "")
        if len(rest) > 3:
            raise errors.not_found_resource()
        res = self.registry.lookup(group, version, plural)
        if res is None or (namespace and not res.namespaced):
            raise errors.not_found_resource()
        if sub and sub not in res.subresources:
            raise errors.not_found_resource()
        method = request.method
        if method == "GET":
            if name:
                return await self._get(request, res, namespace, name, sub)
            if _bool(request.query.get("watch")):
                return await self._watch(request, res, namespace)
            return self._list(request, res, namespace)
        if method == "POST":
            if name and sub:
                return await self._post_sub(request, res, namespace, name, sub)
            if name:
                raise errors.ApiError(405, "the server does not allow this method on the requested resource")
            return await self._create(request, res, namespace)
        if method == "PUT" and name:
            return await self._update(request, res, namespace, name, sub)
        if method == "PATCH" and name:
            return await self._patch(request, res, namespace, name, sub)
        if method == "DELETE":
            if name and not sub:
                return await self._delete(request, res, namespace, name)
            if not name:
                return await self._delete_collection(request, res, namespace)
        raise errors.ApiError(405, "the server does not allow this method on the requested resource")

    def _table(self, res: resources.Resource, objs: list[dict[str, Any]], include: str) -> dict[str, Any]:
        cols = self.cluster.printer_columns.get((res.group, res.version, res.plural))
        return tables.table(res, objs, include=include, printer_columns=cols)

    def _respond(self, request: web.Request, res: resources.Resource, obj: dict[str, Any],
                 status: int = 200) -> web.Response:
        if _wants_table(request):
            return _json(self._table(res, [obj], request.query.get("includeObject", "Metadata")), status)
        if res.custom and obj.get("apiVersion") != res.api_version:
            obj = dict(obj)
            obj["apiVersion"] = res.api_version
        return _json(obj, status)

    async def _get(self, request: web.Request, res: resources.Resource, ns: str, name: str,
                   sub: str) -> web.Response:
        entry = self.api.require(res, ns, name)
        if sub == "scale":
            return _json(self.cluster.scale_of(res, entry.obj))
        if sub == "log":
            return web.Response(text=f"simulated pod {ns}/{name}: no logs\n", content_type="text/plain")
        if _wants_table(request):
            return self._respond(request, res, entry.obj)
        return _raw(_served(entry, res))

    def _list(self, request: web.Request, res: resources.Resource, ns: str) -> web.Response:
        q = request.query
        limit = int(q.get("limit") or 0)
        entries, list_rv, token, remaining = self.api.list_entries(
            res, ns, label_selector=q.get("labelSelector"), field_selector=q.get("fieldSelector"),
            limit=limit, cont=q.get("continue"))
        if _wants_table(request):
            doc = self._table(res, [e.obj for e in entries], q.get("includeObject", "Metadata"))
            doc["metadata"] = {"resourceVersion": str(list_rv)}
            if token:
                doc["metadata"]["continue"] = token
            return _json(doc)
        meta: dict[str, Any] = {"resourceVersion": str(list_rv)}
        if token:
            meta["continue"] = token
            meta["remainingItemCount"] = remaining
        head = dumps({"apiVersion": res.api_version, "items": None, "kind": res.list_kind_name, "metadata": meta})
        head = head[: head.index(b'"items":null')] + b'"items":['
        tail = b"]," + dumps({"kind": res.list_kind_name, "metadata": meta})[1:]
        body = head + b",".join(_served(e, res) for e in entries) + tail
        return _raw(body)

    async def _watch(self, request: web.Request, res: resources.Resource, ns: str) -> web.StreamResponse:
        q = request.query
        rv_param = q.get("resourceVersion")
        since = int(rv_param) if rv_param and rv_param != "0" else None
        send_initial = _bool(q.get("sendInitialEvents"))
        if send_initial:
            since = None
        field_selector = q.get("fieldSelector")
        name = ""
        if field_selector and field_selector.startswith("metadata.name=") and "," not in field_selector:
            name = field_selector.split("=", 1)[1]
        match = self.api.watcher_match(res, q.get("labelSelector"), field_selector)
        table = _wants_table(request)
        include = q.get("includeObject", "Metadata")
        response = web.StreamResponse(headers={"Content-Type": JSON, "Transfer-Encoding": "chunked"})
        try:
            watcher = self.cluster.store.watch(key=res.storage_key, namespace=ns if res.namespaced else "",
                                               match=match, since=since)
        except Gone as exc:
            await response.prepare(request)
            status = errors.ApiError(410, f"too old resource version: {exc}", reason="Expired").status()
            await response.write(dumps({"type": "ERROR", "object": status}) + b"\n")
            return response
        del name
        await response.prepare(request)
        timeout = float(q.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        bookmarks = _bool(q.get("allowWatchBookmarks"))
        last_rv = since or self.cluster.store.rv
        try:
            if send_initial:
                initial = watcher.queue.qsize()
                for _ in range(initial):
                    item = watcher.queue.get_nowait()
                    if item is not None:
                        await response.write(self._event(res, item[0], item[1], table, include))
                bookmark = {"kind": res.kind, "apiVersion": res.api_version,
                            "metadata": {"resourceVersion": str(self.cluster.store.rv),
                                         "annotations": {"k8s.io/initial-events-end": "true"}}}
                await response.write(dumps({"type": "BOOKMARK", "object": bookmark}) + b"\n")
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), timeout=min(remaining, BOOKMARK_SECONDS))
                except TimeoutError:
                    if bookmarks:
                        bm = {"kind": res.kind, "apiVersion": res.api_version,
                              "metadata": {"resourceVersion": str(max(last_rv, self.cluster.store.rv))}}
                        await response.write(dumps({"type": "BOOKMARK", "object": bm}) + b"\n")
                    continue
                if item is None:
                    break
                last_rv = item[1].rv
                await response.write(self._event(res, item[0], item[1], table, include))
                self.cluster.record_watch_latency(item[1].rv)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.cluster.store.unwatch(watcher)
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await response.write_eof()
        return response

    def _event(self, res: resources.Resource, kind: str, entry: Entry, table: bool, include: str) -> bytes:
        if table:
            obj = self._table(res, [entry.obj], include)
            return dumps({"type": kind, "object": obj}) + b"\n"
        return b'{"type":"' + kind.encode() + b'","object":' + _served(entry, res) + b"}\n"

    async def _body(self, request: web.Request) -> Any:
        from sim.apiserver import parse_body

        raw = await request.read()
        if not raw:
            raise errors.bad_request("the body of the request was empty")
        if request.headers.get("Content-Type", "").startswith("application/vnd.kubernetes.protobuf"):
            try:
                return protobuf.decode(raw)
            except protobuf.ProtobufError as exc:
                raise errors.ApiError(415, str(exc)) from exc
        return parse_body(raw)

    async def _create(self, request: web.Request, res: resources.Resource, ns: str) -> web.Response:
        if res.verbs == resources.CREATE_ONLY:
            body = await self._body(request)
            return _json(self.cluster.review(res, body), 201)
        body = await self._body(request)
        obj = self.api.create(res, ns, body, manager=_manager(request),
                              dry_run=request.query.get("dryRun") == "All")
        return self._respond(request, res, obj, 201)

    async def _update(self, request: web.Request, res: resources.Resource, ns: str, name: str,
                      sub: str) -> web.Response:
        body = await self._body(request)
        if sub == "scale":
            obj = self.cluster.set_scale(res, ns, name, body, manager=_manager(request))
            return _json(self.cluster.scale_of(res, obj))
        obj = self.api.update(res, ns, name, body, manager=_manager(request), subresource=sub,
                              dry_run=request.query.get("dryRun") == "All")
        return self._respond(request, res, obj)

    async def _patch(self, request: web.Request, res: resources.Resource, ns: str, name: str,
                     sub: str) -> web.Response:
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
        body = await request.read()
        manager = _manager(request)
        if ctype == "application/apply-patch+yaml" and not request.query.get("fieldManager"):
            raise errors.ApiError(422, 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is '
                                       "required for apply patch", reason="Invalid")
        if sub == "scale":
            obj = self.cluster.patch_scale(res, ns, name, body, content_type=ctype, manager=manager)
            return _json(self.cluster.scale_of(res, obj))
        obj = self.api.patch(res, ns, name, body, content_type=ctype, manager=manager,
                             force=_bool(request.query.get("force")), subresource=sub,
                             dry_run=request.query.get("dryRun") == "All")
        return self._respond(request, res, obj)

    async def _delete_options(self, request: web.Request) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        raw = await request.read()
        if raw:
            try:
                parsed = protobuf.decode(raw) if raw.startswith(protobuf.MAGIC) else json.loads(raw)
            except (ValueError, protobuf.ProtobufError) as exc:
                raise errors.bad_request(f"invalid DeleteOptions: {exc}") from exc
            if isinstance(parsed, dict):
                opts = parsed
        q = request.query
        if q.get("propagationPolicy"):
            opts["propagationPolicy"] = q["propagationPolicy"]
        if q.get("gracePeriodSeconds"):
            opts["gracePeriodSeconds"] = int(q["gracePeriodSeconds"])
        if q.get("dryRun") == "All":
            opts["dryRun"] = ["All"]
        if opts.get("orphanDependents") is True:
            opts.setdefault("propagationPolicy", "Orphan")
        policy = opts.get("propagationPolicy")
        if policy not in (None, "Orphan", "Foreground", "Background"):
            raise errors.ApiError(422, f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported '
                                       f'value: "{policy}"', reason="Invalid")
        return opts

    async def _delete(self, request: web.Request, res: resources.Resource, ns: str, name: str) -> web.Response:
        opts = await self._delete_options(request)
        obj, gone = self.api.delete(res, ns, name, propagation=opts.get("propagationPolicy"),
                                    grace=opts.get("gracePeriodSeconds"), preconditions=opts.get("preconditions"),
                                    dry_run="All" in (opts.get("dryRun") or []))
        if gone and res.kind != "Pod" and not res.custom:
            meta = obj.get("metadata") or {}
            return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                          "details": {"name": name, "group": res.group, "kind": res.plural,
                                      "uid": meta.get("uid", "")}})
        return self._respond(request, res, obj)

    async def _delete_collection(self, request: web.Request, res: resources.Resource, ns: str) -> web.Response:
        opts = await self._delete_options(request)
        q = request.query
        entries, _, _, _ = self.api.list_entries(res, ns, label_selector=q.get("labelSelector"),
                                                 field_selector=q.get("fieldSelector"))
        items = []
        for e in entries:
            with contextlib.suppress(errors.ApiError):
                obj, _ = self.api.delete(res, e.namespace, e.name, propagation=opts.get("propagationPolicy"),
                                         grace=opts.get("gracePeriodSeconds"),
                                         dry_run="All" in (opts.get("dryRun") or []))
                items.append(obj)
        return _json({"kind": res.list_kind_name, "apiVersion": res.api_version,
                      "metadata": {"resourceVersion": str(self.cluster.store.rv)}, "items": items})

    async def _post_sub(self, request: web.Request, res: resources.Resource, ns: str, name: str,
                        sub: str) -> web.Response:
        body = await self._body(request)
        if res.kind == "Pod" and sub == "eviction":
            self.cluster.evict(ns, name, body)
            return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201},
                         201)
        if res.kind == "Pod" and sub == "binding":
            self.cluster.bind(ns, name, body)
            return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201},
                         201)
        if res.kind == "ServiceAccount" and sub == "token":
            self.api.require(res, ns, name)
            doc = dict(body) if isinstance(body, dict) else {}
            doc.setdefault("status", {})["token"] = f"sim-token-{ns}-{name}"
            doc["status"]["expirationTimestamp"] = "2099-01-01T00:00:00Z"
            return _json(doc, 201)
        raise errors.ApiError(405, "the server does not allow this method on the requested resource")


def make_app(cluster: Cluster, *, token: str | None) -> web.Application:
    h = Handlers(cluster, token=token)
    app = web.Application(middlewares=[h.middleware], client_max_size=64 * 1024 * 1024)
    app.router.add_get("/version", h.version)
    app.router.add_get("/version/", h.version)
    for p in ("/healthz", "/livez", "/readyz"):
        app.router.add_get(p, h.health)
    app.router.add_get("/api", h.api_root)
    app.router.add_get("/api/", h.api_root)
    app.router.add_get("/apis", h.apis_root)
    app.router.add_get("/apis/", h.apis_root)
    app.router.add_get("/openapi/v2", h.openapi_v2)
    app.router.add_get("/openapi/v3", h.openapi_v3_root)
    app.router.add_get("/openapi/v3/{gv:.+}", h.openapi_v3)
    app.router.add_post("/sim/nodes/{name}/{action}", h.admin_node)
    app.router.add_get("/sim/state", h.admin_state)
    app.router.add_post("/sim/compact", h.admin_compact)
    app.router.add_route("*", "/{tail:.*}", h.resource)
    return app
