"""The two server processes, assembled from the rooms below: ``run_node`` (``edgerec serve``) and ``run_registry``
(``edgerec registry``), each one ``daemon.Daemon``.

Node start-up order: open the event log of the state directory (``events/log.py``) -> load the model (the newest
verified bundle of the state directory, or ``model.bundle``) -> serve it through the one swap path
(``serving.swap.ModelSwapper``: served-path check, the warm-up) -> restore the shoppers' sessions from the log ->
bind the listeners (or take systemd's sockets) -> start model sync, zeroconf announcements and the metrics endpoint
-> ``READY=1``. SIGHUP re-reads the configuration (settings that need new sockets or threads are reported and kept
until a restart) and loads the newest bundle through the same swap path; SIGTERM drains and exits 0.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import resource
import socket
import sqlite3
import time
from pathlib import Path
from typing import Callable

from .. import const, scoring
from ..bundle.signing import load_public_keys, verify_bundle
from ..config import split_hostport
from ..errors import BundleError, ConfigError, EdgeRuntimeError
from ..events.log import EventLog
from ..events.pseudonym import Pseudonymizer, load_key
from ..fleet.announce import NodeAnnouncer, RegistryAnnouncer
from ..fleet.discovery import Discovery, is_loopback
from ..fleet.collector import CollectorStore
from ..fleet.registry import PEER_METHODS, RegistryService, store_methods
from ..fleet.shipper import RpcTransport, Shipper, read_upstream_state
from ..fleet.sync import SyncManager
from ..rpc.client import Credentials
from ..rpc.methods import check_keys
from ..serving.encoder import configure_providers
from ..serving.memory import limit_blas_threads, limit_malloc_arenas
from ..serving.model import Model
from ..serving.service import Service
from ..serving.swap import ModelSwapper
from . import logs, systemd
from .security import Security, tcp_hosts
from .daemon import Daemon, run_listening
from .metrics import Metrics, MetricsEndpoint

log = logging.getLogger("edgerec")

# settings a SIGHUP cannot change (they hold sockets, threads or files); a change is logged and waits for a restart
RESTART_ONLY = ("server.host", "server.port", "server.unix", "server.threads", "server.batch_wait_us",
                "server.batch_max", "sync.state_dir", "sync.trusted_keys",
                "sync.discovery", "sync.node_id", "metrics.host", "metrics.port", "model.precision", "events.enabled",
                "events.synchronous", "events.pseudonym_key", "events.session_ttl_seconds", "events.upstream",
                "events.transport", "events.nats_url", "events.ship_batch", "events.ship_interval_seconds",
                "events.ship_max_backoff", "server.max_connections", "server.max_connections_per_address",
                "server.insecure_listen", "auth.client_token_file", "tls.cert_file", "tls.key_file", "tls.ca_file",
                "tls.client_cert_role", "tls.check_hostname", "model.providers")


def raise_fd_limit() -> None:
    """Raise the soft open-file limit to the hard one (at most 65,536): every connection is a descriptor, and a
    soft limit of 1,024 would make accept() fail below ``server.max_connections`` plus the daemon's own files."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard if hard != resource.RLIM_INFINITY else 65536, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError):
        pass


def _boot_model(cfg: dict, credentials: Credentials | None = None) -> tuple[Model | None, SyncManager | None]:
    """The model to serve first, and model sync when a state directory is configured.

    Raises:
        BundleError, ValueError, OSError: no model can be served (the message says why).
    """
    syn = cfg["sync"]
    bundle = cfg["model"]["bundle"] or None
    if syn["state_dir"] and (syn["trusted_keys"] or syn["registry"]):
        trusted = load_public_keys(syn["trusted_keys"])
        sync = SyncManager(None, syn["state_dir"], trusted, precision=cfg["model"]["precision"],
                           registry=split_hostport(syn["registry"]) if syn["registry"] else None,
                           channel=syn["channel"], keep=syn["keep"], poll_seconds=syn["poll_seconds"],
                           max_backoff=syn["max_backoff"], credentials=credentials)
        return (sync.adopt(bundle) if bundle else sync.load_newest()), sync
    if syn["trusted_keys"]:
        verify_bundle(bundle, load_public_keys(syn["trusted_keys"]))
    return Model(bundle, precision=cfg["model"]["precision"], providers=cfg["model"]["providers"]), None


