"""Roles, tokens, TLS and connection floods (``rpc/auth.py``, ``rpc/tls.py``, ``rpc/server.py``, ``ops/security.py``)
on real processes over loopback: a registry with its collector and a node that follows it, every method of each
called by every role and by a connection without one."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest

from edge_runtime import const
from edge_runtime.bundle import signing
from edge_runtime.bundle.store import publish
from edge_runtime.client import Client, RpcError
from edge_runtime.errors import AUTH_FAILED, FRAME_TOO_LARGE, NOT_PERMITTED, ConfigError
from edge_runtime.ops import security
from edge_runtime.rpc.auth import OPEN, ROLE_OF, ROLES, Authenticator, read_token_file, write_token_file
from edge_runtime.rpc.tls import client_context
from edgerec.process import PACKAGE_ROOT, free_port, start_daemon, stop_daemon

from tls_pki import issue, make_ca

PSEUDONYM = "ab" * 16
PER_ADDRESS = 64   # the guarded node's per-address cap


def _edgerec(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgerec", *args], capture_output=True, text=True, cwd=PACKAGE_ROOT,
                          timeout=120, **kw)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tokens")
    out = {}
    for role in ROLES:
        res = _edgerec("keygen", "--token", role, "--out", str(d / f"{role}.token"))
        assert res.returncode == 0, res.stderr
        out[role] = d / f"{role}.token"
    return out


def _token(path: Path) -> str:
    return read_token_file(path)[0]


def _token_flags(tokens: dict[str, Path], roles=ROLES) -> list[str]:
    return [a for r in roles for a in ("--token-file", f"{r}={tokens[r]}")]


def _call(port: int, role: str | None, tokens: dict, method: str, params: dict, **kw):
    """(result, None) or (None, error code) of one call on a fresh connection with ``role``'s token."""
    with Client("127.0.0.1", port, timeout=10, token=_token(tokens[role]) if role else None, **kw) as c:
        try:
            return c.call(method, **params), None
        except RpcError as exc:
            return None, exc.code


def _methods(port: int, tokens: dict) -> list[str]:
    """The live method table, from the list a MethodNotFound error carries."""
    with Client("127.0.0.1", port, timeout=10, token=_token(tokens["ops"])) as c:
        with pytest.raises(RpcError) as err:
            c.call("no_such_method")
    return sorted(json.loads(re.search(r"methods: (\[.*\])", err.value.message).group(1).replace("'", '"')))


# --------------------------------------------------------------------------------------------- units (no processes)
def test_tokens_files_and_constant_time_lookup(tmp_path, tokens):
    t = _token(tokens["shop"])
    assert re.fullmatch(r"[0-9a-f]{64}", t)
    assert stat.S_IMODE(tokens["shop"].stat().st_mode) == 0o600
    res = _edgerec("keygen", "--token", "shop", "--out", str(tokens["shop"]))
    assert res.returncode == 2 and "exists" in res.stderr and _token(tokens["shop"]) == t   # never overwritten
    a = Authenticator({"shop": [t, "x" * 40], "ops": [_token(tokens["ops"])]})
    assert a.enforced and a.token_count == 3
    assert a.role_of_token(t) == "shop" and a.role_of_token("x" * 40) == "shop"
    assert a.role_of_token(_token(tokens["ops"])) == "ops"
    assert a.role_of_token(t[:-1] + ("0" if t[-1] != "0" else "1")) is None and a.role_of_token("") is None
    assert not Authenticator().enforced and Authenticator(cert_role="peer").enforced
    with pytest.raises(ConfigError, match="unknown role 'admin'"):
        Authenticator({"admin": [t]})
    # a file others can read, a short line, an empty file: refused, the line never quoted
    loose = tmp_path / "loose.token"
    loose.write_text(t + "\n")
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by group or others"):
        read_token_file(loose)
    short = tmp_path / "short.token"
    write_token_file(short)
    short.write_text("# rotated 2026-12\n" + "tooshort-secret\n")
    with pytest.raises(ConfigError, match="line 2: not a token") as err:
        read_token_file(short)
    assert "tooshort-secret" not in str(err.value)
    two = tmp_path / "two.token"
    write_token_file(two)
    two.write_text(f"{t}\n\n# next\n{'y' * 64}\n")
    assert read_token_file(two) == [t, "y" * 64]


