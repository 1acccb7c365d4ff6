"""Signature checks in a short-lived child process, so ``cryptography`` never enters the agent.

Why: the bundle verifier (``bundles.verify``, ``bundles.trust``, ``bundles.dsse``) pulls in
``cryptography`` and the manifest models, ~10 MiB of RSS (7.9 MiB of it cryptography's Rust
extension) that a process keeps for life once imported. The daemon needs them only when a
bundle or a hub command arrives; ``bundle import --wait`` only before it installs. So, like the
renderer (``agent.install.cache``), a child does the work and exits: ``python -m
agent.verifyproc`` reads one JSON request on stdin (paths and numbers; no key material, nothing
on argv) and writes one JSON result on stdout.

What the child does is exactly what the agent did in-process before:

* ``bundle``: the site's effective trust root (seed + stored rotations, refused if below the
  version this site already trusted), :func:`bundles.verify.verify_and_stage` against it and the
  anti-rollback mark, and the persistence of a rotation the bundle's chain made (re-walked from
  a fresh load of the stored chain). The caller holds the staging lock for the whole run.
* ``command``: the hub command key, the DSSE envelope and its signature; the verified payload
  comes back (its schema and addressee are checked by the caller, which needs no crypto).
* ``cleanup``: sweep the staging/trash directories a crashed staging left behind.

Failures come back as data and are raised again in the caller as the same class with the same
message (:class:`bundles.errors.BundleError` subclasses by name). A child that crashes, is
killed, or answers with anything but one JSON document (stdout is read up to
:data:`MAX_OUTPUT_BYTES`) is a :class:`VerifierFailed`: the bundle or command is refused, never
used half-checked (a staging directory the child left is swept by the caller).

Failpoint (tests only): ``EDGEFLEET_FAILPOINT=verifier:<op>`` SIGKILLs the child on a request.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent import exitcodes
from bundles import errors

MAX_OUTPUT_BYTES = 1 << 20
MAX_REQUEST_BYTES = 1 << 20
_STDERR_TAIL = 4096


class VerifierFailed(errors.BundleError):
    """The verifier child crashed, was killed or answered garbage: nothing it did counts."""

    reason = "verifier-failed"
    exit_code = exitcodes.BUNDLE_REJECTED


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Run one request in a child and return its JSON result (blocking; call it from a thread).

    Raises :class:`VerifierFailed` if the child did not exit 0 with one JSON object on stdout.
    """
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.verifyproc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
            close_fds=True,
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps(request).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the child died early: its exit status says why
            out = proc.stdout.read(MAX_OUTPUT_BYTES + 1)
            if len(out) > MAX_OUTPUT_BYTES:
                proc.kill()
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
        err.seek(0, os.SEEK_END)
        err.seek(max(0, err.tell() - _STDERR_TAIL))
        tail = [line for line in err.read().decode(errors="replace").splitlines() if line.strip()]
    what = request.get("op", "?")
    if len(out) > MAX_OUTPUT_BYTES:
        raise VerifierFailed(f"the {what} verifier's answer exceeded {MAX_OUTPUT_BYTES} bytes; refused")
    if code != 0:
        status = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        raise VerifierFailed(f"the {what} verifier {status}" + (f": {tail[-1][:500]}" if tail else "") + "; refused")
    try:
        result = json.loads(out)
    except ValueError:
        result = None
    if not isinstance(result, dict):
        raise VerifierFailed(f"the {what} verifier answered no JSON object; refused")
    return result


def error_of(doc: dict[str, Any]) -> errors.BundleError:
    """The exception a child's ``{"class", "message"}`` stands for (same class, same message)."""
    cls = getattr(errors, str(doc.get("class")), None)
    message = str(doc.get("message") or "")
    if isinstance(cls, type) and issubclass(cls, errors.BundleError):
        return cls(message)
    return VerifierFailed(message or "the verifier failed without a reason")


# --- the child ----------------------------------------------------------------------------------------------


def _error(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, errors.BundleError):
        return {"class": type(exc).__name__, "message": exc.message}
    return {"class": "VerifierFailed", "message": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}


def _root_record(effective: Any) -> dict[str, Any]:
    return {"version": effective.root.version, "seed_version": effective.seed.version,
            "rotations": len(effective.links), "expires": effective.root.expires.isoformat()}


