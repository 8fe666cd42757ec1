"""``edgerec loop``: the model keeps learning from its shoppers. Every ``interval`` seconds (default 5 minutes), or
as soon as ``min_events`` new events have been collected, fine-tune the serving model's checkpoint on the events the
nodes shipped (``trainer/finetune.py``, behind its quality gate), sign and publish the candidate to the registry
directory (``edge_runtime.bundle.store.publish``); the nodes that follow the registry hot-swap it as they do any new
version.

State, in ``workdir``: ``loop.json`` (the current checkpoint, its collector cursor, the last updates with their gate
results and the per-node sequence numbers each published model was trained through), the candidates' bundles and
checkpoints (the last ``keep`` are kept; a refused candidate leaves nothing). The loop never stops for a bad round:
a corrupt checkpoint, an unreadable collector file or a failed export is logged, counted
(``edgerec_loop_errors_total``) and retried at the next round, and the last good checkpoint stays current. A
refused candidate leaves the cursor where it was, so the next round learns from those events and the newer ones;
that round waits until new events have arrived (the gate would judge the same events the same way). The gate needs
enough held-back events to judge by (``FinetuneConfig.min_gate_targets``), so a quiet shop publishes only once that
many new events came in.

Metrics (Prometheus, ``--metrics-port``, on 127.0.0.1 by default): ``edgerec_loop_model_age_seconds`` (since the
newest published model was created), ``edgerec_loop_update_seconds`` (histogram of whole rounds),
``edgerec_loop_events_per_update`` (events the last update learned from), ``edgerec_loop_pending_events``
(collected, not yet learned from), ``edgerec_loop_gate_total{result="passed|refused"}``,
``edgerec_loop_errors_total``, ``edgerec_loop_published_total``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from edge_runtime import const
from edge_runtime.bundle.store import publish
from edge_runtime.errors import BundleError
from edge_runtime.events.statefile import write_atomic
from trainer.checkpoint import CheckpointError
from trainer.finetune import EventError, FinetuneConfig, FinetuneResult, finetune

log = logging.getLogger("edgerec.loop")

STATE = "loop.json"


class LoopStateError(RuntimeError):
    """``loop.json`` is damaged; the message says where it was set aside and how to go on."""
MAX_UPDATES_KEPT = 200   # update records in loop.json (oldest dropped)


@dataclasses.dataclass
class LoopConfig:
    """Settings of ``edgerec loop``.

    Attributes:
        checkpoint: the first parent (``edgerec train`` writes ``<out>.ckpt``); later rounds chain from loop.json.
        events: the collector's SQLite file (``edgerec registry --collect DIR`` -> ``DIR/collected.db``).
        registry: the registry's bundle directory (what ``edgerec registry --bundles`` serves).
        key: the Ed25519 private key that signs published bundles.
        workdir: the loop's state and candidates.
        interval_s: s between rounds (a round with no new events does nothing).
        min_events: a round starts as soon as this many new events are collected (0: on the interval only).
        item_attributes: JSON ``{item: [values]}`` of the catalog, for new items' embeddings (None: mean embedding).
        channel: registry channel to publish to.
        keep: candidate bundles / checkpoints kept in ``workdir``.
        finetune: ``FinetuneConfig`` of each round.
    """

    checkpoint: Path
    events: Path
    registry: Path
    key: Path
    workdir: Path
    interval_s: float = 300.0
    min_events: int = 0
    item_attributes: Path | None = None
    channel: str = const.DEFAULT_CHANNEL
    keep: int = 3
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)


class LoopMetrics:
    """The loop's Prometheus families, in a registry of their own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.age = Gauge("edgerec_loop_model_age_seconds", "seconds since the newest published model was created",
                         registry=r)
        self.duration = Histogram("edgerec_loop_update_seconds", "seconds of a whole round (fine-tune, gate, "
                                  "publish)", buckets=(5, 10, 20, 30, 60, 120, 300, 600, 1800), registry=r)
        self.events = Gauge("edgerec_loop_events_per_update", "events the last round learned from", registry=r)
        self.pending = Gauge("edgerec_loop_pending_events", "collected events not yet learned from", registry=r)
        self.gate = Counter("edgerec_loop_gate", "quality gate decisions", ["result"], registry=r)
        self.errors = Counter("edgerec_loop_errors", "rounds that failed (see the log)", registry=r)
        self.published = Counter("edgerec_loop_published", "models published", registry=r)
        for result in ("passed", "refused"):
            self.gate.labels(result)


