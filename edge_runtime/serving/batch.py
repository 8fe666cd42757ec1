"""Concurrent ``recommend`` requests scored together: one batched scan per group of requests with the same filters.

A request's scoring is a ``Job``. The sessions of a batch are encoded together when the model's encoder is
batch-exact (``Model.batch_exact``: float MatMuls and the padding-exact attention of ``trainer.export``, checked at
load): left-padded groups of similar window lengths, one encoder call each (``Model.encode_many``), every vector
bit for bit that of a call with its session alone. An encoder with int8 dynamic quantization (one activation scale
per call: a padded batch moved vectors by up to 0.05 on the Beauty bundle) encodes each request alone. The scan of
a group is one ``scoring.topk`` call with ``per_query=True``: each block of items is read from memory once for the
whole group, and every query gets bit for bit what a scan of it alone returns.
Each request's own exclusions (its seen items, ``filters.exclude``) go into the shared scan as one list per query
(``scoring.topk_served(query_excludes=...)``), so every request gets exactly the filtered top ``k`` of a scan of
it alone, and a long list costs only its own query (a lookup per candidate), not the group's heaps.

When requests are batched (``Batcher``): a request that arrives while others arrived in the same event-loop turn
(or in the turn before) waits for the end of that turn, so every request already read from the sockets joins
(``wait_us`` > 0 waits that long for more; 0, the default, adds no wait: batches form from what arrived together).
A lone request is scored at once, on the loop or in a thread as before (never held for ``wait_us``). With scoring
threads, at most one batch per thread is in flight; requests arriving meanwhile form the next batch (the busier,
the larger). A heavy request (``Service.recommend_now``: large k or exclusion list, many categories) takes its
batch to a scoring thread even when the model is small enough to score on the loop.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from .. import const, scoring
from ..errors import EdgeRuntimeError
from ..events.log import settle

_ONE = np.ones(1, dtype=np.float32)
# A turn with several requests makes the next ones join batches for this long (s): a burst's next requests arrive
# within a batch's scoring time (8 x ~150 µs on the Beauty bundle), a lone request after a quiet spell is scored
# at once.
RECENT_S = 0.02


class Job:
    """One request's scoring: ``model``, context ``rows`` (known to the encoder; empty: the popularity list), ``k``,
    ``exclude`` (rows never to return, any order, repeats allowed), ``categories`` / ``stock_bits`` (the allow mask
    inputs), and ``done(scored, exc)`` called on the event loop with (ids int64 [k'], scores float32 [k'])."""
    __slots__ = ("model", "rows", "k", "exclude", "categories", "stock_bits", "done")

    def __init__(self, model, rows: list[int], k: int, exclude: list[int], categories, stock_bits, done):
        self.model, self.rows, self.k, self.exclude = model, rows, k, exclude
        self.categories, self.stock_bits, self.done = categories, stock_bits, done

    @property
    def shareable(self) -> bool:
        """Whether a shared scan may serve it: k + its exclusions at most ``const.BATCH_MAX_FETCH`` (a shared scan
        keeps the group's largest k for every query, and a long exclusion list costs its query a lookup per
        candidate; such a request is also too heavy for the event loop, ``Service.recommend_now``)."""
        return self.k + len(self.exclude) <= const.BATCH_MAX_FETCH


class StageClock:
    """Time spent in the encoder and in the scan (calls, queries, seconds), summed since start: what the daemon's
    own path costs beside the model (``stats``, bench/bench_latency.py). Plain counters, no lock: each += is done
    by one thread at a time per stage in practice, and a lost update only blurs a statistic."""

    def __init__(self):
        self.encode_calls = 0     # sessions encoded
        self.encoder_runs = 0     # encoder calls (fewer than sessions when a batch is encoded together)
        self.encode_s = 0.0
        self.scan_calls = 0
        self.scan_queries = 0
        self.scan_s = 0.0

    def snapshot(self) -> dict:
        """{encode_calls (sessions encoded), encoder_runs (encoder calls), encode_seconds, encode_us (mean µs per
        session), scan_calls, scan_queries, scan_seconds, scan_us_per_query}."""
        return {"encode_calls": self.encode_calls, "encoder_runs": self.encoder_runs,
                "encode_seconds": self.encode_s, "scan_seconds": self.scan_s,
                "encode_us": self.encode_s * 1e6 / self.encode_calls if self.encode_calls else None,
                "scan_calls": self.scan_calls, "scan_queries": self.scan_queries,
                "scan_us_per_query": self.scan_s * 1e6 / self.scan_queries if self.scan_queries else None}


def score_one(job: Job, allow, clock: StageClock, u: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One request: encoder (unless ``u``, its user vector float32 [d], is given) + exact top-k scan with the
    exclusions inside; no known context -> the popularity list through the same scan (filters apply to it too).
    Returns (ids int64 [k'], scores float32 [k'])."""
    model = job.model
    excl = job.exclude or None   # a list: sorted and deduplicated by the scan
    t0 = time.perf_counter()
    if not job.rows:
        out = scoring.topk_served(_ONE, model.popularity_column, job.k, None, excl, allow)
        clock.scan_s += time.perf_counter() - t0
        clock.scan_calls += 1
        clock.scan_queries += 1
        return out
    if u is None:
        u = model.encode(job.rows)
        clock.encode_calls += 1
        clock.encoder_runs += 1
        clock.encode_s += time.perf_counter() - t0
    t1 = time.perf_counter()
    out = scoring.topk_served(u, model.items, job.k, model.scales, excl, allow)   # items checked at load
    clock.scan_s += time.perf_counter() - t1
    clock.scan_calls += 1
    clock.scan_queries += 1
    return out


