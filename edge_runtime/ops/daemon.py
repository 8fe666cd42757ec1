"""One process lifecycle for every edgerec server (the node, the registry, and the tests' in-process servers):
start-up, main loop, reload, shutdown.

``Daemon.run()``:

1. bind the listeners (``rpc.server.RpcServer``; or take systemd's sockets);
2. start the components (objects with ``async start(server)`` / ``async stop()``: model sync, zeroconf
   announcements, the metrics endpoint), in order;
3. ``READY=1`` to systemd (``systemd.py``; no-ops outside it) and ``WATCHDOG=1`` pings from the event loop, so a
   wedged loop stops the pings (the node checks its model through the served path before it builds the daemon);
4. wait: SIGHUP runs ``reload`` (``RELOADING=1`` ... ``READY=1``; serialized; a failed reload keeps the running
   configuration and model); SIGTERM / SIGINT (or ``stop()``) end the wait;
5. ``STOPPING=1``, stop the components in reverse order, drain (no new connections or requests; requests in flight
   get their replies, at most ``drain_timeout`` s; lingering closes), remove the Unix socket, run ``on_shutdown``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from typing import Awaitable, Callable, Protocol

from .. import const
from ..errors import EdgeRuntimeError
from ..rpc.methods import MethodTable
from ..rpc.server import Observer, RpcServer
from . import systemd

log = logging.getLogger("edgerec")


class Component(Protocol):
    """Something that runs beside the listeners for the daemon's lifetime."""

    async def start(self, server: RpcServer) -> None: ...

    async def stop(self) -> None: ...


class Daemon:
    """A server process's lifecycle; see the module docstring.

    Args:
        methods / observer: what the RPC server dispatches to, and its accounting (see ``RpcServer``).
        host / port / unix: where to listen (port None: no TCP; unix None: no Unix socket; port 0 picks one).
        sockets: listening sockets handed over by systemd socket activation, served instead of binding.
        components: started after the listeners are bound, stopped (reverse order) before the drain.
        reload: awaited on SIGHUP.
        on_shutdown: called after the drain (e.g. the scoring threads' executor shutdown).
        name: what the start-up log line calls this process.
        server_options: ``RpcServer`` bounds (stalled_frame_seconds, idle_seconds, max_connections, ...).
    """

    def __init__(self, methods: MethodTable, observer: Observer | None = None, *,
                 host: str | None = const.DEFAULT_HOST, port: int | None = const.DEFAULT_PORT,
                 unix: str | None = None, sockets: list[socket.socket] | None = None,
                 components: list[Component] | tuple = (),
                 reload: Callable[[], Awaitable[None]] | None = None,
                 on_shutdown: list[Callable[[], None]] | tuple = (), drain_timeout: float = const.DRAIN_SECONDS,
                 name: str = "edgerec", **server_options):
        self.server = RpcServer(methods, observer, **server_options)
        self.host, self.port, self.unix, self.sockets = host, port, unix, sockets
        self.components = list(components)
        self.reload = reload
        self.on_shutdown = list(on_shutdown)
        self.drain_timeout = drain_timeout
        self.name = name
        self.addresses: list[str] = []
        self._stop: asyncio.Event | None = None
        self._reloads: set[asyncio.Task] = set()
        self._reload_lock: asyncio.Lock | None = None

    def stop(self) -> None:
        """End the main loop (as SIGTERM does); safe to call before ``run`` reaches it."""
        if self._stop is not None:
            self._stop.set()

    async def do_reload(self) -> Exception | None:
        """What SIGHUP runs: ``reload`` under one lock (reloads run one at a time, in the order asked, so the last
        one leaves the last configuration in force). Returns why it failed (an ``EdgeRuntimeError`` the reload
        raised after logging it, e.g. a rejected configuration, or an unexpected error, logged here), or None."""
        if self.reload is None:
            return None
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            systemd.notify("RELOADING=1")
            failed: Exception | None = None
            try:
                await self.reload()
            except EdgeRuntimeError as exc:   # logged by the reload itself; the running config and model stay
                failed = exc
            except Exception as exc:  # a failed reload keeps the running config and model
                log.exception("reload failed; still serving the previous configuration and model")
                failed = exc
            systemd.notify("READY=1")
            return failed

    def _signals(self, loop: asyncio.AbstractEventLoop, install: bool) -> None:
        def on_hup() -> None:
            t = asyncio.ensure_future(self.do_reload())
            self._reloads.add(t)
            t.add_done_callback(self._reloads.discard)

        handlers = {signal.SIGTERM: self._stop.set, signal.SIGINT: self._stop.set}
        if self.reload is not None:
            handlers[signal.SIGHUP] = on_hup
        for sig, fn in handlers.items():
            try:
                if install:
                    loop.add_signal_handler(sig, fn)
                else:
                    loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass

    async def run(self) -> None:
        """Start, serve until SIGTERM / SIGINT / ``stop()``, drain, shut down (see the module docstring).

        Raises:
            OSError: a listener cannot be bound (nothing else was started).
        """
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.addresses = await self.server.start(self.host, self.port, self.unix, sockets=self.sockets)
        self._signals(loop, True)
        log.info("%s listening on %s", self.name, ", ".join(self.addresses))
        started: list[Component] = []
        watchdog = None
        try:
            for c in self.components:
                await c.start(self.server)
                started.append(c)
            systemd.notify(f"READY=1\nSTATUS=serving on {', '.join(self.addresses)}\nMAINPID={os.getpid()}")
            interval = systemd.watchdog_interval()
            if interval:
                async def ping() -> None:
                    while True:
                        systemd.notify("WATCHDOG=1")
                        await asyncio.sleep(interval)
                watchdog = asyncio.ensure_future(ping())
            await self._stop.wait()
        finally:
            systemd.notify("STOPPING=1\nSTATUS=draining")
            if watchdog is not None:
                watchdog.cancel()
            for c in reversed(started):
                try:
                    await c.stop()
                except Exception:  # one component failing to stop must not keep the others running
                    log.exception("stopping %s failed", type(c).__name__)
            log.info("shutting down: draining %d in-flight request(s)", len(self.server.tasks))
            await self.server.shutdown(self.drain_timeout)
            self._signals(loop, False)
            if self.unix is not None:
                self.server.remove_unix_socket(self.unix)
            for fn in self.on_shutdown:
                fn()
            log.info("stopped")