def test_every_method_of_every_service_has_one_role(tmp_path):
    """The method tables as the code builds them (the live ones are checked over RPC below)."""
    import concurrent.futures

    from edge_runtime.fleet.collector import CollectorStore
    from edge_runtime.fleet.registry import PEER_METHODS, RegistryService
    from edge_runtime.serving.service import Service

    assert set(OPEN) == {"auth", "health"}
    assert sum(len(ms) for ms in ROLES.values()) == len(ROLE_OF)   # no method in two roles
    store = CollectorStore(tmp_path / "c.db")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        tables = {"node": set(Service(None, pool).methods) | set(PEER_METHODS) | {"rollback", "stats", "reload"},
                  "registry": set(RegistryService(tmp_path / "reg").methods), "collector": set(store.methods())}
    store.close()
    for service, names in tables.items():
        assert names - set(ROLE_OF) - set(OPEN) == set(), service
    assert {ROLE_OF[m] for m in tables["collector"]} == {"peer"}
    assert {ROLE_OF[m] for m in tables["registry"] - set(OPEN)} == {"peer"}


def test_listen_check_names_the_settings(caplog):
    none = Authenticator()
    with pytest.raises(ConfigError, match=r"server.insecure_listen.*") as err:
        security.check_listen(["0.0.0.0"], none, None, False, "node")
    assert "tls.cert_file" in str(err.value) and "auth.token_files" in str(err.value)
    for host in ("127.0.0.1", "127.9.9.9", "::1", "localhost"):
        security.check_listen([host], none, None, False, "node")   # loopback: fine without anything
    assert not security.is_loopback_host("192.168.1.10") and not security.is_loopback_host("::")
    with caplog.at_level(logging.WARNING, logger="edgerec"):
        security.check_listen(["10.1.2.3"], none, None, True, "registry")
    assert "insecure_listen = true" in caplog.text and "every method" in caplog.text


@pytest.mark.parametrize("flags,missing", [
    ([], ("TLS", "tokens")),
    (["--token-file", "shop={shop}"], ("TLS",)),
])
def test_serve_and_registry_refuse_a_public_address_unprotected(tmp_path, tiny_bundle, tokens, flags, missing):
    flags = [f.format(shop=tokens["shop"]) for f in flags]
    res = _edgerec("serve", "--bundle", str(tiny_bundle), "--host", "0.0.0.0", "--port", "0", "--no-discovery",
                   *flags)
    assert res.returncode == 2
    assert "refusing to listen on 0.0.0.0" in res.stderr and "server.insecure_listen" in res.stderr
    for m in missing:
        assert f"without {m}" in res.stderr
    res = _edgerec("registry", "--bundles", str(tmp_path / "reg"), "--host", "0.0.0.0", "--port", "0",
                   "--no-discovery", *flags)
    assert res.returncode == 2 and "registry: refusing to listen on 0.0.0.0" in res.stderr


# ------------------------------------------------------------------------------------------------ the role table
@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_bundle, tokens):
    """A registry (v1, v2 published; the collector on) and a node following it, both with every role's token."""
    d = tmp_path_factory.mktemp("fleet")
    signing.keygen(d / "trainer")
    publish(tiny_bundle, d / "reg", d / "trainer.key", version="v1")
    rport, nport = free_port(), free_port()
    reg = start_daemon(None, rport, ["--bundles", str(d / "reg"), "--collect", str(d / "col"), "--no-discovery",
                                     *_token_flags(tokens)], command="registry", log_path=d / "registry.log")
    node = None
    try:
        node = start_daemon(None, nport, ["--state-dir", str(d / "state"), "--trusted-key", str(d / "trainer.pub"),
                                          "--registry", f"127.0.0.1:{rport}", "--no-discovery", "--poll-seconds",
                                          "0.5", *_token_flags(tokens)], log_path=d / "node.log")
        for version in ("v1", "v2"):   # two versions on the node: rollback has one to go back to
            if version == "v2":
                publish(tiny_bundle, d / "reg", d / "trainer.key", version="v2")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                h, _ = _call(nport, None, tokens, "health", {})
                if h.get("model_version") == version:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError(f"the node did not sync {version} over authenticated peer calls: {h}")
        yield {"reg": rport, "node": nport, "col": d / "col" / const.COLLECTOR_DB, "dir": d}
    finally:
        if node is not None:
            stop_daemon(node)
        stop_daemon(reg)


