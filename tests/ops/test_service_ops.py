"""Running edgerec as a service: config precedence and validation, systemd readiness / watchdog / socket activation,
SIGTERM drain, SIGHUP reload, Prometheus metrics and the stats RPC, structured logs without shopper ids, and the
unit file (systemd-analyze verify)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest

from edge_runtime import config as config_mod
from edge_runtime.client import Client, RpcError
from edgerec.process import PACKAGE_ROOT, free_port, start_daemon, stop_daemon

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEREC_", "NOTIFY_", "LISTEN_", "WATCHDOG_"))}
    env.update(extra)
    return env


def _edgerec(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgerec", *args], capture_output=True, text=True,
                          cwd=PACKAGE_ROOT, env=env or _env(), timeout=timeout)


# --------------------------------------------------------------------------------------------------------- config
def test_example_config_documents_every_key_with_its_default():
    text = (ROOT / "deploy" / "edgerec.toml").read_text()
    for k in config_mod.KEYS:
        assert f"\n{k.name} = " in text, k.dotted
    assert config_mod.load(ROOT / "deploy" / "edgerec.toml", env={}) == config_mod.load(None, env={})


def test_precedence_file_env_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[server]\nport = 7001\nthreads = 3\n[limits]\nmax_sessions = 10\n[sync]\ntrusted_keys = ["a.pub"]\n')
    c = config_mod.load(f, env={"EDGEREC_SERVER_PORT": "7002", "EDGEREC_SYNC_TRUSTED_KEYS": "x.pub, y.pub",
                                "EDGEREC_SYNC_DISCOVERY": "off", "EDGEREC_DDP_BACKEND": "gloo"},
                        flags={"port": 7003, "threads": None, "trusted_key": None})
    assert c["server"]["port"] == 7003            # flag > env > file
    assert c["server"]["threads"] == 3            # file (no env, flag not given)
    assert c["limits"]["max_sessions"] == 10
    assert c["sync"]["trusted_keys"] == ["x.pub", "y.pub"] and c["sync"]["discovery"] is False
    assert c["server"]["host"] == "127.0.0.1"     # default


@pytest.mark.parametrize("text, env, words", [
    ("[server]\nport = 70000\n", {}, "server.port = 70000"),
    ("[model]\nprecision = 'int4'\n", {}, "'int8' or 'fp32'"),
    ("[server]\nthreads = 'two'\n", {}, "server.threads"),
    ("[server]\nprot = 1\n", {}, "unknown key server.prot"),
    ("[srever]\nport = 1\n", {}, "unknown section [srever]"),
    ("[server\nport = 1\n", {}, "not valid TOML"),
    ("", {"EDGEREC_LIMITS_MAX_SESSIONS": "-5"}, "limits.max_sessions = -5"),
    ("", {"EDGEREC_SYNC_REGISTRY": "nohostport"}, "'' or HOST:PORT"),
    ("", {"EDGEREC_SERVER_PROT": "1"}, "EDGEREC_SERVER_PROT names no setting"),
    ("[sync]\ndiscovery = 'maybe'\n", {}, "sync.discovery"),
])
def test_invalid_values_name_the_key(tmp_path, text, env, words):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(f, env=env)
    assert words in str(e.value)


def test_daemon_refuses_invalid_config_at_startup(tmp_path, tiny_bundle):
    f = tmp_path / "c.toml"
    f.write_text(f'[model]\nbundle = "{tiny_bundle}"\n[limits]\ncache_entries = -1\n')
    r = _edgerec("serve", "--config", str(f))
    assert r.returncode == 2 and "limits.cache_entries = -1" in r.stderr and "0..1e8" in r.stderr
    r = _edgerec("serve", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "missing.toml" in r.stderr
    r = _edgerec("serve", "--bundle", str(tiny_bundle), env=_env(EDGEREC_SERVER_PORT="http"))
    assert r.returncode == 2 and "server.port = 'http' (from $EDGEREC_SERVER_PORT)" in r.stderr


# -------------------------------------------------------------------------------------- systemd: notify + drain
class _NotifySocket:
    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.path = path
        self.messages: list[tuple[float, str]] = []

    def poll(self, until: float, want: str) -> bool:
        while time.monotonic() < until:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except socket.timeout:
                continue
            if want in self.messages[-1][1]:
                return True
        return False


def test_ready_only_when_answering_and_sigterm_drains_in_flight(tmp_path, tiny_bundle, beauty_data):
    notify = _NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    cmd = [sys.executable, "-m", "edgerec", "serve", "--bundle", str(tiny_bundle), "--port", str(port),
           "--log-format", "json"]
    proc = subprocess.Popen(cmd, cwd=PACKAGE_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000"))
    try:
        assert notify.poll(time.monotonic() + 60, "READY=1"), notify.messages
        # at READY=1 the daemon answers at once, with the model loaded and warm
        with Client("127.0.0.1", port, timeout=5) as c:
            assert len(c.call("recommend", history=[beauty_data.item_ids[0]], k=5)["items"]) == 5
        assert notify.messages[0][1].startswith("READY=1")      # nothing before READY
        # watchdog pings every WATCHDOG_USEC / 2 = 0.2 s
        assert notify.poll(time.monotonic() + 3, "WATCHDOG=1")

        # load: 4 clients in request / reply loops, and one pipelined burst of 300 requests in flight at SIGTERM
        stop, errors, answered = threading.Event(), [], [0]

        def loop_client():
            try:
                with Client("127.0.0.1", port, timeout=10) as c:
                    while not stop.is_set():
                        c.call("recommend", history=[beauty_data.item_ids[answered[0] % 50]], k=10)
                        answered[0] += 1
            except (OSError, ConnectionError):
                pass                       # the drained daemon closed the connection between requests
            except Exception as exc:       # an error reply
                errors.append(repr(exc))
        threads = [threading.Thread(target=loop_client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        burst = socket.create_connection(("127.0.0.1", port))
        frames = b"".join(msgpack.packb([0, i, "recommend", [{"history": [beauty_data.item_ids[i % 300]],
                                                                "k": 20}]]) for i in range(300))
        burst.sendall(frames)
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(burst.recv(65536))      # the first replies: the daemon has read the burst
        proc.send_signal(signal.SIGTERM)
        replies = list(unpacker)
        burst.settimeout(15)
        while True:
            data = burst.recv(65536)
            if not data:
                break
            unpacker.feed(data)
            replies.extend(unpacker)
        burst.close()
        stop.set()
        for t in threads:
            t.join(20)
        rc = proc.wait(30)
        assert rc == 0
        assert len(replies) == 300 and all(r[2] is None and len(r[3]["items"]) == 20 for r in replies)
        assert sorted(r[1] for r in replies) == list(range(300))
        assert errors == [] and answered[0] > 0
        assert notify.poll(time.monotonic() + 1, "STOPPING=1") or any("STOPPING=1" in m for _, m in notify.messages)
        log = proc.stderr.read()
        assert '"message": "stopped"' in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_socket_activation(tmp_path, tiny_bundle):
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    port = lsock.getsockname()[1]
    fd = lsock.fileno()
    # systemd passes the socket as fd 3 and sets LISTEN_PID to the service's pid: `exec` keeps the shell's pid
    script = (f'exec 3<&{fd}; LISTEN_PID=$$ LISTEN_FDS=1 exec "{sys.executable}" -m edgerec serve '
              f'--bundle "{tiny_bundle}" --port -1 --no-discovery')
    proc = subprocess.Popen(["bash", "-c", script], cwd=PACKAGE_ROOT, pass_fds=(fd,), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lsock.close()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client("127.0.0.1", port, timeout=5) as c:
                    assert c.call("health")["status"] == "ok"
                    break
            except (OSError, ConnectionError):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
                time.sleep(0.2)
        assert stop_daemon(proc) == 0
        assert "socket activation" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


# ----------------------------------------------------------------------------------------------------- SIGHUP
def _copy_as_version(src: Path, dst: Path, version: str) -> None:
    from edge_runtime.bundle import MANIFEST, sha256_file
    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST).read_text())
    m["model_version"] = version
    m["files"] = {n: {"sha256": sha256_file(dst / n), "bytes": (dst / n).stat().st_size} for n in m["files"]}
    (dst / MANIFEST).write_text(json.dumps(m))


def test_sighup_reloads_config_and_bundle(tmp_path, tiny_bundle):
    a, b = tmp_path / "a", tmp_path / "b"
    _copy_as_version(tiny_bundle, a, "va")
    _copy_as_version(tiny_bundle, b, "vb")
    cfg = tmp_path / "edgerec.toml"
    port = free_port()
    cfg.write_text(f'[model]\nbundle = "{a}"\n[server]\nport = {port}\n[limits]\nmax_sessions = 1000\n'
                   f'[sync]\ndiscovery = false\n[log]\nformat = "json"\n')
    proc = start_daemon(None, port, ["--config", str(cfg)], log_path=tmp_path / "d.log")
    try:
        with Client("127.0.0.1", port) as c:
            for i in range(20):
                c.call("track", user=f"u{i}", item="1", event="view")
            assert c.call("health")["model_version"] == "va"
        cfg.write_text(f'[model]\nbundle = "{b}"\n[server]\nport = {port}\nthreads = 7\n[limits]\nmax_sessions = 5\n'
                       f'[sync]\ndiscovery = false\n[log]\nformat = "json"\nlevel = "DEBUG"\n')
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with Client("127.0.0.1", port) as c:
                h = c.call("health")
            if h["model_version"] == "vb":
                break
            time.sleep(0.1)
        assert h["model_version"] == "vb" and h["sessions"] == 5    # new bundle, sessions bound applied live
        # a broken config on SIGHUP is refused; the daemon keeps serving
        cfg.write_text("[server]\nport = 'x'\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        with Client("127.0.0.1", port) as c:
            assert c.call("health")["model_version"] == "vb"
        assert stop_daemon(proc) == 0
        log = [json.loads(line) for line in (tmp_path / "d.log").read_text().splitlines() if line.startswith("{")]
        text = " ".join(r["message"] for r in log)
        assert "server.threads changed (2 -> 7); it takes effect at the next restart" in text
        assert "SIGHUP: config rejected" in text and "server.port = 'x'" in text
        assert any(r["level"] == "DEBUG" for r in log)              # log.level applied live
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------------------------- metrics, stats, logs
def _scrape(port: int) -> dict:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        out[("__family__", fam.name)] = fam.type
    return out


def test_metrics_endpoint_and_stats_move_with_requests(tmp_path, tiny_bundle, beauty_data):
    port, mport = free_port(), free_port()
    proc = start_daemon(tiny_bundle, port, ["--metrics-port", str(mport), "--no-discovery", "--log-format", "json"],
                        log_path=tmp_path / "d.log")
    secret = "shopper-7f3a9c"
    try:
        before = _scrape(mport)
        for fam in ("edgerec_requests", "edgerec_request_duration_seconds", "edgerec_errors", "edgerec_cache_hits",
                    "edgerec_cache_hit_ratio", "edgerec_events_tracked", "edgerec_sessions", "edgerec_sessions_max",
                    "edgerec_model_info", "edgerec_model_age_seconds", "edgerec_scoring_info",
                    "process_resident_memory_bytes"):
            assert ("__family__", fam) in before, fam
        assert before[("process_resident_memory_bytes", ())] > 10e6
        with Client("127.0.0.1", port) as c:
            c.call("track", user=secret, item=beauty_data.item_ids[3], event="view")
            for _ in range(3):
                c.call("recommend", user=secret, k=5)          # miss, then 2 hits
            with pytest.raises(RpcError, match="'k'"):
                c.call("recommend", k="many")
            stats = c.call("stats")
        after = _scrape(mport)
        req = lambda m, d: d.get(("edgerec_requests_total", (("method", m),)), 0)  # noqa: E731
        assert req("recommend", after) - req("recommend", before) == 4
        assert req("track", after) - req("track", before) == 1
        assert after[("edgerec_request_duration_seconds_count", (("method", "recommend"),))] >= 4
        assert after[("edgerec_errors_total", (("code", "-32602"),))] == 1
        assert after[("edgerec_events_tracked_total", ())] == before[("edgerec_events_tracked_total", ())] + 1
        assert after[("edgerec_sessions", ())] == 1
        assert after[("edgerec_cache_hits_total", ())] - before[("edgerec_cache_hits_total", ())] == 2
        assert 0 < after[("edgerec_cache_hit_ratio", ())] <= 1
        version = json.loads((tiny_bundle / "manifest.json").read_text())["model_version"]
        assert after[("edgerec_model_info", (("precision", "int8"), ("version", version)))] == 1
        # the stats RPC carries the same figures
        assert stats["edgerec_events_tracked_total"] == 1 and stats["edgerec_sessions"] == 1
        assert {r["method"]: r["value"] for r in stats["edgerec_requests"]}["recommend"] == 4
        assert stats["edgerec_request_duration_seconds"]["recommend"]["count"] == 4
        assert stats["process_resident_memory_bytes"] > 10e6
    finally:
        assert stop_daemon(proc) == 0
    lines = (tmp_path / "d.log").read_text().splitlines()
    assert lines and all(json.loads(line)["level"] in ("INFO", "WARNING", "ERROR") for line in lines)
    assert secret not in "\n".join(lines)          # no shopper id in the logs at INFO


def test_journald_lines_under_systemd(tmp_path, tiny_bundle):
    port = free_port()
    proc = start_daemon(tiny_bundle, port, ["--no-discovery"], log_path=tmp_path / "d.log",
                        env=_env(INVOCATION_ID="abc", JOURNAL_STREAM="8:1234"))
    assert stop_daemon(proc) == 0
    lines = (tmp_path / "d.log").read_text().splitlines()
    assert lines and all(line.startswith(("<6>INFO ", "<4>WARNING ")) for line in lines), lines[:3]


def test_request_families_render_as_prometheus_client_would():
    """The request counter and latency histogram are plain counters rendered at scrape (``_RequestCollector``): the
    exposition of the same observations is line for line that of prometheus_client's own Counter and Histogram
    (bucket edges included: a value on an edge counts in that bucket), less their ``_created`` series."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from edge_runtime import const
    from edge_runtime.ops.metrics import Metrics
    from edge_runtime.rpc.methods import MethodTable
    from edge_runtime.serving.service import Service

    service = Service(None)
    try:
        ours = Metrics(service, MethodTable({"recommend": (None, False), "track": (None, False)}))
        reg = CollectorRegistry()
        c = Counter("edgerec_requests", "requests received", ["method"], registry=reg)
        h = Histogram("edgerec_request_duration_seconds", "handler time per request (s)", ["method"],
                      buckets=const.LATENCY_BUCKETS, registry=reg)
        values = [5e-5, 1e-4, 1.0001e-4, 3e-4, 0.0101, 2.5, 2.51, 40.0]
        for i, v in enumerate(values):
            m = ("recommend", "track", "no-such-method")[i % 3]
            ours.observe(m, v, None)
            label = m if m != "no-such-method" else "other"
            c.labels(label).inc()
            h.labels(label).observe(v)

        def lines(registry, fams):
            return sorted(ln for ln in generate_latest(registry).decode().splitlines()
                          if ln.startswith(fams) and "_created" not in ln)
        fams = ("edgerec_requests_total", "edgerec_request_duration_seconds")
        assert lines(ours.registry, fams) == lines(reg, fams)
        assert len(lines(reg, fams)) == 3 * (1 + len(const.LATENCY_BUCKETS) + 1 + 2)
    finally:
        service.executor.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------ the unit file