def event_loop_runner(tls: bool = False) -> tuple[Callable, str]:
    """(run, name): uvloop's ``run`` where it is installed (a dependency on Linux; its loop is written in C and
    takes less time per request), else ``asyncio.run``; ``EDGEREC_EVENT_LOOP=asyncio`` forces the standard loop.
    With TLS (``tls``) the standard loop: uvloop 0.23's ``start_tls`` stalled a legitimate handshake behind ten
    connections that never sent a ClientHello (measured; asyncio's does not), and TLS runs after admission."""
    from ..config import env_value

    want = (env_value("EVENT_LOOP") or "auto").strip().lower()
    if want not in ("auto", "uvloop", "asyncio"):
        log.warning("EDGEREC_EVENT_LOOP=%r: must be auto, uvloop or asyncio; using auto", want)
        want = "auto"
    if tls and want != "asyncio":
        return asyncio.run, "asyncio (TLS is on)"
    if want != "asyncio":
        try:
            import uvloop
            return uvloop.run, f"uvloop {uvloop.__version__}"
        except ImportError:
            if want == "uvloop":
                log.warning("EDGEREC_EVENT_LOOP=uvloop but uvloop is not installed; using asyncio")
    return asyncio.run, "asyncio"


def run_listening(main: Callable[[], Awaitable[None]], tls: bool = False) -> int:
    """Run ``main()`` on the event loop (``event_loop_runner``, logged) for a command that listens: 0 when it
    returns, 2 (logged) when it cannot bind or its start-up check fails."""
    run, name = event_loop_runner(tls)
    log.info("event loop: %s", name)
    try:
        run(main())
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 2
    except EdgeRuntimeError as exc:
        log.error("cannot serve: %s", exc)
        return 2
    return 0