def _item(port, tokens) -> list[str]:
    res, err = _call(port, "shop", tokens, "recommend", {"history": ["1", "2"], "k": 5})
    assert err is None
    return res["items"]


def _node_params(port, tokens) -> dict[str, dict]:
    items = _item(port, tokens)
    return {
        "recommend": {"user": "table-u1", "k": 5},
        "track": {"user": "table-u1", "item": items[0], "event": "view"},
        "track_batch": {"events": [{"user": "table-u1", "item": items[1], "event": "cart"}]},
        "add_items": {"items": [{"id": "table-new-item"}]},
        "health": {},
        "set_availability": {"items": [items[0]], "in_stock": False},
        "rollback": {},
        "forget": {"user": "table-u2"},
        "session": {"user": "table-u2"},
        "stats": {},
        "model_info": {},
        "reload": {},
        "versions": {},
        "manifest": {"version": "v2"},
        "fetch": {"version": "v2", "file": _a_file(port, tokens), "length": 16},
    }


def _a_file(port, tokens) -> str:
    rep, err = _call(port, "peer", tokens, "manifest", {"version": "v2"})
    assert err is None
    return sorted(json.loads(rep["manifest"])["files"])[0]


def _node_state(port, tokens) -> tuple:
    """What a forbidden call could change: sessions, stock, the catalog, the model served, the events stored."""
    s1, _ = _call(port, "ops", tokens, "session", {"user": "table-u1"})
    s2, _ = _call(port, "ops", tokens, "session", {"user": "table-u2"})
    rec, _ = _call(port, "shop", tokens, "recommend", {"history": ["1", "2", "table-new-item"], "k": 20,
                                                        "exclude_seen": False})
    h, _ = _call(port, None, tokens, "health", {})
    stats, _ = _call(port, "ops", tokens, "stats", {})
    return (json.dumps(s1, sort_keys=True), json.dumps(s2, sort_keys=True), tuple(rec["items"]),
            tuple(rec["ignored"]), h["model_version"], stats["edgerec_events_committed_total"])


def _registry_params(port, tokens) -> dict[str, dict]:
    return {
        "latest": {"channel": "stable"}, "versions": {}, "manifest": {"version": "v2"},
        "fetch": {"version": "v2", "file": _a_file(port, tokens), "length": 16}, "health": {},
        "ingest": {"node": "table-node", "after": 0, "events": [[1, PSEUDONYM, "7", "view", time.time() - 5]]},
        "ingest_cursor": {"node": "table-node"},
        "ingest_forget": {"node": "table-node", "user": PSEUDONYM},
    }


def _registry_state(fleet, tokens) -> tuple:
    cur, _ = _call(fleet["reg"], "peer", tokens, "ingest_cursor", {"node": "table-node"})
    with sqlite3.connect(fleet["col"]) as db:
        rows = db.execute("SELECT count(*) FROM events").fetchone()[0]
    latest, _ = _call(fleet["reg"], "peer", tokens, "latest", {"channel": "stable"})
    return json.dumps(cur, sort_keys=True), rows, latest["version"]