def _bundle(req: dict[str, Any]) -> dict[str, Any]:
    from datetime import datetime

    from bundles import trust, verify

    seed, chain = Path(req["seed"]), Path(req["chain"])
    trusted = int(req["trusted_version"])
    try:
        effective = trust.load_effective(seed, chain)
        if effective.root.version < trusted:
            raise errors.RootInvalid(
                f"the trust root is v{effective.root.version} (seed {seed} + {chain}) but this site already trusted "
                f"v{trusted}: the stored chain was removed or replaced; restore it, or install root v{trusted} or "
                f"newer as the seed"
            )
    except Exception as exc:
        return {"phase": "trust", "error": _error(exc)}
    out: dict[str, Any] = {"effective": _root_record(effective)}
    try:
        staged = verify.verify_and_stage(
            req["path"], root=effective.root, store_dir=req["store_dir"], min_release=int(req["min_release"]),
            min_created=datetime.fromisoformat(req["min_created"]) if req.get("min_created") else None,
            kubernetes_version=req.get("kubernetes_version"), arch=req.get("arch"),
        )
    except Exception as exc:
        return {**out, "phase": "verify", "error": _error(exc)}
    manifest = staged.manifest
    out["staged"] = {
        "path": str(staged.path), "bundle_id": staged.bundle_id, "name": manifest.name, "version": manifest.version,
        "release": manifest.release, "created": manifest.created.isoformat(), "signers": sorted(staged.signers),
        "root_version": staged.root.version,
    }
    if staged.root_rotated:
        try:
            current = trust.load_effective(seed, chain)
            if current.root.version < effective.root.version:
                raise errors.RootInvalid(f"the stored trust chain went back to v{current.root.version} meanwhile")
            rotated = trust.persist_rotation(current, staged.root_chain, chain_path=chain)
        except (OSError, errors.BundleError) as exc:
            message = exc.message if isinstance(exc, errors.BundleError) else str(exc)
            error = errors.StoreError(
                f"could not store the rotation to trust root v{staged.root.version} in {chain}: {message}"
            )
            return {**out, "phase": "rotation", "error": _error(error)}
        out["rotated"] = _root_record(rotated)
    return out


def _command(req: dict[str, Any]) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from agent import protocol
    from bundles import dsse

    payload = base64.b64decode(req["payload"])

    def rejected(reason: str, detail: str) -> dict[str, Any]:
        return {"rejected": {"reason": reason, "detail": detail, "cmd_id": _claimed_cmd_id(payload)}}

    path = Path(req["trust_dir"]) / protocol.HUB_COMMAND_KEY_FILE
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        return rejected("no-key", f"no hub command key at {path}: commands are refused until it is installed")
    except (OSError, ValueError) as exc:
        return rejected("no-key", f"hub command key {path} is unreadable: {exc}")
    if not isinstance(key, Ed25519PublicKey):
        return rejected("no-key", f"hub command key {path} is not an Ed25519 public key")
    try:
        envelope = dsse.parse(payload, max_bytes=protocol.MAX_COMMAND_ENVELOPE_BYTES)
    except dsse.EnvelopeError as exc:
        return rejected("malformed", f"not a command envelope: {exc}")
    if envelope.payload_type != protocol.COMMAND_PAYLOAD_TYPE:
        return rejected("forged", f"envelope payload type {envelope.payload_type[:80]!r} is not a command")
    if not dsse.valid_keyids(envelope, keys={dsse.keyid_of(key): key}):
        return rejected("forged", "no valid signature by the hub command key")
    return {"payload": base64.b64encode(envelope.payload).decode("ascii")}


def _claimed_cmd_id(payload: bytes) -> str:
    """Best effort, for correlation only: the cmd_id an unverifiable envelope claims."""
    from agent import protocol
    from bundles import dsse

    try:
        envelope = dsse.parse(payload, max_bytes=protocol.MAX_COMMAND_ENVELOPE_BYTES)
        doc = json.loads(envelope.payload)
        value = doc.get("cmd_id") if isinstance(doc, dict) else None
    except (dsse.EnvelopeError, ValueError):
        return ""
    return value[:64] if isinstance(value, str) else ""


def _cleanup(req: dict[str, Any]) -> dict[str, Any]:
    from bundles import verify

    return {"removed": [str(p) for p in verify.cleanup_stale(req["store_dir"])]}


_OPS = {"bundle": _bundle, "command": _command, "cleanup": _cleanup}


def _main() -> int:
    raw = sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1)
    if len(raw) > MAX_REQUEST_BYTES:
        print("request too large", file=sys.stderr)
        return 2
    req = json.loads(raw)
    if os.environ.get("EDGEFLEET_FAILPOINT") == f"verifier:{req['op']}":  # tests: the child dies, answering nothing
        os.kill(os.getpid(), signal.SIGKILL)
    result = _OPS[req["op"]](req)
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
