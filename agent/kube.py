"""Kubernetes access for the agent: one way in, real client code paths, a small generic surface.

``async with kube.connect(kubeconfig) as api:`` yields a kubernetes-asyncio ``ApiClient`` set up
exactly as against a real cluster (bearer token, client certificates, CA, exec plugins), from,
in order: the given kubeconfig file; the in-cluster service account when running in a pod; the
default kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``); k3s' ``/etc/rancher/k3s/k3s.yaml``.

Everything the agent does in a cluster is generic (objects come from bundles as dicts), so this
module works on plain dicts by ``apiVersion``/``kind``: :func:`apply` (server-side apply),
:func:`get`, :func:`list_objects`, :func:`patch`, :func:`delete`, resolving the REST path through
API discovery (cached per client, re-fetched for a group-version when a kind is missing from it,
which is what happens right after a CRD becomes Established).

Memory (see docs/operations.md, "Memory"): ``kubernetes_asyncio/__init__.py`` and
``kubernetes_asyncio/client/__init__.py`` import every generated API and model (~1000 modules,
tens of MiB). The agent never uses them, so before importing anything from kubernetes-asyncio this
module registers those two packages (and ``client.models``) as *lazy* packages: their submodules
(``api_client``, ``configuration``, ``rest``, ``exceptions``, ``config.*``) import normally, and
the original ``__init__`` runs only if some code asks the package for a name it does not have yet
(e.g. ``kubernetes_asyncio.client.CoreV1Api`` in a test), so nothing breaks for such code; it only
pays the cost. Agent modules must therefore import kubernetes-asyncio only through this module.

Errors: :class:`KubeUnavailable` when the API server cannot be reached (connection refused, TLS
failure, timeout, 502/503/504); :class:`NotFound`, :class:`Conflict` and :class:`KubeError` for API
answers; :class:`UnknownKind` when discovery has no such apiVersion/kind.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import importlib.util
import json
import os
import ssl
import sys
import time
import weakref
from asyncio import sslproto
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from agent import jsonpick

_PUBLIC_DUNDERS = {"__all__", "__version__", "__project__"}


def _lazy_module(name: str, *, forward: tuple[str, ...] = (), **preset: Any) -> None:
    """Register module or package ``name`` without running its code until a name it lacks is asked for.

    ``forward``: names that importers take with ``from name import x`` at *their* import time
    (which would load the module at once). They get a stand-in that loads the module on its
    first call and calls the real one, so the importer works unchanged, only later.
    """
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader
    locations = list(spec.submodule_search_locations or ())
    loaded = False

    def load() -> None:
        nonlocal loaded
        if not loaded:
            loaded = True
            loader.exec_module(module)  # the real code, into this very module object

    def __getattr__(attr: str) -> Any:  # PEP 562: called only for names the module lacks
        if loaded or (attr.startswith("__") and attr not in _PUBLIC_DUNDERS):  # probes like __wrapped__
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        if any(Path(loc, attr).is_dir() or Path(loc, f"{attr}.py").is_file() for loc in locations):
            return importlib.import_module(f"{name}.{attr}")  # a submodule: import just that
        load()
        return getattr(module, attr)

    def stand_in(attr: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            load()
            return getattr(module, attr)(*args, **kwargs)

        call.__name__ = call.__qualname__ = attr
        return call

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    vars(module).update(preset)
    vars(module).update({attr: stand_in(attr) for attr in forward})
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


# The top-level __init__ only imports its subpackages and names its version: do that lazily without
# ever running it (running it from inside a subpackage import would be a circular import).
_lazy_module(
    "kubernetes_asyncio",
    __project__="kubernetes_asyncio",
    __version__=importlib.metadata.version("kubernetes_asyncio"),
    __all__=["client", "config", "dynamic", "stream", "utils", "watch"],
)
_lazy_module("kubernetes_asyncio.client")
_lazy_module("kubernetes_asyncio.client.models")
# What the client modules we do load import for code paths the agent never takes (~2 MiB):
# urllib3 (configuration: basic-auth headers), dateutil's parser (api_client: typed date
# deserialisation) and multiprocessing's ThreadPool (api_client: ``async_req``). Same trick, so
# they load, unchanged, the first time something does use them.
_lazy_module("urllib3")
_lazy_module("dateutil.parser", forward=("parse",))
_lazy_module("multiprocessing.pool", forward=("ThreadPool",))

import aiohttp  # noqa: E402
import aiohttp.payload  # noqa: E402
import yaml  # noqa: E402
from aiohttp.abc import AbstractStreamWriter  # noqa: E402
from kubernetes_asyncio.client import api_client as _api_client  # noqa: E402
from kubernetes_asyncio.client import configuration as _configuration  # noqa: E402
from kubernetes_asyncio.client import exceptions as _exceptions  # noqa: E402

_client_pkg = sys.modules["kubernetes_asyncio.client"]
# kubernetes_asyncio.config does `from kubernetes_asyncio.client import ApiClient, Configuration`.
for _attr, _value in (("ApiClient", _api_client.ApiClient), ("Configuration", _configuration.Configuration)):
    if _attr not in vars(_client_pkg):
        setattr(_client_pkg, _attr, _value)

from kubernetes_asyncio.config import incluster_config as _incluster  # noqa: E402
from kubernetes_asyncio.config import kube_config as _kube_config  # noqa: E402
from kubernetes_asyncio.config.config_exception import ConfigException  # noqa: E402

ApiClient = _api_client.ApiClient
Configuration = _configuration.Configuration
ApiException = _exceptions.ApiException

FIELD_MANAGER = "edgefleet"
K3S_KUBECONFIG = Path("/etc/rancher/k3s/k3s.yaml")
#: Per-request timeout; a hung API server must not hang a task forever.
REQUEST_TIMEOUT_SECONDS = 30.0
_UNAVAILABLE_STATUSES = {502, 503, 504}
#: Answers that do not count as contact for readiness: the agent cannot work with these credentials.
_UNUSABLE_STATUSES = {401, 403}

#: ``time.monotonic()`` of the last successful answer from any API server (for ``/readyz``).
last_contact: float | None = None


class KubeError(Exception):
    """An API answer other than success. ``status`` is the HTTP status, ``reason`` the Status reason."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class KubeUnavailable(KubeError):
    """The API server could not be reached or is not serving (the cluster, not the request, is the problem)."""


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class UnknownKind(KubeError):
    """Discovery does not know this apiVersion/kind (yet: a CRD may not be Established)."""