def _check_table(port, tokens, params: dict, state) -> dict:
    methods = _methods(port, tokens)
    assert set(methods) == set(params), f"the test must call every method: {set(methods) ^ set(params)}"
    assert all(m in ROLE_OF for m in methods), "every method has a role"
    before = state()
    tried = 0
    for role in (None, "shop", "ops", "peer"):
        for m in methods:
            if m in OPEN or ROLE_OF[m] == role:
                continue
            res, code = _call(port, role, tokens, m, params[m])
            assert code == NOT_PERMITTED, f"{m} by {role}: {res!r} {code}"
            tried += 1
    assert state() == before, "a refused call changed something"
    results = {}
    for role in ("shop", "ops", "peer"):
        for m in methods:
            if ROLE_OF[m] == role:
                res, code = _call(port, role, tokens, m, params[m])
                assert code is None, f"{m} by its own role {role} failed with {code}"
                results[m] = res
    for m in OPEN:
        if m in methods:
            assert _call(port, None, tokens, m, params[m])[1] is None
    assert tried >= len(methods)
    return results


def test_role_table_node(fleet, tokens):
    port = fleet["node"]
    _call(port, "shop", tokens, "track", {"user": "table-u2", "item": _item(port, tokens)[0], "event": "view"})
    res = _check_table(port, tokens, _node_params(port, tokens), lambda: _node_state(port, tokens))
    # what the permitted calls did is real: stock, erasure, rollback, the new item
    assert res["rollback"]["from"] == "v2" and res["rollback"]["to"] == "v1"
    assert res["forget"]["removed"] == 1 and res["session"]["events"] == []
    assert res["set_availability"]["out_of_stock"] == 1
    assert len(res["fetch"]["data"]) == 16 and res["versions"]
    after, _ = _call(port, "shop", tokens, "recommend", {"history": ["table-new-item"], "k": 5})
    assert after["ignored"] == []
    # health without a role: liveness and the model only; with one: everything
    public, _ = _call(port, None, tokens, "health", {})
    assert set(public) == {"status", "model_version", "uptime_s", "offline"}
    full, _ = _call(port, "shop", tokens, "health", {})
    assert {"sessions", "sync", "events"} <= set(full)


def test_role_table_registry_and_collector(fleet, tokens):
    res = _check_table(fleet["reg"], tokens, _registry_params(fleet["reg"], tokens),
                       lambda: _registry_state(fleet, tokens))
    assert res["ingest"]["acked"] == 1 and res["latest"]["version"] == "v2"


def test_auth_failures_close_the_connection_and_are_counted(fleet, tokens):
    port = fleet["node"]
    before, _ = _call(port, "ops", tokens, "stats", {})
    with Client("127.0.0.1", port, timeout=10) as c:
        codes = []
        for attempt in range(const.AUTH_MAX_FAILURES):
            try:
                c.call("auth", token=f"wrong-{attempt}-" + "0" * 60)
            except RpcError as exc:
                codes.append(exc.code)
        assert codes == [AUTH_FAILED] * const.AUTH_MAX_FAILURES
        with pytest.raises(OSError):   # closed after the last failure
            c.call("health")
    after, _ = _call(port, "ops", tokens, "stats", {})
    assert after["edgerec_auth_failures_total"] - before.get("edgerec_auth_failures_total", 0) == 3
    closed = {r["reason"]: r["value"] for r in after["edgerec_connections_closed"]}
    assert closed["auth_failures"] >= 1
    # the token never reaches a log line
    log = (fleet["dir"] / "node.log").read_text()
    assert "wrong-0-" not in log and all(_token(tokens[r]) not in log for r in ROLES)
    # an authenticated connection cannot switch roles
    with Client("127.0.0.1", port, timeout=10, token=_token(tokens["shop"])) as c:
        with pytest.raises(RpcError, match="has the 'shop' role already"):
            c.call("auth", token=_token(tokens["ops"]))
        assert c.call("recommend", history=["1"], k=1)["items"]