def encode_jobs(jobs: Sequence[Job], clock: StageClock) -> dict[int, np.ndarray | BaseException]:
    """User vectors float32 [d] of the jobs with a context, by job index, or the exception a session's encoding
    raised: each model's sessions in one ``Model.encode_many`` (padded calls when the encoder is batch-exact, else
    one call each); if that raises, each session alone, so only a session that fails by itself fails."""
    by_model: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        if job.rows:
            by_model.setdefault(id(job.model), []).append(i)
    vectors: dict[int, np.ndarray | BaseException] = {}
    for members in by_model.values():
        model = jobs[members[0]].model
        t0 = time.perf_counter()
        try:
            users, calls = model.encode_many([jobs[i].rows for i in members])
            vectors.update(zip(members, users))
            encoded = len(members)
        except Exception:  # noqa: BLE001 - each session alone, each reporting its own error
            encoded = 0
            for i in members:
                try:
                    vectors[i] = model.encode(jobs[i].rows)
                    encoded += 1
                except Exception as exc:  # noqa: BLE001
                    vectors[i] = exc
            calls = encoded
        clock.encode_s += time.perf_counter() - t0
        clock.encode_calls += encoded
        clock.encoder_runs += calls
    return vectors


def score_jobs(jobs: Sequence[Job], allow_mask: Callable[[Any, Any, Any], Any],
               clock: StageClock) -> list[tuple[Any, BaseException | None]]:
    """Score ``jobs`` (any thread): the sessions encoded together (``encode_jobs``); requests on the same model with
    the same allow mask share one scan; the rest (a lone one, the popularity list, k + |exclude| above
    ``const.BATCH_MAX_FETCH``) are scanned alone. Returns, per job in order, ((ids, scores), None) or (None, the
    exception its scoring raised)."""
    out: list[tuple[Any, BaseException | None]] = [(None, None)] * len(jobs)
    vectors = encode_jobs(jobs, clock)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        if isinstance(vectors.get(i), BaseException):
            out[i] = (None, vectors[i])
        elif job.rows and job.shareable:
            groups.setdefault((id(job.model), job.categories, id(job.stock_bits)), []).append(i)
        else:
            groups[("alone", i)] = [i]
    for members in groups.values():
        first = jobs[members[0]]
        try:
            allow = allow_mask(first.model, first.categories, first.stock_bits)
        except Exception as exc:  # noqa: BLE001 - reported to each request as its error
            for i in members:
                out[i] = (None, exc)
            continue
        if len(members) == 1:
            try:
                out[members[0]] = (score_one(first, allow, clock, vectors.get(members[0])), None)
            except Exception as exc:  # noqa: BLE001
                out[members[0]] = (None, exc)
            continue
        _score_group([jobs[i] for i in members], members, allow, clock, out, vectors)
    return out


def _score_group(group: list[Job], members: list[int], allow, clock: StageClock, out: list,
                 vectors: dict[int, np.ndarray | BaseException]) -> None:
    model = group[0].model
    t0 = time.perf_counter()
    try:
        scored = scoring.topk_served(np.stack([vectors[i] for i in members]), model.items,
                                     max(job.k for job in group), model.scales, None, allow, per_query=True,
                                     query_excludes=[job.exclude for job in group])
    except Exception as exc:  # noqa: BLE001
        for i in members:
            out[i] = (None, exc)
        return
    clock.scan_s += time.perf_counter() - t0
    clock.scan_calls += 1
    clock.scan_queries += len(group)
    for row, job in enumerate(group):
        ids, scores = scored[row]
        out[members[row]] = ((ids[:job.k], scores[:job.k]), None)


