"""The ``recommend`` fast path (``serving/fastpath.py``, ``_native.RecommendFrames``): every frame it answers gets,
byte for byte, the reply the general path sends for it; every frame it declines (bad input, a ``user``, filters,
an unknown id, a heavy request, bytes after the frame) gets exactly what it got without the fast path; the
connection's stream accounting stays right around it; and over a real socket the daemon serves its plain frames
through it."""
from __future__ import annotations

import asyncio

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime import const
from edge_runtime.client import Client
from edge_runtime.rpc.server import RpcConnection, RpcServer
from edge_runtime.serving import batch, fastpath
from edge_runtime.serving.model import Model
from served import serve


class Wire:
    """The connection's transport as the server sees it, recording what it writes (no socket: the replies' bytes
    are compared here; the socket path is test_daemon_serves_plain_frames_fast)."""

    def __init__(self):
        self.out: list[bytes] = []
        self.closing = False

    def write(self, b: bytes) -> None:
        self.out.append(bytes(b))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, key, default=None):
        return ("127.0.0.1", 40000) if key == "peername" else default

    def set_write_buffer_limits(self, **kw) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closing = True


@pytest.fixture(scope="module")
def model(tiny_bundle) -> Model:
    return Model(tiny_bundle)   # int8: the precision the native encoder serves


@pytest.fixture(scope="module")
def service(model):
    svc = serve(model, "always")
    yield svc
    svc.executor.shutdown(wait=True)


async def replies(service, chunks: list[bytes], fast: bool, server: RpcServer | None = None,
                  expect: int | None = None) -> list[bytes]:
    """What a fresh connection writes for ``chunks`` (each received alone, one loop turn apart), with the frame path
    on or off, once ``expect`` replies (default: one per chunk) are written or the connection closed."""
    table = service.methods
    path = table.frame_path
    table.frame_path = path if fast else None
    try:
        conn = RpcConnection(server or RpcServer(table))
        wire = Wire()
        conn.connection_made(wire)
        for c in chunks:
            conn.data_received(c)
            await asyncio.sleep(0)
        want = len(chunks) if expect is None else expect
        for _ in range(2000):   # scoring threads: replies come later
            if len(wire.out) >= want or wire.closing:
                break
            await asyncio.sleep(0.002)
        conn.connection_lost(None)
        return wire.out
    finally:
        table.frame_path = path


def frame(params, msgid: int = 7, wrap: bool = True, method: str = "recommend") -> bytes:
    return msgpack.packb([0, msgid, method, [params] if wrap else params], use_bin_type=True)


def plain_frames(model: Model, n: int = 120, seed: int = 5) -> list[bytes]:
    """Frames the fast path must answer: histories of 1 .. 3 max_len known ids (repeats included), k from 1 to
    the light bound, exclude_seen either way or absent, params wrapped or bare, msgids across every int width."""
    rng = np.random.default_rng(seed)
    ids = model.item_ids
    msgids = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1]
    out = []
    for i in range(n):
        length = int(rng.integers(1, 3 * model.max_len))
        hist = [ids[j] for j in rng.integers(0, model.num_items, length)]
        if i % 7 == 3:
            hist = hist[:3] * 4   # repeats: the encoder sees them, the exclusions once
        p: dict = {"history": hist}
        if i % 3:
            p["k"] = int(rng.choice([1, 2, 10, 50, max(1, const.BATCH_MAX_FETCH - length)]))
        if i % 4 == 1:
            p["exclude_seen"] = bool(rng.integers(0, 2))
        if i % 5 == 2:
            p = dict(reversed(list(p.items())))   # key order does not matter
        out.append(frame(p, msgids[i % len(msgids)], wrap=i % 6 != 0))
    return out


def test_plain_frames_get_the_general_paths_bytes(model, service):
    assert model.fast is not None, "the tiny bundle has a native encoder: the fast path must be built"
    frames = plain_frames(model)

    async def go():
        general = [await replies(service, [f], fast=False) for f in frames]
        before = service.fast_served
        fast = [await replies(service, [f], fast=True) for f in frames]
        return general, fast, service.fast_served - before
    general, fast, served = asyncio.run(go())
    assert served == len(frames)   # every one of them went through the fast path...
    for f, g, q in zip(frames, general, fast):
        assert len(g) == 1 and q == g, msgpack.unpackb(f)   # ... and wrote the general path's exact bytes
        reply = msgpack.unpackb(g[0])
        assert reply[2] is None and reply[3]["source"] == "model" and len(reply[3]["items"]) >= 1