# ----------------------------------------------------------------------------------------- floods, deadlines, uid
@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_bundle, tokens):
    """A node with tokens, a 1 s authentication deadline and a Unix socket whose owner's uid has the ops role."""
    d = tmp_path_factory.mktemp("guarded")
    port = free_port()
    env = dict(os.environ, EDGEREC_AUTH_DEADLINE_SECONDS="1", EDGEREC_AUTH_UNIX_ROLES=f"{os.getuid()}=ops",
               EDGEREC_SERVER_MAX_CONNECTIONS_PER_ADDRESS=str(PER_ADDRESS))
    proc = start_daemon(tiny_bundle, port, ["--no-discovery", "--unix", str(d / "node.sock"),
                                            *_token_flags(tokens, ("shop",))], env=env, log_path=d / "node.log")
    try:
        yield {"port": port, "unix": str(d / "node.sock"), "proc": proc}
    finally:
        stop_daemon(proc)


def test_unauthenticated_connection_is_closed_after_the_deadline(guarded):
    with socket.create_connection(("127.0.0.1", guarded["port"]), timeout=5) as s:
        s.sendall(msgpack.packb([0, 1, "health", []]))
        t0 = time.monotonic()
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        waited = time.monotonic() - t0
    replies = _unpack(data)
    assert replies[0][1] == 1 and replies[0][2] is None          # health answered
    assert replies[-1][2]["code"] == AUTH_FAILED and "not authenticated within 1 s" in replies[-1][2]["message"]
    assert 0.8 < waited < 4.5


def _unpack(data: bytes) -> list:
    u = msgpack.Unpacker(raw=False)
    u.feed(data)
    return list(u)


def test_unix_peer_uid_gets_its_role(guarded, tokens):
    with Client(unix=guarded["unix"], timeout=10) as c:
        assert c.call("set_availability", items=["1"], in_stock=True)["out_of_stock"] == 0
        with pytest.raises(RpcError) as err:
            c.call("recommend", history=["1"], k=1)
        assert err.value.code == NOT_PERMITTED and "has the 'ops' role" in err.value.message
    with Client("127.0.0.1", guarded["port"], timeout=10) as c:   # the same uid over TCP has no role
        with pytest.raises(RpcError) as err:
            c.call("set_availability", items=["1"], in_stock=True)
        assert err.value.code == NOT_PERMITTED and "not authenticated" in err.value.message


def test_idle_flood_from_one_address_locks_nobody_out(guarded, tokens):
    """5,000 idle connections from 127.0.0.1 while a legitimate client (same address) asks health 20 times, on a
    fresh authenticated connection each time and on one it keeps: every answer within 1 s."""
    port = guarded["port"]
    flood: list[socket.socket] = []
    opened = threading.Event()
    errors: list[str] = []

    def open_flood() -> None:
        try:
            for i in range(5000):
                try:
                    flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                except OSError as exc:
                    errors.append(repr(exc))
                if i == 1000:
                    opened.set()
        finally:
            opened.set()

    keeper = Client("127.0.0.1", port, timeout=5, token=_token(tokens["shop"]))
    th = threading.Thread(target=open_flood, daemon=True)
    th.start()
    try:
        assert opened.wait(60)
        times = []
        for _ in range(20):
            t0 = time.monotonic()
            with Client("127.0.0.1", port, timeout=1.0, token=_token(tokens["shop"])) as c:
                assert c.call("health")["status"] == "ok"
            t1 = time.monotonic()
            assert keeper.call("health")["status"] == "ok"
            times.append((t1 - t0, time.monotonic() - t1))
            time.sleep(0.05)
        th.join(120)
        assert not th.is_alive()
        assert max(max(t) for t in times) < 1.0, times
        print(f"flood: {len(flood)} idle connections; health on a new connection max "
              f"{max(t[0] for t in times) * 1e3:.1f} ms, on the kept one max {max(t[1] for t in times) * 1e3:.1f} ms")
        assert len(flood) >= 4900, errors[:3]
        assert keeper.call("health")["status"] == "ok"   # the kept connection survived the whole flood
    finally:
        for s in flood:
            s.close()
        keeper.close()
    with Client(unix=guarded["unix"], timeout=10) as c:
        stats = c.call("stats")
    closed = {r["reason"]: r["value"] for r in stats["edgerec_connections_closed"]}
    assert closed.get("address_cap", 0) >= 5000 - PER_ADDRESS - 50
    assert closed.get("refused", 0) == 0
    assert guarded["proc"].poll() is None


