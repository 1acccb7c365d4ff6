"""Which container images a simulated site's kubelets can get, and what a failed pull says.

A real node gets an image from containerd's store or pulls it from a registry it can reach; an
air-gapped site reaches no upstream registry at all. The sim models that as one set of *pullable*
entries per site (``Pullable``), Docker-normalized:

* a registry host (``docker.io``, ``registry.local:5000``, ``localhost:5000``: a name without ``/``
  whose host part contains ``.`` or is ``localhost``; any other host with a trailing ``/``:
  ``myregistry:5000/``) makes every image of that registry pullable;
* a repository (``nginx``, ``quay.io/acme/widget``) makes every tag and digest of it pullable;
* a reference (``nginx:1.27``, ``busybox@sha256:...``) makes exactly that image pullable.

``None`` (the default) means everything is pullable, so nothing changes for callers that do not
care about images. A registry named by any entry counts as reachable: an image missing there fails
as *not found*; an image of any other registry fails as the DNS error an air-gapped node sees. The
messages are containerd's (through the CRI's ``rpc error``), so ``kubectl describe`` reads like a
real k3s node's. A reference that does not parse is ``InvalidImageName``, which the kubelet never
retries.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

DOCKER_HUB = "docker.io"
DOCKER_HUB_HOST = "registry-1.docker.io"  # where docker.io's API really lives

# distribution/reference's grammar (without IPv6 hosts).
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE = re.compile(rf"^(?P<name>(?:{_DOMAIN}/)?{_PATH}(?:/{_PATH})*)(?::(?P<tag>[\w][\w.-]{{0,127}}))?"
                        r"(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?$")


@dataclasses.dataclass(frozen=True)
class Ref:
    registry: str
    repository: str  # without the registry: library/nginx
    tag: str
    digest: str

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


class InvalidReference(ValueError):
    pass


def _is_host(part: str) -> bool:
    return "." in part or ":" in part or part == "localhost"


def parse(image: str) -> Ref:
    """Docker-normalize ``image`` (``busybox`` → ``docker.io/library/busybox:latest``), as the kubelet does."""
    m = _REFERENCE.match(image)
    if m is None or len(m.group("name")) > 255:
        raise InvalidReference(f'couldn\'t parse image name "{image}": invalid reference format')
    name = m.group("name")
    first, sep, rest = name.partition("/")
    if sep and _is_host(first):
        registry, repository = first, rest
    else:
        registry, repository = DOCKER_HUB, name
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    tag, digest = m.group("tag") or "", m.group("digest") or ""
    return Ref(registry=registry, repository=repository, tag=tag or ("" if digest else "latest"), digest=digest)


@dataclasses.dataclass(frozen=True)
class Pullable:
    """The images a site can get; ``entries=None`` is everything (see the module docstring)."""

    entries: frozenset[str] | None = None

    @classmethod
    def of(cls, entries: Iterable[str] | None) -> Pullable:
        if entries is None:
            return cls()
        normal = set()
        for entry in entries:
            entry = entry.strip()
            if not entry:
                continue
            host = entry.removesuffix("/")
            if "/" not in host and "@" not in host and ("." in host.split(":")[0] or host.split(":")[0] == "localhost"
                                                         or entry.endswith("/")):
                normal.add(f"registry:{DOCKER_HUB if host == 'index.docker.io' else host}")
                continue
            try:
                ref = parse(entry)
            except InvalidReference as exc:
                raise ValueError(f"pullable image {entry!r}: {exc}") from None
            explicit = ":" in entry.rpartition("/")[2] or "@" in entry
            normal.add(f"image:{ref}" if explicit else f"repo:{ref.name}")
            normal.add(f"reachable:{ref.registry}")
        return cls(frozenset(normal))

    def reachable(self, registry: str) -> bool:
        return self.entries is None or f"registry:{registry}" in self.entries or f"reachable:{registry}" in self.entries

    def error(self, image: str) -> tuple[str, str] | None:
        """``None`` when the kubelet gets ``image``; else ``(reason, message)``: ``InvalidImageName`` (never
        retried) or ``ErrImagePull`` with the runtime's error (retried with back-off)."""
        try:
            ref = parse(image)
        except InvalidReference as exc:
            return "InvalidImageName", f'Failed to apply default image tag "{image}": {exc}'
        if self.entries is None:
            return None
        e = self.entries
        if f"registry:{ref.registry}" in e or f"repo:{ref.name}" in e or f"image:{ref}" in e:
            return None
        full = str(ref)
        what = ref.digest or ref.tag
        if self.reachable(ref.registry):
            return "ErrImagePull", (f'rpc error: code = NotFound desc = failed to pull and unpack image "{full}": '
                                    f'failed to resolve reference "{full}": {full}: not found')
        host = DOCKER_HUB_HOST if ref.registry == DOCKER_HUB else ref.registry
        return "ErrImagePull", (f'rpc error: code = Unknown desc = failed to pull and unpack image "{full}": '
                                f'failed to resolve reference "{full}": failed to do request: Head '
                                f'"https://{host}/v2/{ref.repository}/manifests/{what}": dial tcp: lookup '
                                f'{host.split(":")[0]}: no such host')
