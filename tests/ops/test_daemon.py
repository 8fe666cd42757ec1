"""Integration: `edgerec serve` as a subprocess on a free loopback port, driven by a plain msgpack socket client."""
from __future__ import annotations


from edgerec.process import PACKAGE_ROOT

import socket
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest

from edge_runtime import const


class Raw:
    """A plain msgpack socket client (no edgerec code), as any msgpack-rpc client would be."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.next_id = 1

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self):
        """Next message, or None when the daemon closed the connection."""
        while True:
            for msg in self.unpacker:
                return msg
            data = self.sock.recv(65536)
            if not data:
                return None
            self.unpacker.feed(data)

    def request(self, method, params=None):
        msgid = self.next_id
        self.next_id += 1
        self.send_raw(msgpack.packb([0, msgid, method, [params or {}]]))
        msg = self.read()
        assert msg is not None, "connection closed"
        assert msg[0] == 1 and msg[1] == msgid
        return msg[2], msg[3]

    def call(self, method, **params):
        err, res = self.request(method, params)
        assert err is None, err
        return res

    def close(self):
        self.sock.close()


@pytest.fixture
def raw(daemon):
    c = Raw(daemon[1])
    yield c
    c.close()


def assert_alive(port: int) -> None:
    """The daemon still answers a fresh client."""
    c = Raw(port)
    try:
        assert c.call("health")["status"] == "ok"
    finally:
        c.close()


# ------------------------------------------------------------------------------------------------ real behaviour
def test_recommend_real_users_k_distinct_valid_unseen(raw, beauty_data, tiny_manifest):
    catalog = set(beauty_data.item_ids)
    for u in range(20, 40):
        seq = [beauty_data.item_ids[t - 1] for t in beauty_data.sequences[u]]
        user = f"t1-{u}"
        assert raw.call("track_batch", events=[{"user": user, "item": i, "event": "view"} for i in seq]) == \
            {"ok": True, "count": len(seq)}
        res = raw.call("recommend", user=user, k=10)
        assert res["source"] == "model"
        assert res["model_version"] == tiny_manifest["model_version"]
        assert len(res["items"]) == 10 and len(set(res["items"])) == 10
        assert set(res["items"]) <= catalog
        assert not set(res["items"]) & set(seq)
        assert all(a >= b for a, b in zip(res["scores"], res["scores"][1:]))
        assert res["ignored"] == []


def test_tracked_item_leaves_next_result(raw, beauty_data):
    seq = [beauty_data.item_ids[t - 1] for t in beauty_data.sequences[5]]
    user = "t2"
    raw.call("track_batch", events=[{"user": user, "item": i, "event": "view"} for i in seq])
    first = raw.call("recommend", user=user, k=10)
    top = first["items"][0]
    assert raw.call("track", user=user, item=top, event="cart") == {"ok": True}
    second = raw.call("recommend", user=user, k=10)
    assert top not in second["items"]
    assert second["items"] != first["items"]
    # without exclude_seen the context item may come back, and the call is not served from the stale cache
    third = raw.call("recommend", user=user, k=10, exclude_seen=False)
    assert len(third["items"]) == 10


def test_history_then_session_and_cache(raw, beauty_data, tiny_bundle):
    from edge_runtime.serving.model import Model

    model = Model(tiny_bundle)
    seq = [beauty_data.item_ids[t - 1] for t in beauty_data.sequences[7]]
    user = "t3"
    raw.call("track", user=user, item=seq[-1], event="view")
    both = raw.call("recommend", user=user, history=seq[:-1], k=5)
    # reference: the same context through the in-process model and the same scan
    rows, _ = model.rows(seq)
    from edge_runtime import scoring
    ids, scores = scoring.topk(model.encode(rows), model.items, 5, item_scales=model.scales,
                               exclude=np.asarray(rows))
    assert both["items"] == [model.item_ids[i] for i in ids]
    np.testing.assert_allclose(both["scores"], scores, rtol=1e-5)
    h0 = raw.call("health")["cache_entries"]
    a = raw.call("recommend", user=user, k=5)
    b = raw.call("recommend", user=user, k=5)
    assert a == b
    assert raw.call("health")["cache_entries"] == h0 + 1


def test_unknown_user_gets_popularity(raw, tiny_bundle):
    pop = np.load(tiny_bundle / "popularity.npy")
    res = raw.call("recommend", user="never-seen-before", k=5)
    assert res["source"] == "popularity"
    from edge_runtime.serving.model import Model
    ids = Model(tiny_bundle).item_ids
    expected = [ids[i] for i in np.lexsort((np.arange(len(pop)), -pop))[:5]]
    assert res["items"] == expected


def test_unknown_items_are_ignored_and_kept(raw, beauty_data):
    known = beauty_data.item_ids[10]
    raw.call("track", user="t4", item="brand-new-sku", event="view")
    raw.call("track", user="t4", item=known, event="view")
    res = raw.call("recommend", user="t4", history=["other-new-sku"], k=5)
    assert res["ignored"] == ["other-new-sku", "brand-new-sku"]
    assert res["source"] == "model" and known not in res["items"]
    only_unknown = raw.call("recommend", history=["x1", "x2"], k=3)
    assert only_unknown["source"] == "popularity" and only_unknown["ignored"] == ["x1", "x2"]


def test_int_ids_are_normalized(raw, beauty_data):
    item = beauty_data.item_ids[3]
    assert item.isdigit()
    raw.call("track", user=12345, item=int(item), event="view")
    by_int = raw.call("recommend", user=12345, k=5)
    by_str = raw.call("recommend", user="12345", k=5)
    assert by_int == by_str and item not in by_int["items"]


def test_category_filter_and_availability(raw, tiny_bundle):
    from edge_runtime.serving.model import Model

    model = Model(tiny_bundle)
    ind = model.attr_indptr
    from conftest import attr_values

    vals = attr_values(tiny_bundle)
    counts = {}
    for v in vals:
        counts[v] = counts.get(v, 0) + 1
    cat = max(counts, key=counts.get)
    res = raw.call("recommend", history=[model.item_ids[0]], k=20, filters={"category": cat})
    assert len(res["items"]) == 20
    for it in res["items"]:
        r = model.index[it]
        assert cat in set(vals[ind[r]:ind[r + 1]])
    rare = min(counts, key=counts.get)
    few = raw.call("recommend", history=[model.item_ids[0]], k=50, filters={"category": [rare]})
    assert 0 < len(few["items"]) <= counts[rare]
    top = raw.call("recommend", history=[model.item_ids[0]], k=3)["items"]
    assert raw.call("set_availability", items=[top[0]], in_stock=False)["ok"]
    after = raw.call("recommend", history=[model.item_ids[0]], k=3)["items"]
    assert top[0] not in after and after[:2] == top[1:]
    raw.call("set_availability", items=[top[0]], in_stock=True)
    assert raw.call("recommend", history=[model.item_ids[0]], k=3)["items"] == top
    excl = raw.call("recommend", history=[model.item_ids[0]], k=3, filters={"exclude": [top[1]]})["items"]
    assert top[1] not in excl and excl[0] == top[0]


def test_model_info_and_health(raw, tiny_manifest):
    info = raw.call("model_info")
    assert info["model_version"] == tiny_manifest["model_version"]
    assert info["num_items"] == tiny_manifest["model"]["num_items"]
    assert set(info["metrics"]) - {"native_int8"} == {"pytorch_fp32", "onnx_fp32", "onnx_int8"}
    h = raw.call("health")
    assert h["status"] == "ok" and h["uptime_s"] > 0 and h["precision"] == "int8"


def test_pipelined_requests_answered_by_msgid(raw):
    frames = b"".join(msgpack.packb([0, 100 + i, "recommend", [{"history": [str(i + 1)], "k": 3}]])
                      for i in range(30))
    raw.send_raw(frames)
    ids = set()
    for _ in range(30):
        msg = raw.read()
        assert msg[0] == 1 and msg[2] is None and len(msg[3]["items"]) == 3
        ids.add(msg[1])
    assert ids == set(range(100, 130))


def test_notification_gets_no_reply_but_acts(raw):
    raw.send_raw(msgpack.packb([2, "track", [{"user": "t5", "item": "1", "event": "view"}]]))
    raw.send_raw(msgpack.packb([2, "track", [{"user": "t5"}]]))  # bad notification: no reply, nothing breaks
    res = raw.call("recommend", user="t5", k=5)
    assert res["source"] == "model" and "1" not in res["items"]


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("params, code, words", [
    ({"k": 0}, -32602, "'k' must be between 1"),
    ({"k": -3}, -32602, "'k' must be between 1"),
    ({"k": const.MAX_K + 1}, -32602, "'k' must be between 1"),
    ({"k": "10"}, -32602, "'k' must be an integer"),
    ({"k": True}, -32602, "'k' must be an integer"),
    ({"user": 1.5}, -32602, "'user' must be a string or an integer"),
    ({"user": ""}, -32602, "'user' must be 1 to"),
    ({"history": "1,2"}, -32602, "'history' must be an array"),
    ({"history": [1, None]}, -32602, "'history[1]'"),
    ({"history": ["1"] * (const.MAX_HISTORY_IDS + 1)}, -32602, "at most"),
    ({"exclude_seen": "yes"}, -32602, "'exclude_seen' must be true or false"),
    ({"filters": [1]}, -32602, "'filters' must be a map"),
    ({"filters": {"colour": "red"}}, -32602, "unknown parameter(s) ['colour']"),
    ({"filters": {"category": []}}, -32602, "at least one category"),
    ({"kk": 10}, -32602, "unknown parameter(s) ['kk']"),
])
def test_recommend_bad_params(daemon, raw, params, code, words):
    err, res = raw.request("recommend", params)
    assert res is None and err["code"] == code and words in err["message"], err
    assert raw.call("health")["status"] == "ok"   # same connection still served
    assert_alive(daemon[1])


@pytest.mark.parametrize("method, params, words", [
    ("track", {"user": "u", "item": "1"}, "missing required parameter 'event'"),
    ("track", {"user": "u", "event": "view"}, "missing required parameter 'item'"),
    ("track", {"user": "u", "item": "1", "event": "like"}, "'event' must be one of"),
    ("track", {"user": "u", "item": {"a": 1}, "event": "view"}, "'item' must be a string or an integer"),
    ("track", {"user": "u", "item": "1", "event": "view", "ts": "now"}, "'ts' must be a unix time"),
    ("track", {"user": "u", "item": "1", "event": "view", "ts": float("nan")}, "'ts' must be a unix time"),
    ("track_batch", {"events": {"user": "u"}}, "'events' must be an array"),
    ("track_batch", {}, "missing required parameter 'events'"),
    ("set_availability", {"items": ["1"]}, "missing required parameter 'in_stock'"),
])
def test_event_bad_params(daemon, raw, method, params, words):
    err, _ = raw.request(method, params)
    assert err["code"] == -32602 and words in err["message"], err
    assert_alive(daemon[1])


def test_track_batch_is_all_or_nothing(raw):
    events = [{"user": "t6", "item": "1", "event": "view"}, {"user": "t6", "item": "2", "event": "bogus"}]
    err, _ = raw.request("track_batch", {"events": events})
    assert err["code"] == -32602 and "events[1]" in err["message"]
    # nothing from the rejected batch was applied: t6 is still unknown
    assert raw.call("recommend", user="t6", k=3)["source"] == "popularity"


def test_unknown_method(daemon, raw):
    err, _ = raw.request("drop_tables")
    assert err["code"] == -32601 and "drop_tables" in err["message"]
    err, _ = raw.request(42)
    assert err["code"] == -32601
    assert_alive(daemon[1])


@pytest.mark.parametrize("frame", [
    [0, 7, "recommend"],                 # too short
    [0, 7, "recommend", {"k": 1}, 1],    # too long
    [5, 7, "recommend", []],             # unknown message type
    [0, "id", "recommend", []],          # msgid not an int
    [0, 7, "recommend", "k=10"],         # params neither array nor map
    [0, 7, "recommend", [1, 2]],         # params array not holding one map
])
def test_malformed_frames_get_errors_and_connection_survives(daemon, raw, frame):
    raw.send_raw(msgpack.packb(frame))
    msg = raw.read()
    assert msg[0] == 1 and msg[3] is None
    assert msg[2]["code"] in (-32600, -32602), msg
    if isinstance(frame[1], int) and frame[0] == 0:
        assert msg[1] == 7
    assert raw.call("health")["status"] == "ok"
    assert_alive(daemon[1])


def test_non_array_frame_closes_connection(daemon, raw):
    raw.send_raw(msgpack.packb({"method": "recommend"}))
    msg = raw.read()
    assert msg[2]["code"] == -32600 and "array" in msg[2]["message"]
    assert raw.read() is None
    assert_alive(daemon[1])


def test_garbage_bytes_close_connection(daemon):
    c = Raw(daemon[1])
    c.send_raw(b"\xc1\xc1\xc1 this is not msgpack")   # 0xc1 is never valid MessagePack
    msg = c.read()
    assert msg is not None and msg[2]["code"] == -32700
    assert c.read() is None
    c.close()
    assert_alive(daemon[1])


@pytest.mark.parametrize("payload", [
    b"\x91" * 100_000,                      # 100,000 nested one-element arrays (a stack bomb)
    b"\xdd\xff\xff\xff\xff" + b"\x00" * 64,  # array32 declaring 4,294,967,295 elements
    b"\xdb\xff\xff\xff\x00" + b"a" * (const.MAX_FRAME_BYTES + 1),  # str32 declaring ~4 GB, then 1 MiB of it
])
def test_hostile_frames_close_only_that_connection(daemon, payload):
    c = Raw(daemon[1])
    other = Raw(daemon[1])
    try:
        c.send_raw(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        msg = c.read()
        assert msg is None or msg[2]["code"] in (-32700, -32001), msg
        if msg is not None:
            assert c.read() is None
    except ConnectionResetError:
        pass
    c.close()
    assert other.call("health")["status"] == "ok"
    other.close()
    assert_alive(daemon[1])


def test_oversized_frame_rejected(daemon):
    c = Raw(daemon[1])
    big = msgpack.packb([0, 1, "track_batch", [{"events": [{"user": "u" * 200, "item": "i" * 200,
                                                             "event": "view"}] * 5000}]])
    assert len(big) > const.MAX_FRAME_BYTES
    try:
        c.send_raw(big)
    except (BrokenPipeError, ConnectionResetError):
        pass
    msg = c.read()
    assert msg is not None and msg[2]["code"] == -32001 and "larger than" in msg[2]["message"]
    assert c.read() is None
    c.close()
    assert_alive(daemon[1])


def test_client_that_disconnects_mid_request(daemon):
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", daemon[1]))
        s.sendall(msgpack.packb([0, 1, "recommend", [{"history": ["1"], "k": 100}]])[:-3])
        s.close()
        s = socket.create_connection(("127.0.0.1", daemon[1]))
        s.sendall(msgpack.packb([0, 1, "recommend", [{"history": ["1"], "k": 100}]]))
        s.close()
    time.sleep(0.2)
    assert_alive(daemon[1])


def test_pipelined_flood_is_bounded_and_loses_nothing(daemon):
    """A client that sends 3,000 requests without reading any reply neither starves others nor loses replies."""
    flood = Raw(daemon[1])
    frames = b"".join(msgpack.packb([0, i, "recommend", [{"history": [str(1 + i % 50)], "k": 50}]])
                      for i in range(3000))
    sender = __import__("threading").Thread(target=flood.send_raw, args=(frames,))
    sender.start()
    assert_alive(daemon[1])                   # answered while the flood is pending
    got = set()
    for _ in range(3000):
        msg = flood.read()
        assert msg[2] is None and len(msg[3]["items"]) == 50
        got.add(msg[1])
    sender.join()
    assert got == set(range(3000))
    flood.close()


def test_half_closed_client_gets_its_replies(daemon):
    s = socket.create_connection(("127.0.0.1", daemon[1]), timeout=10)
    s.sendall(b"".join(msgpack.packb([0, i, "recommend", [{"history": ["1"], "k": 5}]]) for i in range(20)))
    s.shutdown(socket.SHUT_WR)
    unpacker, replies = msgpack.Unpacker(raw=False), []
    while True:
        data = s.recv(65536)
        if not data:
            break
        unpacker.feed(data)
        replies.extend(unpacker)
    s.close()
    assert sorted(r[1] for r in replies) == list(range(20)) and all(r[2] is None for r in replies)


@pytest.mark.parametrize("frame", [[0.0, 1, "health", []], [False, 1, "health", []], [0, -5, "health", []],
                                   [0, 2 ** 40, "health", []]])
def test_kind_and_msgid_must_be_msgpack_rpc_integers(raw, frame):
    raw.send_raw(msgpack.packb(frame))
    msg = raw.read()
    assert msg[2]["code"] == -32600 and msg[1] is None


def test_deeply_nested_values_get_invalid_params(daemon, raw):
    deep = "view"
    for _ in range(900):
        deep = [deep]
    err, _ = raw.request("track", {"user": "u", "item": "1", "event": deep})
    assert err["code"] == -32602 and len(err["message"]) < 300
    raw.send_raw(b"\x94" + b"\x91" * 900 + b"\x00\x01\xa6health\x90")
    msg = raw.read()
    assert msg is not None and msg[2]["code"] == -32600
    assert_alive(daemon[1])


def test_batch_errors_name_the_event(raw):
    err, _ = raw.request("track_batch", {"events": [{"user": "u", "item": "1", "event": "view"},
                                                    {"user": "u", "item": "1", "event": "view", "ts": 1e308}]})
    assert err["code"] == -32602 and "events[1].ts" in err["message"]
    err, _ = raw.request("track_batch", {"events": [{"user": None, "item": "1", "event": "view"}]})
    assert "events[0].user" in err["message"]


def test_many_unknown_out_of_stock_ids(raw, tiny_bundle):
    ghosts = [f"ghost-{i}" for i in range(10_000)]
    assert raw.call("set_availability", items=ghosts, in_stock=False)["out_of_stock"] == 10_000
    res = raw.call("recommend", history=["1"], k=5)
    assert len(res["items"]) == 5
    assert raw.call("set_availability", items=ghosts, in_stock=True)["out_of_stock"] == 0


# ------------------------------------------------------------------------------------------------ lifecycle
def test_unix_socket_and_sigterm(tiny_bundle, tmp_path):
    from edge_runtime.client import Client
    from edgerec.process import free_port, start_daemon, stop_daemon

    path = str(tmp_path / "edgerec.sock")
    proc = start_daemon(tiny_bundle, free_port(), ["--unix", path])
    try:
        with Client(unix=path) as c:
            assert c.call("recommend", history=["1", "2"], k=4)["source"] == "model"
    finally:
        assert stop_daemon(proc) == 0
    assert "stopped" in proc.stderr.read()


def test_trickled_frame_and_idle_connections_are_closed(tiny_bundle):
    from edgerec.process import free_port, start_daemon, stop_daemon

    port = free_port()
    proc = start_daemon(tiny_bundle, port, ["--stalled-frame-seconds", "1.0", "--idle-seconds", "1.5"])
    try:
        frame = msgpack.packb([0, 1, "recommend", [{"user": "x" * 200}]])
        trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        closed_at = None
        start = time.monotonic()
        for i in range(20):            # one byte every 0.2 s: 4 s of bytes for a frame due within 1 s
            try:
                trickle.sendall(frame[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed_at = time.monotonic() - start
                break
            time.sleep(0.2)
        if closed_at is None:
            trickle.settimeout(5)
            data = b""
            while True:
                chunk = trickle.recv(65536)
                if not chunk:
                    break
                data += chunk
            assert b"stalled" in data
        idle.settimeout(5)
        assert idle.recv(1) == b""     # closed by the daemon after 1.5 s without traffic
        assert_alive(port)
    finally:
        assert stop_daemon(proc) == 0


def test_a_connection_in_use_outlives_the_idle_deadline(tiny_bundle):
    """The idle deadline counts from the last bytes received: requests every 0.4 s keep a connection open for 3 s
    past a 1 s deadline, and once they stop it is closed about 1 s later."""
    from edge_runtime.client import Client
    from edgerec.process import free_port, start_daemon, stop_daemon

    port = free_port()
    proc = start_daemon(tiny_bundle, port, ["--idle-seconds", "1.0"])
    try:
        with Client("127.0.0.1", port, timeout=5) as c:
            start = time.monotonic()
            while True:
                assert c.call("health")["status"] == "ok"
                quiet = time.monotonic()
                if quiet - start > 3.0:
                    break
                time.sleep(0.4)
            c.sock.settimeout(5)
            assert c.sock.recv(1) == b""        # closed by the daemon
            assert 0.8 <= time.monotonic() - quiet <= 3.0
    finally:
        assert stop_daemon(proc) == 0


def test_unix_socket_of_a_live_daemon_is_not_taken_over(tiny_bundle, tmp_path):
    from edge_runtime.client import Client
    from edgerec.process import free_port, start_daemon, stop_daemon

    path = str(tmp_path / "d.sock")
    first = start_daemon(tiny_bundle, free_port(), ["--unix", path])
    try:
        second = subprocess.run([sys.executable, "-m", "edgerec", "serve", "--bundle", str(tiny_bundle),
                                 "--port", "-1", "--unix", path], capture_output=True, text=True, timeout=60,
                                cwd=PACKAGE_ROOT)
        assert second.returncode == 2 and "another process is listening" in second.stderr
        with Client(unix=path) as c:
            assert c.call("health")["status"] == "ok"
    finally:
        assert stop_daemon(first) == 0


def test_refuses_tampered_bundle(tiny_bundle, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    arr = np.load(bad / "items.i8.npy")
    arr[0, 0] ^= 1
    np.save(bad / "items.i8.npy", arr)
    out = subprocess.run([sys.executable, "-m", "edgerec", "serve", "--bundle", str(bad), "--port", "0"],
                         capture_output=True, text=True, timeout=60, cwd=PACKAGE_ROOT)
    assert out.returncode == 2
    assert "items.i8.npy" in out.stderr and "checksum" in out.stderr