def test_direct_calls_agree_with_the_service(model, service):
    """``fast(frame)`` alone: the reply decodes to what ``recommend_now`` returns, and the stage times are real."""
    ids = model.item_ids
    hist = [ids[5], ids[9], ids[5], ids[40]]
    reply, enc_s, scan_s = model.fast(frame({"history": hist, "k": 12}, msgid=99))

    async def general():
        return service.recommend_now({"history": hist, "k": 12})
    want = asyncio.run(general())
    assert msgpack.unpackb(reply) == [1, 99, None, want]
    assert not set(want["items"]) & set(hist)   # exclude_seen by default
    assert 0 < enc_s < 1 and 0 < scan_s < 1


def declined_frames(model: Model) -> list[tuple[str, list[bytes]]]:
    """Frames (as chunks) the fast path must leave to the general path, each with why."""
    ids = model.item_ids
    h = [ids[1], ids[2]]
    plain = frame({"history": h, "k": 5})
    long_id = "x" * (const.MAX_ID_CHARS + 1)
    return [
        ("unknown id (ignored in the reply)", [frame({"history": h + ["no-such-item"], "k": 5})]),
        ("only unknown ids (popularity)", [frame({"history": ["no-such-item"]})]),
        ("a user", [frame({"user": "u1", "history": h})]),
        ("user nil", [frame({"user": None, "history": h})]),
        ("filters", [frame({"history": h, "filters": {"exclude": [ids[3]]}})]),
        ("unknown key", [frame({"history": h, "kk": 1})]),
        ("k = 0", [frame({"history": h, "k": 0})]),
        ("k above MAX_K", [frame({"history": h, "k": const.MAX_K + 1})]),
        ("k a bool", [frame({"history": h, "k": True})]),
        ("k a float", [frame({"history": h, "k": 5.0})]),
        ("k negative", [frame({"history": h, "k": -3})]),
        ("exclude_seen an int", [frame({"history": h, "exclude_seen": 1})]),
        ("history nil", [frame({"history": None})]),
        ("history empty", [frame({"history": []})]),
        ("history a string", [frame({"history": ids[1]})]),
        ("history with an int id", [frame({"history": [1, ids[2]]})]),
        ("history with bytes", [frame({"history": [ids[1].encode()]})]),
        ("id too long", [frame({"history": [long_id]})]),
        ("history above MAX_HISTORY_IDS", [frame({"history": [ids[1]] * (const.MAX_HISTORY_IDS + 1)})]),
        ("heavy: k + exclusions above BATCH_MAX_FETCH",
         [frame({"history": [ids[1]] * 10, "k": const.BATCH_MAX_FETCH - 9})]),
        ("params empty", [frame({}, wrap=True)]),
        ("params two maps", [msgpack.packb([0, 1, "recommend", [{"history": h}, {"k": 2}]])]),
        ("no params", [msgpack.packb([0, 1, "recommend"])]),
        ("a notification", [msgpack.packb([2, "recommend", [{"history": h}]])]),
        ("msgid above uint32", [frame({"history": h}, msgid=2**32)]),
        ("msgid negative", [frame({"history": h}, msgid=-1)]),
        ("another method", [frame({}, method="health")]),
        ("method as bytes", [msgpack.packb([0, 1, b"recommend", [{"history": h}]], use_bin_type=True)]),
        ("two frames in one chunk", [plain + frame({"history": h, "k": 3}, msgid=8)]),
        ("a frame and a partial one", [plain + frame({"history": h}, msgid=8)[:5]]),
        ("a frame in two chunks", [plain[:6], plain[6:]]),
        ("not msgpack", [b"\xc1\xc1\xc1"]),
        ("duplicate key", [b"\x94\x00\x07\xa9recommend\x91\x82\xa1k\x05\xa1k\x06"]),
    ]


def test_declined_frames_change_nothing(model, service):
    cases = declined_frames(model)

    async def go():
        out = []
        for why, chunks in cases:
            if len(chunks) == 1:
                assert model.fast(chunks[0]) is None, why
            before = service.fast_served
            expect = {"two frames in one chunk": 2, "a notification": 0}.get(why, 1)
            with_fast = await replies(service, chunks, fast=True, expect=expect)
            assert service.fast_served == before, why
            without = await replies(service, chunks, fast=False, expect=expect)
            out.append((why, with_fast, without))
        return out
    for why, with_fast, without in asyncio.run(go()):
        assert with_fast == without, (why, [msgpack.unpackb(x) for x in with_fast],
                                      [msgpack.unpackb(x) for x in without])
        assert len(with_fast) == {"two frames in one chunk": 2, "a notification": 0}.get(why, 1), why


