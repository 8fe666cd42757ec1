"""Model sync on an edge node: learn of new versions, download, verify, warm up, hot swap, roll back.

State directory (``--state-dir``)::

    bundles/<version>/     verified, signed bundles (the newest N kept; peers may fetch them from this node)
    staging/<version>/     transfers in progress: ``<file>.part`` grows chunk by chunk and survives restarts,
                           so a transfer resumes where it stopped
    state.json             {"history": [versions served, oldest first], "skip": {version: reason}}

The loop (``SyncManager.run``): ask the registry for ``latest`` (on a timer with exponential backoff while it is
unreachable, and at once when a zeroconf announcement names a new version) -> if the version is new and not
skipped: download it, signature first (``transfer.py``), from a peer that already serves that version, else from
the registry -> hand it to the node's one swap path (``serving.swap.ModelSwapper``: load beside the current model
with its model check, swap atomically, served-path check, automatic rollback, memory release) -> prune old
versions. Rollback (RPC / CLI) and SIGHUP take the same path.

Every failure is logged, counted and shown in ``health.sync``; the node keeps serving its current model whatever
happens (registry down, corrupted chunk, bad signature, disk full, warm-up failure). A version that fails
verification or warm-up is skipped until the registry names another.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

from .. import const
from ..bundle import format as bundle_mod
from ..bundle import signing
from ..bundle.store import BundleStore
from ..errors import BundleError, InvalidParams, RpcError, SignatureError, SwapError, SyncError
from ..rpc.client import AsyncClient, Credentials
from ..rpc.methods import check_keys
from ..serving.model import Model
from ..serving.swap import ModelSwapper
from .discovery import NODE_TYPE, REGISTRY_TYPE, Discovery
from .transfer import Transfer

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


def _valid_version(v) -> bool:
    try:
        bundle_mod.check_version_name(v)
        return True
    except BundleError:
        return False


class SyncManager:
    """Keeps an edge node on the registry's latest verified model. See the module docstring.

    Args:
        swapper: the node's ``ModelSwapper`` (None: verification and boot helpers only, no loop).
        state_dir: directory for bundles, staging and state.json (created).
        trusted: {key_id: Ed25519 public key}; bundles signed by any other key are refused.
        registry: (host, port) of the registry; None = discover it with zeroconf (needs ``discovery``).
        discovery: a started ``Discovery`` (registry announcements, peers); None = no zeroconf.
        keep: versions kept on disk (>= 2, so a rollback target stays).
        poll_seconds: registry poll interval (s); while unreachable the interval backs off from 1 s up to
            ``max_backoff`` s, and a zeroconf announcement wakes the loop at once.
        chunk_bytes: bytes per fetch call (``transfer.Transfer``).
        timeout: seconds per RPC call.
        fetch_jitter: with peers (zeroconf), wait a random 0..fetch_jitter s before fetching a new version, so
            the nodes that start later find it on a peer instead of all hitting the registry at once.
        credentials: TLS context and token presented to the registry and peers (``rpc.client.Credentials``).
    """

    def __init__(self, swapper: ModelSwapper | None, state_dir: str | os.PathLike, trusted: dict,
                 precision: str = "int8", registry: tuple[str, int] | None = None, discovery: Discovery | None = None,
                 channel: str = const.DEFAULT_CHANNEL, keep: int = const.SYNC_KEEP,
                 poll_seconds: float = const.SYNC_POLL_SECONDS, max_backoff: float = const.SYNC_MAX_BACKOFF_SECONDS,
                 chunk_bytes: int = const.SYNC_CHUNK_BYTES, timeout: float = const.SYNC_TIMEOUT_SECONDS,
                 node_id: str | None = None, fetch_jitter: float = const.SYNC_FETCH_JITTER_SECONDS,
                 credentials: Credentials | None = None):
        if not trusted:
            raise SignatureError("model sync needs at least one trusted public key (--trusted-key)")
        self.swapper = swapper
        self.root = Path(state_dir)
        self.bundles = self.root / "bundles"
        self.staging = self.root / "staging"
        for d in (self.bundles, self.staging):
            d.mkdir(parents=True, exist_ok=True)
        self.store = BundleStore(self.bundles)
        self.trusted = trusted
        self.precision = precision
        self.registry = registry
        self.discovery = discovery
        self.channel = channel
        self.keep = max(2, keep)
        self.poll_seconds = poll_seconds
        self.max_backoff = max_backoff
        self.credentials = credentials
        self.transfer = Transfer(self.bundles, self.staging, trusted, chunk_bytes, timeout, credentials)
        self.timeout = timeout
        self.node_id = node_id
        self.fetch_jitter = fetch_jitter
        self.state = self._read_state()
        self.boot_errors: list[str] = []   # bundles on disk refused at boot (health shows them)
        self.status: dict = {"enabled": True, "state": "starting", "registry": None, "registry_reachable": None,
                             "offline_since": None, "last_check": None, "last_success": None, "last_error": None,
                             "errors": 0, "installs": 0, "rollbacks": 0, "latest_seen": None}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._check_lock: asyncio.Lock | None = None

    @property
    def bytes_from(self) -> dict[str, int]:
        """Payload bytes downloaded, by source kind ("registry", "peer")."""
        return self.transfer.bytes_from

    # -- persistent state ------------------------------------------------------------------------------------
    def _read_state(self) -> dict:
        try:
            with open(self.root / STATE_FILE, "r", encoding="utf-8") as f:
                st = json.load(f)
            if isinstance(st, dict) and isinstance(st.get("history"), list) and isinstance(st.get("skip"), dict):
                # keep only well-formed entries: a hand-edited or damaged file must not break rollback
                return {"history": [v for v in st["history"] if _valid_version(v)][-const.MAX_SERVED_VERSIONS:],
                        "skip": {k: str(v)[:300] for k, v in st["skip"].items() if _valid_version(k)}}
            log.warning("%s: unexpected content; starting with an empty sync state", self.root / STATE_FILE)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable (%s); starting with an empty sync state", self.root / STATE_FILE, exc)
        return {"history": [], "skip": {}}

    def _write_state(self) -> None:
        tmp = self.root / (STATE_FILE + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.state, f, indent=1)
            os.replace(tmp, self.root / STATE_FILE)
        except OSError as exc:  # a full disk must not stop serving
            log.error("cannot write %s: %s", self.root / STATE_FILE, exc)

    def _served(self, version: str) -> None:
        h = [v for v in self.state["history"] if v != version] + [version]
        self.state["history"] = h[-const.MAX_SERVED_VERSIONS:]
        self._write_state()

    def _skip(self, version: str, reason: str) -> None:
        skip = self.state["skip"]
        skip.pop(version, None)
        skip[version] = reason[:300]
        while len(skip) > const.MAX_SKIPPED_VERSIONS:
            del skip[next(iter(skip))]
        self._write_state()

    def _error(self, msg: str) -> None:
        self.status["last_error"] = msg
        self.status["errors"] += 1
        log.error("sync: %s", msg)

    # -- boot ------------------------------------------------------------------------------------------------
    def verified_model(self, version: str, files_checked: bool = False) -> Model:
        """Load ``bundles/<version>`` after checking its signature, names and checksums (``Model`` runs the model
        check).
        ``files_checked``: the transfer has just checked every file's sha256 against the signed manifest (the
        names and links are still checked; the bytes are not hashed a second time).

        Raises:
            BundleError (incl. SignatureError): any check fails.
        """
        d = self.bundles / version
        signing.verify_bundle(d, self.trusted)
        if files_checked:
            for name in bundle_mod.load_manifest(d, verify=False)["files"]:
                bundle_mod.check_member_name(name)
                if (d / name).is_symlink() or not (d / name).is_file():
                    raise BundleError(f"{d}: {name!r} is not a regular file of the bundle")
        model = Model(d, precision=self.precision, verify=not files_checked)
        if model.version != version:
            raise BundleError(f"{d}: manifest says model_version {model.version!r}, directory is {version!r}")
        return model

    def load_newest(self) -> Model | None:
        """At boot, before talking to anyone: the newest verified bundle on disk that is not skipped (rolled back
        from or failed), else None."""
        for row in reversed(self.store.versions()):
            v = row["version"]
            if v in self.state["skip"]:
                continue
            try:
                model = self.verified_model(v)
            except Exception as exc:  # noqa: BLE001 - BundleError, or a bug a bad file reaches: the next one boots
                detail = str(exc) if isinstance(exc, BundleError) else f"{type(exc).__name__}: {exc}"
                msg = f"bundle {v} on disk fails verification, not served: {detail}"
                self.boot_errors = (self.boot_errors + [msg[:const.MAX_ERROR_CHARS]])[-const.MAX_BOOT_ERRORS:]
                self._error(msg)
                continue
            self._served(v)
            log.info("boot: serving %s from %s", v, self.bundles)
            return model
        return None

    def adopt(self, bundle_dir: str | os.PathLike) -> Model:
        """Serve a bundle given on the command line: it must carry a trusted signature; it is copied into the
        state directory so later rollbacks and peers see it.

        Raises:
            BundleError (incl. SignatureError): verification fails.
        """
        src = Path(bundle_dir)
        signing.verify_bundle(src, self.trusted)
        manifest = bundle_mod.load_manifest(src, verify=True)
        version = bundle_mod.check_version_name(manifest.get("model_version"))
        dst = self.bundles / version
        if not dst.exists():
            tmp = self.staging / f".adopt-{version}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in list(manifest["files"]) + [bundle_mod.MANIFEST, bundle_mod.SIGNATURE]:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / name, tmp / name)
            os.replace(tmp, dst)
        model = self.verified_model(version)
        self._served(version)
        return model

    # -- the loop --------------------------------------------------------------------------------------------
    async def start(self, server=None) -> None:
        """Start the loop (a component of ``ops.daemon.Daemon``)."""
        self._wake = asyncio.Event()
        if self.discovery is not None:
            self.discovery.browse(REGISTRY_TYPE, self._on_registry)
            self.discovery.browse(NODE_TYPE)
        self._task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    def lock(self) -> asyncio.Lock:
        """The lock every model change (install, rollback, SIGHUP reload) holds: the swapper's."""
        return self.swapper.lock()

    def _on_registry(self, name: str, entry: dict | None) -> None:
        if entry is not None and entry["props"].get("latest") not in (None, "", self._current()):
            self.status["latest_seen"] = entry["props"].get("latest")
            self.wake()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _current(self) -> str | None:
        return self.swapper.current if self.swapper is not None else None

    def registry_address(self) -> tuple[str, int] | None:
        if self.registry is not None:
            return self.registry
        if self.discovery is not None:
            regs = sorted(self.discovery.services.get(REGISTRY_TYPE, {}).values(), key=lambda e: e["name"])
            for e in regs:
                if e["props"].get("channel", self.channel) == self.channel:
                    return e["host"], e["port"]
        return None

    async def run(self) -> None:
        delay = 1.0
        if self.registry is None and self.discovery is not None:
            try:   # give zeroconf a moment to find the registry before the first check
                await asyncio.wait_for(self._wake.wait(), const.SYNC_DISCOVERY_GRACE_SECONDS)
            except asyncio.TimeoutError:
                pass
        while True:
            try:
                ok = await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the loop die
                log.exception("sync loop error")
                self._error(f"internal error: {exc!r}")
                ok = False
            if ok:
                wait, delay = self.poll_seconds, 1.0
            else:
                wait, delay = delay, min(delay * 2, self.max_backoff)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait * random.uniform(0.9, 1.1))
            except asyncio.TimeoutError:
                pass

    async def check_once(self) -> bool:
        """One round: ask the registry for the latest version and install it if it is new. Returns False when the
        registry could not be asked (the caller backs off). Rounds never overlap; the transfer does not hold the
        model lock, so ``rollback`` and SIGHUP stay available while a slow download runs."""
        if self._check_lock is None:
            self._check_lock = asyncio.Lock()
        async with self._check_lock:
            self.status["last_check"] = time.time()
            addr = self.registry_address()
            self.status["registry"] = f"{addr[0]}:{addr[1]}" if addr else None
            if addr is None:
                self._offline("no registry configured or discovered")
                return False
            try:
                c = await AsyncClient.connect(addr[0], addr[1], self.timeout, self.credentials)
                try:
                    latest = await c.call("latest", channel=self.channel)
                finally:
                    await c.close()
            except (OSError, asyncio.TimeoutError, RpcError) as exc:
                self._offline(f"registry {addr[0]}:{addr[1]} unreachable: {exc!r}")
                return False
            if self.status["registry_reachable"] is False:
                log.info("sync: registry %s:%d reachable again after %.0f s offline", addr[0], addr[1],
                         time.time() - (self.status["offline_since"] or time.time()))
            self.status.update(registry_reachable=True, offline_since=None)
            if self.status["state"] in ("offline", "starting"):
                self.status["state"] = "idle"
            if latest is None:
                return True   # empty channel
            if not isinstance(latest, dict) or not _valid_version(latest.get("version")):
                self._error(f"registry answered 'latest' with {str(latest)[:120]!r}: not a version record")
                return True
            version = latest["version"]
            self.status["latest_seen"] = version
            if version == self._current() or version in self.state["skip"]:
                self.status["last_success"] = time.time()
                return True
            if self.discovery is not None and self.fetch_jitter > 0:
                await asyncio.sleep(random.uniform(0, self.fetch_jitter))
            await self._install(version, addr)
            return True

    def _offline(self, why: str) -> None:
        if self.status["registry_reachable"] is not False:
            log.warning("sync: %s; serving %s offline until it returns", why, self._current())
            self.status["offline_since"] = time.time()
        self.status.update(registry_reachable=False, state="offline", last_error=why)

    def _peer_sources(self, version: str) -> list[tuple[str, str, int]]:
        if self.discovery is None:
            return []
        peers = [e for e in self.discovery.services.get(NODE_TYPE, {}).values()
                 if e["props"].get("version") == version and e["props"].get("node") != self.node_id
                 and e["props"].get("rpc", "").isdigit()]
        random.shuffle(peers)
        return [("peer", e["host"], int(e["props"]["rpc"])) for e in peers]

    async def _install(self, version: str, registry: tuple[str, int]) -> None:
        try:
            await self._install_inner(version, registry)
        finally:
            if self.status["state"] in ("downloading", "warming"):
                self.status["state"] = "idle"

    async def _install_inner(self, version: str, registry: tuple[str, int]) -> None:
        sources = self._peer_sources(version) + [("registry", registry[0], registry[1])]
        self.status["state"] = "downloading"
        failures = []
        for kind, host, port in sources:
            try:
                await self.transfer.download(kind, host, port, version)
                break
            except SignatureError as exc:
                failures.append(f"{kind} {host}:{port}: {exc}")
                if kind == "registry":
                    self._skip(version, f"signature: {exc}")
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    shutil.rmtree(self.staging / version, ignore_errors=True)
                    self.status["state"] = "idle"
                    self._error(f"disk full while staging {version}; staging removed, still serving "
                                f"{self._current()}: {exc}")
                    return
                failures.append(f"{kind} {host}:{port}: {exc!r}")
            except (asyncio.TimeoutError, RpcError, BundleError, SyncError, ValueError, KeyError, TypeError,
                    AttributeError) as exc:
                failures.append(f"{kind} {host}:{port}: {exc!r}"[:const.MAX_ERROR_CHARS])
        else:
            self.status["state"] = "idle"
            self._error(f"cannot fetch {version}, still serving {self._current()}: " + "; ".join(failures))
            return
        for f in failures:
            log.warning("sync: source failed before one succeeded: %s", f)
        self.status["state"] = "warming"
        try:
            model = await self.swapper.load(lambda: self.verified_model(version, True))
        except (BundleError, OSError, ValueError) as exc:
            self._skip(version, f"warm-up: {exc}")
            self.status["state"] = "idle"
            self._error(f"new version {version} failed its warm-up / health check, rolled back to "
                        f"{self._current()}: {exc}")
            return
        async with self.lock():
            if version in self.state["skip"]:   # rolled back from while it loaded
                log.info("sync: %s was skipped while it loaded; not activated", version)
                return
            await self.activate(model)

    async def activate(self, model: Model, reason: str = "sync") -> None:
        """``model`` through the node's swap path (the caller holds ``lock()``); a failed served check skips its
        version. Then prune and record it as served."""
        try:
            await self.swapper.activate(model, reason)
        except SwapError as exc:
            self._skip(model.version, f"served-path check: {exc.__cause__!r}")
            self.status["state"] = "idle"
            self.status["rollbacks"] += 1
            self._error(f"version {model.version} failed its first served request, rolled back to "
                        f"{self._current()}: {exc.__cause__!r}")
            return
        self._served(model.version)
        self.status.update(state="idle", last_success=time.time(), last_error=None)
        if reason == "sync":
            self.status["installs"] += 1
        self._prune()

    # -- rollback / pruning ----------------------------------------------------------------------------------
    async def rollback(self) -> dict:
        """Serve the version served before the current one (it must still be on disk and verify); the current
        version is skipped until the registry names another.

        Raises:
            SyncError: no earlier verified version on disk.
        """
        async with self.lock():
            current = self._current()
            for v in reversed(self.state["history"]):
                # a version skipped (rolled back from, or failed) is no rollback target: a second rollback goes
                # further back instead of flipping to the version the first one left
                if v == current or v in self.state["skip"] or not (self.bundles / v).is_dir():
                    continue
                try:
                    model = await self.swapper.load(lambda v=v: self.verified_model(v))
                except BundleError as exc:
                    log.warning("rollback: %s fails verification: %s", v, exc)
                    continue
                if current is not None:
                    self._skip(current, "rolled back")
                self.state["skip"].pop(v, None)
                self.status["rollbacks"] += 1
                await self.activate(model, reason=f"rollback from {current}")
                return {"ok": True, "from": current, "to": v}
            raise SyncError(f"no earlier verified version on disk to roll back to from {current}")

    def _prune(self) -> None:
        for d in self.staging.iterdir():   # transfers of versions that are served now or were superseded
            shutil.rmtree(d, ignore_errors=True)
        rows = self.store.versions()
        protect = set(self.state["history"][-2:]) | {self._current()}
        extra = len(rows) - self.keep
        for row in rows:
            if extra <= 0:
                break
            if row["version"] in protect:
                continue
            shutil.rmtree(self.bundles / row["version"], ignore_errors=True)
            log.info("sync: pruned %s (keeping %d versions)", row["version"], self.keep)
            extra -= 1

    async def rpc_rollback(self, p: dict) -> dict:
        """The ``rollback {}`` method: ``{ok, from, to}``.

        Raises:
            InvalidParams: no earlier verified version on disk (the message says so).
        """
        check_keys(p, (), (), "rollback")
        try:
            return await self.rollback()
        except SyncError as exc:
            raise InvalidParams(str(exc)) from None

    async def reload_newest(self) -> None:
        """SIGHUP: serve the newest verified, not skipped version on disk if it is not the one served."""
        async with self.lock():   # not while a sync installs a version
            current = self._current()
            rows = [r["version"] for r in self.store.versions() if r["version"] not in self.state["skip"]]
            if not rows or rows[-1] == current:
                log.info("SIGHUP: newest verified bundle on disk is the one served (%s)", current)
                return
            try:
                model = await self.swapper.load(lambda: self.verified_model(rows[-1]))
            except BundleError as exc:
                log.error("SIGHUP: newest bundle %s refused, still serving %s: %s", rows[-1], current, exc)
                return
            await self.activate(model, reason="SIGHUP")

    def health(self) -> dict:
        return dict(self.status, boot_errors=list(self.boot_errors), current=self._current(),
                    versions_on_disk=[r["version"] for r in self.store.versions()],
                    skipped=dict(self.state["skip"]), bytes_from=dict(self.bytes_from),
                    bytes_served_to_peers=self.store.bytes_served)
