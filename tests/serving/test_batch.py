"""Batches of concurrent ``recommend`` requests (``serving/batch.py``): every reply equals, bit for bit, the reply
the same request gets alone, whatever it shares the batch with (other k, exclusions, filters, stock, popularity),
on the loop and on scoring threads, and over a real socket under concurrent clients."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from edge_runtime import const, scoring
from edge_runtime.client import Client
from edge_runtime.serving.batch import Job, StageClock, score_jobs, score_one
from edge_runtime.serving.model import Model
from served import serve


@pytest.fixture(scope="module", params=["int8", "fp32"])
def model(request, tiny_bundle) -> Model:
    return Model(tiny_bundle, precision=request.param)


def mixed_requests(model: Model, n: int = 40, seed: int = 3) -> list[dict]:
    """Requests of every shape a batch may mix: various k and history lengths, exclude_seen off, exclusions of the
    very items the model ranks first, a category filter, unknown-only (popularity) and over-long exclusions."""
    rng = np.random.default_rng(seed)
    ids = model.item_ids
    out = []
    for i in range(n):
        hist = [ids[j] for j in rng.choice(model.num_items, int(rng.integers(1, 12)), replace=False)]
        p = {"history": hist, "k": int(rng.choice([1, 5, 10, 37]))}
        if i % 5 == 1:
            p["exclude_seen"] = False
        if i % 4 == 2:   # exclude what this context would get first: the shared scan must reach past them
            top = scoring.topk(model.encode(model.rows(hist)[0]), model.items, 15, item_scales=model.scales)[0]
            p["filters"] = {"exclude": [ids[r] for r in top.tolist()]}
        out.append(p)
    attrs = sorted(model.attr_rows)
    if attrs:
        out.append({"history": [ids[3], ids[8]], "k": 10, "filters": {"category": attrs[0]}})
        out.append({"history": [ids[4]], "k": 10, "filters": {"category": attrs[:3]}})
    out.append({"history": ["no-such-item"], "k": 10})                       # popularity
    out.append({"history": [ids[2]], "k": 5, "filters": {"exclude": ids[100:100 + const.BATCH_MAX_FETCH]}})
    return out


@pytest.mark.parametrize("mode", ["always", "never"])
def test_batched_replies_equal_lone_replies(model, mode):
    requests = mixed_requests(model)
    service = serve(model, mode)
    service.set_availability({"items": [model.item_ids[r] for r in range(0, model.num_items, 7)],
                              "in_stock": False})

    async def go():
        alone = []
        for p in requests:   # one at a time, after a quiet spell (batch.RECENT_S): never batched
            await asyncio.sleep(0.025)
            r = service.recommend_now(dict(p))
            alone.append(await r if isinstance(r, asyncio.Future) else r)
        before = service.batcher.batches
        pending = [service.recommend_now(dict(p)) for p in requests]   # all in one turn
        together = [await r if isinstance(r, asyncio.Future) else r for r in pending]
        return alone, together, service.batcher.batches - before

    try:
        alone, together, batches = asyncio.run(go())
    finally:
        service.executor.shutdown(wait=True)
    assert batches >= 1
    assert service.batcher.batched >= len(requests) - 1
    for p, a, t in zip(requests, alone, together):
        assert t == a, p                    # items and scores, bit for bit
        assert len(a["items"]) == min(p["k"], len(a["items"])) and a["items"]
        gone = set((p.get("filters") or {}).get("exclude", ()))
        if p.get("exclude_seen", True):
            gone |= set(p["history"])
        assert not gone & set(a["items"])
        assert not {model.item_ids[r] for r in range(0, model.num_items, 7)} & set(a["items"])   # out of stock
    assert together[-2]["source"] == "popularity"


def test_score_jobs_equals_score_one_with_exclusions_inside(model):
    """The pure scoring function: a group's shared scan, each request's exclusions inside it as its own list, gives
    what a scan of each request alone gives, on random contexts whose exclusions are their own top items."""
    rng = np.random.default_rng(11)
    clock = StageClock()
    jobs = []
    for i in range(64):
        rows = rng.choice(model.num_items, int(rng.integers(1, 20)), replace=False).tolist()
        top = scoring.topk(model.encode(rows), model.items, 30, item_scales=model.scales)[0].tolist()
        exclude = rows + top[: int(rng.integers(0, 30))] + rows[:2]        # repeats too
        jobs.append(Job(model, rows, int(rng.integers(1, 40)), exclude, None, None, None))
    got = score_jobs(jobs, lambda m, c, b: None, clock)
    assert clock.scan_calls == 1 and clock.scan_queries == 64 and clock.encode_calls == 64
    assert model.batch_exact and clock.encoder_runs < 64      # the sessions were encoded in a few padded calls
    for job, (scored, exc) in zip(jobs, got):
        assert exc is None
        ids, sc = score_one(job, None, StageClock())
        np.testing.assert_array_equal(scored[0], ids)
        np.testing.assert_array_equal(scored[1], sc)
        assert len(ids) == job.k and not set(ids.tolist()) & set(job.exclude)


def test_encode_many_equals_lone_calls(model):
    """Batched encoder calls (padded groups of similar lengths) give every session its lone call's vector bit for
    bit, windows longer than max_len included; fewer calls than sessions."""
    assert model.batch_exact and 1 <= model.call_tokens <= 4 * model.max_len
    assert model.summary()["batch_exact"] is True and model.summary()["encoder_call_tokens"] >= 1
    rng = np.random.default_rng(4)
    for batch in (2, 3, 8, 32):
        sessions = [rng.integers(0, model.bundle_items, int(rng.integers(1, model.max_len + 6))).tolist()
                    for _ in range(batch)]
        users, calls = model.encode_many(sessions)
        np.testing.assert_array_equal(users, np.stack([model.encode(s) for s in sessions]))
        assert users.dtype == np.float32 and 1 <= calls <= batch
    same = [[5, 6, 7]] * 4 + [[1, 2, 3]] * 4
    assert model.encode_many(same)[1] == 1                    # one length: one call


def test_an_encoder_that_is_not_batch_exact_is_called_per_session(tiny_bundle, tmp_path):
    """A bundle whose int8 encoder has dynamically quantized MatMuls (one activation scale per call) is found not
    batch-exact at load; its sessions are encoded one call each, and batched replies still equal lone ones."""
    import shutil

    from trainer.export import quantize_int8

    b = tmp_path / "dyn"
    shutil.copytree(tiny_bundle, b)
    quantize_int8(b / "encoder.onnx", b / "encoder.int8.onnx", matmuls="dynamic")
    dyn = Model(b, verify=False)                               # the file no longer matches the manifest's sha256
    assert not dyn.batch_exact and dyn.summary()["batch_exact"] is False
    sessions = [[1, 2, 3], [4, 5], [6, 7, 8]]
    users, calls = dyn.encode_many(sessions)
    assert calls == 3
    np.testing.assert_array_equal(users, np.stack([dyn.encode(s) for s in sessions]))
    clock = StageClock()
    jobs = [Job(dyn, s, 5, [], None, None, None) for s in sessions]
    got = score_jobs(jobs, lambda m, c, b: None, clock)
    assert clock.encoder_runs == 3 and clock.encode_calls == 3
    for job, (scored, exc) in zip(jobs, got):
        ids, sc = score_one(job, None, StageClock())
        np.testing.assert_array_equal(scored[0], ids)
        np.testing.assert_array_equal(scored[1], sc)


def test_a_failing_request_fails_alone(model):
    """An encoder failure of one request of a batch is that request's error; the others are scored."""
    good = Job(model, [1, 2, 3], 5, [], None, None, None)
    bad = Job(model, [model.bundle_items + 5], 5, [], None, None, None)   # a row the encoder has no embedding for
    out = score_jobs([good, bad, good], lambda m, c, b: None, StageClock())
    assert out[0][1] is None and out[2][1] is None and len(out[0][0][0]) == 5
    assert out[1][0] is None and isinstance(out[1][1], Exception)


