"""Fuzzing real daemons with hypothesis (issue 15, point 6), through bench/fuzz_rpc.py's strategies and runner: a
node (event log, model sync, shipping to the collector), a registry with the collector, and a node with an access
token that is fuzzed without ever authenticating. Random bytes, random MessagePack values, hand-crafted
encodings, requests and notifications for every method; after every case the process must be alive and answer
``health`` on a fresh connection, and every case must end in its replies or a clean close within 5 s."""
from __future__ import annotations

import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings

from edge_runtime.errors import INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR

BENCH = Path(__file__).resolve().parents[2] / "bench"
CASES = {"node": 1500, "registry": 1000, "node-auth": 500}   # ~15 s of fuzzing on 2 cores


def _fuzz_rpc():
    sys.path.insert(0, str(BENCH))
    try:
        import fuzz_rpc
    finally:
        sys.path.remove(str(BENCH))
    return fuzz_rpc


@pytest.fixture(scope="module")
def fuzzed(tiny_bundle, tmp_path_factory):
    """The report of one fuzz run over every target (``fuzz_rpc.target_specs()``), with a fixed seed."""
    fz = _fuzz_rpc()
    work = tmp_path_factory.mktemp("fuzz")
    with fz.started_targets(tiny_bundle, work, printer=lambda *a: None) as targets:
        report = fz.run_fuzz(targets, {t.name: CASES[t.name] for t in targets}, seed=15, max_seconds=300,
                             printer=lambda *a: None)
    fz.print_report(report)   # shown with -s, and beside a failure
    return report


def test_strategies_make_the_frames_they_promise():
    """No process: the method table covers every method the code builds, and the request / named / notify
    strategies make frames of the promised shape, for methods of the service."""
    fz = _fuzz_rpc()
    for service in fz.SERVICES:
        methods = fz.code_methods(service)
        assert len(methods) >= 8 and fz.check_table(methods) == [], service
        seen = {"request": 0, "named": 0, "notify": 0, "named_real_keys": 0}

        def check(case):
            msg = msgpack.unpackb(case.payload, raw=False, strict_map_key=False)
            seen[case.kind] += 1
            if case.kind == "notify":
                assert len(msg) == 3 and msg[0] == 2 and case.expect == "silent"
                return
            assert len(msg) == 4 and msg[0] == 0 and msg[2] in methods and case.method == msg[2]
            assert case.reply_id == (msg[1] if fz._valid_msgid(msg[1]) else None)
            if case.kind == "named":
                params = msg[3][0] if isinstance(msg[3], list) and msg[3] and isinstance(msg[3][0], dict) else msg[3]
                names = fz.METHOD_PARAMS[msg[2]]
                if isinstance(params, dict) and names and params and all(k in names for k in params):
                    seen["named_real_keys"] += 1

        for kind in ("request", "named", "notify"):
            settings(max_examples=80, database=None, deadline=None, phases=[Phase.generate],
                     suppress_health_check=list(HealthCheck))(given(fz.frame_strategy(service, kind))(check))()
        assert all(n > 10 for n in seen.values()), seen


def test_fuzz_no_crash_no_hang_every_service_answering(fuzzed):
    rep = fuzzed
    fz = _fuzz_rpc()
    assert {"node", "registry"} <= set(rep["targets"])
    assert rep["stopped_early"] is None and rep["fuzzer_errors"] == []
    assert rep["crashes"] == 0 and rep["hangs"] == 0, rep["failures"]
    assert rep["all_answering"]
    for name, d in rep["targets"].items():
        assert d["answering"] and d["alive"], (name, d["answering_detail"])
        # the real numbers: every case of every kind ran, each followed by a health check on a fresh connection
        assert d["cases"] == d["requested"] == CASES[name], name
        assert d["kinds"] == fz.split_kinds(CASES[name]) and min(d["kinds"].values()) >= 25, d["kinds"]
        assert d["health_checks"] >= d["cases"]
        # the methods: listed by the daemon itself, all in the table, each one fuzzed
        assert d["method_source"] == "live" and d["methods_untabled"] == [], d["methods_untabled"]
        assert set(fz.code_methods(d["service"])) <= set(d["methods_served"])
        assert d["methods_not_hit"] == [], d["methods_not_hit"]
        assert min(d["methods"][m] for m in d["methods_served"]) >= (1 if name == "node-auth" else 3), d["methods"]
        # the cases reached the framing, the dispatcher and the handlers
        codes = {int(c): n for c, n in d["error_codes"].items()}
        assert d["replies"] >= 0.8 * d["cases"], d["replies"]
        assert codes.get(PARSE_ERROR, 0) >= 5 and codes.get(INVALID_REQUEST, 0) >= 20, codes
        assert codes.get(METHOD_NOT_FOUND, 0) >= 0.03 * d["cases"], codes
        if name == "node-auth":
            from edge_runtime.errors import NOT_PERMITTED
            assert codes.get(NOT_PERMITTED, 0) >= 0.2 * d["cases"], codes
        else:
            assert codes.get(INVALID_PARAMS, 0) >= 0.2 * d["cases"], codes
            assert d["successes"] >= 0.03 * d["cases"], d["successes"]
    node = rep["targets"]["node"]
    assert sum(node["method_successes"].get(m, 0) for m in ("track", "track_batch")) >= 1, node["method_successes"]
    assert node["health_after"]["events"]["committed"] > 0   # stored (sessions: a fuzzed forget may erase them)
    assert rep["targets"]["registry"]["method_successes"].get("ingest", 0) >= 1   # batches the collector stored


def test_fuzz_replies_are_well_formed(fuzzed):
    """Every reply a well-formed response with a known error code, none to a notification or to a msgid nobody
    sent, every valid request answered, nothing succeeds without authentication (internal errors: next test)."""
    rep = fuzzed
    wrong = {k: n for k, n in rep["unexpected_by_category"].items() if k != "internal_error"}
    assert wrong == {}, [f for f in rep["failures"] if f.get("category") != "internal_error"]


def test_fuzz_no_handler_raised(fuzzed):
    """No InternalError reply (a handler raised something that is not an EdgeRuntimeError) and no traceback in the
    daemons' logs (a notification's handler that raises shows only there)."""
    rep = fuzzed
    internal = [f for f in rep["failures"] if f.get("category") == "internal_error"]
    assert rep["unexpected_by_category"].get("internal_error", 0) == 0, internal
    logged = {n: d["log_error_samples"][:1] for n, d in rep["targets"].items() if d["log_errors"]}
    assert logged == {}, logged
