"""``edgerec serve``: build the daemon from a validated configuration (``config.py``) and run it.

Start-up order: load the model (the newest verified bundle of the state directory, or ``model.bundle``) -> bind the
listeners (or take systemd's sockets) -> start model sync and zeroconf announcements -> warm-up request -> metrics
endpoint -> ``READY=1``. SIGHUP re-reads the configuration (settings that need new sockets or threads are reported
and kept until a restart) and loads the newest bundle; SIGTERM drains and exits 0 (``server.serve``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket

from .config import split_hostport
from .errors import BundleError

log = logging.getLogger("edgerec")

# settings a SIGHUP cannot change (they hold sockets, threads or files); a change is logged and waits for a restart
RESTART_ONLY = ("server.host", "server.port", "server.unix", "server.threads", "sync.state_dir", "sync.trusted_keys",
                "sync.discovery", "sync.node_id", "metrics.host", "metrics.port", "model.precision")


def run_daemon(cfg: dict, reload_config=None) -> int:
    """Run until SIGTERM; returns the exit status (0 after a clean drain, 2 when it cannot start)."""
    from . import systemd
    from .model import Model, limit_blas_threads, limit_malloc_arenas
    from .server import run_listening, serve
    from .service import Service

    limit_malloc_arenas(2)
    limit_blas_threads(1)
    srv, lim, syn = cfg["server"], cfg["limits"], cfg["sync"]
    port = None if srv["port"] < 0 else srv["port"]
    unix = srv["unix"] or None
    sockets = systemd.listen_fds()
    if port is None and unix is None and not sockets:
        log.error("nothing to listen on: set server.port >= 0 or server.unix (or use socket activation)")
        return 2
    bundle = cfg["model"]["bundle"] or None
    if bundle is None and not syn["state_dir"]:
        log.error("no model: set model.bundle (--bundle DIR), or sync.state_dir with sync.trusted_keys to follow a "
                  "registry")
        return 2
    if not syn["state_dir"] and syn["registry"]:
        log.error("sync.registry needs sync.state_dir (where verified bundles are kept)")
        return 2
    sync = None
    try:
        if syn["state_dir"]:
            from . import signing
            from .sync import SyncManager

            trusted = signing.load_public_keys(syn["trusted_keys"])
            sync = SyncManager(None, syn["state_dir"], trusted, precision=cfg["model"]["precision"],
                               registry=split_hostport(syn["registry"]) if syn["registry"] else None,
                               channel=syn["channel"], keep=syn["keep"], poll_seconds=syn["poll_seconds"],
                               max_backoff=syn["max_backoff"])
            model = sync.adopt(bundle) if bundle else sync.load_newest()
        else:
            if syn["trusted_keys"]:
                from . import signing
                signing.verify_bundle(bundle, signing.load_public_keys(syn["trusted_keys"]))
            model = Model(bundle, precision=cfg["model"]["precision"])
    except (BundleError, ValueError, OSError) as exc:
        log.error("cannot serve: %s", exc)
        return 2
    if model is not None:
        log.info("loaded bundle %s: model %s, %d items, d=%d, load %.2f s", model.path, model.version,
                 model.num_items, model.dim, model.load_seconds)
    else:
        log.warning("no verified bundle on disk yet: answering health only until the registry delivers one")
    executor = concurrent.futures.ThreadPoolExecutor(srv["threads"], thread_name_prefix="score")
    service = Service(model, executor, max_sessions=lim["max_sessions"], session_events=lim["session_events"],
                      cache_entries=lim["cache_entries"], cache_items=lim["cache_items"])
    state = {"cfg": cfg, "reload_lock": None}

    async def reload() -> None:
        """SIGHUP: new settings where they can change live, then the newest bundle. Reloads run one at a time, in
        the order the signals came, so the last one leaves the last configuration in force."""
        if state["reload_lock"] is None:
            state["reload_lock"] = asyncio.Lock()
        async with state["reload_lock"]:
            await _reload()

    async def _reload() -> None:
        from . import logs

        old = state["cfg"]
        try:
            new = reload_config() if reload_config is not None else old
        except ValueError as exc:
            log.error("SIGHUP: config rejected, keeping the running one: %s", exc)
            return
        for dotted in RESTART_ONLY:
            sec, key = dotted.split(".")
            if new[sec][key] != old[sec][key]:
                log.warning("SIGHUP: %s changed (%r -> %r); it takes effect at the next restart", dotted,
                            old[sec][key], new[sec][key])
                new[sec][key] = old[sec][key]
        logs.setup(new["log"]["level"], new["log"]["format"])
        log.debug("SIGHUP: effective configuration %s", new)
        service.sessions.max_events = new["limits"]["session_events"]
        service.sessions.resize(new["limits"]["max_sessions"])
        service.cache.resize(new["limits"]["cache_entries"], new["limits"]["cache_items"])
        if sync is not None:
            sync.poll_seconds, sync.max_backoff = new["sync"]["poll_seconds"], new["sync"]["max_backoff"]
            sync.keep, sync.channel = max(2, new["sync"]["keep"]), new["sync"]["channel"]
        state["cfg"] = new
        await _reload_bundle(new)

    async def _reload_bundle(c: dict) -> None:
        loop = asyncio.get_running_loop()
        current = service.model.version if service.model is not None else None
        if sync is not None:
            async with sync.lock():   # not while a sync installs a version
                current = service.model.version if service.model is not None else None
                rows = [r["version"] for r in sync.store.versions() if r["version"] not in sync.state["skip"]]
                if not rows or rows[-1] == current:
                    log.info("SIGHUP: newest verified bundle on disk is the one served (%s)", current)
                    return
                try:
                    new_model = await loop.run_in_executor(None, sync.verified_model, rows[-1])
                except BundleError as exc:
                    log.error("SIGHUP: newest bundle %s refused, still serving %s: %s", rows[-1], current, exc)
                    return
                await sync.activate(new_model, reason="SIGHUP")
            return
        path = c["model"]["bundle"]
        try:
            new_model = await loop.run_in_executor(None, lambda: Model(path, precision=c["model"]["precision"]))
        except (BundleError, ValueError, OSError) as exc:
            log.error("SIGHUP: bundle %s refused, still serving %s: %s", path, current, exc)
            return
        if new_model.version == current:
            log.info("SIGHUP: bundle %s holds the model served (%s)", path, current)
            return
        service.swap_model(new_model)
        log.info("SIGHUP: now serving %s", new_model.version)

    async def main() -> None:
        extras = []
        discovery = None
        tcp = port is not None or any(s.family != socket.AF_UNIX for s in sockets)
        if syn["discovery"] and tcp:
            from .discovery import Discovery, is_loopback
            from .fleet import NodeAnnouncer

            discovery = Discovery(loopback_only=is_loopback(srv["host"]))
            await discovery.start()
        if sync is not None:
            sync.service, sync.discovery = service, discovery
            service.attach_sync(sync)
            extras.append(sync)
        if discovery is not None:
            node_id = syn["node_id"] or f"{socket.gethostname()}-{port}"
            if sync is not None:
                sync.node_id = node_id
            ann = NodeAnnouncer(discovery, service, node_id)
            if sync is not None:
                sync.on_swap.append(ann.changed)
            extras.append(ann)
        extras.append(_MetricsEndpoint(service, cfg["metrics"]))
        try:
            await serve(service, srv["host"], port, unix, stalled_frame_seconds=srv["stalled_frame_seconds"],
                        idle_seconds=srv["idle_seconds"], drain_timeout=srv["drain_seconds"], extras=extras,
                        sockets=sockets, reload=reload)
        finally:
            if discovery is not None:
                await discovery.close()

    return run_listening(main)


class _MetricsEndpoint:
    """Prometheus /metrics over HTTP on the event loop (``metrics.Metrics.serve_http``), started with the
    listeners."""

    def __init__(self, service, mcfg: dict):
        self.service, self.host, self.port = service, mcfg["host"], mcfg["port"]

    async def start(self, server) -> None:
        if self.port:
            await self.service.metrics.serve_http(self.host, self.port)
            log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        await self.service.metrics.close()