def test_flood_of_partial_frames_spares_the_kept_connection(guarded, tokens):
    """600 connections that each send one byte of a frame and stop: they are closed before a connection that has
    completed requests, even one idle since before the flood began."""
    port = guarded["port"]
    keeper = Client("127.0.0.1", port, timeout=5, token=_token(tokens["shop"]))
    keeper.call("health")
    time.sleep(0.2)
    flood = []
    try:
        for _ in range(600):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"\x94")   # the first byte of a 4-element array, never finished
            flood.append(s)
        assert keeper.call("health")["status"] == "ok"
        with Client("127.0.0.1", port, timeout=1.0, token=_token(tokens["shop"])) as c:
            assert c.call("health")["status"] == "ok"
    finally:
        for s in flood:
            s.close()
        keeper.close()


def test_anonymous_requests_do_not_push_out_an_authenticated_connection(guarded, tokens):
    """Connections that complete requests (health) without a role are closed before an authenticated idle one."""
    port = guarded["port"]
    keeper = Client("127.0.0.1", port, timeout=5, token=_token(tokens["shop"]))
    keeper.call("health")
    time.sleep(0.2)
    anon = []
    try:
        for _ in range(3 * PER_ADDRESS):
            c = Client("127.0.0.1", port, timeout=5)
            c.call("health")
            anon.append(c)
        assert keeper.call("recommend", history=["1"], k=1)["items"]
    finally:
        for c in anon:
            c.close()
        keeper.close()


def test_anonymous_frames_are_small(guarded, tokens):
    """Before authenticating, a frame over 64 KiB closes the connection; after, the full 1 MiB applies."""
    big = {"history": ["1"], "k": 1, "filters": {"exclude": [f"{i:0100d}" for i in range(1000)]}}   # ~100 KB
    with socket.create_connection(("127.0.0.1", guarded["port"]), timeout=5) as s:
        s.sendall(msgpack.packb([0, 1, "recommend", [big]]))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    err = _unpack(data)[0][2]
    assert err["code"] == FRAME_TOO_LARGE and "before authenticating" in err["message"]
    with Client("127.0.0.1", guarded["port"], timeout=5, token=_token(tokens["shop"])) as c:
        assert len(c.call("recommend", **big)["items"]) == 1