def test_unit_file_verifies():
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("EDGEREC_REQUIRE_SYSTEMD_ANALYZE"):
            pytest.fail("systemd-analyze is required here (EDGEREC_REQUIRE_SYSTEMD_ANALYZE) but not installed")
        pytest.skip("systemd-analyze not installed (.ci/run installs it)")
    unit = (ROOT / "deploy" / "edgerec.service").read_text()
    for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "DynamicUser=yes", "StateDirectory=edgerec",
                "ProtectSystem=strict", "NoNewPrivileges=yes", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert key in unit
    exe = shutil.which("edgerec") or sys.executable
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgerec-verify-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    (tmp / "edgerec.service").write_text(unit.replace("/opt/edgerec/venv/bin/edgerec", exe))
    shutil.copy(ROOT / "deploy" / "edgerec.socket", tmp / "edgerec.socket")
    r = subprocess.run([tool, "verify", str(tmp / "edgerec.service"), str(tmp / "edgerec.socket")],
                       capture_output=True, text=True, timeout=60)
    shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    assert "edgerec.service" not in r.stderr, r.stderr    # no warnings about the unit


def test_upstream_unit_files_verify():
    """deploy/edgerec-registry.service and deploy/edgerec-loop.service (the upstream machine) pass systemd-analyze
    verify with no warning about them, run commands this edgerec accepts, and share the state directory their
    paths point into."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("EDGEREC_REQUIRE_SYSTEMD_ANALYZE"):
            pytest.fail("systemd-analyze is required here (EDGEREC_REQUIRE_SYSTEMD_ANALYZE) but not installed")
        pytest.skip("systemd-analyze not installed (.ci/run installs it)")
    exe = shutil.which("edgerec") or sys.executable
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgerec-verify-up-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    units = {}
    for name in ("edgerec-registry.service", "edgerec-loop.service"):
        units[name] = (ROOT / "deploy" / name).read_text()
        for key in ("Type=exec", "Restart=on-failure", "User=edgerec", "StateDirectory=edgerec-upstream",
                    "ProtectSystem=strict", "NoNewPrivileges=yes", "KillSignal=SIGTERM"):
            assert key in units[name], (name, key)
        (tmp / name).write_text(units[name].replace("/opt/edgerec/venv/bin/edgerec", exe))
    r = subprocess.run([tool, "verify", *(str(tmp / n) for n in units)], capture_output=True, text=True, timeout=60)
    shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    assert "edgerec-registry.service" not in r.stderr and "edgerec-loop.service" not in r.stderr, r.stderr
    # the commands: every flag is one the CLI has (its --help lists it), and the paths meet
    for name, sub, flags in (("edgerec-registry.service", "registry", ("--bundles", "--collect")),
                             ("edgerec-loop.service", "loop", ("--checkpoint", "--collect", "--registry", "--key",
                                                               "--workdir", "--interval"))):
        line = units[name].split("ExecStart=", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
        assert line.split()[1] == sub
        helptext = subprocess.run([sys.executable, "-m", "edgerec", sub, "--help"], capture_output=True, text=True,
                                  timeout=60, cwd=ROOT).stdout
        for flag in flags:
            assert f" {flag} " in line and flag in helptext, (name, flag)
    assert "/var/lib/edgerec-upstream/bundles" in units["edgerec-loop.service"]
    assert "/var/lib/edgerec-upstream/collect" in units["edgerec-loop.service"]
    assert "LoadCredential=signing.key:" in units["edgerec-loop.service"] and "%d/signing.key" in units[
        "edgerec-loop.service"]


# --------------------------------------------------------------------------- defects found by a breaker, fixed
def test_binary_config_and_bracketed_ipv6_registry(tmp_path):
    f = tmp_path / "c.toml"
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(config_mod.ConfigError, match="not UTF-8"):
        config_mod.load(f, env={})
    f.write_text("server = 5\n")
    with pytest.raises(config_mod.ConfigError, match="must be a table"):
        config_mod.load(f, env={})
    assert config_mod.split_hostport("[::1]:7710") == ("::1", 7710)
    assert config_mod.split_hostport("reg.local:7710") == ("reg.local", 7710)
    for bad in ("::1", "[::1]", "host:0", "host:99999", ":7710"):
        with pytest.raises(ValueError):
            config_mod.split_hostport(bad)


def test_pipelined_load_at_sigterm_gets_replies_then_a_clean_eof(tmp_path, tiny_bundle, beauty_data):
    port = free_port()
    proc = start_daemon(tiny_bundle, port, ["--no-discovery"], log_path=tmp_path / "d.log")
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    frames = b"".join(msgpack.packb([0, i, "recommend", [{"history": [beauty_data.item_ids[i % 500]], "k": 10}]])
                      for i in range(3000))
    senders = [threading.Thread(target=c.sendall, args=(frames,)) for c in conns]
    for t in senders:
        t.start()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    outcomes = []
    for c in conns:
        c.settimeout(20)
        unpacker, n, how = msgpack.Unpacker(raw=False), 0, "eof"
        try:
            while True:
                data = c.recv(1 << 16)
                if not data:
                    break
                unpacker.feed(data)
                for msg in unpacker:
                    assert msg[2] is None and len(msg[3]["items"]) == 10
                    n += 1
        except ConnectionResetError:
            how = "reset"
        outcomes.append((n, how))
        c.close()
    for t in senders:
        t.join(20)
    assert proc.wait(30) == 0
    assert all(how == "eof" and n > 0 for n, how in outcomes), outcomes


def test_metrics_endpoint_holds_no_thread_per_connection(tmp_path, tiny_bundle):
    port, mport = free_port(), free_port()
    proc = start_daemon(tiny_bundle, port, ["--metrics-port", str(mport), "--no-discovery"],
                        log_path=tmp_path / "d.log")
    try:
        threads = lambda: len(os.listdir(f"/proc/{proc.pid}/task"))  # noqa: E731
        before = threads()
        idle = [socket.create_connection(("127.0.0.1", mport)) for _ in range(100)]
        for s in idle:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")       # an unfinished head, held open
        time.sleep(0.5)
        assert threads() <= before + 1
        for s in idle:
            s.close()
        time.sleep(0.3)
        assert ("__family__", "edgerec_requests") in _scrape(mport)   # still serves scrapes
    finally:
        assert stop_daemon(proc) == 0


def test_rapid_sighups_apply_in_order(tmp_path, tiny_bundle):
    a, b = tmp_path / "a", tmp_path / "b"
    _copy_as_version(tiny_bundle, a, "va")
    _copy_as_version(tiny_bundle, b, "vb")
    cfg = tmp_path / "edgerec.toml"
    port = free_port()
    text = lambda d: f'[model]\nbundle = "{d}"\n[server]\nport = {port}\n[sync]\ndiscovery = false\n'  # noqa: E731
    cfg.write_text(text(a))
    proc = start_daemon(None, port, ["--config", str(cfg)], log_path=tmp_path / "d.log")
    try:
        for d in (b, a, b, a, b, a, b):
            cfg.write_text(text(d))
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.01)
        time.sleep(4)
        with Client("127.0.0.1", port) as c:
            assert c.call("health")["model_version"] == "vb"
    finally:
        assert stop_daemon(proc) == 0