def open_events(cfg: dict) -> tuple[EventLog | None, Pseudonymizer | None]:
    """The event log and pseudonymizer of the state directory (None, None without one or with
    ``events.enabled = false``). The log is opened (a damaged one salvaged) but not started.

    Raises:
        ConfigError: the pseudonym key is unreadable or too widely readable.
    """
    state, ev = cfg["sync"]["state_dir"], cfg["events"]
    if not state or not ev["enabled"]:
        return None, None
    Path(state).mkdir(parents=True, exist_ok=True)
    pseudonym = load_key(ev["pseudonym_key"] or Path(state) / const.PSEUDONYM_KEY_FILE, create=not ev["pseudonym_key"])
    events = EventLog(Path(state) / const.EVENT_DB, pseudonym.key_id, synchronous=ev["synchronous"],
                      max_bytes=ev["max_bytes"], retention_seconds=ev["retention_seconds"])
    events.open()
    return events, pseudonym


def default_node_id(state_dir: str, port: int | None) -> str:
    """``sync.node_id`` when none is configured: with a state directory, ``HOSTNAME-<8 hex>`` made once and kept in
    ``<state_dir>/node_id`` (two nodes on one host, or a node whose port changes, keep distinct, stable ids: the
    collector tells nodes apart by it); without one, ``HOSTNAME-PORT``."""
    host = socket.gethostname()
    if not state_dir:
        return f"{host}-{port if port is not None else 'unix'}"
    path = Path(state_dir) / const.NODE_ID_FILE
    try:
        got = path.read_text(encoding="utf-8").strip()
        if got and len(got) <= const.MAX_ID_CHARS:
            return got
    except OSError:
        pass
    node_id = f"{host[:200]}-{os.urandom(4).hex()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(node_id + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return node_id


def shipping_on(cfg: dict) -> bool:
    return bool(cfg["events"]["upstream"]) or cfg["events"]["transport"] == "nats"


def make_shipper(cfg: dict, events: EventLog, sync: SyncManager | None, node_id: str,
                 credentials: Credentials | None = None) -> Shipper | None:
    """The upstream shipper: ``[events] transport = "nats"`` publishes to JetStream at ``nats_url``; else
    ``upstream`` names the collector (None when it is '': no shipping).

    Raises:
        ConfigError: ``upstream = "registry"`` without model sync to follow a registry.
    """
    ev = cfg["events"]
    if not shipping_on(cfg):
        return None
    if not 0 < len(node_id) <= const.MAX_ID_CHARS:
        raise ConfigError(f"sync.node_id must be 1 to {const.MAX_ID_CHARS} characters to ship events, got "
                          f"{len(node_id)}")
    if ev["transport"] == "nats":
        from ..fleet.nats_transport import NatsTransport   # nats-py only where the NATS transport is used
        transport = NatsTransport(ev["nats_url"])
    elif ev["upstream"] == "registry":
        if sync is None:
            raise ConfigError("events.upstream = 'registry' needs model sync (sync.state_dir and sync.trusted_keys) "
                              "to know the registry; or give the collector's HOST:PORT")
        transport = RpcTransport(sync.registry_address, credentials=credentials)
    else:
        addr = split_hostport(ev["upstream"])
        transport = RpcTransport(lambda: addr, credentials=credentials)
    return Shipper(events, node_id, cfg["sync"]["state_dir"], transport, batch_events=ev["ship_batch"],
                   interval=ev["ship_interval_seconds"], max_backoff=ev["ship_max_backoff"])