class Loop:
    """See the module docstring. ``run()`` until ``stop()``; ``round()`` once."""

    def __init__(self, cfg: LoopConfig, metrics: LoopMetrics | None = None):
        self.cfg = cfg
        self.metrics = metrics or LoopMetrics()
        self.workdir = Path(cfg.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._last_db_error: str | None = None
        self.state = self._read_state()
        self._finish_interrupted_publish()
        self._clean_staging()
        if not self.state.get("checkpoint"):
            self.state.update(checkpoint=str(Path(cfg.checkpoint).resolve()), cursor=None, updates=[],
                              published_created=None)
        self._last_round = 0.0
        self._pending_at_round = 0
        self._refused_at: int | None = None   # pending events when the gate last refused

    # -- state -----------------------------------------------------------------------------------------------
    def _read_state(self) -> dict:
        """``loop.json``, {} when there is none.

        Raises:
            LoopStateError: it exists but is damaged (set aside as ``loop.json.bad-<time>``: starting over from
                the first checkpoint would publish a model that forgets every update since).
        """
        path = self.workdir / STATE
        try:
            with open(path, encoding="utf-8") as f:
                st = json.load(f)
            if isinstance(st, dict) and isinstance(st.get("checkpoint"), str):
                return st
            why = "not a loop state"
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            why = str(exc)
        aside = path.with_name(f"{STATE}.bad-{int(time.time())}")
        os.replace(path, aside)
        raise LoopStateError(f"{path} is damaged ({why[:200]}); set aside as {aside}. Repair it, or start the loop with "
                             "--checkpoint set to the checkpoint of the model the registry serves now")

    def _finish_interrupted_publish(self) -> None:
        """A round killed between publishing and writing loop.json: the version is in the registry, so adopt it
        (its checkpoint and cursor were noted before publishing) instead of training on the same events again."""
        pend = self.state.pop("publishing", None)
        if not pend:
            return
        if (Path(self.cfg.registry) / pend["version"]).is_dir() and Path(pend["checkpoint"]).is_file():
            log.warning("loop: the last round published %s but stopped before noting it; adopting it", pend["version"])
            rec = dict(pend["record"], published=True, version=pend["version"], published_at=time.time(),
                       recovered=True)
            self.state.update(checkpoint=pend["checkpoint"], cursor=pend["cursor"], published_at=rec["published_at"])
            self.state["updates"] = (self.state.get("updates", []) + [rec])[-MAX_UPDATES_KEPT:]
        self._write_state()

    def _clean_staging(self) -> None:
        """Staging directories of rounds that were killed (the loop's own, and publish's in the registry)."""
        for d in list((self.workdir / "candidates").glob(".*")) + list(Path(self.cfg.registry).glob(".publish-*")):
            if d.is_dir() and time.time() - d.stat().st_mtime > 60:
                shutil.rmtree(d, ignore_errors=True)

    def _write_state(self) -> None:
        write_atomic(self.workdir / STATE, json.dumps(self.state, indent=1))

    # -- the collector ---------------------------------------------------------------------------------------
    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        path = Path(self.cfg.events)
        if not path.is_file():
            return []
        try:
            con = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=10)
        except sqlite3.Error as exc:
            return self._db_error(exc)
        try:
            got = con.execute(sql, args).fetchall()
            self._last_db_error = None
            return got
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):   # the collector has not stored anything yet
                return []
            return self._db_error(exc)
        except sqlite3.DatabaseError as exc:
            return self._db_error(exc)
        finally:
            con.close()

    def _db_error(self, exc: Exception) -> list:
        """An unreadable collector file: logged once per distinct error (not every poll), counted, no rows."""
        msg = f"{self.cfg.events}: {exc}"
        if msg != self._last_db_error:
            log.error("loop: cannot read the collector: %s", msg)
            self.metrics.errors.inc()
            self._last_db_error = msg
        return []

    def pending(self) -> int:
        """Collected events above the current checkpoint's cursor (0 while the cursor is not known yet)."""
        cursor = self.state.get("cursor") or 0
        got = self._query("SELECT count(*) FROM events WHERE id > ?", (cursor,))
        return got[0][0] if got else 0

    def _through(self, cursor: int) -> dict[str, int]:
        """Per node, the highest sequence number among the collector rows up to ``cursor``."""
        return {n: s for n, s in self._query("SELECT node, max(seq) FROM events WHERE id <= ? GROUP BY node",
                                             (cursor,))}

    # -- rounds ----------------------------------------------------------------------------------------------
    def due(self, now: float) -> bool:
        """A round is due when events are pending and the interval has passed, or ``min_events`` events arrived
        since the last round (after a refused or failed round, ``min_events`` more, not the same ones again)."""
        n = self.pending()
        self.metrics.pending.set(n)
        if n == 0:
            return False
        if self.cfg.min_events and n - self._pending_at_round >= self.cfg.min_events:
            return True
        if self._refused_at is not None and n <= self._refused_at:
            return False   # the gate refused these very events: wait for new ones
        return now - self._last_round >= self.cfg.interval_s

    def round(self) -> dict:
        """One fine-tune -> gate -> publish. Returns the update record (also kept in loop.json); never raises for
        a bad checkpoint, bad events or a failed export (``error`` in the record)."""
        t0 = time.time()
        self._last_round = t0
        self._pending_at_round = self.pending()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(t0)) + f"-{int(t0 * 1000) % 1000:03d}"
        out = self.workdir / "candidates" / stamp
        ck_out = self.workdir / "candidates" / f"{stamp}.ckpt"
        rec: dict = {"at": t0, "parent": self.state["checkpoint"], "published": False}
        try:
            res: FinetuneResult = finetune(
                self.state["checkpoint"], self.cfg.events, out, self.cfg.finetune,
                item_attributes=self.cfg.item_attributes, after_id=self.state.get("cursor"),
                checkpoint_out=ck_out, printer=lambda *a: log.info(" ".join(str(x) for x in a)))
        except (CheckpointError, EventError, BundleError, ValueError, OSError, RuntimeError) as exc:
            self.metrics.errors.inc()
            rec.update(error=f"{type(exc).__name__}: {exc}"[:const.MAX_ERROR_CHARS], seconds=time.time() - t0)
            log.error("loop: round failed, keeping %s: %s", self.state["checkpoint"], rec["error"])
            shutil.rmtree(out, ignore_errors=True)
            return self._record(rec)
        rec.update(events=res.events, new_items=res.new_items, gate=res.gate, finetune_s=round(res.seconds, 2),
                   cursor=res.detail.get("cursor"))
        if res.published:
            cursor = int(res.detail.get("cursor") or 0)
            version = res.manifest["model_version"]
            # noted before publishing: a round killed in between is finished at the next start, not redone
            self.state["publishing"] = {"version": version, "checkpoint": str(res.checkpoint), "cursor": cursor,
                                        "record": dict(rec, checkpoint=str(res.checkpoint),
                                                       through=self._through(cursor))}
            self._write_state()
            try:
                version = publish(out, self.cfg.registry, self.cfg.key, channel=self.cfg.channel, version=version)
            except (BundleError, OSError) as exc:
                self.metrics.errors.inc()
                self.state.pop("publishing", None)
                rec.update(error=f"publish: {exc}"[:const.MAX_ERROR_CHARS])
                log.error("loop: publishing %s failed: %s", out, exc)
                return self._record(rec, time.time() - t0)
            self.metrics.gate.labels("passed").inc()
            self.metrics.published.inc()
            self.metrics.events.set(res.events)
            self.state.pop("publishing", None)
            rec.update(published=True, version=version, checkpoint=str(res.checkpoint),
                       through=self._through(cursor), published_at=time.time())
            self.state.update(checkpoint=str(res.checkpoint), cursor=cursor,
                              published_created=res.manifest.get("created_at") if res.manifest else None)
            self.state["published_at"] = rec["published_at"]
            self._pending_at_round = 0
            self._refused_at = None
            log.info("loop: published %s (%d events, %d new items, gate %s, %.1f s)", version, res.events,
                     res.new_items, _gate_line(res.gate), time.time() - t0)
            self._prune()
        elif res.events:
            self._refused_at = self._pending_at_round
            self.metrics.gate.labels("refused").inc()
            log.warning("loop: candidate refused by the quality gate (%s); still serving %s", _gate_line(res.gate),
                        Path(self.state["checkpoint"]).name)
        return self._record(rec, time.time() - t0)

    def _record(self, rec: dict, seconds: float | None = None) -> dict:
        if seconds is not None:
            rec["seconds"] = round(seconds, 2)
            self.metrics.duration.observe(seconds)
        self.state["updates"] = (self.state.get("updates", []) + [rec])[-MAX_UPDATES_KEPT:]
        self._write_state()
        return rec

    def _prune(self) -> None:
        """Keep the last ``keep`` candidates (bundle + checkpoint); the current checkpoint is never removed."""
        cand = self.workdir / "candidates"
        ckpts = sorted(cand.glob("*.ckpt"))
        current = Path(self.state["checkpoint"]).resolve()
        for old in ckpts[:-self.cfg.keep]:
            if old.resolve() != current:
                old.unlink(missing_ok=True)
                shutil.rmtree(cand / old.stem, ignore_errors=True)

    def _age(self) -> None:
        at = self.state.get("published_at")
        if at:
            self.metrics.age.set(time.time() - at)

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self, poll_s: float = 2.0) -> None:
        """Rounds until ``stop()`` (SIGTERM / SIGINT in ``edgerec loop``); a round in progress finishes first."""
        log.info("loop: %s -> %s every %.0f s%s; checkpoint %s", self.cfg.events, self.cfg.registry,
                 self.cfg.interval_s, f" or {self.cfg.min_events} events" if self.cfg.min_events else "",
                 self.state["checkpoint"])
        self._last_round = time.time() if self.state.get("updates") else 0.0
        while not self._stop.is_set():
            self._age()
            try:
                if self.due(time.time()):
                    self.round()
            except Exception:   # a bug in a round must not end the loop
                self.metrics.errors.inc()
                log.exception("loop: round failed")
            self._stop.wait(poll_s)

    def stop(self) -> None:
        self._stop.set()


def _gate_line(g: dict) -> str:
    if not g:
        return "n/a"
    return (f"NDCG@10 candidate {g.get('candidate', {}).get('NDCG@10', float('nan')):.4f} vs serving "
            f"{g.get('serving', {}).get('NDCG@10', float('nan')):.4f}, margin {g.get('margin')}, "
            f"{'passed' if g.get('passed') else 'refused'}: {g.get('reason', '')}")


def run_loop(cfg: LoopConfig, metrics_host: str = "127.0.0.1", metrics_port: int = 0, once: bool = False) -> int:
    """``edgerec loop``: rounds until SIGTERM / SIGINT (exit 0); ``once``: one round, exit 0 when it published,
    1 when it did not (refused, no events, error)."""
    try:
        loop = Loop(cfg)
    except LoopStateError as exc:
        log.error("loop: %s", exc)
        return 2
    if metrics_port:
        start_http_server(metrics_port, addr=metrics_host, registry=loop.metrics.registry)
    if once:
        return 0 if loop.round().get("published") else 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: loop.stop())
    loop.run()
    return 0
