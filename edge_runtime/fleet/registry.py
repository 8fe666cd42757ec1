"""The registry's RPC methods over a ``bundle.store.BundleStore``: what ``edgerec registry`` serves to nodes, and
the subset every node with model sync serves to its peers (``versions``, ``manifest``, ``fetch``).

Methods (params: one map; the registry is announced over zeroconf as ``_edgerec-registry._tcp``, ``announce.py``):

* ``latest {channel?}`` -> ``{version, channel, published_at, bytes}`` or nil when the channel is empty.
* ``versions {channel?}`` -> ``[{version, channel, published_at, bytes}, ...]`` oldest first.
* ``manifest {version}`` -> ``{version, manifest: bin (the exact manifest.json bytes), signature: map}``.
* ``fetch {version, file, offset?, length?}`` -> ``{data: bin, size: int (whole file, bytes), eof: bool}``;
  ``length`` is capped at ``const.MAX_CHUNK_BYTES``.
* ``health {}`` (registry only) -> ``{status, role, versions, latest, bytes_served, uptime_s, collector?}``.
"""
from __future__ import annotations

import os
import time

from .. import const
from ..bundle.store import BundleStore
from ..errors import InvalidParams
from ..rpc.methods import MethodTable, check_keys

PEER_METHODS = ("versions", "manifest", "fetch")


def store_methods(store: BundleStore) -> MethodTable:
    """``latest``, ``versions``, ``manifest`` and ``fetch`` over ``store`` (all inline: directory reads of at most
    one chunk)."""

    def latest(p: dict) -> dict | None:
        check_keys(p, ("channel",), (), "latest")
        ch = p.get("channel", const.DEFAULT_CHANNEL)
        if not isinstance(ch, str):
            raise InvalidParams("'channel' must be a string")
        return store.latest(ch)

    def versions(p: dict) -> list[dict]:
        check_keys(p, ("channel",), (), "versions")
        ch = p.get("channel")
        if ch is not None and not isinstance(ch, str):
            raise InvalidParams("'channel' must be a string")
        return store.versions(ch)

    def manifest(p: dict) -> dict:
        check_keys(p, ("version",), ("version",), "manifest")
        return store.manifest(p["version"])

    def fetch(p: dict) -> dict:
        check_keys(p, ("version", "file", "offset", "length"), ("version", "file"), "fetch")
        return store.fetch(p["version"], p["file"], p.get("offset", 0), p.get("length", const.MAX_CHUNK_BYTES))

    return MethodTable({"latest": (latest, False), "versions": (versions, False), "manifest": (manifest, False),
                        "fetch": (fetch, False)})


class RegistryService:
    """What ``edgerec registry`` serves: ``store_methods`` plus ``health``.

    Attributes:
        store: the ``BundleStore`` over ``root``. methods: the ``MethodTable`` the RPC server dispatches to.
    """

    def __init__(self, root: str | os.PathLike):
        self.store = BundleStore(root)
        self.methods = store_methods(self.store)
        self.methods.add("health", self.health)
        self.started = time.time()
        self.collector = None   # fleet.collector.CollectorStore when the registry also collects events

    def health(self, p: dict) -> dict:
        check_keys(p, (), (), "health")
        latest = self.store.latest(None)
        out = {"status": "ok", "role": "registry", "versions": len(self.store.versions()),
               "latest": latest["version"] if latest else None, "bytes_served": self.store.bytes_served,
               "uptime_s": round(time.time() - self.started, 3)}
        if self.collector is not None:
            out["collector"] = self.collector.health()
        return out