def wire_sync(service: Service, swapper: ModelSwapper, sync: SyncManager) -> None:
    """Model sync on a node: installs go through ``swapper``, ``health`` shows the sync state, peers may call
    ``versions`` / ``manifest`` / ``fetch`` on this node's verified bundles, operators ``rollback``."""
    sync.swapper = swapper
    service.sync = sync
    service.methods.update(store_methods(sync.store), PEER_METHODS)
    service.methods.add("rollback", sync.rpc_rollback, is_async=True)


class WarmBeforeReady:
    """The last component a node starts: ``Service.warm_up`` once more right before ``READY=1``. Starting the others
    (zeroconf's announcement probing above all) runs enough other code to cool what the boot swap's warm-up warmed:
    the first ``recommend`` after READY measured 2.1x the second without this, its encoder call 374 µs against
    150 µs a few calls later."""

    def __init__(self, service: Service):
        self.service = service

    async def start(self, server) -> None:
        if self.service.model is not None:
            try:
                await self.service.warm_up(self.service.model)
            except Exception as exc:   # noqa: BLE001 - only speed is at stake
                log.warning("warm-up before READY failed (serving anyway): %r", exc)

    async def stop(self) -> None:
        pass


def run_node(cfg: dict, reload_config: Callable[[], dict] | None = None) -> int:
    """Run an edge node until SIGTERM; returns the exit status (0 after a clean drain, 2 when it cannot start).

    Args:
        cfg: the validated configuration (``config.load``).
        reload_config: called on SIGHUP for the new configuration (raises ``ConfigError`` to refuse it).
    """
    limit_malloc_arenas()
    limit_blas_threads()
    raise_fd_limit()
    srv, lim, syn = cfg["server"], cfg["limits"], cfg["sync"]
    port = None if srv["port"] < 0 else srv["port"]
    unix = srv["unix"] or None
    sockets = systemd.listen_fds()
    if port is None and unix is None and not sockets:
        log.error("nothing to listen on: set server.port >= 0 or server.unix (or use socket activation)")
        return 2
    if not cfg["model"]["bundle"] and not (syn["state_dir"] and syn["trusted_keys"]):
        log.error("no model: set model.bundle (--bundle DIR), or sync.state_dir with sync.trusted_keys to follow a "
                  "registry")
        return 2
    if not syn["state_dir"] and syn["registry"]:
        log.error("sync.registry needs sync.state_dir (where verified bundles are kept)")
        return 2
    node_id = syn["node_id"] or default_node_id(syn["state_dir"], port)
    try:
        guard = Security(cfg)
        guard.check_listen(tcp_hosts(srv["host"], port, sockets), "node")
    except ConfigError as exc:
        log.error("cannot serve: %s", exc)
        return 2
    try:
        configure_providers(cfg["model"]["providers"])   # every encoder this process loads (sync too) uses it
        events, pseudonym = open_events(cfg)
        model, sync = _boot_model(cfg, guard.credentials)
        shipper = make_shipper(cfg, events, sync, node_id, guard.credentials) if events is not None else None
    except (BundleError, ValueError, OSError) as exc:
        log.error("cannot serve: %s", exc)
        return 2
    if shipping_on(cfg) and events is None:
        log.error("shipping events upstream (events.upstream, events.transport) needs the event log "
                  "(sync.state_dir, events.enabled = true)")
        return 2
    if shipper is not None:   # a log rebuilt after damage must not reuse sequence numbers already shipped
        events.ensure_seq_above(read_upstream_state(syn["state_dir"]).get("acked", 0))
    if model is not None:
        log.info("loaded bundle %s: model %s, %d items, d=%d, encoder: %s, load %.2f s", model.path, model.version,
                 model.num_items, model.dim, model.encoder_name, model.load_seconds)
    else:
        log.warning("no verified bundle on disk yet: answering health only until the registry delivers one")
    executor = concurrent.futures.ThreadPoolExecutor(srv["threads"], thread_name_prefix="score")
    service = Service(None, executor, max_sessions=lim["max_sessions"], session_events=lim["session_events"],
                      cache_entries=lim["cache_entries"], cache_items=lim["cache_items"], events=events,
                      pseudonym=pseudonym,
                      added_items=Path(syn["state_dir"]) / const.ADDED_ITEMS_FILE if syn["state_dir"] else None,
                      batch_wait_us=srv["batch_wait_us"], batch_max=srv["batch_max"], scoring_threads=srv["threads"])
    swapper = ModelSwapper(service)
    methods = service.methods
    if sync is not None:
        wire_sync(service, swapper, sync)
    service.upstream = shipper
    metrics = Metrics(service, methods, sync)
    methods.add("stats", metrics.rpc_stats)
    state: dict = {"cfg": cfg, "daemon": None}

    async def rpc_reload(p: dict) -> dict:
        """``reload {}`` (ops): what SIGHUP does (configuration, token files, the newest bundle); returns the
        model served afterwards."""
        check_keys(p, (), (), "reload")
        if state["daemon"] is not None:
            failed = await state["daemon"].do_reload()
            if failed is not None:
                raise failed if isinstance(failed, EdgeRuntimeError) else EdgeRuntimeError(
                    f"reload failed ({type(failed).__name__}); still serving the previous configuration and model")
        m = service.model
        return {"model_version": m.version if m is not None else None}

    methods.add("reload", rpc_reload, is_async=True)

    async def reload() -> None:
        """SIGHUP: new settings where they can change live, then the newest bundle (``Daemon.do_reload`` runs one
        at a time)."""
        old = state["cfg"]
        try:
            new = reload_config() if reload_config is not None else old
        except ValueError as exc:
            log.error("SIGHUP: config rejected, keeping the running one: %s", exc)
            raise ConfigError(f"config rejected, keeping the running one: {exc}") from None
        for dotted in RESTART_ONLY:
            sec, key = dotted.split(".")
            if new[sec][key] != old[sec][key]:
                log.warning("SIGHUP: %s changed (%r -> %r); it takes effect at the next restart", dotted,
                            old[sec][key], new[sec][key])
                new[sec][key] = old[sec][key]
        guard.reload(new)   # first: a rejected token file or an auth switch-off changes nothing at all
        logs.setup(new["log"]["level"], new["log"]["format"])
        log.debug("SIGHUP: effective configuration %s", new)
        service.sessions.max_events = new["limits"]["session_events"]
        service.sessions.resize(new["limits"]["max_sessions"])
        service.cache.resize(new["limits"]["cache_entries"], new["limits"]["cache_items"])
        if events is not None:   # read by the writer thread at its next compaction
            events.max_bytes, events.retention_seconds = new["events"]["max_bytes"], new["events"]["retention_seconds"]
        state["cfg"] = new
        if sync is not None:
            sync.poll_seconds, sync.max_backoff = new["sync"]["poll_seconds"], new["sync"]["max_backoff"]
            sync.keep, sync.channel = max(2, new["sync"]["keep"]), new["sync"]["channel"]
            await sync.reload_newest()
        else:
            await _reload_bundle(new["model"]["bundle"], new["model"]["precision"], new["model"]["providers"])

    async def _reload_bundle(path: str, precision: str, providers: list[str]) -> None:
        current = swapper.current
        async with swapper.lock():
            try:
                new_model = await swapper.load(lambda: Model(path, precision=precision, providers=providers))
            except (BundleError, ValueError, OSError) as exc:
                log.error("SIGHUP: bundle %s refused, still serving %s: %s", path, current, exc)
                return
            if new_model.version == current:
                log.info("SIGHUP: bundle %s holds the model served (%s)", path, current)
                return
            try:
                await swapper.activate(new_model, "SIGHUP")
            except EdgeRuntimeError as exc:
                log.error("SIGHUP: %s", exc)

    def shutdown() -> None:
        executor.shutdown(wait=True)
        if events is not None:
            events.close()   # after the drain: every acknowledged event is committed already

    async def main() -> None:
        if model is not None:
            async with swapper.lock():
                await swapper.activate(model, "boot")   # the served-path check before anything listens
            log.info("serving model %s (%s, %d items, encoder: %s, scoring: %s)", model.version, model.precision,
                     model.num_items, model.encoder_name, scoring.IMPLEMENTATION)
        note = scoring.simd_note()
        if note:
            log.warning("%s; using %s", note, scoring.simd_level())
        plan_note = scoring.scan_plan_note()
        if plan_note:
            log.warning("%s", plan_note)
        if scoring.FALLBACK_NOTE:
            log.warning("%s", scoring.FALLBACK_NOTE)
        if events is not None:
            t0 = time.perf_counter()
            ttl = min(cfg["events"]["session_ttl_seconds"], cfg["events"]["retention_seconds"])
            n, sessions = service.restore(events.restore(time.time() - ttl))
            log.info("event log %s (%s, %d rows): restored %d sessions from %d events in %.2f s", events.path,
                     events.synchronous, events.status["rows"], sessions, n, time.perf_counter() - t0)
            events.start(asyncio.get_running_loop())
        components: list = []
        discovery = None
        tcp = port is not None or any(s.family != socket.AF_UNIX for s in sockets)
        if syn["discovery"] and tcp:
            discovery = Discovery(loopback_only=is_loopback(srv["host"]))
            await discovery.start()
        if sync is not None:
            sync.discovery = discovery
            components.append(sync)
        if shipper is not None:
            components.append(shipper)
        if discovery is not None:
            if sync is not None:
                sync.node_id = node_id
            ann = NodeAnnouncer(discovery, service, node_id)
            swapper.on_swap.append(ann.changed)
            components.append(ann)
        components.append(MetricsEndpoint(metrics, cfg["metrics"]["host"], cfg["metrics"]["port"]))
        components.append(WarmBeforeReady(service))   # last: just before READY=1
        daemon = Daemon(methods, metrics, host=srv["host"], port=port, unix=unix, sockets=sockets,
                        components=components, reload=reload, on_shutdown=[shutdown],
                        drain_timeout=srv["drain_seconds"],
                        name="node" if model is not None else "node (no model yet)",
                        stalled_frame_seconds=srv["stalled_frame_seconds"], idle_seconds=srv["idle_seconds"],
                        **guard.server_options)
        state["daemon"] = daemon
        metrics.declare_methods()   # every method's series from the start (see there)
        # Everything loaded so far (model, id index, restored sessions) lives for the whole run: moved out of the
        # collector's generations, a full collection no longer walks it; and the young generation is collected
        # every GC_THRESHOLDS[0] allocations instead of 700 (the request path makes few cycles). Measured on
        # track with the event log, 8 clients x 32 pipelined: p99 20 ms -> 14 ms (freeze) -> 10 ms (thresholds).
        gc.freeze()
        gc.set_threshold(*const.GC_THRESHOLDS)
        try:
            await daemon.run()
        finally:
            if discovery is not None:
                await discovery.close()

    return run_listening(main, tls=guard.tls is not None)


