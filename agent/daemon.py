"""``edgefleet-agent run``: the daemon that hosts every agent task on one asyncio loop.

Lifecycle: load config → logging → open the state store → run every module's migrations →
build the :class:`~agent.context.AgentContext` → start the local HTTP endpoint and the tasks of
:data:`TASKS` → ``READY=1`` → run until SIGTERM/SIGINT → drain → close the store → exit 0.

Why supervised tasks rather than one loop: the installer, the degradation controller, the
snapshot scheduler and the link fail independently (an API outage, a full disk, a broker gone).
A task that raises is logged, reported as an ``agent.task-crashed`` event (repeats of the same
error at exponentially spaced restarts only, see :func:`should_report`), counted in
``edgefleet_agent_task_restarts_total`` and restarted after an exponential, jittered, capped
backoff; the other tasks carry on. A task that *returns* is finished (e.g. a disabled feature)
and is not restarted. Only a crash of the daemon's own machinery takes the process down, and
then systemd restarts it (``Restart=on-failure``): every task keeps its state in the store, so a
restart resumes where it was.

Shutdown: new work stops (``/readyz`` turns 503, ``STOPPING=1``), every task is cancelled and
gets ``daemon.drain_seconds`` to unwind; a task still running after that is logged, cancelled
once more at loop shutdown, and otherwise left to systemd's ``TimeoutStopSec`` (its state is
journaled, so the next start resumes it). Keep the drain below ``TimeoutStopSec``.

systemd: ``READY=1`` once the tasks are started, ``STATUS=`` with a one-line site summary every
``daemon.status_interval_seconds``, ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` from the
heartbeat coroutine, which runs only while the event loop does: a blocked or wedged loop stops
the pings and systemd restarts the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import gc
import os
import random
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent import (
    commands,
    degrade,
    events,
    exitcodes,
    httpd,
    installer,
    intake,
    kube,
    link,
    logs,
    metrics,
    outbox,
    protocol,
    sdnotify,
    sitestatus,
    snapshots,
)
from agent import config as agent_config
from agent.context import AgentContext
from agent.install import journal as install_journal
from agent.state import StateStore

log = structlog.get_logger("edgefleet.daemon")

Task = Callable[[AgentContext], Awaitable[None]]

#: Persisted by the daemon for ``edgefleet-agent status`` (pid, start time, HTTP address, task states).
STATE_KEY = "daemon.state"


async def kube_probe(ctx: AgentContext) -> None:
    """Ask the API server for ``/version`` periodically: feeds ``/readyz``, ``kube_up`` and events.

    Reachability changes become events (``kube.unreachable`` / ``kube.reachable``), so the hub
    learns that the site lost its own API server even though nothing else failed yet.
    """
    interval = ctx.config.daemon.kube_probe_interval_seconds
    reachable: bool | None = None
    while True:
        error = ""
        try:
            async with kube.shared(ctx.config.kubeconfig) as api:
                while True:
                    await kube.ping(api)
                    metrics.KUBE_UP.set(1)
                    if reachable is not True:
                        if reachable is False:
                            ctx.emit("kube.reachable", "the Kubernetes API server answers again")
                        reachable = True
                    await asyncio.sleep(interval)
        except kube.KubeError as exc:  # unavailable, or no usable kubeconfig: keep probing
            error = str(exc)
        metrics.KUBE_UP.set(0)
        if reachable is not False:
            ctx.emit(
                "kube.unreachable",
                f"the Kubernetes API server is not usable: {error}"[:500],
                severity=protocol.Severity.WARNING,
            )
            reachable = False
        await asyncio.sleep(interval)


#: Every module's schema migrations, run once at startup before any task starts.
#: Modules add their ``setup(store)`` here.
MIGRATIONS: list[Callable[[StateStore], None]] = [
    outbox.setup,
    events.setup,
    commands.setup,
    snapshots.setup,
    install_journal.setup,
    degrade.setup,
]

#: The daemon's tasks, each ``async def run(ctx) -> None``, started in this order.
#: Modules add their entry here (installer, degradation, snapshots, link).
TASKS: list[tuple[str, Task]] = [
    ("kube-probe", kube_probe),
    ("snapshots", snapshots.run),
    ("installer", installer.run),
    ("intake", intake.run),
    ("degradation", degrade.run),
    ("link", link.run),
]


@dataclass
class TaskState:
    name: str
    up: bool = False
    finished: bool = False
    restarts: int = 0
    last_error: str = ""
    last_crash: float | None = None
    next_start: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "finished": self.finished,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_crash": self.last_crash,
            "next_start": self.next_start,
        }


@dataclass
class Runtime:
    """What the daemon knows about itself; read by the HTTP endpoint and persisted for ``status``."""

    ctx: AgentContext
    started: float = field(default_factory=time.time)
    tasks: dict[str, TaskState] = field(default_factory=dict)
    #: ``time.monotonic()`` of the last heartbeat (the event loop's pulse).
    last_beat: float = field(default_factory=time.monotonic)
    loop_lag: float = 0.0
    stopping: bool = False
    http_address: tuple[str, int] | None = None

    def persist(self) -> None:
        try:
            self.ctx.store.put(
                STATE_KEY,
                {
                    "pid": os.getpid(),
                    "started": self.started,
                    "stopping": self.stopping,
                    "http": list(self.http_address) if self.http_address else None,
                    "tasks": {name: state.as_dict() for name, state in self.tasks.items()},
                    "updated": time.time(),
                },
            )
        except sqlite3.Error as exc:  # a full disk must not stop supervision
            log.warning("could not persist daemon state", error=str(exc))


def backoff_delay(attempt: int, *, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with ±20 % jitter, capped at ``maximum`` (jitter keeps restarts of
    several crashing tasks, or of many sites after a shared outage, from moving in lockstep)."""
    base = min(maximum, initial * 2.0 ** min(attempt, 32))
    jitter = rng.uniform(0.8, 1.2) if rng is not None else random.uniform(0.8, 1.2)
    return min(maximum, base * jitter)