def test_registry_rotates_tokens_on_sighup(tmp_path, tokens):
    conf = tmp_path / "registry.toml"
    extra = tmp_path / "extra.token"
    write_token_file(extra)
    conf.write_text(f'[auth]\ntoken_files = ["peer={tokens["peer"]}"]\n')
    port = free_port()
    reg = start_daemon(None, port, ["--bundles", str(tmp_path / "reg"), "--no-discovery", "--config", str(conf)],
                       command="registry", log_path=tmp_path / "registry.log")
    try:
        assert _call(port, "peer", tokens, "versions", {})[1] is None
        conf.write_text(f'[auth]\ntoken_files = ["peer={extra}"]\n')
        reg.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "token(s) in force" not in (tmp_path / "registry.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reg.poll() is None   # SIGHUP does not kill the registry
        with pytest.raises(RpcError) as err:
            _call(port, "peer", tokens, "versions", {})
        assert err.value.code == AUTH_FAILED
        with Client("127.0.0.1", port, timeout=10, token=_token(extra)) as c:
            assert c.call("versions") == [] or isinstance(c.call("versions"), list)
    finally:
        stop_daemon(reg)


# ------------------------------------------------------------------------------------------------------------ TLS
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    other = make_ca(d / "other", cn="stranger CA")
    return {"ca": ca[0], "server": issue(ca, d, "server"), "node": issue(ca, d, "node"),
            "stranger": issue(other, d / "other", "stranger")}


def test_the_certificate_dates_are_checked_at_start(tmp_path, tiny_bundle, pki, caplog):
    """The process's own certificate: an error in the log when it has expired or is not valid yet (clients will
    refuse it), a warning within TLS_CERT_WARN_DAYS of its end, nothing otherwise; a daemon started on an expired
    one says so in its log and still serves its other listeners."""
    import datetime as dt

    from edge_runtime.ops.security import check_certificate_dates
    ca = make_ca(tmp_path / "ca")
    day = dt.timedelta(days=1)
    cases = {"expired": (-10 * day, 9 * day, logging.ERROR, "expired on"),
             "future": (3 * day, 30 * day, logging.ERROR, "not valid before"),
             "soon": (-day, 4 * day, logging.WARNING, "expires on"),
             "fine": (-day, 90 * day, None, None)}
    for name, (start, length, level, words) in cases.items():
        cert = issue(ca, tmp_path, name, valid_from=start, valid_for=length)[0]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgerec"):
            msg = check_certificate_dates(str(cert))
        if level is None:
            assert msg is None and not caplog.records, name
        else:
            assert words in msg and str(cert) in msg, (name, msg)
            assert [r.levelno for r in caplog.records] == [level], name
    assert "in 2 d 23 h" in check_certificate_dates(str(tmp_path / "soon.pem"))   # 3 days left, minus the run
    assert check_certificate_dates(str(tmp_path / "nonexistent.pem")) is None
    expired = tmp_path / "expired.pem", tmp_path / "expired.key"
    port = free_port()
    node = start_daemon(tiny_bundle, port, ["--no-discovery", "--tls-cert", str(expired[0]), "--tls-key",
                                            str(expired[1]), "--unix", str(tmp_path / "n.sock")],
                        ready=("ok",), log_path=tmp_path / "node.log", ssl=_no_verify())
    try:
        log = (tmp_path / "node.log").read_text()
        assert "expired on" in log and "TLS clients will refuse every connection" in log, log[-2000:]
    finally:
        stop_daemon(node)


def _no_verify():
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_tls_tokens_and_mutual_tls_between_node_and_registry(tmp_path, tiny_bundle, tokens, pki):
    signing.keygen(tmp_path / "trainer")
    publish(tiny_bundle, tmp_path / "reg", tmp_path / "trainer.key", version="v1")
    tls = ["--tls-cert", str(pki["server"][0]), "--tls-key", str(pki["server"][1]), "--tls-ca", str(pki["ca"])]
    rport, nport = free_port(), free_port()
    ctx = client_context(str(pki["ca"]))
    reg = start_daemon(None, rport, ["--bundles", str(tmp_path / "reg"), "--no-discovery", *tls,
                                     *_token_flags(tokens, ("peer",))], command="registry", ssl=ctx,
                       log_path=tmp_path / "registry.log")
    node = None
    try:
        # the node holds no peer token: its client certificate (signed by the CA) gives it the peer role
        node_tls = ["--tls-cert", str(pki["node"][0]), "--tls-key", str(pki["node"][1]), "--tls-ca", str(pki["ca"])]
        node = start_daemon(None, nport, ["--state-dir", str(tmp_path / "state"), "--trusted-key",
                                          str(tmp_path / "trainer.pub"), "--registry", f"127.0.0.1:{rport}",
                                          "--no-discovery", "--poll-seconds", "0.5", *node_tls,
                                          *_token_flags(tokens, ("shop",))], ssl=ctx, log_path=tmp_path / "node.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with Client("127.0.0.1", nport, timeout=5, ssl=ctx) as c:
                if c.call("health").get("model_version") == "v1":
                    break
            time.sleep(0.2)
        else:
            raise AssertionError("the node did not sync over mutual TLS")
        with Client("127.0.0.1", nport, timeout=5, ssl=ctx, token=_token(tokens["shop"])) as c:
            assert len(c.call("recommend", history=["1", "2"], k=5)["items"]) == 5
        # connections that never start their handshake count against the caps like any other
        raw = [socket.create_connection(("127.0.0.1", nport), timeout=5) for _ in range(600)]
        try:
            t0 = time.monotonic()
            with Client("127.0.0.1", nport, timeout=2, ssl=ctx, token=_token(tokens["shop"])) as c:
                assert c.call("health")["status"] == "ok"
            assert time.monotonic() - t0 < 1.0
            assert len(os.listdir(f"/proc/{node.pid}/fd")) < const.MAX_CONNECTIONS_PER_ADDRESS + 100
        finally:
            for r in raw:
                r.close()
        # plain TCP to a TLS port: no answer, a closed connection
        with pytest.raises(OSError):
            with Client("127.0.0.1", nport, timeout=5) as c:
                c.call("health")
        # a client certificate from another CA: the handshake fails
        with pytest.raises(OSError):
            Client("127.0.0.1", rport, timeout=5,
                   ssl=client_context(str(pki["ca"]), str(pki["stranger"][0]), str(pki["stranger"][1]))).call("health")
        # the CA's client certificate: peer role without a token, and nothing else
        mtls = client_context(str(pki["ca"]), str(pki["node"][0]), str(pki["node"][1]))
        with Client("127.0.0.1", rport, timeout=5, ssl=mtls) as c:
            assert c.call("latest", channel="stable")["version"] == "v1"
        with Client("127.0.0.1", nport, timeout=5, ssl=mtls) as c:
            with pytest.raises(RpcError, match="has the 'peer' role"):
                c.call("recommend", history=["1"], k=1)
        # TLS without a client certificate and without a token: health only
        res, code = _call(rport, None, tokens, "latest", {"channel": "stable"}, ssl=ctx)
        assert code == NOT_PERMITTED
        assert "tls://127.0.0.1" in (tmp_path / "registry.log").read_text()
    finally:
        if node is not None:
            stop_daemon(node)
        stop_daemon(reg)


def test_tokens_rotate_on_sighup(tmp_path, tiny_bundle):
    old, new, ops = tmp_path / "old.token", tmp_path / "new.token", tmp_path / "ops.token"
    for f in (old, new, ops):
        write_token_file(f)
    conf = tmp_path / "edgerec.toml"

    def configure(*files: Path) -> None:
        conf.write_text("[auth]\ntoken_files = [" + ", ".join(f'"shop={f}"' for f in files) + f', "ops={ops}"]\n')

    configure(old)
    port = free_port()
    proc = start_daemon(tiny_bundle, port, ["--no-discovery", "--config", str(conf)], log_path=tmp_path / "n.log")
    try:
        kept = Client("127.0.0.1", port, timeout=10, token=_token(old))

        def works(path: Path) -> bool:
            try:
                with Client("127.0.0.1", port, timeout=10, token=_token(path)) as c:
                    return bool(c.call("recommend", history=["1"], k=1)["items"])
            except RpcError as exc:
                assert exc.code == AUTH_FAILED
                return False

        def hup() -> None:
            n = (tmp_path / "n.log").read_text().count("SIGHUP")
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20   # the reload logs "SIGHUP: bundle ... holds the model served"
            while (tmp_path / "n.log").read_text().count("SIGHUP") == n and time.monotonic() < deadline:
                time.sleep(0.1)

        assert works(old) and not works(new)
        configure(old, new)
        hup()
        assert works(old) and works(new)
        configure(new)
        with Client("127.0.0.1", port, timeout=30, token=_token(ops)) as c:   # the reload RPC does what SIGHUP does
            assert c.call("reload")["model_version"]
            assert not works(old) and works(new)
            conf.write_text("[server]\nport = 'x'\n")
            with pytest.raises(RpcError, match="config rejected"):   # a rejected reload says so, and keeps all
                c.call("reload")
            conf.write_text("")   # no token left: authentication would be off; refused, the tokens stay
            with pytest.raises(RpcError, match="open every method"):
                c.call("reload")
            new.chmod(0o644)     # an unreadable token file: refused, the tokens stay
            configure(new)
            with pytest.raises(RpcError, match="readable by group or others"):
                c.call("reload")
            new.chmod(0o600)
        assert not works(old) and works(new)
        assert kept.call("recommend", history=["1"], k=1)["items"]   # connections keep the role they have
        kept.close()
    finally:
        stop_daemon(proc)