def run_registry(bundles: str | os.PathLike, host: str, port: int, discovery: bool = True,
                 name: str | None = None, collect: str | os.PathLike | None = None,
                 nodes: list[str] | None = None, cfg: dict | None = None,
                 reload_config: Callable[[], dict] | None = None) -> int:
    """Serve the published versions in ``bundles`` (``fleet.registry``) until SIGTERM, announced over zeroconf
    unless ``discovery`` is False; with ``collect`` (a directory), also the collector of the events nodes ship
    (``fleet.collector``: ``ingest``, ``ingest_cursor``; ``nodes`` = the node ids allowed, None = any). ``cfg``:
    the configuration whose ``[auth]``, ``[tls]`` and ``[server]`` connection settings apply (``config.load``;
    None: the defaults, loopback only); ``reload_config``: called on SIGHUP for the new one (its token files are
    re-read: rotation). Returns the exit status (2 when it cannot start)."""
    from ..config import load as load_config

    raise_fd_limit()
    try:
        guard = Security(cfg if cfg is not None else load_config(env={}, path=os.devnull))
        guard.check_listen([host], "registry")
    except ConfigError as exc:
        log.error("cannot serve: %s", exc)
        return 2
    os.makedirs(bundles, exist_ok=True)
    service = RegistryService(bundles)
    collector = None
    if collect:
        try:
            collector = CollectorStore(Path(collect) / const.COLLECTOR_DB, nodes)
        except (OSError, sqlite3.Error) as exc:
            log.error("cannot open the collector in %s: %s", collect, exc)
            return 2
        service.methods.update(collector.methods())
        service.collector = collector
        log.info("collector %s: %d events stored; nodes %s", collector.path, collector.count(),
                 "any" if nodes is None else sorted(nodes))

    async def reload() -> None:
        """SIGHUP: the token files again (the bundles directory is read on every call anyway)."""
        if reload_config is None:
            log.info("SIGHUP: nothing to re-read (no configuration file)")
            return
        try:
            new = reload_config()
        except ValueError as exc:
            log.error("SIGHUP: config rejected, keeping the running one: %s", exc)
            raise ConfigError(f"config rejected, keeping the running one: {exc}") from None
        guard.reload(new)
        log.info("SIGHUP: %d token(s) in force", guard.auth.token_count)

    async def main() -> None:
        components, disc = [], None
        if discovery:
            disc = Discovery(loopback_only=is_loopback(host))
            await disc.start()
            components.append(RegistryAnnouncer(disc, service, name or f"registry-{socket.gethostname()}-{port}"))
        try:
            await Daemon(service.methods, host=host, port=port, components=components, name="registry",
                         reload=reload, **guard.server_options).run()
        finally:
            if disc is not None:
                await disc.close()
            if collector is not None:
                collector.close()

    return run_listening(main, tls=guard.tls is not None)



