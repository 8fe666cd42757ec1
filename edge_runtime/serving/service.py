"""The recommender service: one node's state (model, sessions, result cache, availability) and the methods of its
MessagePack-RPC API.

Handlers never see bytes (that is ``rpc/server.py``'s job), validate with ``rpc/methods.py`` and never raise
anything but ``EdgeRuntimeError`` subclasses for bad input; the server turns those into msgpack-rpc error objects.
``ops/node.py`` adds the methods that belong to other rooms (``stats``; with model sync ``rollback``, ``versions``,
``manifest``, ``fetch``).

Methods (params: one map):

* ``recommend {user?, history?, k=10, exclude_seen=true, filters?}`` -> ``{items, scores, model_version, ignored,
  source}``. Context = ``history`` (oldest first) then the user's live session. ``source`` is ``"model"`` or
  ``"popularity"`` (no known item in the context). ``filters``: ``category`` (attribute value or list: keep items
  having any), ``exclude`` (item ids never to return).
* ``track {user, item, event: view|cart|purchase, ts?, event_id?}`` -> ``{ok: true}``; ``track_batch {events:
  [...]}`` -> ``{ok: true, count}`` (validated as a whole first: one bad event rejects the batch, nothing
  half-applied). With the event log (``events/log.py``) the reply comes only after the events are committed, and a
  repeated (user, event_id) is acknowledged without being stored or applied twice; a log that cannot store them
  answers ``EventLogUnavailable`` and nothing is applied.
* ``session {user}`` -> ``{events: [{item, event, ts}, ...]}`` oldest first, as the node holds it;
  ``forget {user}`` -> ``{ok: true, removed, session_events}``: the shopper's logged events (``removed``) and
  in-memory session are erased on this node.
* ``set_availability {items: [...], in_stock: bool}`` -> ``{ok: true, out_of_stock}``: out-of-stock items are never
  recommended (an allow-mask in the scan).
* ``add_items {items: [{id, attributes?: [str, ...]}, ...]}`` -> ``{ok: true, added, updated, known: [ids],
  composed_from: {id: n}}``: items the model has never seen, recommended at once with an embedding composed from
  their attribute values (``compose.py``; ``composed_from`` = known values used, 0 = the mean item embedding). An
  id the model was trained on, or added before with the same attributes, is listed in ``known`` and left as it is;
  one added before with other attributes is recomposed (``updated``). The batch is validated as a whole first.
  Added items survive a model swap (recomposed from the new bundle unless it knows them) and, with a state
  directory, a restart (``const.ADDED_ITEMS_FILE``).
* ``health`` -> ``{status, model_version, uptime_s, ...}``; ``model_info`` -> the manifest summary.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np

from .. import const, scoring
from ..config import score_inline_mode
from ..events.statefile import write_atomic
from ..errors import EdgeRuntimeError, InvalidParams, ModelNotLoadedError, SwapError
from ..events.analytics import Analytics
from ..events.log import Event, EventLog, settle
from ..rpc.methods import (MethodTable, as_bool, as_id, as_id_list, as_int, as_str, as_ts, check_keys, short,
                           type_name)
from .batch import Batcher, Job, StageClock, future_done, score_jobs, score_one
from .model import Model
from .session import EVENTS, ResultCache, SessionStore

log = logging.getLogger(__name__)



def as_event(p: dict, where: str) -> tuple[str, str, str, float | None, str | None]:
    """Validate one event map -> (user, item, event, ts or None, event_id or None); error messages name ``where``
    (e.g. ``events[3]``) and the parameter."""
    if not isinstance(p, dict):
        raise InvalidParams(f"{where} must be a map {{user, item, event, ts?, event_id?}}, got {type_name(p)}")
    check_keys(p, ("user", "item", "event", "ts", "event_id"), ("user", "item", "event"), where)
    prefix = "" if where == "track" else f"{where}."
    event = p["event"]
    if not isinstance(event, str) or event not in EVENTS:
        raise InvalidParams(f"{where}: 'event' must be one of {list(EVENTS)}, got {short(event)}")
    ts = as_ts(p["ts"], f"{prefix}ts") if p.get("ts") is not None else None
    eid = as_str(p["event_id"], f"{prefix}event_id", const.MAX_EVENT_ID_CHARS) if p.get("event_id") is not None \
        else None
    return as_id(p["user"], f"{prefix}user"), as_id(p["item"], f"{prefix}item"), event, ts, eid


def as_new_item(p: Any, where: str) -> tuple[str, tuple[str, ...]]:
    """Validate one ``add_items`` entry -> (id, attribute values: distinct, sorted, so the same set compares
    equal whatever its order); error messages name ``where`` (e.g. ``items[3]``)."""
    if not isinstance(p, dict):
        raise InvalidParams(f"{where} must be a map {{id, attributes?}}, got {type_name(p)}")
    check_keys(p, ("id", "attributes"), ("id",), where)
    attrs = p.get("attributes")
    attrs = [] if attrs is None else attrs
    if not isinstance(attrs, (list, tuple)):
        raise InvalidParams(f"'{where}.attributes' must be an array of strings, got {type_name(attrs)}")
    if len(attrs) > const.MAX_ITEM_ATTRIBUTES:
        raise InvalidParams(f"'{where}.attributes' holds {len(attrs)} values; at most {const.MAX_ITEM_ATTRIBUTES}")
    values = [as_str(v, f"{where}.attributes[{i}]", const.MAX_ATTRIBUTE_CHARS) for i, v in enumerate(attrs)]
    return as_id(p["id"], f"{where}.id"), tuple(sorted(set(values)))


def parse_new_items(items: Any, name: str = "items", limit: int = const.MAX_ADD_ITEMS) -> list[tuple[str, tuple]]:
    """A whole ``add_items`` batch (or the added-items file), checked before anything is applied.

    Raises:
        InvalidParams: not an array, more than ``limit`` entries, a bad entry or an id given twice (names it).
    """
    if not isinstance(items, (list, tuple)):
        raise InvalidParams(f"'{name}' must be an array of {{id, attributes?}}, got {type_name(items)}")
    if len(items) > limit:
        raise InvalidParams(f"'{name}' holds {len(items)} items; at most {limit} per call")
    out = [as_new_item(e, f"{name}[{i}]") for i, e in enumerate(items)]
    first: dict[str, int] = {}
    for i, (it, _) in enumerate(out):
        j = first.setdefault(it, i)
        if j != i:
            raise InvalidParams(f"'{name}[{i}].id' {short(it)} repeats {name}[{j}]")
    return out


def read_added(path: Path) -> dict[str, tuple[str, ...]]:
    """The added-items file -> {id: attribute values}; {} when it does not exist.

    Raises:
        ValueError: the file is not valid JSON of the expected shape (``InvalidParams`` names the entry).
        OSError: it cannot be read.
    """
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("format") != 1:
        raise ValueError("not an added-items file of format 1")
    return dict(parse_new_items(doc.get("items"), "items", const.MAX_ADDED_ITEMS))


def write_added(path: Path, added: dict[str, tuple[str, ...]]) -> None:
    """Write the added-items file atomically (a temporary file beside it, fsynced, renamed over it; the directory
    is created if missing).

    Raises:
        OSError: it cannot be written (the previous file is left as it was).
    """
    write_atomic(path, json.dumps({"format": 1, "items": [{"id": it, "attributes": list(a)}
                                                          for it, a in added.items()]}, separators=(",", ":")))


# ---------------------------------------------------------------------------------------------------- service
class Service:
    """The daemon's state: current model, sessions, result cache, availability, counters.

    Args:
        model: the loaded bundle, or None (a node waiting for model sync); swap models with ``swap.ModelSwapper``.
        executor: threads that run encoder calls and scans (both release the GIL).
        events: the durable event log (started), or None: events then live in memory only.
        pseudonym: raw shopper id -> the id the node keys sessions, the cache and the log by
            (``events.pseudonym.Pseudonymizer``); None keeps raw ids (only without a log).
        added_items: the added-items file (``const.ADDED_ITEMS_FILE`` in the state directory), or None: items
            added by ``add_items`` then live in memory only. Read here (a damaged file is set aside as
            ``.bad`` and logged); its items are composed onto the first model swapped in.
        batch_wait_us / batch_max: concurrent ``recommend`` requests are scored in batches (``batch.py``): µs a
            batch waits for more after its first request (0: to the end of the event-loop turn), and requests per
            batch at most. ``scoring_threads``: the executor's threads (batches in flight at most).

    Attributes:
        methods: the ``MethodTable`` of the API (the RPC server dispatches to it).
        sync: the node's model sync (``fleet.sync.SyncManager``) when it has one; ``health`` shows its state.
        added: {id: attribute values} of every item added at this node that no model served since was trained on
            (what the next model gets composed onto it, what the added-items file holds).
    """

    def __init__(self, model: Model | None, executor: concurrent.futures.Executor | None = None,
                 max_sessions: int = const.MAX_SESSIONS, session_events: int = const.SESSION_EVENTS,
                 cache_entries: int = const.CACHE_ENTRIES, cache_items: int = const.CACHE_ITEMS,
                 events: EventLog | None = None, pseudonym: Callable[[str], str] | None = None,
                 added_items: str | os.PathLike | None = None, batch_wait_us: float = 0.0,
                 batch_max: int = const.BATCH_MAX_REQUESTS, scoring_threads: int = const.SCORING_THREADS):
        if events is not None and pseudonym is None:
            raise ValueError("an event log needs a pseudonymizer: raw shopper ids are never stored")
        self.model = model
        self.events = events
        self.key = pseudonym or (lambda user: user)
        self.analytics = Analytics(EVENTS)
        self.score_inline = score_inline_mode()
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(const.SCORING_THREADS,
                                                                          thread_name_prefix="score")
        self.clock = StageClock()
        self.fast_served = 0   # recommend requests answered by the frame path (recommend_frame)
        self.batcher = Batcher(lambda jobs: self._score_jobs(jobs), self.executor, scoring_threads,
                               lambda: self._inline(self.model), batch_wait_us, batch_max)
        self.sessions = SessionStore(max_sessions, session_events)
        self.cache = ResultCache(cache_entries, cache_items)
        # Out-of-stock ids (unknown ids kept: a later model may know them), and for the current model a bool mask
        # updated per change plus its packed snapshot, which requests hand to the scoring threads (never mutated).
        self.out_of_stock: set[str] = set()
        self._in_stock = np.ones(model.num_items if model is not None else 0, dtype=bool)
        self._stock_bits: np.ndarray | None = None
        self.sync = None
        self.upstream = None   # fleet.shipper.Shipper when events are shipped upstream (ops/node.py)
        self._stock_version = 0
        self.started = time.time()
        self.added_path = Path(added_items) if added_items is not None else None
        self.added: dict[str, tuple[str, ...]] = {}
        if self.added_path is not None:
            try:
                self.added = read_added(self.added_path)
            except (OSError, ValueError) as exc:
                log.error("added items %s unreadable, set aside as .bad: %s", self.added_path, exc)
                try:
                    os.replace(self.added_path, self.added_path.with_name(self.added_path.name + ".bad"))
                except OSError:
                    pass
        if model is not None and self.added:   # a model given here directly (not through the swap path)
            self.model = self.with_added(model)
            self._in_stock = np.ones(self.model.num_items, dtype=bool)
        self._items_lock: asyncio.Lock | None = None
        logged = events is not None   # the logged handlers return a future: the reply waits for the commit
        self.methods = MethodTable({
            "recommend": (self.recommend_now, False),
            "track": (self.track_logged if logged else self.track, False),
            "track_batch": (self.track_batch_logged if logged else self.track_batch, False),
            "add_items": (self.add_items, True),
            "set_availability": (self.set_availability, False),
            "session": (self.session, False),
            "forget": (self.forget, True),
            "health": (self.health, False),
            "model_info": (self.model_info, False),
        })
        self.methods.set_frame_path("recommend", self.recommend_frame)

    async def served_check(self, model: Model) -> None:
        """One request through the served path (parameter checks, a scoring thread, encoder, scan, reply) for the
        most popular item's session: the reply must come from ``model``, hold at least one item unless nothing is
        in stock (an encoder that returns NaN scores every item out), and only finite scores. Run after every swap
        (``swap.ModelSwapper``, which runs ``warm_up`` once the swap is done).

        Raises:
            SwapError: the reply is not from ``model``, is empty, or has non-finite scores.
        """
        row = int(np.argmax(model.popularity))
        res = await self.recommend({"history": [model.item_ids[row]], "k": const.CHECK_K, "exclude_seen": False})
        empty = not res["items"] and bool(np.any(self._in_stock)) and self.model is model
        if res["model_version"] != model.version or empty or not np.all(np.isfinite(res["scores"])):
            raise SwapError(f"served-path check got model {res['model_version']}, {len(res['items'])} items, "
                            f"scores {res['scores'][:3]}")

    async def warm_up(self, model: Model) -> None:
        """Make the first real request cost what the next ones do (it cost 2x before: each path below does one-time
        work on its first run). Run by the swap path after the swap and its memory release (which would hand back
        pages warmed before it). The encoder once at every window length (ONNX Runtime plans its memory per input
        shape: a length met for the first time cost ~20 µs more, measured), and with a batch-exact encoder the batched
        shapes met most (2 to ``const.WARM_BATCH_SESSIONS`` sessions, windows up to ``const.WARM_BATCH_WINDOW``).
        Through ``recommend``: the encoder at the full window (``model.max_len`` items) with the scan's exclude list
        (``exclude_seen``); a ``user`` request (the result cache, the popularity scan with an exclude filter; no
        session is created, its cache entry is dropped, its lookups stay out of the hit / miss counters); a history of
        an unknown id (ignored, the popularity scan); a category filter when the model has attributes (the scan's
        allow-mask); all of them in one event-loop turn (as concurrent requests arrive), then one after the other. And
        when this model is scored on the scoring threads, the encoder and the scan on every one of those threads at once
        (behind a barrier, so that none is left out: each thread's first ONNX Runtime run sets up its own buffers).
        Nothing a client sees changes.

        Raises:
            EdgeRuntimeError: a warm-up request failed (the swap path logs it and serves on).
        """
        top = np.argsort(-model.popularity[:model.bundle_items], kind="stable")
        rows = top[:min(model.max_len, const.MAX_HISTORY_IDS)][::-1].tolist()   # oldest first: the most popular last
        window = [model.item_ids[r] for r in rows]
        for n in range(1, len(rows) + 1):   # every window length once: ONNX Runtime plans memory per input shape
            model.encode(rows[-n:])
        if model.batch_exact:   # and the batched shapes concurrent requests meet most: 2..8 sessions, short windows
            for b in range(2, const.WARM_BATCH_SESSIONS + 1):
                for n in range(1, min(len(rows), const.WARM_BATCH_WINDOW) + 1):
                    model.encode_padded([rows[-n:]] * b)
        user = "edgerec.warm-up"
        self.cache.uncounted = self.key(user)   # its lookups stay out of the hit / miss counters
        warm = [{"history": window, "k": const.CHECK_K},
                {"user": user, "k": const.CHECK_K, "filters": {"exclude": window[-1:]}},
                {"history": [user], "k": const.CHECK_K}]   # an id the model does not know: ignored, popularity
        category = next((v for v in model.attr_rows if len(v) <= const.MAX_ID_CHARS), None)
        if category:
            warm.append({"history": window[-1:], "k": const.CHECK_K, "filters": {"category": category}})
        try:
            # all in one event-loop turn, as concurrent clients' requests arrive (batched together), then one by one
            # (as a lone client's requests arrive: what the next request finds)
            replies = [self.recommend_now(p) for p in warm]
            await asyncio.gather(*(r for r in replies if isinstance(r, asyncio.Future)))
            for p in warm:
                await self.recommend(p)
        finally:
            self.cache.invalidate(self.key(user))
            self.cache.uncounted = None
        if self._inline(model):
            return
        n = self.batcher.threads
        barrier = threading.Barrier(n)
        excl = np.asarray(rows, dtype=np.int64)

        def on_each_thread() -> None:
            try:
                barrier.wait(5.0)   # s: a thread still busy with a long request is waited for, this long at most
            except threading.BrokenBarrierError:
                pass   # the others are warm; this one warms after them
            scoring.topk(model.encode(rows), model.items, const.CHECK_K, item_scales=model.scales, exclude=excl,
                         items_checked=True)

        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.executor, on_each_thread) for _ in range(n)))

    def swap_model(self, model: Model | None) -> None:
        """Serve ``model`` (None: no model) from now on; requests already running finish on the model they started
        with. Use ``swap.ModelSwapper.activate``, which checks the served path and rolls back (and composes the
        added items in a worker thread first); here, items of ``added`` that ``model`` lacks are composed inline."""
        if model is not None:
            model = self.with_added(model)
        old, self.model = self.model, model
        n = model.num_items if model is not None else 0
        self._in_stock = np.ones(n, dtype=bool)
        if model is not None:
            self._in_stock[model.rows(self.out_of_stock)[0]] = False
        self._stock_bits = scoring.pack_mask(self._in_stock) if self.out_of_stock and model is not None else None
        self.cache.clear()
        log.info("model %s -> %s", old.version if old else None, model.version if model else None)

    # -- recommend -------------------------------------------------------------------------------------------
    @staticmethod
    def _allow_mask(model: Model, categories: tuple[str, ...] | None, stock_bits: np.ndarray | None):
        """Packed allow-bitset: in stock AND (any of ``categories`` when given); None when everything passes.
        Runs in a scoring thread (a category mask is cached per value set by the model)."""
        mask = stock_bits
        if categories is not None:
            cat = model.attribute_mask(categories)
            mask = cat if mask is None else np.bitwise_and(mask, cat)
        return mask

    @staticmethod
    def _parse_filters(f: Any, model: Model) -> tuple[tuple[str, ...] | None, list[str]]:
        if f is None:
            return None, []
        if not isinstance(f, dict):
            raise InvalidParams(f"'filters' must be a map, got {type_name(f)}")
        check_keys(f, ("category", "exclude"), (), "filters")
        categories = None
        if "category" in f:
            c = f["category"]
            if c is None:
                raise InvalidParams("'filters.category' must be a category id or an array of them, got nil")
            values = c if isinstance(c, (list, tuple)) else [c]
            if not values:
                raise InvalidParams("'filters.category' must name at least one category")
            categories = tuple(sorted(set(as_id_list(values, "filters.category", const.MAX_FILTER_VALUES))))
            if not model.has_attributes:
                raise InvalidParams("'filters.category': the loaded model has no item attributes")
        exclude = as_id_list(f.get("exclude", []), "filters.exclude", const.MAX_HISTORY_IDS)
        return categories, exclude

    async def recommend(self, p: dict) -> dict:
        """``recommend`` awaited (the swap path's check, tests); the RPC table calls ``recommend_now``."""
        r = self.recommend_now(p)
        return (await r) if isinstance(r, asyncio.Future) else r

    def recommend_now(self, p: dict) -> dict | asyncio.Future:
        """The ``recommend`` handler: the reply, or a future of it when the request is batched or scored on a thread.

        Where a request is scored: on the event loop when the served model's measured scoring cost
        (``Model.score_us``: encoder + scan) is at most ``const.INLINE_SCORE_US`` (the hop to a thread and back
        costs more than it saves there; ``EDGEREC_SCORE_INLINE=always|never`` overrides), else on a scoring thread
        (the encoder and the scan release the GIL, so long scans of concurrent requests overlap). A lone request
        on the loop is scored at once; requests arriving together, and every request scored on a thread, go
        through the ``Batcher`` (``batch.py``: one scan per batch, each reply what it would be alone)."""
        check_keys(p, ("user", "history", "k", "exclude_seen", "filters"), (), "recommend")
        user = as_id(p["user"], "user") if p.get("user") is not None else None
        history = as_id_list(p["history"], "history", const.MAX_HISTORY_IDS) if p.get("history") is not None else None
        k = as_int(p.get("k", 10), "k", 1, const.MAX_K)
        exclude_seen = as_bool(p.get("exclude_seen", True), "exclude_seen")
        model = self.model
        if model is None:
            raise ModelNotLoadedError("no model is loaded")
        categories, exclude_ids = self._parse_filters(p.get("filters"), model)
        if user is not None:
            user = self.key(user)
        session = self.sessions.get(user) if user is not None else None
        cache_key = None
        if user is not None and history is None:
            # fixed-size key whatever the filters hold
            cache_key = hashlib.blake2b(msgpack.packb([k, exclude_seen, categories, exclude_ids,
                                                       self._stock_version]), digest_size=16).digest()
            hit = self.cache.get(user, cache_key, session.version if session else 0, model.version)
            if hit is not None:
                return hit
        context = (history or []) + (session.items() if session is not None else [])
        rows, ignored = model.rows(context)
        excl_rows, _ = model.rows(exclude_ids)
        if exclude_seen:
            excl_rows = excl_rows + rows
        if model.num_added:   # added items have no row in the encoder's table: excluded when seen, not encoded
            rows = [r for r in rows if r < model.bundle_items]
        finish = (model, bool(rows), ignored, user, cache_key, session.version if session else 0)
        job = Job(model, rows, k, excl_rows, categories, self._stock_bits, None)
        together = self.batcher.concurrent()
        # a heavy request (large k or exclusion list, many categories) goes to a thread even for a small model: on
        # the loop it would hold every other connection for its milliseconds
        light = job.shareable and len(categories or ()) <= const.INLINE_MAX_CATEGORIES
        if light and self._inline(model) and not together:   # a lone request on the loop: no future, no batch
            scored = score_one(job, self._allow_mask(model, categories, job.stock_bits), self.clock)
            return self._result(scored, *finish)
        out = asyncio.get_running_loop().create_future()
        job.done = future_done(out, lambda scored: self._result(scored, *finish))
        self.batcher.add(job, hold=together, on_loop=light)
        return out

    def recommend_frame(self, frame: bytes) -> bytes | None:
        """The ``recommend`` frame path (``MethodTable.set_frame_path``): a whole request frame's bytes -> its reply's
        bytes through the model's native fast path (``fastpath.py``: byte for byte the general path's reply), or
        None (nothing done: the general path answers). Only where the general path would score the request on the
        event loop: a model with a fast path, scored inline, no stock filter; and either no other request arriving
        with this one (``Batcher.alone``) or a model on which batching does not pay (``Model.fast_concurrent``)."""
        model = self.model
        fast = model.fast if model is not None else None
        if fast is None or self._stock_bits is not None or not self._inline(model) \
                or not (model.fast_concurrent or self.batcher.alone()):
            return None
        out = fast(frame)
        if out is None:
            return None
        self.batcher.concurrent()   # counted in this loop turn, as the general path counts a request
        reply, encode_s, scan_s = out
        self.fast_served += 1
        clock = self.clock
        clock.encode_calls += 1
        clock.encoder_runs += 1
        clock.encode_s += encode_s
        clock.scan_calls += 1
        clock.scan_queries += 1
        clock.scan_s += scan_s
        return reply

    def _score_jobs(self, jobs: list[Job]) -> list:
        """A batch of requests (on the loop or a scoring thread): ``batch.score_jobs`` with this service's filters
        and stage clock."""
        return score_jobs(jobs, self._allow_mask, self.clock)

    def scoring_stats(self) -> dict:
        """Where ``recommend`` time goes (``stats``): ``StageClock.snapshot`` (mean encoder µs per call, scan µs per
        query) plus ``batches`` (batches of more than one request scored), ``batched`` (the requests in them) and
        ``fast_path`` (requests answered by the frame path, ``recommend_frame``)."""
        return dict(self.clock.snapshot(), batches=self.batcher.batches, batched=self.batcher.batched,
                    fast_path=self.fast_served)

    def _inline(self, model: Model) -> bool:
        mode = self.score_inline
        return mode == "always" or (mode == "auto" and model is not None and model.score_us <= const.INLINE_SCORE_US)

    def _result(self, scored: tuple, model: Model, known: bool, ignored: list[str], user: str | None,
                cache_key: bytes | None, session_version: int) -> dict:
        ids, scores = scored
        names = model.item_ids
        result = {"items": [names[i] for i in ids.tolist()], "scores": scores.tolist(),
                  "model_version": model.version, "ignored": ignored, "source": "model" if known else "popularity"}
        # add_items keeps the version but clears the cache: a result scored on the model before it is not cached
        if cache_key is not None and self.model is model:
            # Only cache if no event arrived for this user while scoring ran.
            now = self.sessions.get(user)
            if (now.version if now else 0) == session_version:
                self.cache.put(user, cache_key, now.version if now else 0, model.version, result)
        return result

    # -- events ----------------------------------------------------------------------------------------------
    def _shared(self, item: str) -> str:
        """The model's own string for a known item (a session then holds no copy per event), else ``item``."""
        m = self.model
        row = m.index.get(item) if m is not None else None
        return m.item_ids[row] if row is not None else item

    def _apply(self, user: str, item: str, event: str, ts: float | None) -> None:
        """Apply one event for the (already keyed) ``user`` to its session, the cache and the analytics."""
        item = self._shared(item)
        self.sessions.track(user, item, event, ts)
        self.cache.invalidate(user)
        self.analytics.observe(user, item, event)

    @staticmethod
    def _parse_batch(p: dict) -> list[tuple[str, str, str, float | None, str | None]]:
        check_keys(p, ("events",), ("events",), "track_batch")
        events = p["events"]
        if not isinstance(events, (list, tuple)):
            raise InvalidParams(f"'events' must be an array of {{user, item, event, ts?, event_id?}}, got "
                                f"{type_name(events)}")
        if len(events) > const.MAX_BATCH_EVENTS:
            raise InvalidParams(f"'events' holds {len(events)} events; at most {const.MAX_BATCH_EVENTS} per batch")
        return [as_event(e, f"events[{i}]") for i, e in enumerate(events)]

    def track(self, p: dict) -> dict:
        """``track`` without an event log (in memory; ``event_id`` is accepted and not needed)."""
        user, item, event, ts, _ = as_event(p, "track")
        self._apply(self.key(user), item, event, ts)
        return {"ok": True}

    def track_batch(self, p: dict) -> dict:
        parsed = self._parse_batch(p)
        for user, item, event, ts, _ in parsed:
            self._apply(self.key(user), item, event, ts)
        return {"ok": True, "count": len(parsed)}

    def _log_and_apply(self, parsed: list[tuple[str, str, str, float | None, str | None]],
                       reply: dict) -> asyncio.Future:
        """Queue ``parsed`` for the next commit; the returned future gets ``reply`` once they are committed and what
        was stored now is applied (a retried event_id is not applied twice), or ``EventLogUnavailable`` (nothing
        stored, nothing applied)."""
        now = time.time()
        key = self.key   # the event id is keyed too: a client may build it from the raw shopper id
        rows = [Event(key(u), item, ev, ts if ts is not None else now, key(eid) if eid is not None else None)
                for u, item, ev, ts, eid in parsed]
        out = asyncio.get_running_loop().create_future()

        def done(stored, exc) -> None:
            try:
                if exc is None:
                    for e, new in zip(rows, stored):
                        if new:
                            self._apply(e.user, e.item, e.event, e.ts)
            except Exception as bug:  # stored but not applied: the client gets an internal error, never a hang
                exc = bug
            settle(out, reply, exc)

        self.events.submit(rows, done)
        return out

    def track_logged(self, p: dict) -> asyncio.Future:
        """``track`` with the event log: the reply comes once the event is committed."""
        return self._log_and_apply([as_event(p, "track")], {"ok": True})

    def track_batch_logged(self, p: dict) -> asyncio.Future:
        parsed = self._parse_batch(p)
        return self._log_and_apply(parsed, {"ok": True, "count": len(parsed)})

    def restore(self, rows) -> tuple[int, int]:
        """Boot: replay (keyed user, item, event, ts) rows, oldest first, into the sessions (each keeps its last
        ``session_events``); returns (events, sessions)."""
        n = 0
        for user, item, event, ts in rows:
            self.sessions.track(user, self._shared(item), event, ts)
            n += 1
        return n, len(self.sessions)

    def session(self, p: dict) -> dict:
        check_keys(p, ("user",), ("user",), "session")
        s = self.sessions.get(self.key(as_id(p["user"], "user")))
        return {"events": [{"item": it, "event": ev, "ts": ts} for it, ev, ts in (s.events if s else ())]}

    async def forget(self, p: dict) -> dict:
        """Erase a shopper on this node: logged events (``removed``) and the in-memory session and results; with
        shipping on, the erasure is queued durably for the collector (``upstream: "queued"``).

        Raises:
            EventLogUnavailable: the log could not erase them now (the session is kept too; retry).
        """
        check_keys(p, ("user",), ("user",), "forget")
        user = self.key(as_id(p["user"], "user"))
        removed = await self.events.forget(user) if self.events is not None else 0
        held = self.sessions.drop(user)
        self.cache.invalidate(user)
        out = {"ok": True, "removed": removed, "session_events": held}
        if self.upstream is not None:   # the events already shipped: erased at the collector too
            self.upstream.forget(user)
            out["upstream"] = "queued"
        return out

    def set_availability(self, p: dict) -> dict:
        check_keys(p, ("items", "in_stock"), ("items", "in_stock"), "set_availability")
        items = as_id_list(p["items"], "items", const.MAX_BATCH_EVENTS)
        in_stock = as_bool(p["in_stock"], "in_stock")
        if in_stock:
            self.out_of_stock.difference_update(items)
        else:
            new = set(items) - self.out_of_stock
            if len(self.out_of_stock) + len(new) > const.MAX_OUT_OF_STOCK:
                raise InvalidParams(f"at most {const.MAX_OUT_OF_STOCK} items can be out of stock at once")
            self.out_of_stock.update(new)
        if self.model is not None:
            rows, _ = self.model.rows(items)   # O(len(items)): only the changed rows are touched
            self._in_stock[rows] = in_stock
        # a new snapshot object (O(N / 8) bytes): scoring threads keep using the one they were given
        self._stock_bits = scoring.pack_mask(self._in_stock) if self.out_of_stock else None
        self._stock_version += 1
        return {"ok": True, "out_of_stock": len(self.out_of_stock)}

    # -- new items -------------------------------------------------------------------------------------------
    def items_lock(self) -> asyncio.Lock:
        """Held by ``add_items`` and by ``swap.ModelSwapper.activate`` around a swap: an add never lands between
        a new model's composition and its swap (created on the event loop's first use)."""
        if self._items_lock is None:
            self._items_lock = asyncio.Lock()
        return self._items_lock

    def with_added(self, model: Model) -> Model:
        """``model`` with the items of ``added`` that it was not trained on composed onto it (``Model.with_items``;
        those it already holds with the same attributes are kept); ``model`` itself when there are none. Safe in a
        worker thread (reads ``added``, which only the event loop replaces, and builds a new model)."""
        todo = [(it, attrs) for it, attrs in self.added.items()
                if not model.trained(it) and model.added.get(it) != attrs]
        if not todo:
            return model
        t0 = time.perf_counter()
        new, _ = model.with_items(todo)
        log.info("model %s: %d added items composed (%s) in %.1f ms", model.version, len(todo),
                 "attributes" if model.attr_emb is not None else "no compose arrays: the mean item embedding",
                 (time.perf_counter() - t0) * 1e3)
        return new

    def retire_known(self) -> int:
        """Drop from ``added`` the items the served model was trained on (its rows serve them now) and rewrite the
        added-items file; returns how many. Run by the swap path once a model passed its served check (a rollback
        before that keeps them). A file that cannot be written is logged (it is rewritten at the next change)."""
        m = self.model
        if m is None or not self.added:
            return 0
        known = [it for it in self.added if m.trained(it)]
        if known:
            self.added = {it: a for it, a in self.added.items() if not m.trained(it)}
            log.info("model %s was trained on %d added items; they leave the added set", m.version, len(known))
            if self.added_path is not None:
                try:
                    write_added(self.added_path, self.added)
                except OSError as exc:
                    log.error("cannot rewrite added items %s: %s", self.added_path, exc)
        return len(known)

    def _serve_added(self, model: Model) -> None:
        """Serve ``model``, the current model plus added rows (same rows below ``num_items``, new ones after):
        the stock mask grows by the new rows (out-of-stock ids applied), every cached result is dropped."""
        old_in = self._in_stock
        in_stock = np.ones(model.num_items, dtype=bool)
        in_stock[:len(old_in)] = old_in
        if self.out_of_stock:
            new_rows = [r for r in model.rows(self.out_of_stock)[0] if r >= len(old_in)]
            in_stock[new_rows] = False
        self.model, self._in_stock = model, in_stock
        self._stock_bits = scoring.pack_mask(in_stock) if self.out_of_stock else None
        self._stock_version += 1
        self.cache.clear()

    def _build_added(self, model: Model, todo: list, added: dict) -> tuple[Model, np.ndarray]:
        """Worker thread: ``model`` with ``todo`` composed onto it, and the added-items file rewritten to ``added``
        (before anything is served: an acknowledged add survives a restart)."""
        new, known = model.with_items(todo)
        if self.added_path is not None:
            try:
                write_added(self.added_path, added)
            except OSError as exc:
                raise EdgeRuntimeError(f"add_items: cannot store the added items in {self.added_path} ({exc}); "
                                       f"nothing was added") from None
        return new, known

    async def add_items(self, p: dict) -> dict:
        """``add_items {items: [{id, attributes?}, ...]}``: see the module docstring.

        The new model (``Model.with_items``: a copy of the item matrix with the composed rows, O(N d) bytes) is
        built in a worker thread and swapped in by reference on the event loop, so a scan running meanwhile keeps
        the arrays it was given; the result cache is cleared.

        Raises:
            InvalidParams: a bad batch (nothing is added), or more than ``MAX_ADDED_ITEMS`` added items.
            ModelNotLoadedError: no model is loaded.
            EdgeRuntimeError: the added-items file cannot be written (nothing is added).
        """
        check_keys(p, ("items",), ("items",), "add_items")
        items = parse_new_items(p["items"])
        async with self.items_lock():
            model = self.model
            if model is None:
                raise ModelNotLoadedError("no model is loaded")
            known = [it for it, attrs in items if model.trained(it) or model.added.get(it) == attrs]
            skip = set(known)
            todo = [(it, attrs) for it, attrs in items if it not in skip]
            grow = sum(1 for it, _ in todo if it not in self.added)
            if len(self.added) + grow > const.MAX_ADDED_ITEMS:
                raise InvalidParams(f"add_items: {len(self.added)} items are added already and {grow} more would "
                                    f"pass {const.MAX_ADDED_ITEMS}; retrain so that the model knows them")
            reply = {"ok": True, "added": sum(1 for it, _ in todo if it not in model.index),
                     "updated": sum(1 for it, _ in todo if it in model.index), "known": known, "composed_from": {}}
            if not todo:
                return reply
            added = {**self.added, **dict(todo)}
            new, counts = await asyncio.get_running_loop().run_in_executor(None, self._build_added, model, todo,
                                                                           added)
            self.added = added
            if self.model is model:
                self._serve_added(new)
            elif self.model is not None:   # swapped without the lock meanwhile: compose onto what is served now
                self._serve_added(self.with_added(self.model))
            reply["composed_from"] = {it: int(c) for (it, _), c in zip(todo, counts)}
            return reply

    # -- introspection ---------------------------------------------------------------------------------------
    def health(self, p: dict) -> dict:
        """``health {}`` -> {status ('ok' / 'no_model'), model_version, uptime_s, sessions, cache_entries, scoring
        (the top-k backend), precision, added_items, provider (the ONNX Runtime execution provider the served
        encoder runs on, e.g. 'CPUExecutionProvider'; None without a model), providers_requested (the configured
        preference list it was picked from), and events / sync / offline / upstream where the node has them}."""
        check_keys(p, (), (), "health")
        m = self.model
        out = {"status": "ok" if m is not None else "no_model", "model_version": m.version if m else None,
               "uptime_s": round(time.time() - self.started, 3), "sessions": len(self.sessions),
               "cache_entries": len(self.cache), "scoring": scoring.IMPLEMENTATION,
               "precision": m.precision if m else None, "added_items": m.num_added if m else 0,
               "encoder": m.encoder_kind if m else None, "provider": m.provider if m else None,
               "providers_requested": list(m.encoder.providers_requested) if m else None}
        if self.events is not None:
            out["events"] = self.events.health()
        if self.sync is not None:
            out["sync"] = self.sync.health()
            out["offline"] = out["sync"]["registry_reachable"] is False
        if self.upstream is not None:
            out["upstream"] = self.upstream.health()
        return out

    def model_info(self, p: dict) -> dict:
        check_keys(p, (), (), "model_info")
        if self.model is None:
            raise ModelNotLoadedError("no model is loaded")
        return self.model.summary()


