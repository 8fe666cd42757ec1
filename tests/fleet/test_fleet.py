"""Model sync and the fleet: signatures, registry, resumable verified transfers, hot swap under load, rollback,
offline serving, peers, zeroconf on loopback, rendezvous routing, and every fault of the issue (each leaves the
node serving its current model and shows in health)."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from edge_runtime.bundle import signing
from edge_runtime.bundle import MANIFEST, load_manifest, sha256_file
from edge_runtime.client import AsyncClient, Client
from edge_runtime.fleet.discovery import NODE_TYPE
from edge_runtime.errors import BundleError, InvalidParams, SignatureError
from edge_runtime.fleet import FleetClient, rendezvous_order
from edgerec.process import free_port, start_daemon, stop_daemon
from edge_runtime.bundle.store import MAX_CHUNK, BundleStore, publish
from edge_runtime.fleet.registry import RegistryService
from edge_runtime.rpc.server import RpcServer
from edge_runtime.ops.node import wire_sync
from edge_runtime.serving.service import Service
from edge_runtime.serving.swap import ModelSwapper
from edge_runtime.fleet.sync import SyncManager


# ------------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    signing.keygen(d / "trainer")
    signing.keygen(d / "stranger")
    return {"key": d / "trainer.key", "pub": d / "trainer.pub", "other_key": d / "stranger.key",
            "trusted": signing.load_public_keys([d / "trainer.pub"])}


def _sign_raw(bundle_dir: Path, key_path: Path) -> None:
    signing.sign_bundle(bundle_dir, signing.load_private_key(key_path))


def _rehash(d: Path, version: str, published_at: float | None = None, files_override: dict | None = None) -> None:
    """Rewrite d/manifest.json with fresh sha256s and a version (a bundle crafted by a test)."""
    m = json.loads((d / MANIFEST).read_text())
    files = {}
    for name in m["files"]:
        files[name] = {"sha256": sha256_file(d / name), "bytes": (d / name).stat().st_size}
    if files_override:
        files.update(files_override)
    m.update(files=files, model_version=version, channel="stable", published_at=published_at or time.time())
    (d / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True))


def _crafted(reg: Path, src: Path, version: str, key_path: Path, mutate=None, files_override=None) -> Path:
    """Copy ``src`` into the registry as ``version``, let ``mutate(dir)`` change it, rehash, sign."""
    d = reg / version
    shutil.copytree(src, d)
    (d / signing.SIGNATURE_FILE).unlink(missing_ok=True)
    if mutate:
        mutate(d)
    _rehash(d, version, files_override=files_override)
    _sign_raw(d, key_path)
    return d


class Node:
    """An in-process edge node: Service + SyncManager + RPC server on a free loopback port."""

    def __init__(self, state: Path, trusted, registry, discovery=None, **kw):
        self.service = Service(None)
        self.swapper = ModelSwapper(self.service)
        self.sync = SyncManager(self.swapper, state, trusted, registry=registry, discovery=discovery,
                                poll_seconds=3600, fetch_jitter=0, **kw)
        wire_sync(self.service, self.swapper, self.sync)
        self.server = RpcServer(self.service.methods)

    async def start(self):
        await self.server.start("127.0.0.1", 0)
        self.sync._wake = asyncio.Event()
        self.port = self.server.tcp_port
        return self

    async def stop(self):
        await self.server.shutdown(1.0)
        self.service.executor.shutdown(wait=True)

    @property
    def version(self):
        return self.service.model.version if self.service.model else None

    def health(self):
        return self.service.health({})


class Registry:
    def __init__(self, root: Path, port: int = 0):
        self.service = RegistryService(root)
        self.root, self.port = root, port
        self.server = None

    async def start(self):
        self.server = RpcServer(self.service.methods)
        await self.server.start("127.0.0.1", self.port)
        self.port = self.server.tcp_port
        return self

    async def kill(self):
        """Like a killed process: listeners closed, every connection aborted."""
        for srv in self.server.servers:
            srv.close()
        for conn in list(self.server.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for srv in self.server.servers:
            await srv.wait_closed()

    @property
    def addr(self):
        return ("127.0.0.1", self.port)


@pytest.fixture()
def reg_dir(tmp_path, tiny_bundle, keys):
    reg = tmp_path / "registry"
    publish(tiny_bundle, reg, keys["key"], version="v1")
    return reg


def run(coro):
    return asyncio.run(coro)


# ----------------------------------------------------------------------------------------------------- signing
def test_keygen_modes_and_no_overwrite(tmp_path):
    priv, pub = signing.keygen(tmp_path / "k")
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(FileExistsError):
        signing.keygen(tmp_path / "k")


def test_sign_verify_and_refusals(tmp_path, tiny_bundle, keys):
    reg = tmp_path / "r"
    publish(tiny_bundle, reg, keys["key"], version="a")
    d = reg / "a"
    assert signing.verify_bundle(d, keys["trusted"]) == next(iter(keys["trusted"]))
    # unknown key
    _sign_raw(d, keys["other_key"])
    with pytest.raises(SignatureError, match="not a trusted key"):
        signing.verify_bundle(d, keys["trusted"])
    # a manifest altered after signing
    _sign_raw(d, keys["key"])
    m = json.loads((d / MANIFEST).read_text())
    m["metrics"] = {"forged": 1}
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify_bundle(d, keys["trusted"])
    (d / signing.SIGNATURE_FILE).unlink()
    with pytest.raises(SignatureError, match="unsigned"):
        signing.verify_bundle(d, keys["trusted"])


def test_publish_checks(tmp_path, tiny_bundle, keys):
    reg = tmp_path / "r"
    v = publish(tiny_bundle, reg, keys["key"], channel="beta", version="x1")
    m = json.loads((reg / v / MANIFEST).read_text())
    assert (m["model_version"], m["channel"]) == ("x1", "beta") and m["published_at"] > 0
    with pytest.raises(BundleError, match="already"):
        publish(tiny_bundle, reg, keys["key"], version="x1")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    with open(bad / "popularity.npy", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    with pytest.raises(BundleError, match="popularity.npy"):
        publish(bad, reg, keys["key"], version="x2")
    assert not (reg / "x2").exists()
    assert [r["version"] for r in BundleStore(reg).versions()] == ["x1"]


def test_store_fetch_bounds(reg_dir, tiny_bundle):
    store = BundleStore(reg_dir)
    size = (tiny_bundle / "items.f32.npy").stat().st_size
    got = store.fetch("v1", "items.f32.npy", 10, 1 << 30)
    assert len(got["data"]) == min(MAX_CHUNK, size - 10) and got["size"] == size
    assert got["data"] == (tiny_bundle / "items.f32.npy").read_bytes()[10:10 + len(got["data"])]
    assert store.fetch("v1", "items.f32.npy", size + 5, 10) == {"data": b"", "size": size, "eof": True}
    for name in ("../v1/manifest.json", "/etc/passwd", "nope.bin"):
        with pytest.raises(InvalidParams, match="not listed"):
            store.fetch("v1", name, 0, 10)
    with pytest.raises(ValueError, match="not held"):
        store.fetch("../v1", "items.f32.npy", 0, 10)
    with pytest.raises(ValueError, match="offset"):
        store.fetch("v1", "items.f32.npy", -1, 10)
    # a listed file replaced by a link (to a secret outside the bundle) is never served, and the bundle is refused
    secret = reg_dir.parent / "secret.txt"
    secret.write_text("private")
    (reg_dir / "v1" / "item_ids.json").unlink()
    (reg_dir / "v1" / "item_ids.json").symlink_to(secret)
    with pytest.raises(InvalidParams, match="link"):
        store.fetch("v1", "item_ids.json", 0, 100)
    with pytest.raises(BundleError, match="item_ids.json"):
        load_manifest(reg_dir / "v1")


# ------------------------------------------------------------------------------------------ sync: happy paths
def test_sync_installs_and_serves_over_rpc(tmp_path, reg_dir, keys, tiny_bundle):
    async def go():
        reg = await Registry(reg_dir).start()
        node = await Node(tmp_path / "n", keys["trusted"], reg.addr).start()
        assert node.health()["status"] == "no_model"
        assert await node.sync.check_once() is True
        assert node.version == "v1"
        c = await AsyncClient.connect("127.0.0.1", node.port)
        res = await c.call("recommend", history=["1", "2"], k=5)
        h = await c.call("health")
        await c.close()
        assert res["model_version"] == "v1" and len(res["items"]) == 5
        assert h["sync"]["current"] == "v1" and h["sync"]["registry_reachable"] is True and h["offline"] is False
        # every file arrived byte-identical
        for name in load_manifest(tiny_bundle)["files"]:
            assert sha256_file(tmp_path / "n" / "bundles" / "v1" / name) == sha256_file(tiny_bundle / name)
        assert node.sync.bytes_from["registry"] == sum(m["bytes"] for m in load_manifest(tiny_bundle)["files"]
                                                       .values())
        await node.stop()
    run(go())


def test_hot_swap_under_load_drops_nothing(tmp_path, reg_dir, keys, tiny_bundle):
    async def go():
        reg = await Registry(reg_dir).start()
        node = await Node(tmp_path / "n", keys["trusted"], reg.addr).start()
        await node.sync.check_once()
        publish(tiny_bundle, reg_dir, keys["key"], version="v2")
        seen, failures, stop = [], [], asyncio.Event()

        async def load(i):
            c = await AsyncClient.connect("127.0.0.1", node.port)
            while not stop.is_set():
                try:
                    r = await c.call("recommend", history=[str(1 + (i * 7 + len(seen)) % 500)], k=10)
                    seen.append(r["model_version"])
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    failures.append(repr(exc))
            await c.close()

        tasks = [asyncio.ensure_future(load(i)) for i in range(8)]
        await asyncio.sleep(0.3)
        before = len(seen)
        await node.sync.check_once()
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)
        await node.stop()
        return seen, failures, before

    seen, failures, before = run(go())
    assert failures == []
    assert before > 0 and "v1" in seen[:before]
    assert seen[-1] == "v2"
    first_v2 = seen.index("v2")
    # after the first reply from v2, no reply came from v1 except requests already in flight (at most 8 clients)
    assert seen[first_v2:].count("v1") <= 8


def test_rollback_rpc_and_boot_prefers_newest_verified(tmp_path, reg_dir, keys, tiny_bundle):
    async def go():
        reg = await Registry(reg_dir).start()
        node = await Node(tmp_path / "n", keys["trusted"], reg.addr, keep=2).start()
        await node.sync.check_once()
        with pytest.raises(ValueError, match="no earlier"):
            await node.sync.rpc_rollback({})
        publish(tiny_bundle, reg_dir, keys["key"], version="v2")
        await node.sync.check_once()
        assert node.version == "v2"
        cl = await AsyncClient.connect("127.0.0.1", node.port)
        assert await cl.call("rollback") == {"ok": True, "from": "v2", "to": "v1"}
        await cl.close()
        assert node.version == "v1"
        # the registry still says v2: it stays skipped, the node keeps v1
        await node.sync.check_once()
        assert node.version == "v1" and node.health()["sync"]["skipped"] == {"v2": "rolled back"}
        # a second rollback does not flip back to the version the first one left
        with pytest.raises(ValueError, match="no earlier"):
            await node.sync.rpc_rollback({})
        assert node.version == "v1"
        # a newer version ends the pin
        publish(tiny_bundle, reg_dir, keys["key"], version="v3")
        await node.sync.check_once()
        assert node.version == "v3"
        # keep=2: only the two newest history entries survive pruning
        assert sorted(node.health()["sync"]["versions_on_disk"]) == ["v1", "v3"]
        await node.stop()
    run(go())
    # boot: a new SyncManager over the same state serves the newest verified, non-skipped bundle before any I/O
    sync = SyncManager(None, tmp_path / "n", keys["trusted"])
    assert sync.load_newest().version == "v3"
    # tamper with v3 on disk: boot falls back to v1 and says why
    with open(tmp_path / "n" / "bundles" / "v3" / "items.i8.npy", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x7f")
    sync = SyncManager(None, tmp_path / "n", keys["trusted"])
    assert sync.load_newest().version == "v1"
    assert "v3" in sync.status["last_error"] and "checksum" in sync.status["last_error"]


def test_adopt_refuses_unsigned_or_untrusted(tmp_path, tiny_bundle, reg_dir, keys):
    sync = SyncManager(None, tmp_path / "n", keys["trusted"])
    with pytest.raises(SignatureError, match="unsigned"):
        sync.adopt(tiny_bundle)
    assert sync.adopt(reg_dir / "v1").version == "v1"
    with pytest.raises(SignatureError, match="trusted public key"):
        SyncManager(None, tmp_path / "m", {})


# ------------------------------------------------------------------------------------------------------ faults
def test_offline_keeps_serving_and_resumes(tmp_path, reg_dir, keys, tiny_bundle):
    async def go():
        reg = await Registry(reg_dir).start()
        node = await Node(tmp_path / "n", keys["trusted"], reg.addr).start()
        await node.sync.check_once()
        await reg.kill()
        assert await node.sync.check_once() is False
        h = node.health()
        assert h["offline"] is True and h["sync"]["state"] == "offline" and h["status"] == "ok"
        assert "unreachable" in h["sync"]["last_error"]
        res = await node.service.recommend({"history": ["1"], "k": 3})
        assert res["model_version"] == "v1" and len(res["items"]) == 3
        publish(tiny_bundle, reg_dir, keys["key"], version="v2")
        reg2 = await Registry(reg_dir, reg.port).start()
        assert await node.sync.check_once() is True
        assert node.version == "v2" and node.health()["offline"] is False
        await node.stop()
        await reg2.kill()
    run(go())


def test_sync_loop_backs_off_then_recovers(tmp_path, reg_dir, keys):
    """The real loop: registry down at start -> offline with growing waits; back -> installs on its own."""
    async def go():
        port = free_port()
        node = Node(tmp_path / "n", keys["trusted"], ("127.0.0.1", port))
        node.sync.max_backoff = 0.4
        await node.start()
        await node.sync.start()
        await asyncio.sleep(1.0)
        assert node.health()["offline"] is True and node.version is None
        reg = await Registry(reg_dir, port).start()
        for _ in range(50):
            if node.version == "v1":
                break
            await asyncio.sleep(0.1)
        assert node.version == "v1" and node.health()["offline"] is False
        await node.sync.stop()
        await node.stop()
        await reg.kill()
    run(go())


def test_registry_killed_mid_transfer_resumes(tmp_path, reg_dir, keys, tiny_bundle):
    total = sum(m["bytes"] for m in load_manifest(tiny_bundle)["files"].values())

    async def go():
        reg = await Registry(reg_dir).start()
        node = await Node(tmp_path / "n", keys["trusted"], reg.addr, chunk_bytes=32 << 10).start()
        await node.sync.check_once()
        publish(tiny_bundle, reg_dir, keys["key"], version="v2")
        served = {"n": 0}
        orig = reg.service.methods["fetch"][0]

        def fetch(p):
            served["n"] += 1
            if served["n"] == 6:
                asyncio.ensure_future(reg.kill())
            return orig(p)
        reg.service.methods["fetch"] = (fetch, False)
        await node.sync.check_once()
        assert node.version == "v1"                 # still serving the old model
        h = node.health()["sync"]
        assert "v2" in h["last_error"] and h["errors"] >= 1
        kept = [p for p in (tmp_path / "n" / "staging" / "v2").iterdir() if p.name != MANIFEST]
        assert kept and node.sync.bytes_from["registry"] < 2 * total     # a partial transfer was kept
        reg.service.methods["fetch"] = (orig, False)
        reg2 = await Registry(reg_dir, reg.port).start()
        offsets = []

        def spy(p):
            offsets.append((p["file"], p["offset"]))
            return orig(p)
        reg2.service.methods["fetch"] = (spy, False)
        await node.sync.check_once()
        assert node.version == "v2"
        # resumed: no byte of v2 was fetched twice (v1 once + v2 once), and files finished before the kill were
        # not asked for again
        assert node.sync.bytes_from["registry"] == 2 * total
        assert len({f for f, _ in offsets}) < len(load_manifest(tiny_bundle)["files"]) or offsets[0][1] > 0
        await node.stop()
        await reg2.kill()
    run(go())


def test_corrupted_chunk_is_discarded_then_refetched(tmp_path, reg_dir, keys, tiny_bundle):
    async def go():
        reg = await Registry(reg_dir).start()
        node = await Node(tmp_path / "n", keys["trusted"], reg.addr).start()
        await node.sync.check_once()
        publish(tiny_bundle, reg_dir, keys["key"], version="v2")
        orig = reg.service.methods["fetch"][0]
        hits = {"n": 0}

        def corrupt(p):
            out = orig(p)
            hits["n"] += 1
            if hits["n"] == 2 and out["data"]:
                out = dict(out, data=bytes([out["data"][0] ^ 0xFF]) + out["data"][1:])
            return out
        reg.service.methods["fetch"] = (corrupt, False)
        await node.sync.check_once()
        assert node.version == "v1"
        err = node.health()["sync"]["last_error"]
        assert "sha256 mismatch" in err and "v2" in err
        assert "v2" not in node.health()["sync"]["skipped"]       # transient: retried
        await node.sync.check_once()
        assert node.version == "v2"
        await node.stop()
    run(go())


@pytest.mark.parametrize("fault", ["unknown_key", "checksum_mismatch", "dotdot_name", "warmup_fails"])
def test_bad_bundles_are_refused_and_node_keeps_serving(tmp_path, reg_dir, keys, tiny_bundle, fault):
    async def go():
        reg = await Registry(reg_dir).start()
        node = await Node(tmp_path / "n", keys["trusted"], reg.addr).start()
        await node.sync.check_once()
        src = reg_dir / "v1"
        if fault == "unknown_key":
            _crafted(reg_dir, src, "v2", keys["other_key"])
            words = "not a trusted key"
        elif fault == "checksum_mismatch":
            d = _crafted(reg_dir, src, "v2", keys["key"])
            # the signed manifest's checksum no longer matches the file served
            with open(d / "popularity.npy", "r+b") as f:
                f.seek(-4, 2)
                f.write(b"\x00\x00\x80\x7f")
            words = "sha256 mismatch"
        elif fault == "dotdot_name":
            def add_evil(d):
                (d / "evil").write_bytes(b"x")
            d = _crafted(reg_dir, src, "v2", keys["key"], mutate=add_evil,
                         files_override={"../evil": {"sha256": "0" * 64, "bytes": 1}})
            words = "not allowed"
        else:
            def break_encoder(d):
                (d / "encoder.int8.onnx").write_bytes(b"this is not an onnx model")
            _crafted(reg_dir, src, "v2", keys["key"], mutate=break_encoder)
            words = "warm-up"
        await node.sync.check_once()
        h = node.health()
        assert node.version == "v1" and h["status"] == "ok"
        assert words in h["sync"]["last_error"], h["sync"]["last_error"]
        res = await node.service.recommend({"history": ["1"], "k": 3})
        assert res["model_version"] == "v1"
        assert not (tmp_path / "n" / "evil").exists() and not (tmp_path / "n" / "staging" / "evil").exists()
        assert not (tmp_path / "n" / "bundles" / "v2").exists() or fault == "warmup_fails"
        if fault in ("unknown_key", "warmup_fails"):
            assert "v2" in h["sync"]["skipped"]    # not retried until the registry names another version
        await node.stop()
    run(go())


def test_disk_full_while_staging(tmp_path, reg_dir, keys, tiny_bundle, monkeypatch):
    async def go():
        reg = await Registry(reg_dir).start()
        node = await Node(tmp_path / "n", keys["trusted"], reg.addr, chunk_bytes=32 << 10).start()
        await node.sync.check_once()
        publish(tiny_bundle, reg_dir, keys["key"], version="v2")
        calls = {"n": 0}

        def full(f, data):
            calls["n"] += 1
            if calls["n"] >= 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write(data)
        monkeypatch.setattr(node.sync.transfer, "_write_chunk", full)
        await node.sync.check_once()
        h = node.health()
        assert node.version == "v1" and "disk full" in h["sync"]["last_error"]
        assert not (tmp_path / "n" / "staging" / "v2").exists()     # space given back
        monkeypatch.undo()
        await node.sync.check_once()
        assert node.version == "v2"
        await node.stop()
    run(go())


class _FakeDiscovery:
    """Peers as zeroconf would report them (only ``services`` is read by the sync)."""

    def __init__(self, peers):
        self.services = {NODE_TYPE: peers}

    def browse(self, *a, **k):
        pass


def test_peer_announcing_unservable_version_falls_back_to_registry(tmp_path, reg_dir, keys, tiny_bundle):
    async def go():
        reg = await Registry(reg_dir).start()
        good = await Node(tmp_path / "good", keys["trusted"], reg.addr).start()
        await good.sync.check_once()
        publish(tiny_bundle, reg_dir, keys["key"], version="v2")
        await good.sync.check_once()
        dead = free_port()
        liar_state = await Node(tmp_path / "liar", keys["trusted"], reg.addr).start()   # holds nothing
        peers = {"dead": {"name": "dead", "host": "127.0.0.1", "port": dead,
                          "props": {"node": "dead", "version": "v2", "rpc": str(dead)}},
                 "liar": {"name": "liar", "host": "127.0.0.1", "port": liar_state.port,
                          "props": {"node": "liar", "version": "v2", "rpc": str(liar_state.port)}}}
        node = await Node(tmp_path / "n", keys["trusted"], reg.addr, discovery=_FakeDiscovery(peers)).start()
        before = reg.service.store.bytes_served
        await node.sync.check_once()
        assert node.version == "v2"
        assert reg.service.store.bytes_served > before        # the registry had to serve it
        # a peer that really holds v2 is used instead of the registry
        peers["good"] = {"name": "good", "host": "127.0.0.1", "port": good.port,
                         "props": {"node": "good", "version": "v2", "rpc": str(good.port)}}
        del peers["dead"], peers["liar"]
        fresh = await Node(tmp_path / "fresh", keys["trusted"], reg.addr, discovery=_FakeDiscovery(peers)).start()
        before = reg.service.store.bytes_served
        await fresh.sync.check_once()
        assert fresh.version == "v2" and fresh.sync.bytes_from["peer"] > 0
        assert reg.service.store.bytes_served == before and good.sync.store.bytes_served > 0
        for n in (good, liar_state, node, fresh):
            await n.stop()
    run(go())


# ------------------------------------------------------------------------------------ zeroconf + fleet client
def test_rendezvous_moves_only_the_lost_nodes_users():
    nodes = ["a", "b", "c", "d"]
    users = [f"u{i}" for i in range(2000)]
    first = {u: rendezvous_order(u, nodes)[0] for u in users}
    counts = {n: sum(1 for v in first.values() if v == n) for n in nodes}
    assert all(350 < c < 650 for c in counts.values()), counts
    after = {u: rendezvous_order(u, ["a", "b", "d"])[0] for u in users}
    moved = [u for u in users if first[u] != after[u]]
    assert moved and all(first[u] == "c" for u in moved)
    assert all(after[u] == rendezvous_order(u, nodes)[1] for u in moved)


def test_zeroconf_fleet_on_loopback(tmp_path, tiny_bundle, keys):
    """Real processes: a registry and two nodes find each other over zeroconf on 127.0.0.1; a publish reaches
    both nodes without polling; the fleet client routes users and fails over when a node dies."""
    reg_dir = tmp_path / "reg"
    publish(tiny_bundle, reg_dir, keys["key"], version="v1")
    rport, p1, p2 = free_port(), free_port(), free_port()
    procs = []
    try:
        procs.append(start_daemon(None, rport, ["--bundles", str(reg_dir)], command="registry",
                                  log_path=tmp_path / "reg.log"))
        common = ["--trusted-key", str(keys["pub"]), "--poll-seconds", "600"]
        for port, name in ((p1, "n1"), (p2, "n2")):
            procs.append(start_daemon(None, port, common + ["--state-dir", str(tmp_path / name), "--node-id", name],
                                      log_path=tmp_path / f"{name}.log", ready=("ok", "no_model")))

        def versions():
            out = []
            for port in (p1, p2):
                with Client("127.0.0.1", port) as c:
                    out.append(c.call("health")["model_version"])
            return out

        deadline = time.monotonic() + 20
        while versions() != ["v1", "v1"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert versions() == ["v1", "v1"]
        publish(tiny_bundle, reg_dir, keys["key"], version="v2")
        t0 = time.monotonic()
        while versions() != ["v2", "v2"] and time.monotonic() < t0 + 20:
            time.sleep(0.2)
        assert versions() == ["v2", "v2"]
        assert time.monotonic() - t0 < 15          # announcement-driven: the nodes poll only every 600 s

        fc = FleetClient(loopback_only=True, timeout=5)
        try:
            found = fc.wait_for(2, timeout=10)
            strays = sorted(set(found) - {"n1", "n2"})
            assert not strays, (f"other edgerec nodes announce on loopback {strays}: this test routes over every node "
                                f"it discovers; stop them (an `edgerec serve` left running?) or start them with "
                                f"--no-discovery")
            assert set(found) == {"n1", "n2"}
            homes = {}
            for u in ("alice", "bob", "carol", "dave", "erin", "frank"):
                node, res = fc.call(u, "recommend", history=["1"], k=3)
                assert node == rendezvous_order(u, ["n1", "n2"])[0] and len(res["items"]) == 3
                homes[u] = node
            victim = procs[1] if "n1" in homes.values() else procs[2]
            stop_daemon(victim)
            for u in homes:
                node, res = fc.call(u, "recommend", history=["1"], k=3)
                assert len(res["items"]) == 3 and node != ("n1" if victim is procs[1] else "n2")
        finally:
            fc.close()
    finally:
        for p in procs:
            if p.poll() is None:
                stop_daemon(p)


# --------------------------------------------------------------------------- defects found by a breaker, fixed
def test_junk_version_dirs_are_skipped_not_fatal(reg_dir, tmp_path):
    for name, text in (("junk", '{"files": {"a": {"bytes": null}}}'), ("junk2", '{"published_at": "yesterday", '
                       '"files": {}}'), ("junk3", "not json")):
        (reg_dir / name).mkdir()
        (reg_dir / name / MANIFEST).write_text(text)
    (reg_dir / "evil").symlink_to(reg_dir / "v1")            # a linked version directory is not listed
    svc = RegistryService(reg_dir)
    assert [r["version"] for r in svc.store.versions()] == ["v1"]
    assert svc.health({})["latest"] == "v1"
    with pytest.raises(InvalidParams, match="unknown parameter"):
        svc.methods["fetch"][0]({1: 2, "x": 3, "version": "v1", "file": "item_ids.json"})


def test_symlinked_directory_inside_a_version_is_not_served(reg_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("private")
    d = reg_dir / "v1"
    (d / "extra").symlink_to(outside)
    m = json.loads((d / MANIFEST).read_text())
    m["files"]["extra/secret.txt"] = {"sha256": sha256_file(outside / "secret.txt"), "bytes": 7}
    (d / MANIFEST).write_text(json.dumps(m))
    store = BundleStore(reg_dir)
    with pytest.raises(InvalidParams, match="leaves the bundle"):
        store.fetch("v1", "extra/secret.txt", 0, 100)


@pytest.mark.parametrize("version", ["../../escaped", "/abs", "a\nb", " ", "a\x01b", ".hidden", "x" * 200])
def test_bad_version_names_refused_everywhere(tmp_path, tiny_bundle, keys, version):
    with pytest.raises(BundleError, match="not allowed"):
        publish(tiny_bundle, tmp_path / "r", keys["key"], version=version)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    m = json.loads((bad / MANIFEST).read_text())
    m["model_version"] = version
    (bad / MANIFEST).write_text(json.dumps(m))
    _sign_raw(bad, keys["key"])
    sync = SyncManager(None, tmp_path / "state", keys["trusted"])
    with pytest.raises(BundleError, match="not allowed"):
        sync.adopt(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "state"]   # nothing written outside


def test_staged_file_is_hashed_before_install(tmp_path, reg_dir, keys, tiny_bundle):
    """A file already in staging with the right size but other bytes is not trusted: it is re-fetched."""
    async def go():
        reg = await Registry(reg_dir).start()
        node = await Node(tmp_path / "n", keys["trusted"], reg.addr).start()
        await node.sync.check_once()
        publish(tiny_bundle, reg_dir, keys["key"], version="v2")
        stage = tmp_path / "n" / "staging" / "v2"
        stage.mkdir(parents=True)
        shutil.copy(reg_dir / "v2" / MANIFEST, stage / MANIFEST)
        good = (reg_dir / "v2" / "popularity.npy").read_bytes()
        (stage / "popularity.npy").write_bytes(good[:-4] + b"\x00\x00\x80\x7f")
        await node.sync.check_once()
        assert node.version == "v2"
        assert (tmp_path / "n" / "bundles" / "v2" / "popularity.npy").read_bytes() == good
        await node.stop()
    run(go())


def test_rollback_is_not_blocked_by_a_slow_transfer(tmp_path, reg_dir, keys, tiny_bundle):
    async def go():
        reg = await Registry(reg_dir).start()
        node = await Node(tmp_path / "n", keys["trusted"], reg.addr, chunk_bytes=64 << 10).start()
        await node.sync.check_once()
        publish(tiny_bundle, reg_dir, keys["key"], version="v2")
        await node.sync.check_once()
        publish(tiny_bundle, reg_dir, keys["key"], version="v3")
        orig = reg.service.methods["fetch"][0]

        async def slow(p):
            await asyncio.sleep(0.5)
            return orig(p)
        reg.service.methods["fetch"] = (slow, True)
        transfer = asyncio.ensure_future(node.sync.check_once())
        await asyncio.sleep(1.0)
        assert node.sync.status["state"] == "downloading"
        t0 = time.monotonic()
        res = await asyncio.wait_for(node.sync.rpc_rollback({}), 5)
        assert res == {"ok": True, "from": "v2", "to": "v1"} and time.monotonic() - t0 < 2
        transfer.cancel()
        await node.stop()
    run(go())


@pytest.mark.parametrize("reply", [None, [1, 2], {"manifest": "text", "signature": {}}, {"manifest": b"{}"}])
def test_malformed_manifest_replies_give_clear_errors(tmp_path, reg_dir, keys, tiny_bundle, reply):
    async def go():
        reg = await Registry(reg_dir).start()
        node = await Node(tmp_path / "n", keys["trusted"], reg.addr).start()
        await node.sync.check_once()
        publish(tiny_bundle, reg_dir, keys["key"], version="v2")
        reg.service.methods["manifest"] = (lambda p: reply, False)
        await node.sync.check_once()
        h = node.health()["sync"]
        assert node.version == "v1" and h["state"] == "idle"
        assert "cannot fetch v2" in h["last_error"] and "internal error" not in h["last_error"]
        await node.stop()
    run(go())


def test_state_file_is_sanitized_and_bounded(tmp_path, keys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "state.json").write_text(json.dumps({"history": [1, None, ["x"], "v1", "../x"],
                                                           "skip": {"ok": "r", "../bad": "r", "n\nl": 1}}))
    sync = SyncManager(None, tmp_path / "s", keys["trusted"])
    assert sync.state == {"history": ["v1"], "skip": {"ok": "r"}}
    for i in range(120):
        sync._skip(f"v{i}", "x" * 1000)
    assert len(sync.state["skip"]) == 50 and "v119" in sync.state["skip"] and "v0" not in sync.state["skip"]
    assert max(len(r) for r in sync.state["skip"].values()) == 300
    assert os.path.getsize(tmp_path / "s" / "state.json") < 40_000


def test_registry_latest_reply_that_is_not_a_record(tmp_path, reg_dir, keys):
    async def go():
        reg = await Registry(reg_dir).start()
        node = await Node(tmp_path / "n", keys["trusted"], reg.addr).start()
        reg.service.methods["latest"] = (lambda p: ["v9"], False)
        assert await node.sync.check_once() is True
        assert node.version is None and "not a version record" in node.health()["sync"]["last_error"]
        await node.stop()
    run(go())
