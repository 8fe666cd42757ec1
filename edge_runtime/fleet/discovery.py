"""Zeroconf (mDNS / DNS-SD, RFC 6762 / 6763) announcements and browsing for registries and peer nodes.

The one zeroconf browser of the project: the sync loop, the announcers and ``FleetClient`` all use ``Discovery``.

Service types (``_edgerec-registry`` is one byte over RFC 6335's 15-byte service names; zeroconf registers it with
``strict=False`` and every DNS-SD browser resolves it): ``_edgerec-registry._tcp.local.`` (the trainer-side
registry; TXT ``latest``, ``channel``) and
``_edgerec._tcp.local.`` (edge daemons; TXT ``node``, ``version``, ``load``, ``rpc`` = TCP port of the RPC API).

A node bound to loopback announces and listens on 127.0.0.1 only (``loopback_only``): nothing is multicast on other
interfaces. Everything runs on the caller's asyncio loop (``zeroconf.asyncio``).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .. import const

log = logging.getLogger(__name__)

REGISTRY_TYPE = "_edgerec-registry._tcp.local."
NODE_TYPE = "_edgerec._tcp.local."


def is_loopback(host: str | None) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or (host or "").startswith("127.")


def _txt(props: dict) -> dict[str, str]:
    return {str(k): str(v) for k, v in props.items() if v is not None}


def _decode(props: dict) -> dict[str, str]:
    out = {}
    for k, v in (props or {}).items():
        try:
            out[k.decode() if isinstance(k, bytes) else str(k)] = \
                v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))
        except UnicodeDecodeError:
            continue
    return out


class Discovery:
    """One AsyncZeroconf instance: announce services, browse service types.

    Args:
        loopback_only: bind to 127.0.0.1 only (tests, and any daemon listening on loopback).
        host: the address put in announcements (default 127.0.0.1 when loopback_only, else this host's address).
    """

    def __init__(self, loopback_only: bool = True, host: str | None = None):
        self.loopback_only = loopback_only
        self.host = host or ("127.0.0.1" if loopback_only else _own_address())
        self.zc: AsyncZeroconf | None = None
        self._infos: dict[str, AsyncServiceInfo] = {}
        self._browsers: list[AsyncServiceBrowser] = []
        self.services: dict[str, dict[str, dict]] = {}   # type -> name -> {host, port, props}
        self._tasks: set[asyncio.Task] = set()
        self._announce_lock: asyncio.Lock | None = None

    async def start(self) -> None:
        self._announce_lock = asyncio.Lock()
        if self.loopback_only:
            self.zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        else:
            self.zc = AsyncZeroconf(ip_version=IPVersion.V4Only)

    async def announce(self, type_: str, name: str, port: int, props: dict) -> None:
        """Register (or update, if ``name`` is already announced) a service instance."""
        full = f"{name}.{type_}"
        info = AsyncServiceInfo(type_, full, addresses=[socket.inet_aton(self.host)], port=port,
                                properties=_txt(props), server=f"{name}.local.")
        async with self._announce_lock:   # a registration probes for ~1.5 s; updates wait for it
            if full in self._infos:
                await self.zc.async_update_service(info)
            else:
                # strict=False: "edgerec-registry" is 16 bytes, one over RFC 6335's 15-byte service-name limit
                await self.zc.async_register_service(info, allow_name_change=False, strict=False)
            self._infos[full] = info

    def browse(self, type_: str, on_change: Callable[[str, dict | None], None] | None = None) -> None:
        """Keep ``self.services[type_]`` current; ``on_change(name, entry or None)`` after each resolve / removal."""
        table = self.services.setdefault(type_, {})

        def handler(zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            if state_change is ServiceStateChange.Removed:
                table.pop(name, None)
                if on_change:
                    on_change(name, None)
                return
            task = asyncio.ensure_future(self._resolve(service_type, name, table, on_change))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._browsers.append(AsyncServiceBrowser(self.zc.zeroconf, type_, handlers=[handler]))

    async def _resolve(self, type_: str, name: str, table: dict, on_change) -> None:
        info = AsyncServiceInfo(type_, name)
        try:
            ok = await info.async_request(self.zc.zeroconf, const.ZEROCONF_RESOLVE_MS)
        except Exception as exc:  # a malformed announcement must not break browsing
            log.debug("cannot resolve %s: %r", name, exc)
            return
        if not ok or not info.addresses:
            return
        entry = {"name": name, "host": socket.inet_ntoa(info.addresses[0]), "port": info.port,
                 "props": _decode(info.properties)}
        table[name] = entry
        if on_change:
            on_change(name, entry)

    async def close(self) -> None:
        for b in self._browsers:
            await b.async_cancel()
        for t in list(self._tasks):
            t.cancel()
        if self.zc is not None:
            for info in self._infos.values():
                try:
                    await self.zc.async_unregister_service(info)
                except Exception:  # closing: best effort
                    pass
            await self.zc.async_close()
            self.zc = None


def _own_address() -> str:
    """The address other hosts reach this one at (the source address of a route to a public address; no packet
    is sent)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))
        return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()
