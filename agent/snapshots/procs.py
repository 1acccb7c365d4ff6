"""Run an external command under *our* timeout.

``etcdctl snapshot save`` can hang forever on a half-open connection, and ``k3s`` spawns
helpers, so the command starts in its own session (process group) and a timeout kills the
whole group: SIGTERM, a short grace, then SIGKILL. Output is captured but only a bounded
tail is kept for error messages, so a chatty tool cannot exhaust memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TAIL_BYTES = 8192
KILL_GRACE_SECONDS = 2.0


class CommandFailed(Exception):
    """Non-zero exit, a timeout, or a binary that could not start; one line, naming the command."""


@dataclass(frozen=True)
class Result:
    stdout: bytes
    stderr: bytes
    seconds: float


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _last_line(data: bytes) -> str:
    lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else ""


async def run(
    argv: Sequence[str | Path],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Result:
    """Run ``argv``; raise :class:`CommandFailed` unless it exits 0 within ``timeout`` seconds."""
    words = [str(a) for a in argv[1:] if not str(a).startswith("-")][:2]
    name = " ".join([Path(str(argv[0])).name, *words])
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *(str(a) for a in argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        raise CommandFailed(f"{name}: cannot start: {exc.strerror or exc}") from None
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        await _terminate(proc)
        raise CommandFailed(f"{name}: timed out after {timeout:g}s; killed its process group") from None
    except BaseException:  # cancelled (shutdown): never leave an orphan behind
        await _terminate(proc)
        raise
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        detail = _last_line(stderr[-TAIL_BYTES:]) or _last_line(stdout[-TAIL_BYTES:]) or "no output"
        raise CommandFailed(f"{name}: exit status {proc.returncode}: {detail}")
    return Result(stdout=stdout, stderr=stderr[-TAIL_BYTES:], seconds=seconds)


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), KILL_GRACE_SECONDS)
    except TimeoutError:
        _kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()
    # The leader may be gone while children it spawned still hold the group: finish them too.
    _kill_group(proc.pid, signal.SIGKILL)
