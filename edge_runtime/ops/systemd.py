"""The systemd service protocol, without libsystemd: readiness / watchdog notifications and socket activation.

* ``notify("READY=1")``: one datagram to ``$NOTIFY_SOCKET`` (sd_notify(3); a leading ``@`` names an abstract
  socket). A no-op when the variable is unset, so the daemon runs the same outside systemd.
* ``watchdog_interval()``: half of ``$WATCHDOG_USEC`` in seconds when ``$WATCHDOG_PID`` is unset or ours
  (sd_watchdog_enabled(3)); the daemon pings ``WATCHDOG=1`` that often from its event loop, so a wedged loop stops
  the pings and systemd restarts it.
* ``listen_fds()``: sockets passed by socket activation (``$LISTEN_FDS`` from fd 3, ``$LISTEN_PID`` ours;
  sd_listen_fds(3)), as socket objects.
* ``under_systemd()``: started by systemd (``$INVOCATION_ID``) with stderr going to the journal (``$JOURNAL_STREAM``).
"""
from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify(state: str, env: dict | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to the service manager; False when not under one or
    the send failed (never raises: a notification must not take the daemon down)."""
    env = os.environ if env is None else env
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


def watchdog_interval(env: dict | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the configured timeout), or None when the watchdog is off."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) <= 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2e6


def listen_fds(env: dict | None = None, unset: bool = True) -> list[socket.socket]:
    """Sockets handed over by systemd socket activation (stream sockets: TCP or Unix), in order; [] otherwise.
    The variables are removed (``unset``) so child processes do not take them for theirs."""
    env = os.environ if env is None else env
    pid, n = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if not n or not n.isdigit() or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(n)):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    if unset:
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(k, None)
    return socks


def under_systemd(env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("INVOCATION_ID")) and bool(env.get("JOURNAL_STREAM"))