def run_collector(nats_url: str, collect: str | os.PathLike, nodes: list[str] | None = None,
                  stream: str = const.NATS_STREAM, durable: str = "edgerec-collector", replicas: int = 1) -> int:
    """``edgerec collect``: read the events nodes publish to NATS JetStream (``fleet.nats_transport.NatsFeed``)
    into ``collect``/collected.db (the store ``edgerec registry --collect`` keeps) until SIGTERM / SIGINT; a server
    that is away is waited for. Returns the exit status: 0 after a signal, 2 when the store cannot be opened or the
    stream exists with settings that lose acknowledged batches (memory storage, async persistence)."""
    import signal

    from ..fleet.nats_transport import NatsFeed   # nats-py only where the NATS transport is used

    try:
        store = CollectorStore(Path(collect) / const.COLLECTOR_DB, nodes)
    except (OSError, sqlite3.Error) as exc:
        log.error("cannot open the collector in %s: %s", collect, exc)
        return 2
    log.info("collector %s: %d events stored; nodes %s", store.path, store.count(),
             "any" if nodes is None else sorted(nodes))

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        feed = NatsFeed(store, nats_url, stream, durable, replicas=replicas)
        await feed.start()
        ready = asyncio.ensure_future(feed.ready.wait())
        ready.add_done_callback(lambda f: f.cancelled() or systemd.notify("READY=1\nSTATUS=collecting"))
        waiter = asyncio.ensure_future(stop.wait())
        running = asyncio.ensure_future(feed.wait())
        try:
            await asyncio.wait([waiter, running], return_when=asyncio.FIRST_COMPLETED)
            if running.done() and running.exception() is not None:
                log.error("cannot collect: %s", running.exception())
                return 2
            systemd.notify("STOPPING=1")
            return 0
        finally:
            for t in (ready, waiter):
                t.cancel()
            await feed.stop()
            h = feed.health()
            log.info("collector stopped: %d batches, %d events stored, %d duplicates, terminated %s", h["batches"],
                     h["stored"], h["duplicates"], h["terminated"] or "none")

    try:
        return asyncio.run(main())
    finally:
        store.close()