def test_threads_take_one_batch_each_and_the_rest_waits(model):
    """With scoring threads, batches in flight never exceed the threads; requests arriving meanwhile form the next
    batch, and every reply still equals the lone one."""
    service = serve(model, "never")
    gate = threading.Event()
    seen: list[int] = []
    real = service._score_jobs

    def held(jobs):
        seen.append(len(jobs))
        gate.wait(10)
        return real(jobs)

    requests = mixed_requests(model, 12, seed=5)[:12]

    async def go():
        alone = [await service.recommend(dict(p)) for p in requests]
        service._score_jobs = held
        first = [service.recommend_now(dict(p)) for p in requests[:2]]   # batch 1 (held in its thread)
        await asyncio.sleep(0.05)
        second = [service.recommend_now(dict(p)) for p in requests[2:]]  # queued behind it? no: a second thread
        await asyncio.sleep(0.05)
        third = [service.recommend_now(dict(p)) for p in requests]       # both threads busy: waits, one batch
        await asyncio.sleep(0.05)
        assert service.batcher.in_flight == 2 and len(service.batcher.pending) == len(requests)
        gate.set()
        got = [await f for f in first + second + third]
        return alone, got

    try:
        alone, got = asyncio.run(go())
    finally:
        gate.set()
        service.executor.shutdown(wait=True)
    assert seen[:3] == [2, 10, 12]
    assert got == alone[:2] + alone[2:] + alone


