"""The edge fleet: zeroconf announcements of nodes and registries, and a client that routes shoppers to nodes.

* ``NodeAnnouncer``: a daemon announces ``_edgerec._tcp`` with TXT ``node`` (id), ``version`` (model served),
  ``load`` (requests in flight) and ``rpc`` (TCP port), updated on every swap and every ``interval`` s.
* ``RegistryAnnouncer``: the registry announces ``_edgerec-registry._tcp`` with TXT ``latest`` and ``channel`` and
  updates it when a publish changes the latest version, so edges learn of it at once.
* ``FleetClient``: routes a user to a node by rendezvous (highest-random-weight) hashing over the discovered
  nodes (Thaler & Ravishankar, "Using Name-Based Mappings to Increase Hit Rates", IEEE/ACM ToN 1998): a user
  stays on one node (their session lives there) and only the users of a node that disappears move. On a
  connection failure the client fails over to the next node in that user's order.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import threading
import time
from typing import Any

from .client import Client
from .discovery import NODE_TYPE, REGISTRY_TYPE, Discovery
from .registry import DEFAULT_CHANNEL

log = logging.getLogger(__name__)


class NodeAnnouncer:
    """Announce this daemon as a peer (see the module docstring); an ``extras`` object for ``server.serve``."""

    def __init__(self, discovery: Discovery, service, node_id: str, interval: float = 5.0):
        self.discovery, self.service, self.node_id, self.interval = discovery, service, node_id, interval
        self.port: int | None = None
        self._server = None
        self._task: asyncio.Task | None = None
        self._last: dict | None = None

    def props(self) -> dict:
        m = self.service.model
        inflight = sum(c.inflight for c in self._server.connections) if self._server is not None else 0
        return {"node": self.node_id, "version": m.version if m is not None else "", "load": inflight,
                "rpc": self.port}

    async def start(self, server) -> None:
        self._server = server
        self.port = server.tcp_port
        if self.port is None:
            log.warning("no TCP listener: this node is not announced to peers")
            return
        await self.update()
        self._task = asyncio.ensure_future(self._loop())

    async def update(self) -> None:
        props = self.props()
        if props != self._last:
            await self.discovery.announce(NODE_TYPE, self.node_id, self.port, props)
            self._last = props

    def changed(self, version: str) -> None:
        """Swap hook: re-announce at once."""
        if self.port is not None:
            task = asyncio.ensure_future(self.update())
            task.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                                   or log.warning("announce failed: %r", t.exception()))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.update()
            except Exception as exc:  # announcements are best effort
                log.debug("announce failed: %r", exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class RegistryAnnouncer:
    """Announce the registry and keep TXT ``latest`` current (rescans the bundle directory every ``interval`` s)."""

    def __init__(self, discovery: Discovery, service, name: str, channel: str = DEFAULT_CHANNEL,
                 interval: float = 1.0):
        self.discovery, self.service, self.name, self.channel, self.interval = \
            discovery, service, name, channel, interval
        self._task: asyncio.Task | None = None
        self._latest: str | None = None
        self.port: int | None = None

    async def start(self, server) -> None:
        self.port = server.tcp_port
        await self._update()
        self._task = asyncio.ensure_future(self._loop())

    async def _update(self) -> None:
        latest = self.service.store.latest(self.channel)
        version = latest["version"] if latest else ""
        if version != self._latest:
            await self.discovery.announce(REGISTRY_TYPE, self.name, self.port,
                                          {"latest": version, "channel": self.channel})
            log.info("registry: announcing latest %s version %s", self.channel, version or "none")
            self._latest = version

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._update()
            except Exception as exc:
                log.debug("announce failed: %r", exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def rendezvous_order(user: str, nodes: list[str]) -> list[str]:
    """Nodes sorted by decreasing rendezvous weight for ``user`` (blake2b-64 of ``node \\0 user``)."""
    def weight(node: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{node}\0{user}".encode(), digest_size=8).digest(), "big")
    return sorted(nodes, key=weight, reverse=True)


class FleetClient:
    """Blocking client over a fleet: ``call(user, method, **params)`` goes to the user's rendezvous node and fails
    over to the next one when a node cannot be reached.

    Args:
        nodes: static {node_id: (host, port)}; or None to discover ``_edgerec._tcp`` nodes with zeroconf
            (``loopback_only`` binds discovery to 127.0.0.1).
        timeout: seconds per call.
    """

    def __init__(self, nodes: dict[str, tuple[str, int]] | None = None, loopback_only: bool = True,
                 timeout: float = 5.0):
        self.timeout = timeout
        self._static = dict(nodes) if nodes is not None else None
        self._clients: dict[str, Client] = {}
        self._down: dict[str, float] = {}
        self._zc = None
        self._lock = threading.Lock()
        self._found: dict[str, tuple[str, int]] = {}
        if nodes is None:
            from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

            self._zc = Zeroconf(interfaces=["127.0.0.1"] if loopback_only else InterfaceChoice.All,
                                ip_version=IPVersion.V4Only)

            def handler(zeroconf, service_type, name, state_change):
                if state_change is ServiceStateChange.Removed:
                    with self._lock:
                        self._found = {k: v for k, v in self._found.items() if k != name}
                    return
                threading.Thread(target=self._resolve, args=(service_type, name), daemon=True).start()

            self._browser = ServiceBrowser(self._zc, NODE_TYPE, handlers=[handler])

    def _resolve(self, type_: str, name: str) -> None:
        info = self._zc.get_service_info(type_, name, 3000)
        if info is None or not info.addresses:
            return
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        port = int(props.get("rpc") or info.port)
        with self._lock:
            self._found = dict(self._found, **{props.get("node", name): (socket.inet_ntoa(info.addresses[0]), port)})

    def nodes(self) -> dict[str, tuple[str, int]]:
        if self._static is not None:
            return dict(self._static)
        with self._lock:
            return dict(self._found)

    def wait_for(self, count: int, timeout: float = 10.0) -> dict[str, tuple[str, int]]:
        """Block until ``count`` nodes are known (or ``timeout`` s); returns them."""
        end = time.monotonic() + timeout
        while len(self.nodes()) < count and time.monotonic() < end:
            time.sleep(0.05)
        return self.nodes()

    def route(self, user: str) -> list[str]:
        """Node ids in failover order for ``user``; nodes that failed in the last 5 s go last."""
        now = time.monotonic()
        order = rendezvous_order(user, list(self.nodes()))
        return [n for n in order if self._down.get(n, 0) <= now] + [n for n in order if self._down.get(n, 0) > now]

    def call(self, user: str, method: str, **params) -> tuple[str, Any]:
        """Call ``method`` on ``user``'s node (``user`` is also passed as a parameter unless given); returns
        (node id, result).

        Raises:
            ConnectionError: no node could be reached. RpcError: the node answered with an error.
        """
        params.setdefault("user", user)
        nodes = self.nodes()
        errors = []
        for node in self.route(user):
            try:
                c = self._clients.get(node)
                if c is None:
                    host, port = nodes[node]
                    c = self._clients[node] = Client(host, port, timeout=self.timeout)
                return node, c.call(method, **params)
            except OSError as exc:
                errors.append(f"{node}: {exc!r}")
                self._down[node] = time.monotonic() + 5.0
                bad = self._clients.pop(node, None)
                if bad is not None:
                    bad.close()
        raise ConnectionError("no edgerec node reachable: " + ("; ".join(errors) or "none discovered"))

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        if self._zc is not None:
            self._zc.close()