class Batcher:
    """Collects ``Job``s on the event loop and scores them in batches (see the module docstring).

    Args:
        score: ``score_jobs`` bound to the service's allow mask and clock: jobs -> [(scored, exc)].
        executor: the scoring threads.
        threads: batches in flight at most (the executor's threads).
        inline: called at each flush: True scores the batch on the event loop (a small model), False in a thread.
        wait_us: µs a batch waits for more requests after its first one (0: to the end of the loop turn).
        max_batch: requests per batch at most (more wait for the next one).
    """

    def __init__(self, score: Callable[[list[Job]], list], executor, threads: int, inline: Callable[[], bool],
                 wait_us: float = 0.0, max_batch: int = const.BATCH_MAX_REQUESTS):
        self.score, self.executor, self.threads, self.inline = score, executor, max(1, threads), inline
        self.wait_s, self.max_batch = max(0.0, wait_us) / 1e6, max(1, max_batch)
        self.pending: list[Job] = []
        self.in_flight = 0
        self._scheduled = False
        self._heavy = False     # a heavy job is pending: the next flush goes to a thread
        self._turn_open = False
        self._turn = 0
        self._last_turn = 0
        self._last_end = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None   # _running_loop: the loop and its thread
        self._loop_thread = 0
        self.batches = 0       # batches scored (more than one request each), and the requests in them
        self.batched = 0

    def concurrent(self) -> bool:
        """Count a request in this loop turn; True when requests are arriving together (another came in this turn,
        or the last turn with requests had several and ended less than ``RECENT_S`` ago), so this one should join
        a batch."""
        loop = self._running_loop()
        if not self._turn_open:
            self._turn_open = True
            self._turn = 0
            loop.call_soon(self._close_turn, loop)
        self._turn += 1
        return self._turn > 1 or (self._last_turn > 1 and loop.time() - self._last_end < RECENT_S)

    def alone(self) -> bool:
        """Whether a request arriving now would be scored alone at once: ``concurrent`` would say False and nothing
        is queued or being scored. Counts nothing (the fast path asks first, then counts it with ``concurrent``)."""
        if self._turn_open or self.pending or self.in_flight:
            return False
        return self._last_turn <= 1 or self._running_loop().time() - self._last_end >= RECENT_S

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, kept while it runs: ``asyncio.get_running_loop`` costs a getpid() system call per call
        on Python < 3.12, twice per request here (a service serves one loop at a time; tests run several in turn)."""
        loop = self._loop
        if loop is None or self._loop_thread != threading.get_ident() or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        return loop

    def _close_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        self._last_turn, self._turn_open = self._turn, False
        self._last_end = loop.time()

    def add(self, job: Job, hold: bool = True, on_loop: bool = True) -> None:
        """Queue ``job``; its ``done`` is called on the loop once its batch is scored. ``hold``: requests are
        arriving together (``concurrent``), so the batch may wait ``wait_us`` for more (so it may when other
        requests are queued or being scored); a lone one is flushed at the end of this loop turn. ``on_loop``
        False: this job is heavy, its batch goes to a scoring thread even when ``inline`` says the loop."""
        hold = hold or self.in_flight > 0 or bool(self.pending)   # others in progress: not alone either
        self.pending.append(job)
        if not on_loop:
            self._heavy = True
        if not self._scheduled:
            self._scheduled = True
            loop = asyncio.get_running_loop()
            if hold and self.wait_s > 0:
                loop.call_later(self.wait_s, self._flush)
            else:
                loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        heavy, self._heavy = self._heavy, False
        inline = self.inline() and not heavy
        while self.pending and (inline or self.in_flight < self.threads):
            batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
            if len(batch) > 1:
                self.batches += 1
                self.batched += len(batch)
            if inline:
                self._deliver(batch, self.score(batch))
                continue
            try:
                fut = asyncio.get_running_loop().run_in_executor(self.executor, self.score, batch)
            except RuntimeError:   # the executor is shut down: these requests get an error, not silence
                exc = EdgeRuntimeError("request cancelled: the daemon is shutting down")
                self._deliver(batch, [(None, exc)] * len(batch))
                continue
            self.in_flight += 1
            fut.add_done_callback(lambda f, batch=batch: self._scored(batch, f))
        if self.pending and heavy:   # left for a thread to free up: still not for the loop
            self._heavy = True

    def _scored(self, batch: list[Job], f: asyncio.Future) -> None:
        self.in_flight -= 1
        exc = EdgeRuntimeError("request cancelled: the daemon is shutting down") if f.cancelled() else f.exception()
        self._deliver(batch, [(None, exc)] * len(batch) if exc is not None else f.result())
        if self.pending and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    @staticmethod
    def _deliver(batch: list[Job], results: list) -> None:
        for job, (scored, exc) in zip(batch, results):
            job.done(scored, exc)


def future_done(out: asyncio.Future, finish: Callable[[Any], dict]) -> Callable[[Any, BaseException | None], None]:
    """A ``Job.done`` that resolves ``out`` with ``finish(scored)`` (or the scoring's exception)."""
    def done(scored, exc) -> None:
        if out.done():   # the request was cancelled (shutdown)
            return
        if exc is not None:
            settle(out, None, exc)
            return
        try:
            settle(out, finish(scored), None)
        except Exception as e:   # noqa: BLE001 - reported to the client as the request's error
            settle(out, None, e)
    return done