class KubeConfigError(KubeError):
    """No usable kubeconfig / in-cluster credentials."""


@dataclass(frozen=True)
class Resource:
    """Where objects of one apiVersion/kind live in the REST API."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool

    def path(self, *, namespace: str | None = None, name: str | None = None) -> str:
        base = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name, safe='')}"
        return base


# --------------------------------------------------------------------------- connection


def _in_cluster() -> bool:
    return bool(os.environ.get(_incluster.SERVICE_HOST_ENV_NAME)) and Path(_incluster.SERVICE_TOKEN_FILENAME).is_file()


def _is_file(path: Path) -> bool:
    return path.is_file()


def _default_kubeconfig() -> Path:
    default = Path(os.path.expanduser(_kube_config.KUBE_CONFIG_DEFAULT_LOCATION.split(os.pathsep)[0]))
    return default if default.is_file() or not K3S_KUBECONFIG.is_file() else K3S_KUBECONFIG


#: Connections one client keeps to the API server (kubernetes-asyncio's default is 100). Each is a
#: TLS session on a node, ~0.3 MiB with its buffers (below) while the pool keeps it; requests
#: beyond this wait for a connection instead. The degradation controller's two watches hold one
#: each, the installer has up to 8 requests out (one component applying, 8 objects at once).
#: Measured on the sim with TLS and the buffers below, 6 instead of 10: install peak -0.3 MiB,
#: steady after it -0.9 MiB, install time unchanged (docs/operations.md, "Memory").
MAX_CONNECTIONS = 6

#: Request bodies go to the socket this much at a time (:class:`_ChunkedBytesPayload`).
WRITE_CHUNK = 64 * 1024

#: asyncio's TLS transport reads into a per-connection buffer of ``SSLProtocol.max_size``, 256 KiB,
#: allocated (and touched) when the connection opens and kept for its life: 2.5 MiB for a pool of
#: ten, a tenth of what the agent's own state is allowed. API answers arrive in TLS records of at
#: most 16 KiB anyway, so 64 KiB only means more, cheaper reads of a big answer. A class
#: attribute of the stdlib's transport (the only knob there is), set once for the process; it
#: changes no behaviour, only the size of each read (tests/agent_daemon/test_daemon_kube.py).
TLS_READ_BUFFER = 64 * 1024


class _ChunkedBytesPayload(aiohttp.payload.BytesPayload):
    """A bytes request body written :data:`WRITE_CHUNK` at a time, waiting for the socket between
    pieces (aiohttp's writer drains above 64 KiB buffered).

    aiohttp writes a bytes body in one call; over TLS asyncio then encrypts all of it into a
    second buffer and keeps what the socket did not take yet in a third, so a 700 KB CRD cost
    ~2 MB while it went out (measured: the daemon's install peak on a TLS sim -1.3 MiB with
    this). aiohttp's own advice for big bodies is a file-like payload; the installer's documents
    are bytes already (agent.install.apply), and kubernetes-asyncio passes only bytes through,
    so the body stays bytes and only the writing changes. A body of one piece is one write.
    """

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        view = memoryview(self._value)
        if content_length is not None:
            view = view[:content_length]
        for start in range(0, max(len(view), 1), WRITE_CHUNK):  # an empty body: one empty write, as before
            await writer.write(view[start:start + WRITE_CHUNK])


_transport_tuned = False


def _tune_transport() -> None:
    """Once per process: smaller TLS read buffers, bytes bodies written in pieces (above)."""
    global _transport_tuned
    if _transport_tuned:
        return
    _transport_tuned = True
    if sslproto.SSLProtocol.max_size > TLS_READ_BUFFER:
        sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
    aiohttp.payload.register_payload(_ChunkedBytesPayload, bytes, order=aiohttp.payload.Order.try_first)


async def load_configuration(kubeconfig: Path | None) -> Any:
    """Build a client ``Configuration`` (see the module docstring for the search order)."""
    _tune_transport()
    configuration = Configuration()
    configuration.connection_pool_maxsize = MAX_CONNECTIONS
    try:
        if kubeconfig is None and _in_cluster():
            _incluster.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            return configuration
        if kubeconfig is None:
            kubeconfig = _default_kubeconfig()
        if not _is_file(kubeconfig):
            raise KubeConfigError(f"kubeconfig {kubeconfig} does not exist")
        await _kube_config.load_kube_config(
            config_file=str(kubeconfig), client_configuration=configuration, persist_config=False
        )
    except ConfigException as exc:
        raise KubeConfigError(f"kubeconfig {kubeconfig}: {exc}") from None
    except OSError as exc:  # e.g. not readable by the agent's user: name the file and the reason
        raise KubeConfigError(f"kubeconfig {exc.filename or kubeconfig}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError) as exc:  # malformed file
        raise KubeConfigError(f"kubeconfig {kubeconfig}: malformed: {type(exc).__name__}: {exc}"[:500]) from None
    return configuration


@asynccontextmanager
async def connect(kubeconfig: Path | None) -> AsyncIterator[Any]:
    """Yield a kubernetes-asyncio ``ApiClient``; its HTTP session is closed on exit."""
    configuration = await load_configuration(kubeconfig)
    api = ApiClient(configuration=configuration)
    try:
        yield api
    finally:
        _discoveries.pop(api, None)
        await api.close()


@dataclass
class _Shared:
    api: Any
    stamp: tuple[int, int] | None
    users: int = 0


_shared: dict[tuple[Path | None, int], _Shared] = {}


def _stamp(kubeconfig: Path | None) -> tuple[int, int] | None:
    try:
        info = kubeconfig.stat() if kubeconfig is not None else None
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size) if info is not None else None


@asynccontextmanager
async def shared(kubeconfig: Path | None) -> AsyncIterator[Any]:
    """Like :func:`connect`, but one client for all the daemon's tasks on the same kubeconfig.

    Each client carries its own TLS context with the CA store and its connection pool (~0.8 MiB
    of RSS); the API probe, the installer and the degradation controller need only one between
    them (aiohttp sessions serve concurrent requests; the pool allows 100 connections). The
    first user creates it, the last one to leave closes it. A user arriving after the kubeconfig
    file changed (k3s rewrites it when it rotates client certificates) gets a new client, as a
    fresh :func:`connect` would; the old one stays with its current users until they leave.
    """
    key = (kubeconfig, id(asyncio.get_running_loop()))
    stamp = _stamp(kubeconfig)
    entry = _shared.get(key)
    if entry is None or entry.stamp != stamp:
        configuration = await load_configuration(kubeconfig)
        entry = _shared.get(key)  # another task may have made one meanwhile
        if entry is None or entry.stamp != stamp:
            entry = _shared[key] = _Shared(api=ApiClient(configuration=configuration), stamp=stamp)
    entry.users += 1
    try:
        yield entry.api
    finally:
        entry.users -= 1
        if entry.users == 0:
            if _shared.get(key) is entry:
                del _shared[key]
            _discoveries.pop(entry.api, None)
            await entry.api.close()


# --------------------------------------------------------------------------- raw requests


def _error_from(exc: Any) -> KubeError:
    status = int(getattr(exc, "status", 0) or 0)
    body = getattr(exc, "body", None)
    message, reason = str(getattr(exc, "reason", "") or "error"), ""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str) and body:
        try:
            doc = json.loads(body)
            message = str(doc.get("message") or message)
            reason = str(doc.get("reason") or "")
        except (ValueError, AttributeError):
            message = body[:300]
    if status in _UNAVAILABLE_STATUSES or status == 0:
        return KubeUnavailable(f"API server unavailable: {status} {message}", status=status, reason=reason)
    cls = {404: NotFound, 409: Conflict}.get(status, KubeError)
    return cls(f"{status} {message}", status=status, reason=reason)


async def request(
    api: Any,
    method: str,
    path: str,
    *,
    query: dict[str, Any] | None = None,
    body: Any = None,
    content_type: str | None = None,
    timeout: float = REQUEST_TIMEOUT_SECONDS,
    accept: str = "application/json",
    fields: Collection[str] | None = None,
    without: Collection[str] = (),
) -> Any:
    """One API request through the client's own auth and transport; returns the decoded JSON (or None).

    ``accept`` lets a caller ask for a server-side representation such as a metadata-only
    ``Table`` (the installer's drift check lists resourceVersions that way). ``fields``: decode
    only these top-level fields of the answer (an object), and inside them none of the keys in
    ``without``, see :func:`agent.jsonpick.top_level`.
    """
    global last_contact
    headers = {"Accept": accept}
    if content_type:
        headers["Content-Type"] = content_type
    query_params = [(k, v) for k, v in (query or {}).items() if v is not None]
    try:
        result = await api.call_api(
            path,
            method,
            query_params=query_params,
            header_params=headers,
            body=body,
            response_types_map={200: "object", 201: "object", 202: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _request_timeout=timeout,
            _preload_content=fields is None,
        )
        if fields is not None:  # the raw aiohttp response: check and decode it here
            async with result:
                if not 200 <= result.status <= 299:
                    error = ApiException(status=result.status, reason=result.reason)
                    error.body = (await result.read()).decode("utf-8", "replace")
                    raise error
                try:  # from the bytes: a big answer (a CRD) is never decoded as a whole
                    result = await _pick(result, fields, without=without)
                except ValueError as exc:
                    raise KubeError(f"malformed answer to {method} {path}: {exc}") from None
    except ApiException as exc:
        if int(getattr(exc, "status", 0) or 0) not in _UNAVAILABLE_STATUSES | _UNUSABLE_STATUSES | {0}:
            last_contact = time.monotonic()  # it answered (e.g. 404, 409), just not what we wanted
        raise _error_from(exc) from None
    except (aiohttp.ClientError, ssl.SSLError, OSError, TimeoutError) as exc:
        raise KubeUnavailable(f"API server unreachable: {type(exc).__name__}: {exc}") from None
    last_contact = time.monotonic()
    return result


async def _pick(response: Any, fields: Collection[str], *, without: Collection[str]) -> dict[str, Any]:
    """:func:`agent.jsonpick.top_level` of an answer's body; for fields of an object's head, read
    only as far as they go.

    An apply answers with the whole object: a CRD's ~700 KB, of which the installer wants the
    metadata at its start. Several such answers buffered at once were megabytes of the install's
    peak, so the body is read a chunk at a time until the head is complete, and the connection,
    with the rest unread, is closed (the pool opens another). A ValueError on a partial body only
    means "read more"; the whole body's says the answer is malformed.
    """
    if not set(fields) <= set(jsonpick.HEAD):
        return jsonpick.top_level(await response.read(), fields, without=without)
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        try:
            picked = jsonpick.top_level(body, fields, without=without)
        except ValueError:
            continue
        if not response.content.at_eof():
            response.close()
        return picked
    return jsonpick.top_level(body, fields, without=without)


async def ping(api: Any) -> dict[str, Any]:
    """``GET /version``: cheap proof that the API server answers."""
    result = await request(api, "GET", "/version")
    return result if isinstance(result, dict) else {}


# --------------------------------------------------------------------------- discovery


class _Discovery:
    def __init__(self) -> None:
        self.by_gv: dict[str, dict[str, Resource]] = {}
        self.lock = asyncio.Lock()

    async def fetch(self, api: Any, api_version: str) -> dict[str, Resource]:
        path = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        try:
            doc = await request(api, "GET", path)
        except NotFound:
            doc = {}
        kinds: dict[str, Resource] = {}
        for entry in (doc or {}).get("resources", []):
            name = str(entry.get("name", ""))
            if not name or "/" in name:  # subresources (status, scale, ...)
                continue
            kinds[str(entry["kind"])] = Resource(
                api_version=api_version, kind=str(entry["kind"]), plural=name, namespaced=bool(entry.get("namespaced"))
            )
        self.by_gv[api_version] = kinds
        return kinds


_discoveries: weakref.WeakKeyDictionary[Any, _Discovery] = weakref.WeakKeyDictionary()


async def resource_for(api: Any, api_version: str, kind: str) -> Resource:
    """Resolve apiVersion/kind to its REST resource; a miss re-fetches that group-version once."""
    discovery = _discoveries.setdefault(api, _Discovery())
    async with discovery.lock:
        kinds = discovery.by_gv.get(api_version)
        if kinds is None or kind not in kinds:
            kinds = await discovery.fetch(api, api_version)
    if kind not in kinds:
        raise UnknownKind(f"the API server does not serve {kind} in {api_version}", status=404, reason="NotFound")
    return kinds[kind]


def forget(api: Any, api_version: str | None = None, *, group: str | None = None) -> None:
    """Drop cached discovery (of one group-version, of every version of a group, or all), e.g.
    after CRDs were added or removed."""
    discovery = _discoveries.get(api)
    if discovery is None:
        return
    if group is not None:
        for gv in [gv for gv in discovery.by_gv if gv.rpartition("/")[0] == group]:
            discovery.by_gv.pop(gv, None)
    elif api_version is None:
        discovery.by_gv.clear()
    else:
        discovery.by_gv.pop(api_version, None)


# --------------------------------------------------------------------------- objects


def _namespace_of(resource: Resource, namespace: str | None) -> str | None:
    if not resource.namespaced:
        return None
    return namespace or "default"


async def apply(
    api: Any,
    obj: dict[str, Any],
    *,
    body: bytes | None = None,
    field_manager: str = FIELD_MANAGER,
    force: bool = True,
    dry_run: bool = False,
    fields: Collection[str] | None = None,
) -> dict[str, Any]:
    """Server-side apply ``obj`` (a full manifest dict); returns the live object the server answered
    with (only its top-level ``fields``, if given: the answer repeats the whole object).

    ``body``: the full manifest as JSON, when the caller has it that way; ``obj`` then needs only
    what names the object (:data:`agent.jsonpick.HEAD`). The installer applies its rendered
    documents so: a big CRD is sent as the bytes it is stored as instead of being parsed into
    megabytes of dicts, copied once more by the client's serializer, and dumped again.

    The body goes out pre-serialized: the client passes bytes through untouched only when the
    content type is not one it serializes itself, so it carries a ``charset`` parameter, which
    the API server strips (``apiserver/pkg/endpoints/handlers/patch.go``) as the sim does.
    """
    meta = obj.get("metadata") or {}
    if not obj.get("apiVersion") or not obj.get("kind") or not meta.get("name"):
        raise ValueError("object needs apiVersion, kind and metadata.name to be applied")
    resource = await resource_for(api, str(obj["apiVersion"]), str(obj["kind"]))
    path = resource.path(namespace=_namespace_of(resource, meta.get("namespace")), name=str(meta["name"]))
    query: dict[str, Any] = {"fieldManager": field_manager, "force": "true" if force else None}
    if dry_run:
        query["dryRun"] = "All"
    data = json.dumps(obj, separators=(",", ":")).encode() if body is None else body
    result = await request(api, "PATCH", path, query=query, body=data,
                           content_type="application/apply-patch+yaml; charset=utf-8", fields=fields)
    return result if isinstance(result, dict) else {}


async def get(
    api: Any,
    api_version: str,
    kind: str,
    name: str,
    *,
    namespace: str | None = None,
    fields: Collection[str] | None = None,
) -> dict[str, Any] | None:
    """The live object, or None if it does not exist; with ``fields``, only those top-level fields."""
    resource = await resource_for(api, api_version, kind)
    try:
        result = await request(api, "GET", resource.path(namespace=_namespace_of(resource, namespace), name=name),
                               fields=fields)
    except NotFound:
        return None
    return result if isinstance(result, dict) else None


async def list_objects(
    api: Any,
    api_version: str,
    kind: str,
    *,
    namespace: str | None = None,
    label_selector: str | None = None,
    field_selector: str | None = None,
    managed_fields: bool = False,
) -> list[dict[str, Any]]:
    """All objects of a kind (in ``namespace``, or cluster-wide when None), following ``continue``
    pages; without their ``metadata.managedFields`` (the agent never reads them) unless asked."""
    resource = await resource_for(api, api_version, kind)
    path = resource.path(namespace=namespace if resource.namespaced else None)
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        query = {"labelSelector": label_selector, "fieldSelector": field_selector, "limit": 500, "continue": token}
        # Items without their managedFields: a LIST of pods or workloads is a third smaller.
        doc = await request(api, "GET", path, query=query, fields=("items", "metadata"),
                            without=() if managed_fields else ("managedFields",)) or {}
        for item in doc.get("items") or []:
            item.setdefault("apiVersion", api_version)  # list items omit them
            item.setdefault("kind", kind)
            items.append(item)
        token = (doc.get("metadata") or {}).get("continue") or None
        if not token:
            return items


async def patch(
    api: Any,
    api_version: str,
    kind: str,
    name: str,
    body: Any,
    *,
    namespace: str | None = None,
    patch_type: str = "merge",
    field_manager: str = FIELD_MANAGER,
    subresource: str | None = None,
    fields: Collection[str] | None = None,
) -> dict[str, Any]:
    """PATCH with ``patch_type`` ``merge`` (RFC 7386), ``json`` (RFC 6902) or ``strategic``;
    returns the answer (only its top-level ``fields``, if given)."""
    content_type = {
        "merge": "application/merge-patch+json",
        "json": "application/json-patch+json",
        "strategic": "application/strategic-merge-patch+json",
    }[patch_type]
    resource = await resource_for(api, api_version, kind)
    path = resource.path(namespace=_namespace_of(resource, namespace), name=name)
    if subresource:
        path += f"/{subresource}"
    result = await request(
        api, "PATCH", path, query={"fieldManager": field_manager}, body=body, content_type=content_type, fields=fields
    )
    return result if isinstance(result, dict) else {}


async def delete(
    api: Any,
    api_version: str,
    kind: str,
    name: str,
    *,
    namespace: str | None = None,
    propagation: str = "Background",
) -> bool:
    """Delete an object; False if it was already gone (deleting is idempotent for the callers)."""
    resource = await resource_for(api, api_version, kind)
    path = resource.path(namespace=_namespace_of(resource, namespace), name=name)
    body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
    try:
        await request(api, "DELETE", path, body=body)
    except NotFound:
        return False
    return True


def is_lazy() -> bool:
    """True while the generated API/model packages have not been imported (for tests and docs)."""
    return not {"kubernetes_asyncio.client.api", "kubernetes_asyncio.client.models.v1_pod"} & set(sys.modules)


__all__ = [
    "FIELD_MANAGER",
    "ApiClient",
    "ApiException",
    "Configuration",
    "Conflict",
    "KubeConfigError",
    "KubeError",
    "KubeUnavailable",
    "NotFound",
    "Resource",
    "UnknownKind",
    "apply",
    "connect",
    "delete",
    "forget",
    "get",
    "is_lazy",
    "list_objects",
    "patch",
    "ping",
    "request",
    "resource_for",
    "shared",
]
