"""systemd's notify protocol (``sd_notify(3)``), spoken directly: one datagram per message.

Why not a library: the protocol is a datagram of ``KEY=VALUE`` lines to the AF_UNIX socket in
``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace); that is smaller than any
dependency. Without ``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``) every call is
a cheap no-op, so the daemon calls these unconditionally. A failed send is logged by the caller's
choice (the return value) and never raised: systemd being unreachable must not stop the agent.
The socket is non-blocking: these calls run on the event loop, and a receiver whose queue is full
(``net.unix.max_dgram_qlen``) must cost a dropped message, never a blocked loop.
"""

from __future__ import annotations

import os
import socket


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return None
    return "\0" + path[1:] if path[0] == "@" else path


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. ``"READY=1"``, ``"STATUS=..."``) as one message; True if it was sent."""
    address = _address()
    if address is None:
        return False
    message = "\n".join(f.replace("\n", " ") if f.startswith("STATUS=") else f for f in fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.connect(address)
            sock.send(message)
    except OSError:  # includes BlockingIOError: a receiver that stopped reading must not block our loop
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1", f"MAINPID={os.getpid()}", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping(status: str = "") -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """The watchdog period in seconds when systemd expects pings from this process, else None.

    ``$WATCHDOG_PID``, when set, names the process meant; a child that inherited the
    environment must not ping on its parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
