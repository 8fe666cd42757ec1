"""``edgerec loop`` (``edgerec/loop.py``) on real parts: the tiny bundle's checkpoint, a collector SQLite file
filled through ``CollectorStore.ingest`` with real Beauty shoppers (ones the tiny model never saw), a registry
directory with real signatures. A round fine-tunes, gates and publishes; a corrupt checkpoint and a broken update
are refused with the loop still running and the last good model current."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from edge_runtime import const
from edge_runtime.bundle.signing import load_public_keys, verify_bundle
from edge_runtime.bundle.store import BundleStore
from edge_runtime.fleet.collector import CollectorStore
from edgerec.cli import main as cli
from edgerec.loop import Loop, LoopConfig
from edgerec.process import free_port
from trainer.data import EMBEDDED_DIR
from trainer.finetune import FinetuneConfig

FIRST, LAST = 3000, 3900   # Beauty.txt lines after the tiny subset: shoppers the tiny model never saw


def shoppers() -> list[list]:
    with open(EMBEDDED_DIR / "Beauty.txt", encoding="utf-8") as f:
        lines = [ln.split() for i, ln in enumerate(f) if FIRST <= i < LAST]
    rng = random.Random(0)
    rows = []
    for ln in lines:
        user = hashlib.sha256(ln[0].encode()).hexdigest()[:32]
        for j, item in enumerate(ln[1:]):
            rows.append((1.60e9 + j * 86400 + rng.random(), user, item))
    rows.sort()
    return [[s + 1, u, it, "view", ts] for s, (ts, u, it) in enumerate(rows)]


def collect(dir_: Path, events: list[list], node: str = "node-a") -> None:
    store = CollectorStore(dir_ / const.COLLECTOR_DB)
    try:
        for i in range(0, len(events), 1000):
            store.ingest({"node": node, "after": events[i - 1][0] if i else 0, "events": events[i:i + 1000]})
    finally:
        store.close()


@pytest.fixture
def setup(tiny_bundle, tmp_path):
    ckpt = tiny_bundle.parent / (tiny_bundle.name + ".ckpt")
    assert ckpt.is_file()
    assert cli(["keygen", "--out", str(tmp_path / "sign")]) == 0
    cfg = LoopConfig(checkpoint=ckpt, events=tmp_path / "collect" / const.COLLECTOR_DB,
                     registry=tmp_path / "registry", key=tmp_path / "sign.key", workdir=tmp_path / "loop",
                     interval_s=0.0, finetune=FinetuneConfig(time_budget_s=15, epochs=2, holdout=0.15, margin=0.05))
    return cfg, tmp_path


def test_a_round_finetunes_gates_and_publishes_a_signed_bundle(setup):
    cfg, tmp = setup
    events = shoppers()
    collect(tmp / "collect", events)
    loop = Loop(cfg)
    assert loop.pending() == len(events)
    rec = loop.round()
    assert rec["published"], rec
    assert rec["events"] > 1000 and rec["gate"]["passed"] and rec["through"] == {"node-a": len(events)}
    store = BundleStore(cfg.registry)
    assert [v["version"] for v in store.versions()] == [rec["version"]]
    verify_bundle(cfg.registry / rec["version"], load_public_keys([str(tmp / "sign.pub")]))
    manifest = json.loads((cfg.registry / rec["version"] / "manifest.json").read_text())
    assert manifest["finetuned_from"] and manifest["channel"] == "stable"
    assert not any(p.suffix == ".ckpt" for p in (cfg.registry / rec["version"]).iterdir())   # never shipped
    state = json.loads((cfg.workdir / "loop.json").read_text())
    assert state["checkpoint"] == rec["checkpoint"] and state["cursor"] == len(events)
    assert loop.pending() == 0 and not loop.due(time.time())   # nothing new: no round
    assert loop.metrics.registry.get_sample_value("edgerec_loop_published_total") == 1
    assert loop.metrics.registry.get_sample_value("edgerec_loop_gate_total", {"result": "passed"}) == 1
    assert loop.metrics.registry.get_sample_value("edgerec_loop_events_per_update") == rec["events"]


def test_corrupt_checkpoint_and_broken_update_leave_the_loop_running(setup):
    cfg, tmp = setup
    bad = tmp / "corrupt.ckpt"
    data = bytearray(Path(cfg.checkpoint).read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    collect(tmp / "collect", shoppers())
    # a deliberately broken update: a learning rate of 10 wrecks the weights; the gate judges it on real events
    broken = FinetuneConfig(time_budget_s=15, epochs=2, holdout=0.15, margin=0.05, lr=10.0)
    loop = Loop(LoopConfig(**{**cfg.__dict__, "checkpoint": bad, "finetune": broken, "interval_s": 4.0}))
    port = free_port()
    from prometheus_client import start_http_server
    start_http_server(port, addr="127.0.0.1", registry=loop.metrics.registry)
    worker = threading.Thread(target=loop.run, kwargs={"poll_s": 0.2}, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while not loop.state.get("updates") and time.monotonic() < deadline:
            time.sleep(0.2)
        rec = loop.state["updates"][0]
        assert "CheckpointError" in rec["error"] and str(bad) in rec["error"] and not rec["published"]
        assert worker.is_alive()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "edgerec_loop_errors_total 1.0" in text or "edgerec_loop_errors_total 2.0" in text
        # the operator puts a good checkpoint back: the next round runs, and the gate refuses the broken model
        shutil.copy(cfg.checkpoint, bad)
        deadline = time.monotonic() + 240
        while not any("gate" in u for u in loop.state["updates"]) and time.monotonic() < deadline:
            time.sleep(0.5)
        rec = next(u for u in loop.state["updates"] if "gate" in u)
        assert rec["published"] is False and rec["gate"]["passed"] is False, rec
        assert rec["gate"]["candidate"]["NDCG@10"] < rec["gate"]["serving"]["NDCG@10"]
        assert not list(BundleStore(cfg.registry).versions())   # nothing published
        assert loop.state["checkpoint"] == str(bad.resolve()) and (loop.state.get("cursor") or 0) == 0
        assert loop.metrics.registry.get_sample_value("edgerec_loop_gate_total", {"result": "refused"}) >= 1
        assert worker.is_alive()
    finally:
        loop.stop()
        worker.join(timeout=300)


def test_a_round_killed_after_publishing_is_adopted_and_a_damaged_state_refused(setup):
    """loop.json notes the version before publishing: a loop killed before noting it published adopts it at the
    next start (no second model on the same events). A damaged loop.json is set aside, never silently reset."""
    from edgerec.loop import STATE, LoopStateError

    cfg, tmp = setup
    cfg.workdir.mkdir(parents=True)
    (cfg.registry / "v-killed").mkdir(parents=True)
    ckpt = str(Path(cfg.checkpoint).resolve())
    state = {"checkpoint": ckpt, "cursor": 0, "updates": [],
             "publishing": {"version": "v-killed", "checkpoint": ckpt, "cursor": 1234,
                            "record": {"at": 1.0, "events": 1234, "through": {"node-a": 1234}}}}
    (cfg.workdir / STATE).write_text(json.dumps(state))
    loop = Loop(cfg)
    assert loop.state["cursor"] == 1234 and "publishing" not in loop.state
    rec = loop.state["updates"][-1]
    assert rec["version"] == "v-killed" and rec["published"] and rec["recovered"]
    assert json.loads((cfg.workdir / STATE).read_text())["cursor"] == 1234
    (cfg.workdir / STATE).write_text('{"checkpoint": "/tmp/cand')   # torn
    with pytest.raises(LoopStateError, match="damaged"):
        Loop(cfg)
    assert list(cfg.workdir.glob(STATE + ".bad-*")) and not (cfg.workdir / STATE).exists()