def should_report(restarts: int, *, error: str, last_reported: str | None) -> bool:
    """Whether crash number ``restarts`` becomes an event: a new error always, the same one at
    restarts 1, 2, 4, 8, … only. A task crash-looping on the same cause for a month of outage
    would otherwise queue ~40 000 identical error events and push real ones out of the bounded
    outbox; the log and ``edgefleet_agent_task_restarts_total`` still see every crash."""
    return error != last_reported or restarts & (restarts - 1) == 0


async def supervise(name: str, func: Task, runtime: Runtime) -> None:
    """Run ``func(ctx)``; restart it with backoff when it raises, until cancelled."""
    ctx = runtime.ctx
    settings = ctx.config.daemon
    state = runtime.tasks.setdefault(name, TaskState(name))
    loop = asyncio.get_running_loop()
    attempt = 0
    reported_error: str | None = None
    while True:
        started = loop.time()
        state.up, state.next_start = True, None
        metrics.TASK_UP.labels(name).set(1)
        runtime.persist()
        try:
            await func(ctx)
        except asyncio.CancelledError:
            state.up = False
            metrics.TASK_UP.labels(name).set(0)
            raise
        except Exception as exc:
            state.up = False
            metrics.TASK_UP.labels(name).set(0)
            if loop.time() - started >= settings.restart_reset_seconds:
                attempt = 0
            delay = backoff_delay(
                attempt, initial=settings.restart_initial_seconds, maximum=settings.restart_max_seconds
            )
            attempt += 1
            state.restarts += 1
            state.last_error = f"{type(exc).__name__}: {exc}"[:500]
            state.last_crash = time.time()
            state.next_start = state.last_crash + delay
            metrics.TASK_RESTARTS.labels(name).inc()
            log.error("task crashed", task=name, restart_in=round(delay, 2), restarts=state.restarts, exc_info=exc)
            runtime.persist()
            if should_report(state.restarts, error=state.last_error, last_reported=reported_error):
                reported_error = state.last_error
                try:
                    ctx.emit(
                        "agent.task-crashed",
                        f"task {name} crashed ({state.last_error}); restart #{state.restarts} in {delay:.1f}s",
                        severity=protocol.Severity.ERROR,
                        data={
                            "task": name, "error": state.last_error, "restarts": state.restarts, "restart_in": delay,
                        },
                    )
                except Exception as emit_error:  # e.g. disk full: the restart matters more than the report
                    log.warning("could not record task crash event", task=name, error=str(emit_error))
            await asyncio.sleep(delay)
        else:
            state.up, state.finished = False, True
            metrics.TASK_UP.labels(name).set(0)
            log.info("task finished", task=name)
            runtime.persist()
            return


