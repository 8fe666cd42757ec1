"""Zeroconf announcements of what this process serves: a node's model, a registry's latest version.

* ``NodeAnnouncer``: a daemon announces ``_edgerec._tcp`` with TXT ``node`` (id), ``version`` (model served),
  ``load`` (requests in flight) and ``rpc`` (TCP port), updated on every swap and every ``interval`` s.
* ``RegistryAnnouncer``: the registry announces ``_edgerec-registry._tcp`` with TXT ``latest`` and ``channel`` and
  updates it when a publish changes the latest version, so edges learn of it at once.
"""
from __future__ import annotations

import asyncio
import logging

from .. import const
from .discovery import NODE_TYPE, REGISTRY_TYPE, Discovery

log = logging.getLogger(__name__)


class NodeAnnouncer:
    """Announce this daemon as a peer (see the module docstring); a component of ``ops.daemon.Daemon``.

    Args:
        service: the node's ``serving.service.Service`` (its model's version is announced).
    """

    def __init__(self, discovery: Discovery, service, node_id: str,
                 interval: float = const.NODE_ANNOUNCE_SECONDS):
        self.discovery, self.service, self.node_id, self.interval = discovery, service, node_id, interval
        self.port: int | None = None
        self._server = None
        self._task: asyncio.Task | None = None
        self._last: dict | None = None

    def props(self) -> dict:
        m = self.service.model
        inflight = self._server.inflight if self._server is not None else 0
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
    """Announce the registry and keep TXT ``latest`` current (rescans the bundle directory every ``interval`` s).

    Args:
        service: the ``registry.RegistryService`` (its store's latest version is announced).
    """

    def __init__(self, discovery: Discovery, service, name: str, channel: str = const.DEFAULT_CHANNEL,
                 interval: float = const.REGISTRY_ANNOUNCE_SECONDS):
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