def test_concurrent_socket_clients_get_their_lone_replies(daemon, tiny_bundle):
    """8 real clients on a real daemon, all at once: each reply equals the one the same request gets alone, and
    the daemon reports batches."""
    proc, port = daemon
    m = Model(tiny_bundle)
    requests = mixed_requests(m, 48, seed=9)
    with Client("127.0.0.1", port) as c:
        alone = [c.call("recommend", **p) for p in requests]
        before = c.call("stats")["scoring"]["batches"]
    got: dict[int, dict] = {}

    def client(idx: int) -> None:
        with Client("127.0.0.1", port) as c:
            for _ in range(5):
                for j in range(idx, len(requests), 8):
                    got[j] = c.call("recommend", **requests[j])
                    assert got[j] == alone[j], requests[j]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == len(requests)
    with Client("127.0.0.1", port) as c:
        stats = c.call("stats")["scoring"]
    assert stats["batches"] > before
    assert stats["encode_us"] > 0 and stats["scan_us_per_query"] > 0


def test_a_batch_waits_batch_wait_us_for_more(model):
    """With batch_wait_us, requests arriving in later loop turns, while others are being scored, wait for each
    other and form one batch."""
    service = serve(model, "never", batch_wait_us=50_000)

    async def go():
        reqs = mixed_requests(model, 6, seed=1)[:6]
        alone = [await service.recommend(dict(p)) for p in reqs]
        before, before_n = service.batcher.batches, service.batcher.batched
        futs = []
        for p in reqs:                       # one per loop turn, all within the 50 ms wait
            futs.append(service.recommend_now(dict(p)))
            await asyncio.sleep(0)
        got = [await f for f in futs]
        return alone, got, service.batcher.batches - before, service.batcher.batched - before_n

    try:
        alone, got, batches, batched = asyncio.run(go())
    finally:
        service.executor.shutdown(wait=True)
    assert got == alone
    # the first is alone (nothing else queued or in flight: not held); the rest arrive while it is being scored,
    # so their batch waits and takes them all
    assert batches == 1 and batched == 5


def test_heavy_requests_leave_the_loop_and_lone_ones_are_not_held(model):
    """On a model scored on the loop, a heavy request (k + exclusions over BATCH_MAX_FETCH) is scored in a thread
    (a future, same reply as a lone light path would give by definition of the scan); and with batch_wait_us set, a
    lone request on the thread path is not held for the wait."""
    import time

    service = serve(model, "always", batch_wait_us=200_000)
    ids = model.item_ids

    async def go():
        await asyncio.sleep(0.025)
        light = service.recommend_now({"history": [ids[1], ids[2]], "k": 10})
        await asyncio.sleep(0.025)
        heavy = service.recommend_now({"history": [ids[1], ids[2]], "k": const.BATCH_MAX_FETCH})
        assert isinstance(light, dict) and isinstance(heavy, asyncio.Future)
        heavy = await heavy
        assert heavy["items"][:10] == light["items"] and heavy["scores"][:10] == light["scores"]
        service.score_inline = "never"
        await asyncio.sleep(0.025)
        t0 = time.perf_counter()
        await service.recommend({"history": [ids[3]], "k": 10})
        return time.perf_counter() - t0

    try:
        lone_s = asyncio.run(go())
    finally:
        service.executor.shutdown(wait=True)
    assert lone_s < 0.2   # not held for the 200 ms wait (it takes ~1 ms)
