"""Nothing leaks (issue 15, point 5): a registry with its collector, a node with access tokens and `edgerec loop`,
all real processes on loopback under a fresh HOME, take shop / ops traffic for ~30 distinctive raw shopper ids
(tracks, batches, recommends, a session and a forget, bad requests that carry raw ids in their params, wrong
tokens); the node ships to the collector and the loop runs one round on what was collected. Then everything is
stopped and EVERY file under the test's directory (state directory, registry and collector directories, the loop's
workdir, every log, the whole fresh HOME including ~/.cache, the temporary directory the processes were given) is
read as bytes and searched for each raw shopper id and each token. None may appear.

The positive controls make sure the scan looked at something real: the pseudonymised events are in the node's
events.db and in the collector's collected.db (exactly the pseudonyms of the shoppers tracked, the forgotten one
gone), the logs and databases are non-empty, enough files and bytes were read, the scanner itself finds a planted
needle in every encoding it searches for, and ONNX Runtime's telemetry directory (~/.cache/Microsoft, which
``edge_runtime/__init__.py`` disables with ORT_DISABLE_TELEMETRY=1) does not exist under the fresh HOME.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edge_runtime import const
from edge_runtime.client import Client, RpcError
from edge_runtime.errors import AUTH_FAILED, NOT_PERMITTED
from edge_runtime.events.pseudonym import load_key
from edgerec.process import PACKAGE_ROOT, free_port, start_daemon, stop_daemon
from trainer.data import EMBEDDED_DIR

FIRST = 3000                  # Beauty.txt lines after the tiny bundle's 3,000 training users: shoppers it never saw
MAX_EVENTS = 12               # events per shopper at most
PSEUDONYM = re.compile(r"[0-9a-f]{32}\Z")

# ~30 distinctive raw shopper ids: e-mail addresses, upper case, non-ASCII (whose JSON-escaped form is searched too),
# spaces and punctuation. Every one is >= 16 characters, so a hit cannot be chance.
SHOPPERS = ([f"leakcheck-shopper-{i:04d}@example.com" for i in range(10)]
            + [f"LEAK-ID-XYZ-{i:04d}-Q7RT" for i in range(8)]
            + [f"leakcheck-ünïcødé-Жоп-{i:02d}-ß" for i in range(6)]
            + [f"LeakCheck Cust #{i:03d} <vip> 'quoted'" for i in range(6)])
FORGOTTEN = SHOPPERS[3]
# raw ids that only ever appear in bad or refused requests (never a valid event)
BAD_IDS = [f"leakcheck-badreq-{tag}-7Y2K@example.org" for tag in
           ("event-type", "unknown-param", "k-range", "batch-entry", "method", "event-id", "no-auth", "wrong-role",
            "peer-role", "ingest-raw", "ingest-forget", "recommend-history", "anon-collector", "ops-role")]


def _env(tmp: Path) -> dict:
    """This environment with a fresh HOME, every XDG directory and TMPDIR inside ``tmp``, no EDGEREC_* settings and
    no ORT_DISABLE_TELEMETRY (the product has to set that itself)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XDG_", "EDGEREC_", "EDGE_RUNTIME_", "ORT_", "NUMBA_CACHE"))}
    home = tmp / "home"
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_DATA_HOME=str(home / ".local" / "share"), XDG_STATE_HOME=str(home / ".local" / "state"),
               TMPDIR=str(tmp / "tmpdir"), PYTHONPATH=os.pathsep.join(
                   [PACKAGE_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    (tmp / "tmpdir").mkdir()
    home.mkdir()
    return env


def _cli(args: list[str], env: dict, log: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m edgerec ARGS`` with ``env``, stdout and stderr into ``log`` (scanned like every other file)."""
    with open(log, "w") as out:
        res = subprocess.run([sys.executable, "-m", "edgerec", *args], stdout=out, stderr=subprocess.STDOUT,
                             cwd=PACKAGE_ROOT, env=env, timeout=timeout)
    return res


def _shoppers_events(t0: float) -> dict[str, list[dict]]:
    """For each raw shopper id, a real Beauty shopper's items (one the tiny model never saw) as events. Each
    shopper's last event is among the newest, so the loop's gate holds back events of many shoppers."""
    seqs = []
    with open(EMBEDDED_DIR / "Beauty.txt", encoding="utf-8") as f:
        for n, line in enumerate(f):
            parts = line.split()
            if n >= FIRST and len(parts) >= 6:
                seqs.append(parts[1:1 + MAX_EVENTS])
                if len(seqs) == len(SHOPPERS):
                    break
    out = {}
    for i, (user, items) in enumerate(zip(SHOPPERS, seqs)):
        n = len(items)
        out[user] = [{"user": user, "item": it,
                      "event": "purchase" if j % 7 == 6 else "cart" if j % 4 == 3 else "view",
                      "ts": t0 + (j - n) * 60.0 + i * 0.5, "event_id": f"{user}/evt-{j}"}
                     for j, it in enumerate(items)]
    return out


def _forms(s: str) -> list[tuple[bytes, str]]:
    """The encodings of ``s`` searched for: UTF-8, UTF-16-LE, lower case, JSON with ASCII escapes, upper case."""
    forms = {s.encode("utf-8"): "utf-8", s.encode("utf-16-le"): "utf-16-le"}
    for variant, how in ((s.lower(), "lower-case utf-8"), (s.upper(), "upper-case utf-8"),
                         (json.dumps(s)[1:-1], "JSON-escaped")):
        forms.setdefault(variant.encode("utf-8"), how)
    return list(forms.items())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Scan:
    """Every regular file under a root, read as bytes, searched for every needle."""

    def __init__(self, needles: dict[bytes, str], skip: dict[Path, str | None]):
        self.needles = needles
        self.skip = skip            # path -> sha256 it must still have to be skipped (None: skipped regardless)
        self.files: list[tuple[Path, int]] = []
        self.skipped: list[Path] = []
        self.hits: list[str] = []

    def walk(self, root: Path, newer_than: float | None = None, prune: tuple[str, ...] = ()) -> None:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = [d for d in dirnames if not (Path(dirpath) == root and d in prune)]
            for name in filenames:
                p = Path(dirpath) / name
                try:
                    st = p.lstat()
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode) or (newer_than is not None and st.st_mtime < newer_than):
                    continue
                if p in self.skip and (self.skip[p] is None or self.skip[p] == _sha(p)):
                    self.skipped.append(p)
                    continue
                self.file(p)

    def file(self, p: Path) -> None:
        data = p.read_bytes()
        self.files.append((p, len(data)))
        for needle, what in self.needles.items():
            at = data.find(needle)
            if at >= 0:
                ctx = data[max(0, at - 120):at + len(needle) + 120]
                self.hits.append(f"{p} (offset {at}) contains {what}: {needle!r}\n    ...{ctx!r}...")

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.files)


def _wait(cond, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got or time.monotonic() > deadline:
            assert got, f"timed out after {timeout} s waiting for {what}"
            return got
        time.sleep(poll)


def _rows(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def _expect_error(fn, code: int | None = None, name: str | None = None) -> RpcError:
    with pytest.raises(RpcError) as info:
        fn()
    err = info.value
    assert code is None or err.code == code, err
    assert name is None or err.name == name, err
    return err


def test_no_raw_shopper_id_or_token_is_written_anywhere(tiny_bundle, tmp_path):
    t_start = time.time()
    tmp = tmp_path
    env = _env(tmp)
    home = tmp / "home"
    logs = tmp / "logs"
    inputs = tmp / "inputs"
    logs.mkdir()
    inputs.mkdir()

    # -- the test's inputs: bundle and checkpoint copies, signing key, tokens, node config ------------------------
    bundle = inputs / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    ckpt_src = tiny_bundle.parent / (tiny_bundle.name + ".ckpt")
    assert ckpt_src.is_file(), ckpt_src
    ckpt = inputs / "bundle.ckpt"
    shutil.copy(ckpt_src, ckpt)
    sign = inputs / "sign"
    assert _cli(["keygen", "--out", str(sign)], env, logs / "keygen-sign.log").returncode == 0
    token_files = {}
    for role in const.ROLES:
        token_files[role] = inputs / f"{role}.token"
        assert _cli(["keygen", "--token", role, "--out", str(token_files[role])], env,
                    logs / f"keygen-{role}.log").returncode == 0
        assert token_files[role].stat().st_mode & 0o077 == 0
    tokens = {role: token_files[role].read_text().strip() for role in const.ROLES}
    for role, tok in tokens.items():
        assert re.fullmatch(r"[0-9a-f]{64}", tok), f"{role} token file does not hold one 64-hex token"
    wrong = secrets.token_hex(32)                              # a token nobody configured
    near_miss = tokens["shop"][:-1] + ("0" if tokens["shop"][-1] != "0" else "1")   # one character off
    node_cfg = inputs / "node.toml"
    node_cfg.write_text("[events]\nship_interval_seconds = 0.2\nship_max_backoff = 1.0\nship_batch = 100\n"
                        "[sync]\npoll_seconds = 2.0\nmax_backoff = 4.0\n")
    skip: dict[Path, str | None] = {p: None for p in token_files.values()}
    for p in [sign.with_suffix(".key"), sign.with_suffix(".pub"), ckpt] + [p for p in bundle.rglob("*") if p.is_file()]:
        skip[p] = _sha(p)
    registry_dir, collect_dir, state, workdir = tmp / "registry", tmp / "collect", tmp / "state", tmp / "loop"
    assert _cli(["publish", str(bundle), "--registry", str(registry_dir), "--key", str(sign.with_suffix(".key"))],
                env, logs / "publish.log").returncode == 0

    events = _shoppers_events(time.time() - 600)
    n_events = sum(len(v) for v in events.values())
    procs = []
    rport, port, mport = free_port(), free_port(), free_port()
    try:
        reg = start_daemon(None, rport, ["--bundles", str(registry_dir), "--collect", str(collect_dir),
                                         "--no-discovery", "--token-file", f"peer={token_files['peer']}"],
                           command="registry", log_path=logs / "registry.log", env=env)
        procs.append(reg)
        node = start_daemon(None, port, ["--state-dir", str(state), "--trusted-key", str(sign.with_suffix(".pub")),
                                         "--registry", f"127.0.0.1:{rport}", "--upstream", "registry",
                                         "--no-discovery", "--node-id", "leak-node", "--config", str(node_cfg),
                                         "--metrics-port", str(mport)]
                            + [a for role in const.ROLES for a in ("--token-file", f"{role}={token_files[role]}")],
                            log_path=logs / "node.log", env=env, timeout=120)
        procs.append(node)
        replies: list = []   # every reply the clients got, checked for tokens below

        # -- shop traffic: track (odd shoppers), track_batch (even ones), recommend ------------------------------
        with Client("127.0.0.1", port, token=tokens["shop"]) as shop:
            assert shop.role == "shop"
            for i, (user, evs) in enumerate(events.items()):
                if i % 2 == 0:
                    replies.append(shop.call("track_batch", events=evs))
                    assert replies[-1] == {"ok": True, "count": len(evs)}
                else:
                    for e in evs:
                        replies.append(shop.call("track", **e))
                        assert replies[-1] == {"ok": True}
            for i, user in enumerate(SHOPPERS):
                res = shop.call("recommend", user=user, k=5)
                assert res["source"] == "model" and len(res["items"]) == 5, res
                replies.append(res)
                if i % 5 == 0:   # a history and the live session, and an item the model does not know
                    replies.append(shop.call("recommend", user=user, history=[events[user][0]["item"],
                                                                              "leakcheck-no-such-item-0001"], k=3))
            # a retry of an event already stored (same event id): acknowledged, not stored twice
            assert shop.call("track", **events[SHOPPERS[1]][0]) == {"ok": True}
            # -- bad requests, each carrying a raw shopper id in its params -------------------------------------
            bad = iter(BAD_IDS)
            item = events[SHOPPERS[0]][0]["item"]
            replies.append(_expect_error(lambda: shop.call("track", user=next(bad), item=item, event="explode")))
            replies.append(_expect_error(lambda: shop.call("track", user=next(bad), item=item, event="view",
                                                           email="x")))
            replies.append(_expect_error(lambda: shop.call("recommend", user=next(bad), k=0)))
            replies.append(_expect_error(lambda: shop.call("track_batch", events=[
                {"user": SHOPPERS[0], "item": item, "event": "view"}, {"user": next(bad), "event": "view"}])))
            replies.append(_expect_error(lambda: shop.call("recommand", user=next(bad), k=3)))
            long_id = next(bad)
            replies.append(_expect_error(lambda: shop.call("track", user=long_id, item=item, event="view",
                                                           event_id=long_id + "x" * 200)))
            nb = next(bad)
            replies.append(_expect_error(lambda: shop.call("forget", user=nb), NOT_PERMITTED))   # shop role
            replies.append(_expect_error(lambda: shop.call("session", user=SHOPPERS[5]), NOT_PERMITTED))
            replies.append(_expect_error(lambda: shop.call("recommend", user=next(bad),
                                                           history="not-a-list-" + SHOPPERS[6])))
            replies.append(_expect_error(lambda: shop.call("recommend", user=SHOPPERS[7], k=3,
                                                           filters={"exclude": 7, "category": ["x"]})))
        with Client("127.0.0.1", port) as anon:        # no auth call: only auth and health
            replies.append(_expect_error(lambda: anon.call("track", user=next(bad), item=item, event="view"),
                                         NOT_PERMITTED))
            replies.append(anon.call("health"))
        with Client("127.0.0.1", port, token=tokens["peer"]) as peer:   # a valid token of the wrong role
            replies.append(_expect_error(lambda: peer.call("recommend", user=next(bad), k=3), NOT_PERMITTED))
        for target in (port, rport):                                    # a wrong token, at node and registry
            err = _expect_error(lambda: Client("127.0.0.1", target, token=wrong), AUTH_FAILED)
            assert wrong not in str(err)
            replies.append(err)
        err = _expect_error(lambda: Client("127.0.0.1", port, token=near_miss), AUTH_FAILED)
        replies.append(err)
        # the collector: a raw shopper id in an ingest and an ingest_forget (both refused)
        with Client("127.0.0.1", rport, token=tokens["peer"]) as col:
            replies.append(_expect_error(lambda: col.call("ingest", node="leak-probe", after=0, events=[
                [1, next(bad), "item-1", "view", time.time() - 10]])))
            replies.append(_expect_error(lambda: col.call("ingest_forget", node="leak-probe", user=next(bad))))
        with Client("127.0.0.1", rport) as col:
            replies.append(_expect_error(lambda: col.call("ingest_forget", node="leak-node", user=next(bad)),
                                         NOT_PERMITTED))

        # -- shipping: everything reaches the collector -----------------------------------------------------------
        coll_db = collect_dir / const.COLLECTOR_DB
        _wait(lambda: _rows(coll_db, "SELECT count(*) FROM events") == [(n_events,)], 60,
              f"{n_events} events at the collector")

        # -- ops: session and forget of one shopper (the erasure travels to the collector too) ------------------
        with Client("127.0.0.1", port, token=tokens["ops"]) as ops:
            assert ops.role == "ops"
            got = ops.call("session", user=FORGOTTEN)["events"]
            assert [e["item"] for e in got] == [e["item"] for e in events[FORGOTTEN]]
            res = ops.call("forget", user=FORGOTTEN)
            assert res["removed"] == len(events[FORGOTTEN]) and res.get("upstream") == "queued", res
            replies.append(res)
            replies.append(_expect_error(lambda: ops.call("recommend", user=next(bad), k=3), NOT_PERMITTED))
            stats = ops.call("stats")
            replies.append(stats)
        n_kept = n_events - len(events[FORGOTTEN])
        _wait(lambda: _rows(coll_db, "SELECT count(*) FROM events") == [(n_kept,)], 30,
              "the forget to reach the collector")
        def acknowledged() -> dict | None:
            # the collector commits the forget before it answers; the node counts it done when the answer lands
            with Client("127.0.0.1", port, token=tokens["ops"]) as ops:   # the full health needs a role
                h = ops.call("health")
            return h if h["upstream"]["state"] == "ok" and h["upstream"]["forgets_pending"] == 0 else None
        health = _wait(acknowledged, 30, "the node to count the forget acknowledged")
        replies.append(health)
        assert next(bad, None) is None, "every bad id was used"

        # -- metrics: scraped, checked, nothing saved ----------------------------------------------------------
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        assert "edgerec_requests_total" in metrics and "edgerec_events_tracked_total" in metrics

        # -- the loop: one round on the collected events, as a process with the same HOME --------------------------
        loop_log = logs / "loop.log"
        res = _cli(["loop", "--checkpoint", str(ckpt), "--collect", str(collect_dir), "--registry",
                    str(registry_dir), "--key", str(sign.with_suffix(".key")), "--workdir", str(workdir),
                    "--time-budget", "8", "--threads", "2", "--once"], env, loop_log, timeout=240)
        assert res.returncode in (0, 1), f"edgerec loop exited {res.returncode}: {loop_log.read_text()[-3000:]}"
        state_json = json.loads((workdir / "loop.json").read_text())
        rec = state_json["updates"][-1]
        assert "error" not in rec and rec["events"] > 0 and "gate" in rec, rec
        if rec["published"]:   # the node follows the registry: let it install the fine-tuned model too
            _wait(lambda: _health(port)["model_version"] == rec["version"], 60, "the node to serve the new model")
    finally:
        rcs = [stop_daemon(p) for p in reversed(procs) if p.poll() is None]
    assert rcs == [0] * len(procs), f"a daemon did not exit cleanly: {rcs}"
    t_traffic = time.time()

    # -- the scan ----------------------------------------------------------------------------------------------
    needles: dict[bytes, str] = {}
    for user in SHOPPERS + BAD_IDS:
        for b, how in _forms(user):
            needles.setdefault(b, f"raw shopper id {user!r} ({how})")
    for role, tok in list(tokens.items()) + [("wrong", wrong), ("near-miss shop", near_miss)]:
        for b, how in ((tok.encode(), "hex"), (tok.upper().encode(), "upper-case hex"),
                       (tok.encode("utf-16-le"), "utf-16-le"), (bytes.fromhex(tok), "raw bytes")):
            needles[b] = f"the {role} token ({how})"
    # the scanner finds what it looks for, in every form (a planted file outside the scanned tree)
    plant = tmp_path.parent / f"{tmp_path.name}-plant"
    plant.mkdir(exist_ok=True)
    probe = Scan(needles, {})
    for k, (b, _) in enumerate(_forms(SHOPPERS[20])):
        (plant / f"f{k}").write_bytes(b"\x00junk" + b + b"junk")
    (plant / "t").write_bytes(b"x" + bytes.fromhex(tokens["ops"]) + b"y")
    probe.walk(plant)
    shutil.rmtree(plant)
    assert len(probe.hits) == len(probe.files) == len(_forms(SHOPPERS[20])) + 1, probe.hits

    scan = Scan(needles, skip)
    scan.walk(tmp)
    # files this run wrote into the working directory of the processes (the repository): none may hold a needle
    cwd_scan = Scan(needles, {})
    cwd_scan.walk(Path(PACKAGE_ROOT), newer_than=t_start, prune=(".git", ".venv"))
    hits = scan.hits + cwd_scan.hits
    print(f"\nleak scan: {len(scan.files)} files, {scan.bytes:,} bytes under {tmp} ({len(scan.skipped)} inputs "
          f"skipped); {len(cwd_scan.files)} files, {cwd_scan.bytes:,} bytes written into {PACKAGE_ROOT} during the "
          f"test; {len(needles)} needles; traffic + loop {t_traffic - t_start:.1f} s")
    for p, n in sorted(scan.files):
        print(f"  {n:>12,}  {p.relative_to(tmp)}")
    for p, n in sorted(cwd_scan.files):
        print(f"  {n:>12,}  {p} (working directory)")
    assert not hits, "raw shopper ids or tokens written to disk:\n" + "\n".join(hits)

    # nor are they in what the node reported: metrics, stats, health, error replies
    texts = {"metrics": metrics, "replies": "\n".join(json.dumps(r.to_wire() if isinstance(r, RpcError) else r,
                                                                 ensure_ascii=False) for r in replies)}
    for what, text in texts.items():
        for role, tok in list(tokens.items()) + [("wrong", wrong), ("near-miss shop", near_miss)]:
            assert tok not in text, f"the {role} token appears in the {what}"
    for user in SHOPPERS + BAD_IDS:   # (an error reply may name what its own client sent; the metrics never)
        assert not [how for b, how in _forms(user) if b.decode("utf-8", "replace") in metrics], \
            f"{user!r} in the metrics"

    # -- positive controls: the scan read the real thing ----------------------------------------------------------
    scanned = {p: n for p, n in scan.files}
    must = [state / const.EVENT_DB, collect_dir / const.COLLECTOR_DB, state / const.PSEUDONYM_KEY_FILE,
            state / const.UPSTREAM_STATE, workdir / "loop.json", logs / "node.log", logs / "registry.log",
            logs / "loop.log"]
    for p in must:
        assert scanned.get(p, 0) > 0, f"{p} was not scanned or is empty"
    assert len(scan.files) >= 25 and scan.bytes >= 2_000_000, (len(scan.files), scan.bytes)
    assert any(p.is_relative_to(registry_dir) and p.name == "encoder.int8.onnx" for p in scanned)
    assert any(p.is_relative_to(state) and p.name == "manifest.json" for p in scanned)   # the synced bundle
    pseud = load_key(state / const.PSEUDONYM_KEY_FILE)
    want = {pseud(u) for u in SHOPPERS if u != FORGOTTEN}
    node_rows = _rows(state / const.EVENT_DB, "SELECT user, event_id FROM events")
    coll_rows = _rows(collect_dir / const.COLLECTOR_DB, "SELECT user FROM events")
    assert len(node_rows) == len(coll_rows) == n_kept
    assert {u for u, _ in node_rows} == {u for u, in coll_rows} == want
    assert all(PSEUDONYM.match(u) for u, _ in node_rows)
    raw_event_ids = {x["event_id"] for v in events.values() for x in v}
    assert all(e is None or (PSEUDONYM.match(e) and e not in raw_event_ids) for _, e in node_rows)
    assert pseud(FORGOTTEN) not in {u for u, in coll_rows}
    assert not (home / ".cache" / "Microsoft").exists(), \
        f"ONNX Runtime telemetry under the fresh HOME: {sorted(map(str, (home / '.cache' / 'Microsoft').rglob('*')))}"


def _health(port: int) -> dict:
    with Client("127.0.0.1", port, timeout=5) as c:
        return c.call("health")
