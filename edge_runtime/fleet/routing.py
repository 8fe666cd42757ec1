"""Routing shoppers to nodes: rendezvous hashing over the fleet, and a client that fails over.

``FleetClient`` routes a user to a node by rendezvous (highest-random-weight) hashing over the discovered nodes
(Thaler & Ravishankar, "Using Name-Based Mappings to Increase Hit Rates", IEEE/ACM ToN 1998): a user stays on one
node (their session lives there) and only the users of a node that disappears move. On a connection failure the
client fails over to the next node in that user's order. Nodes come from a static table or from zeroconf
(``discovery.Discovery``, the one browser of the project, run on a private event loop thread).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from typing import Any

from .. import const
from ..rpc.client import Client, Credentials
from .discovery import NODE_TYPE, Discovery

log = logging.getLogger(__name__)


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
        credentials: TLS context and the ``shop`` token for nodes that enforce roles (``rpc.client.Credentials``).
    Raises:
        OSError: zeroconf cannot start (discovery only).
    """

    def __init__(self, nodes: dict[str, tuple[str, int]] | None = None, loopback_only: bool = True,
                 timeout: float = 5.0, credentials: Credentials | None = None):
        self.timeout = timeout
        self.credentials = credentials or Credentials()
        self._static = dict(nodes) if nodes is not None else None
        self._clients: dict[str, Client] = {}
        self._down: dict[str, float] = {}
        self._discovery: Discovery | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if nodes is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="fleet-discovery", daemon=True)
            self._thread.start()
            self._discovery = Discovery(loopback_only=loopback_only)

            async def start() -> None:
                await self._discovery.start()
                self._discovery.browse(NODE_TYPE)

            try:
                asyncio.run_coroutine_threadsafe(start(), self._loop).result(10.0)
            except BaseException:
                self.close()
                raise

    def nodes(self) -> dict[str, tuple[str, int]]:
        """{node id: (host, RPC port)} known now (TXT ``node`` and ``rpc`` of each announcement)."""
        if self._static is not None:
            return dict(self._static)
        out = {}
        for name, e in list(self._discovery.services.get(NODE_TYPE, {}).items()):
            rpc = e["props"].get("rpc", "")
            out[e["props"].get("node") or name] = (e["host"], int(rpc) if rpc.isdigit() else e["port"])
        return out

    def wait_for(self, count: int, timeout: float = 10.0) -> dict[str, tuple[str, int]]:
        """Block until ``count`` nodes are known (or ``timeout`` s); returns them."""
        end = time.monotonic() + timeout
        while len(self.nodes()) < count and time.monotonic() < end:
            time.sleep(0.05)
        return self.nodes()

    def route(self, user: str) -> list[str]:
        """Node ids in failover order for ``user``; nodes that failed in the last ``NODE_DOWN_SECONDS`` go last."""
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
                    c = self._clients[node] = Client(host, port, timeout=self.timeout,
                                                     token=self.credentials.token, ssl=self.credentials.ssl)
                return node, c.call(method, **params)
            except OSError as exc:
                errors.append(f"{node}: {exc!r}")
                self._down[node] = time.monotonic() + const.NODE_DOWN_SECONDS
                bad = self._clients.pop(node, None)
                if bad is not None:
                    bad.close()
        raise ConnectionError("no edgerec node reachable: " + ("; ".join(errors) or "none discovered"))

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        if self._loop is not None:
            if self._discovery is not None and self._discovery.zc is not None:
                try:
                    asyncio.run_coroutine_threadsafe(self._discovery.close(), self._loop).result(10.0)
                except Exception as exc:  # closing: best effort
                    log.debug("zeroconf close failed: %r", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
            self._loop.close()
            self._loop = None