def summary(runtime: Runtime) -> str:
    """One line for systemd's STATUS= (what ``systemctl status`` shows an operator)."""
    parts = sitestatus.parts(runtime.ctx.store)
    install, degradation = parts["install"], parts["degradation"]
    state = degradation.get("state", protocol.SiteState.GREEN.value)
    bundle = install.get("bundle") or {}
    bundle_text = f"{bundle.get('name')} {bundle.get('version')}" if bundle.get("name") else "no bundle"
    components = [c for c in install.get("components") or [] if isinstance(c, dict)]
    healthy = sum(1 for c in components if c.get("healthy"))
    tasks_up = sum(1 for t in runtime.tasks.values() if t.up)
    tasks_total = sum(1 for t in runtime.tasks.values() if not t.finished)
    kube_ok = kube.last_contact is not None and (
        time.monotonic() - kube.last_contact <= runtime.ctx.config.daemon.kube_contact_max_age_seconds
    )
    return (
        f"site {runtime.ctx.site} {state}; {bundle_text} ({install.get('install_state', 'idle')}); "
        f"{healthy}/{len(components)} components healthy; tasks {tasks_up}/{tasks_total}; "
        f"kube {'ok' if kube_ok else 'unreachable'}"
    )


async def heartbeat(runtime: Runtime) -> None:
    """The loop's pulse: measures loop lag, pings the systemd watchdog, refreshes STATUS and metrics.

    It pings only from here, on time, so a blocked loop (a synchronous call gone wrong, a
    deadlock) stops the pings and systemd's watchdog restarts the agent.
    """
    settings = runtime.ctx.config.daemon
    watchdog = sdnotify.watchdog_interval()
    tick = min(1.0, watchdog / 4) if watchdog else 1.0
    last_ping = last_status = 0.0
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + tick
        await asyncio.sleep(tick)
        now = loop.time()
        runtime.loop_lag = max(0.0, now - expected)
        runtime.last_beat = time.monotonic()
        metrics.LOOP_LAG.set(runtime.loop_lag)
        if watchdog and now - last_ping >= watchdog / 2:
            sdnotify.watchdog()
            last_ping = now
        if now - last_status >= settings.status_interval_seconds:
            last_status = now
            try:
                metrics.refresh(runtime.ctx.store)
                sdnotify.status(summary(runtime))
            except Exception as exc:  # never let reporting stop the pulse
                log.warning("status refresh failed", error=str(exc))


async def serve(config: agent_config.AgentConfig, *, stop: asyncio.Event | None = None) -> int:
    """Run the daemon until ``stop`` is set or SIGTERM/SIGINT arrives; return the exit code."""
    kube.last_contact = None  # this daemon's contact, not an earlier one's in the same process (tests)
    with _single_instance(config.state_dir):
        store = StateStore.open(config.state_dir)
        try:
            for migrate in MIGRATIONS:
                migrate(store)
            ctx = AgentContext(config=config, store=store)
            runtime = Runtime(ctx=ctx)
            return await _run(runtime, stop or asyncio.Event())
        finally:
            store.close()


class AlreadyRunning(Exception):
    """Another daemon holds this state directory."""


