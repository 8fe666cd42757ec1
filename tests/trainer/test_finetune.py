"""Incremental fine-tuning behind the quality gate: new items composed like a node composes them, a sane update
published (bundle, manifest lineage, checkpoint), a broken one refused with nothing written, the collector's SQLite
file read from its cursor, and ``edgerec finetune``'s exit codes."""
from __future__ import annotations

import json
import random
import sqlite3

import numpy as np
import pytest
import torch

from edge_runtime.bundle.format import read_arrays
from edge_runtime.serving.compose import compose_items
from edge_runtime.serving.model import Model
from edgerec.cli import main
from trainer import checkpoint as ckpt
from trainer.config import TrainConfig
from trainer.data import EMBEDDED_DIR
from trainer.finetune import (FinetuneConfig, SqliteEvents, _holdout_mask, _parent_model, _windows,
                              add_item_rows, finetune)
from trainer.gate import gate_decision, rank_targets

ATTRS = EMBEDDED_DIR / "Beauty_item2attributes.json"
QUIET = dict(printer=lambda *a: None)


@pytest.fixture(scope="module")
def parent(tiny_bundle):
    ck = ckpt.load(ckpt.default_path(tiny_bundle))
    return ck, _parent_model(ck, TrainConfig.from_dict(dict(ck.config)))


@pytest.fixture(scope="module")
def events_file(tmp_path_factory):
    """Shoppers 3001..3600 of the embedded Beauty log (unseen by the tiny bundle, whose items they partly share),
    one item a day from a random start day: ``user item ts`` rows."""
    rng = random.Random(0)
    lines = (EMBEDDED_DIR / "Beauty.txt").read_text().splitlines()[3000:3600]
    rows = []
    for ln in lines:
        user, *items = ln.split()
        start = rng.randint(0, 30)
        rows += [f"{user}\t{it}\t{1_600_000_000 + 86400 * (start + k)}" for k, it in enumerate(items)]
    p = tmp_path_factory.mktemp("events") / "events.tsv"
    p.write_text("\n".join(rows) + "\n")
    return p


def test_new_item_rows_equal_what_the_node_composes(tiny_bundle, parent):
    ck, model = parent
    a = read_arrays(tiny_bundle, "fp32")
    index = {v: j for j, v in enumerate(a.attr_names)}
    known = [v for v in a.attr_names[:40]]
    new_attrs = [
        [known[0], known[1]],                 # known values only
        [known[2], "brand-new-1"],            # known + a value the parent never saw (carried by this item alone)
        ["brand-new-2"],                      # only unseen values: the mean item embedding
        [],                                   # no attributes: the mean item embedding
        [known[3], "shared-new"],             # an unseen value shared by two items with different known values
        [known[4], known[5], "shared-new"],
        [known[6], known[6]],                 # duplicates count once
    ]
    grown, attrs, names = add_item_rows(model, ck.item_attributes, ck.attr_names, new_attrs)
    n, m = ck.num_items, len(new_attrs)
    assert grown.num_items == n + m and grown.item_emb.weight.shape[0] == n + m + 1
    assert names[:len(ck.attr_names)] == ck.attr_names and names[len(ck.attr_names):] == [
        "brand-new-1", "brand-new-2", "shared-new"]
    assert attrs[:n] == ck.item_attributes and attrs[n + 6] == [known[6]]
    want, nknown = compose_items(new_attrs, index, a.attr_emb, a.id_mean, a.items.mean(axis=0))
    assert nknown.tolist() == [2, 1, 0, 0, 1, 2, 1]
    with torch.no_grad():
        table = grown.item_table().numpy()
        old = model.item_table().numpy()
    np.testing.assert_allclose(table[n + 1:], want, rtol=0, atol=2e-6)      # folded embedding == composed
    np.testing.assert_array_equal(table[:n + 1], old)                       # old rows copied, not re-initialised
    # id row = id_mean wherever the new attribute rows fit exactly (no shared unseen value)
    w = grown.item_emb.weight.detach().numpy()
    for j in (0, 1, 2, 6):
        np.testing.assert_allclose(w[n + 1 + j], a.id_mean, atol=2e-6)
    assert grown.attr_emb.weight.shape[0] == len(names)
    # the served item matrix of the grown model is the parent's plus the composed rows
    np.testing.assert_allclose(grown.item_embeddings().detach().numpy()[:n], a.items, atol=1e-6)