def test_stream_accounting_around_fast_frames(model, service):
    """A fast frame, a frame of another method in two chunks, a fast frame, then a frame over the server's frame
    limit: the replies come in order, and the limit still closes the connection (the frames the fast path took
    are counted in the stream offsets, so the frame after them is measured from its own first byte)."""
    ids = model.item_ids
    a = frame({"history": [ids[1]], "k": 3}, msgid=1)
    b = frame({}, msgid=2, method="health")
    c = frame({"history": [ids[2]], "k": 4}, msgid=3)
    big = frame({"history": [ids[3]] * 200, "k": 1}, msgid=4)
    server = RpcServer(service.methods, max_frame_bytes=len(big) - 1)

    async def go():
        before = service.fast_served
        out = await replies(service, [a, b[:4], b[4:], c, big], fast=True, server=server, expect=4)
        return out, service.fast_served - before
    out, served = asyncio.run(go())
    assert served == 2
    got = [msgpack.unpackb(x) for x in out]
    assert [r[1] for r in got[:3]] == [1, 2, 3]
    assert got[1][3]["status"] == "ok"
    assert got[3][2]["name"] == "FrameTooLarge"


def test_stock_filter_and_added_items_take_the_general_path(tiny_bundle):
    model = Model(tiny_bundle)
    svc = serve(model, "always")
    ids = model.item_ids
    f = frame({"history": [ids[1], ids[2]], "k": 20})
    try:
        async def go():
            await asyncio.sleep(2 * batch.RECENT_S)   # the swap's warm-up requests came together: batched
            assert svc.recommend_frame(f) is not None
            out_of_stock = msgpack.unpackb((await replies(svc, [f], fast=True))[0])[3]["items"][:5]
            svc.set_availability({"items": out_of_stock, "in_stock": False})
            assert svc.recommend_frame(f) is None
            r = msgpack.unpackb((await replies(svc, [f], fast=True))[0])[3]["items"]
            assert not set(r) & set(out_of_stock)
            svc.set_availability({"items": out_of_stock, "in_stock": True})
            assert svc.recommend_frame(f) is not None
        asyncio.run(go())
        added, _ = model.with_items([("new-item-1", ("cat-x",))])
        assert added.fast is None and model.fast is not None
    finally:
        svc.executor.shutdown(wait=True)


@pytest.mark.parametrize("concurrent", [False, True])
def test_frames_arriving_together(model, service, concurrent):
    """Plain frames of 4 connections in one loop turn: with ``fast_concurrent`` off (a catalog where batching pays)
    the first is answered by the fast path and the other 3 are batched by the general path; on, all 4 by the fast
    path one by one. Either way every reply is the one the frame gets alone."""
    ids = model.item_ids
    frames = [frame({"history": [ids[3 + i], ids[20 + i]], "k": 5 + i}, msgid=i) for i in range(4)]
    saved = model.fast_concurrent
    model.fast_concurrent = concurrent

    async def go():
        alone = [await replies(service, [f], fast=False) for f in frames]
        await asyncio.sleep(2 * batch.RECENT_S)
        before, batches = service.fast_served, service.batcher.batches
        wires = []
        for f in frames:   # no await in between: one loop turn
            conn = RpcConnection(RpcServer(service.methods))
            wire = Wire()
            conn.connection_made(wire)
            conn.data_received(f)
            wires.append(wire)
        for _ in range(500):
            if all(w.out for w in wires):
                break
            await asyncio.sleep(0.002)
        return alone, [w.out for w in wires], service.fast_served - before, service.batcher.batches - batches
    try:
        alone, together, fast, batches = asyncio.run(go())
    finally:
        model.fast_concurrent = saved
    assert together == alone
    assert (fast, batches) == ((4, 0) if concurrent else (1, 1))


def test_non_ascii_and_repeated_ids(tiny_bundle):
    """Ids beyond ASCII (2-, 3- and 4-byte UTF-8, so 256 characters are more than 256 bytes) and an id given to two
    rows (the index keeps the last, as the Python one does): the fast path's replies are still the general
    path's bytes, and an id of 257 characters is declined."""
    import copy

    base = Model(tiny_bundle)
    m = copy.copy(base)
    m.item_ids = list(base.item_ids)
    m.item_ids[1], m.item_ids[2], m.item_ids[3] = "café", "日本-商品", "😀" * 256
    m.item_ids[4] = "\u00e9" * 257
    m.item_ids[6] = m.item_ids[5]   # one id, two rows
    m.index = {item: row for row, item in enumerate(m.item_ids)}
    m.fast = fastpath.build(m)
    svc = serve(m, "always")
    ids = m.item_ids
    frames = [frame({"history": h, "k": 10}, msgid=i) for i, h in enumerate(
        [[ids[1]], [ids[2], ids[1]], [ids[3]], [ids[5], ids[2]], [ids[0], ids[3], ids[3]]])]
    try:
        async def go():
            await asyncio.sleep(2 * batch.RECENT_S)
            general = [await replies(svc, [f], fast=False) for f in frames]
            before = svc.fast_served
            fast = [await replies(svc, [f], fast=True) for f in frames]
            return general, fast, svc.fast_served - before
        general, fast, served = asyncio.run(go())
        assert served == len(frames) and fast == general
        assert m.fast(frame({"history": [ids[4]]})) is None   # 257 characters: not an id as_id takes
        hist = [msgpack.unpackb(g[0])[3] for g in general]
        assert all(r["source"] == "model" and r["ignored"] == [] for r in hist)
    finally:
        svc.executor.shutdown(wait=True)