@contextmanager
def _single_instance(state_dir: Path) -> Iterator[None]:
    """Hold ``<state_dir>/daemon.lock`` (flock) for the daemon's lifetime.

    Two daemons on one state directory (a hand-started ``run`` beside the service) would both
    degrade, snapshot and publish; the second one refuses to start instead. The kernel drops the
    lock when the process dies, however it dies, so a stale lock cannot block a restart.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise AlreadyRunning(f"another agent (pid {holder}) is running on {state_dir}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _emit_quietly(ctx: AgentContext, type: str, summary: str, **kwargs: Any) -> None:
    """Emit an event the daemon can live without (a full disk must not stop it starting or stopping)."""
    try:
        ctx.emit(type, summary, **kwargs)
    except sqlite3.Error as exc:
        log.warning("could not record event", event_type=type, error=str(exc))


async def _run(runtime: Runtime, stop: asyncio.Event) -> int:
    ctx = runtime.ctx
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    metrics.AGENT.info({"version": sitestatus.AGENT_VERSION, "site": ctx.site})
    metrics.STARTED.set(runtime.started)
    metrics.refresh(ctx.store)
    _emit_quietly(ctx, "agent.started", f"agent {sitestatus.AGENT_VERSION} started", data={"pid": os.getpid()})
    web = None
    if ctx.config.http.enabled:
        try:
            web = await httpd.start(runtime)
            runtime.http_address = web.address
        except OSError as exc:  # e.g. port taken: supervising the platform matters more than the endpoint
            log.error("http endpoint not started", host=ctx.config.http.host, port=ctx.config.http.port, error=str(exc))
            _emit_quietly(
                ctx,
                "agent.http-failed",
                f"local HTTP endpoint {ctx.config.http.host}:{ctx.config.http.port} not started: {exc}",
                severity=protocol.Severity.WARNING,
            )
    pulse = asyncio.create_task(heartbeat(runtime), name="heartbeat")
    for name, _ in TASKS:
        runtime.tasks[name] = TaskState(name)
    tasks = [asyncio.create_task(supervise(name, func, runtime), name=name) for name, func in TASKS]
    await asyncio.sleep(0)  # let every task start, so READY's status line counts them
    runtime.persist()
    log.info("agent started", site=ctx.site, tasks=[name for name, _ in TASKS], http=runtime.http_address)
    sdnotify.ready(summary(runtime))
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        runtime.stopping = True
        log.info("agent stopping", drain_seconds=ctx.config.daemon.drain_seconds)
        sdnotify.stopping("draining tasks")
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=ctx.config.daemon.drain_seconds)
            if pending:
                log.warning("tasks still running after the drain time", tasks=sorted(t.get_name() for t in pending))
        pulse.cancel()
        await asyncio.gather(pulse, return_exceptions=True)
        if web is not None:
            await web.close()
        runtime.persist()
    _emit_quietly(ctx, "agent.stopped", "agent stopped cleanly")
    log.info("agent stopped")
    return exitcodes.OK


def run(config: agent_config.AgentConfig) -> int:
    """Set up logging and run the daemon to completion (the ``run`` command).

    ``gc.freeze()`` first: what exists now (modules, classes, the config) lives as long as the
    process, so the collector need not walk it again. That keeps a full collection at ~0.1 ms
    instead of ~25 ms, which is what lets the installer hand freed memory back after every
    supervision pass (:func:`agent.installer.release_memory`) at no measurable CPU cost.
    """
    logs.setup(config.log_format)
    gc.collect()
    gc.freeze()
    return asyncio.run(serve(config))


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        config = agent_config.load(Path(args.config))
    except agent_config.ConfigError as exc:
        print(f"edgefleet-agent: config error: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    try:
        return run(config)
    except AlreadyRunning as exc:
        print(f"edgefleet-agent: {exc}", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    except sqlite3.Error as exc:
        print(f"edgefleet-agent: state store {config.state_dir}: {exc}", file=sys.stderr)
        return exitcodes.INTERNAL
    except OSError as exc:
        print(f"edgefleet-agent: {exc.filename or config.state_dir}: {exc.strerror or exc}", file=sys.stderr)
        return exitcodes.UNAVAILABLE


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("run", help="run the agent daemon (systemd: Type=notify)")
    parser.set_defaults(func=_cmd_run)