def test_new_item_rows_without_side_information():
    from trainer.model import SASRec

    torch.manual_seed(0)
    model = SASRec(20, max_len=5, hidden=8, blocks=1).eval()
    grown, attrs, names = add_item_rows(model, None, [], [["x"], []])
    with torch.no_grad():
        mean = model.item_embeddings().mean(dim=0)
        np.testing.assert_allclose(grown.item_embeddings()[20:].numpy(), np.stack([mean, mean]), atol=1e-6)
        np.testing.assert_array_equal(grown.item_emb.weight[:21].numpy(), model.item_emb.weight.numpy())
    assert attrs is None and names == []


def test_sane_update_is_published_with_lineage(tmp_path, tiny_bundle, parent, events_file):
    ck, _ = parent
    out = tmp_path / "v2"
    res = finetune(ckpt.default_path(tiny_bundle), events_file, out, FinetuneConfig(), item_attributes=ATTRS,
                   **QUIET)
    g = res.gate
    assert res.published and g["passed"] and res.manifest is not None
    assert g["targets"] >= 500 and g["candidate"]["NDCG@10"] >= g["serving"]["NDCG@10"] * 0.95
    assert g["serving"]["NDCG@10"] > 0.02                         # the parent is a real model on these shoppers
    assert res.new_items > 100 and res.events > 5000
    man = json.loads((out / "manifest.json").read_text())
    assert man["finetuned_from"] == ck.model_version and man["new_items"] == res.new_items
    assert man["events"]["used"] == res.events and man["gate"]["passed"] is True
    served = Model(out)                                           # the node's loader and model check accept it
    assert served.num_items == ck.num_items + res.new_items
    new = ckpt.load(res.checkpoint)
    assert res.checkpoint == ckpt.default_path(out)
    assert new.model_version == man["model_version"] and new.lineage["finetuned_from"] == ck.model_version
    assert new.item_ids == served.item_ids and new.item_ids[:ck.num_items] == ck.item_ids
    assert new.user_ids[:3000] == ck.user_ids and len(new.user_ids) == 3600
    assert int(new.fresh.sum()) == res.detail["held_back"] > 0   # held-back events: the next fine-tune's targets
    assert new.encoder_int8 == (out / "encoder.int8.onnx").read_bytes()
    assert all(len(s) for s in new.sequences[3000:])


def test_broken_update_is_refused_and_nothing_is_written(tmp_path, tiny_bundle, events_file):
    out = tmp_path / "broken"
    res = finetune(ckpt.default_path(tiny_bundle), events_file, out, FinetuneConfig(lr=10.0),
                   item_attributes=ATTRS, **QUIET)
    assert not res.published and res.manifest is None and res.checkpoint is None
    assert not res.gate["passed"] and res.gate["relative"] < -0.05 and "below" in res.gate["reason"]
    assert not out.exists() and not ckpt.default_path(out).exists()
    assert not [p for p in tmp_path.iterdir()]                   # no staging directory left behind either
    few = finetune(ckpt.default_path(tiny_bundle), events_file, out, FinetuneConfig(min_gate_targets=10 ** 6),
                   **QUIET)
    assert not few.published and "held-back targets" in few.gate["reason"] and not out.exists()