def test_roles_enforced(model, service):
    """On a server that enforces roles, the fast path answers only a connection whose role may call recommend
    (shop): an anonymous one and an ops one get the general path's NotPermitted, byte for byte."""
    from edge_runtime.rpc.auth import Authenticator

    shop, ops = "s" * 40, "o" * 40
    f = frame({"history": [model.item_ids[1]], "k": 3}, msgid=5)
    auth_frame = lambda token: frame({"token": token}, msgid=1, method="auth")  # noqa: E731

    async def go():
        out = {}
        for who, chunks in (("anonymous", [f]), ("ops", [auth_frame(ops), f]), ("shop", [auth_frame(shop), f])):
            got = []
            for fast in (True, False):
                server = RpcServer(service.methods, auth=Authenticator({"shop": [shop], "ops": [ops]}))
                before = service.fast_served
                got.append((await replies(service, chunks, fast=fast, server=server), service.fast_served - before))
            out[who] = got
        return out
    out = asyncio.run(go())
    for who, ((with_fast, n_fast), (without, n_without)) in out.items():
        assert with_fast == without and n_without == 0, who
        assert n_fast == (1 if who == "shop" else 0), who
        last = msgpack.unpackb(with_fast[-1])
        assert (last[2] is None) if who == "shop" else (last[2]["name"] == "NotPermitted"), (who, last)


def test_model_info_says_so(model, service):
    info = service.model_info({})
    assert info["fast_path"] is True and info["fast_path_concurrent"] is model.fast_concurrent


def test_switched_off_and_other_encoders(tiny_bundle, monkeypatch):
    """No fast path with EDGEREC_FAST_PATH=0, with the ONNX Runtime encoder, or at fp32 (ONNX Runtime too)."""
    monkeypatch.setenv("EDGEREC_FAST_PATH", "0")
    assert Model(tiny_bundle).fast is None
    monkeypatch.setenv("EDGEREC_FAST_PATH", "1")
    assert Model(tiny_bundle).fast is not None
    assert Model(tiny_bundle, precision="fp32").fast is None
    monkeypatch.setenv("EDGEREC_ENCODER", "onnx")
    assert Model(tiny_bundle).fast is None


values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
                      | st.binary(max_size=4), lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_frames(model, service, data):
    """Frames built from a plain one by changing a value, adding a key, or cutting / flipping bytes: whatever the
    fast path answers is the general path's answer for it."""
    ids = model.item_ids
    hist = data.draw(st.lists(st.sampled_from(ids[:50] + ["unknown"]), min_size=0, max_size=6))
    p: dict = {"history": hist, "k": data.draw(st.integers(-2, 300))}
    key = data.draw(st.sampled_from(["history", "k", "exclude_seen", "user", "filters", "extra", None]))
    if key is not None:
        p[key] = data.draw(values)
    f = frame(p, msgid=data.draw(st.integers(0, 2**32 - 1)))
    cut = data.draw(st.sampled_from(["none", "truncate", "flip", "append"]))
    if cut == "truncate":
        f = f[:data.draw(st.integers(0, len(f)))]
    elif cut == "flip":
        i = data.draw(st.integers(0, len(f) - 1))
        f = f[:i] + bytes([f[i] ^ data.draw(st.integers(1, 255))]) + f[i + 1:]
    elif cut == "append":
        f = f + data.draw(st.binary(min_size=1, max_size=4))
    out = model.fast(f)
    if out is None:
        return
    general = asyncio.run(replies(service, [f], fast=False))
    assert [out[0]] == general


def test_daemon_serves_plain_frames_fast(daemon, model):
    """Over a real socket: the daemon answers plain recommend frames through the fast path (its stats count them)
    with the replies the general path gives in-process."""
    _, port = daemon
    ids = model.item_ids
    reference = serve(model, "always")
    try:
        requests = [{"history": [ids[j] for j in range(i, i + 1 + i % 9)], "k": 1 + i % 20} for i in range(40)]
        with Client("127.0.0.1", port) as c:
            before = c.call("stats")["scoring"]["fast_path"]
            got = [c.call("recommend", **p) for p in requests]
            after = c.call("stats")["scoring"]["fast_path"]

        async def general():
            return [await reference.recommend(dict(p)) for p in requests]
        want = asyncio.run(general())
        assert after - before == len(requests)
        assert got == want
    finally:
        reference.executor.shutdown(wait=True)
