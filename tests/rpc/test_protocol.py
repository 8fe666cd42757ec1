"""rpc/protocol.py and rpc/methods.py alone: reply matching, message kinds, the method table, the parameter checks;
and config.env_value, the one reader of the EDGEREC_* switches (old EDGE_RUNTIME_* names still read)."""
from __future__ import annotations

import logging

import msgpack
import pytest

from edge_runtime import config, const
from edge_runtime.errors import InvalidParams, MethodNotFound, RpcError
from edge_runtime.rpc import protocol
from edge_runtime.rpc.methods import MethodTable, as_id, as_id_list, as_int, as_ts, check_keys


def test_replies_match_by_msgid_out_of_order_and_in_pieces():
    r = protocol.Replies()
    wire = protocol.pack_response(2, None, {"b": 2}) + protocol.pack_response(1, None, [1]) + \
        msgpack.packb([protocol.NOTIFICATION, "x", []]) + protocol.pack_response(3, {"code": -32602, "name": "Bad",
                                                                                      "message": "no"}, None)
    r.feed(wire[:5])
    assert r.take(2) == (False, None)
    r.feed(wire[5:])
    assert r.take(1) == (True, [1])
    assert r.take(2) == (True, {"b": 2})
    assert r.take(2) == (False, None)          # taken once
    with pytest.raises(RpcError) as e:
        r.take(3)
    assert (e.value.code, e.value.name, e.value.message) == (-32602, "Bad", "no")


def test_request_and_notification_frames_follow_the_spec():
    assert msgpack.unpackb(protocol.pack_request(7, "recommend", {"k": 3})) == [0, 7, "recommend", [{"k": 3}]]
    assert msgpack.unpackb(protocol.pack_notification("track", {"user": "u"})) == [2, "track", [{"user": "u"}]]
    ids = protocol.MsgIds()
    ids._next = const.MAX_MSGID
    assert ids() == 0 and ids() == 1          # uint32 wrap


def test_params_map_and_error_objects():
    assert protocol.params_map([]) == {} and protocol.params_map([{"a": 1}]) == {"a": 1}
    assert protocol.params_map({"a": 1}) == {"a": 1}
    for bad in ([1], [{"a": 1}, {}], "x", None):
        with pytest.raises(InvalidParams):
            protocol.params_map(bad)
    assert protocol.error_object(InvalidParams("k"))["code"] == -32602
    leaked = protocol.error_object(KeyError("secret path"))
    assert leaked == {"code": -32603, "name": "InternalError", "message": "internal error: KeyError"}


def test_method_table_lookup_and_checks():
    t = MethodTable({"health": (lambda p: {"ok": True}, False)})
    t.add("recommend", lambda p: None, is_async=True)
    assert t.lookup("health")[0]({}) == {"ok": True} and t.lookup("recommend")[1] is True
    with pytest.raises(MethodNotFound, match="unknown method 'nope'; methods: \\['health', 'recommend'\\]"):
        t.lookup("nope")
    with pytest.raises(MethodNotFound, match="must be a string, got int"):
        t.lookup(3)
    other = MethodTable({"fetch": (len, False), "latest": (len, False)})
    t.update(other, ("fetch",))
    assert "fetch" in t and "latest" not in t
    with pytest.raises(InvalidParams, match="unknown parameter"):
        check_keys({"k": 1, "zz": 2}, ("k",), (), "recommend")
    with pytest.raises(InvalidParams, match="missing required parameter 'user'"):
        check_keys({}, ("user",), ("user",), "track")
    assert as_id(42, "item") == "42"
    for bad in (True, 1.5, "", "x" * (const.MAX_ID_CHARS + 1)):
        with pytest.raises(InvalidParams):
            as_id(bad, "item")
    ids = ["a", "b" * const.MAX_ID_CHARS]
    got = as_id_list(ids, "history", 5)
    assert got == ids and got is not ids                      # a copy: the caller's list is not kept
    assert as_id_list(("a", 7), "history", 5) == ["a", "7"]   # ints normalized on the checked path
    for second in ("", "x" * (const.MAX_ID_CHARS + 1), None, True, 1.5):   # the element that fails is named
        with pytest.raises(InvalidParams, match="'history\\[1\\]'"):
            as_id_list(["a", second, "c"], "history", 5)
    with pytest.raises(InvalidParams, match="at most 1 are accepted"):
        as_id_list(["a", "b"], "history", 1)
    with pytest.raises(InvalidParams, match="between 1 and 1000"):
        as_int(0, "k", 1, 1000)
    with pytest.raises(InvalidParams):
        as_ts(float("nan"), "ts")


def test_env_value_prefers_the_new_prefix_and_reports_the_old_once(caplog):
    config._warned.discard("EDGE_RUNTIME_TEST_SWITCH")
    env = {"EDGE_RUNTIME_TEST_SWITCH": "yes"}
    with caplog.at_level(logging.WARNING, logger="edge_runtime.config"):
        assert config.env_value("TEST_SWITCH", env) == "yes" and config.env_flag("TEST_SWITCH", env)
        assert config.env_value("TEST_SWITCH", env) == "yes"
    lines = [r.getMessage() for r in caplog.records if "EDGE_RUNTIME_TEST_SWITCH" in r.getMessage()]
    assert len(lines) == 1 and "EDGEREC_TEST_SWITCH" in lines[0]
    assert config.env_value("TEST_SWITCH", {"EDGEREC_TEST_SWITCH": "0", **env}) == "0"
    assert config.env_value("TEST_SWITCH", {}) is None and not config.env_flag("TEST_SWITCH", {})