def _collector(path, rows):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE events(id INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT NOT NULL, seq INTEGER NOT NULL,"
                " user TEXT NOT NULL, item TEXT NOT NULL, event TEXT NOT NULL, ts REAL NOT NULL, received REAL NOT "
                "NULL, UNIQUE(node, seq))")
    con.executemany("INSERT INTO events(node, seq, user, item, event, ts, received) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows)
    con.commit()
    con.close()


def test_sqlite_source_reads_after_the_cursor_with_contexts(tmp_path):
    a, b = "a" * 32, "b" * 32
    db = tmp_path / "collect.db"
    _collector(db, [("n1", 1, a, "10", "view", 100.0, 1.0), ("n1", 2, b, "11", "view", 101.0, 1.0),
                    ("n2", 1, a, "12", "purchase", 250.0, 2.0), ("n2", 2, b, "13", "remove", 240.0, 2.0),
                    ("n1", 3, b, "14", "cart", 200.0, 3.0)])
    batch = SqliteEvents(db).read(2, known_users={b})
    assert batch.users == [b, a] and batch.items == ["14", "12"]          # time order, 'remove' dropped
    assert batch.events.tolist() == [1, 2] and batch.cursor == 5 and batch.source["dropped_events"] == 1
    assert batch.context == {a: ["10"]}                                   # unknown shopper: its earlier rows
    assert len(SqliteEvents(db).read(5)) == 0
    from trainer.finetune import EventError
    (tmp_path / "x.db").write_bytes(b"SQLite format 3\x00" + b"\0" * 100)
    with pytest.raises(EventError, match="x.db"):
        SqliteEvents(tmp_path / "x.db").read(0)


def test_finetune_from_the_collector_advances_the_cursor(tmp_path, tiny_bundle, events_file):
    rows = [ln.split("\t") for ln in events_file.read_text().splitlines()]
    pseudo = {u: f"{int(u):032x}" for u in {r[0] for r in rows}}          # nodes ship 32-hex pseudonyms
    db = tmp_path / "collect.db"
    _collector(db, [("n1", i, pseudo[u], it, "view", float(ts), 0.0) for i, (u, it, ts) in enumerate(rows)])
    out = tmp_path / "v2"
    res = finetune(ckpt.default_path(tiny_bundle), db, out, FinetuneConfig(margin=0.99), **QUIET)
    assert res.published and res.detail["cursor"] == len(rows) and res.detail["new_users"] == 600
    new = ckpt.load(res.checkpoint)
    assert new.event_cursor == len(rows) and set(new.user_ids[3000:]) == set(pseudo.values())
    again = finetune(res.checkpoint, db, tmp_path / "v3", FinetuneConfig(), **QUIET)
    assert not again.published and again.gate["reason"] == "no new events" and not (tmp_path / "v3").exists()


def test_cli_exit_codes(tmp_path, tiny_bundle, events_file, capsys):
    src = str(ckpt.default_path(tiny_bundle))
    assert main(["finetune", "--from", src, "--events", str(events_file), "--out", str(tmp_path / "ok"),
                 "--attributes", str(ATTRS), "--quiet"]) == 0
    assert "published" in capsys.readouterr().out and (tmp_path / "ok" / "manifest.json").is_file()
    assert main(["finetune", "--from", src, "--events", str(events_file), "--out", str(tmp_path / "bad"),
                 "--lr", "10"]) == 3
    out = capsys.readouterr()
    assert "REFUSED" in out.out and "not published" in out.err and not (tmp_path / "bad").exists()
    broken = tmp_path / "broken.ckpt"
    raw = ckpt.default_path(tiny_bundle).read_bytes()
    broken.write_bytes(raw[:-10])
    assert main(["finetune", "--from", str(broken), "--events", str(events_file), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "broken.ckpt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["finetune", "--from", src, "--events", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "nope.tsv" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_holdout_keeps_a_timestamp_together_and_windows_cover_the_targets():
    ts = np.array([1, 1, 2, 2, 2, 3, 3, 3, 3, 3], dtype=float)
    assert _holdout_mask(ts, 0.1).tolist() == [False] * 5 + [True] * 5   # the cut's timestamp goes to the held side
    assert _holdout_mask(np.ones(4), 0.5).tolist() == [False] * 4         # never everything
    seq = np.arange(1, 121)
    wins = _windows(seq, 10, 120, 50)
    covered = sorted(int(x) for _, t in wins for x in t)
    assert len(covered) == len(set(covered)) and set(range(11, 121)) <= set(covered)   # every new target once
    assert covered[0] >= 2 and len(wins) == 3 and all(len(i) == len(t) <= 50 for i, t in wins)
    assert all(np.array_equal(i + 1, t) for i, t in wins)                # input p-1 predicts target p


def test_rank_targets_ties_context_and_other_targets():
    scores = np.array([5.0, 4.0, 4.0, 3.0, 9.0], dtype=np.float32)       # tokens 1..5
    # context {5} removed; targets 3 and 4: token 3 ties token 2 (lower row first), token 4 does not count 3
    assert rank_targets(scores, np.array([5]), np.array([3, 4])).tolist() == [2, 2]
    assert rank_targets(scores, np.array([5]), np.array([5, 0, 9])).tolist() == [5, 5, 5]   # in context / unknown
    assert scores[4] == 9.0                                                # not modified
    ok = gate_decision({"HR@10": 0.1, "NDCG@10": 0.096, "targets": 100, "cases": 80},
                       {"HR@10": 0.1, "NDCG@10": 0.1, "targets": 100, "cases": 80}, 0.05, 20)
    bad = gate_decision({"HR@10": 0.1, "NDCG@10": 0.094, "targets": 100, "cases": 80},
                        {"HR@10": 0.1, "NDCG@10": 0.1, "targets": 100, "cases": 80}, 0.05, 20)
    assert ok["passed"] and not bad["passed"] and abs(bad["relative"] + 0.06) < 1e-9
