"""Incremental fine-tuning: a published model learns from its shoppers' new events, behind a quality gate.

``finetune(checkpoint, events, out_dir, cfg)``:

1. load the parent's checkpoint (``checkpoint.py``) and read the events newer than its cursor (``open_events``: the
   collector's SQLite file, a ``user item ts [event]`` text file, or rows in memory), oldest first;
2. items seen for the first time get new embedding rows (``add_item_rows``), initialised so that their folded
   embedding is exactly what a node composes for them (``edge_runtime.serving.compose.compose_items``); the old
   rows are copied;
3. hold back the newest ``holdout`` share of the events (by time; events of one timestamp stay together) for the
   gate, train on the rest: every updated shopper's sequence (targets: the events the model has not been trained on,
   including the previous fine-tune's held-back ones), plus ``replay_ratio`` older shoppers' sequences per updated
   one, drawn anew each epoch; from the parent's weights and Adam state, at most ``epochs`` passes and
   ``time_budget_s`` seconds;
4. export ONNX + int8 and stage the bundle arrays as ``edgerec train`` does (``export.py``, ``bundle.writer``);
5. the gate (``gate.py``): candidate and serving model on the held-back events, next item, full ranking, the int8
   served path, context = the shopper's earlier events. The serving model is the parent as a node runs it: its own
   int8 encoder (stored in the checkpoint) and its item matrix plus the new items composed from their attributes
   (what ``add_items`` gives a node); the new items are not in that encoder's input table, so they are left out of
   its input, as a node leaves out items it cannot encode;
6. passed: the bundle goes to ``out_dir`` (manifest with ``finetuned_from``, the events used, the new items and the
   gate) and the new checkpoint beside it; refused: nothing is written.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import math
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from edge_runtime.bundle import format as fmt
from edge_runtime.bundle.writer import check_out_dir, new_model_version, stage_arrays, write_bundle
from edge_runtime.scoring.quantize import quantize_rows
from edge_runtime.serving.encoder import Encoder

from . import checkpoint as checkpoint_mod
from .config import TrainConfig
from .data import EVENT_CODES
from .evaluate import pad_left
from .export import export_native, export_onnx, quantize_int8
from .gate import ServedPath, gate_decision, rank_cases, summarize
from .losses import sequence_loss
from .model import BERT4Rec, SASRec, build_model
from .pipeline import compose_arrays
from .train import attribute_codes, seed_everything


class EventError(ValueError):
    """The events cannot be read: missing file, not a collector database or event table, a malformed line; the
    message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Settings of one fine-tune (the model's own recipe comes from the checkpoint's training config)."""

    # Defaults measured on the Beauty stream (bench/bench_stream.py, T0 2014-03-07, 5 windows of 28 days; NDCG@10 of
    # window 3 after fine-tuning on windows 1 and 2: frozen 0.0100, full retrain 0.0397):
    time_budget_s: float = 120.0   # training seconds at most (export, gate and bundle come on top)
    epochs: int = 3                # passes over (updated + replayed) sequences (3: 0.0471; 4: 0.0457)
    # older shoppers' sequences replayed per updated sequence, redrawn every epoch (0: 0.0422, 1: 0.0471, 2: 0.0466)
    replay_ratio: float = 1.0
    holdout: float = 0.1           # newest share of the new events (by time) held back for the gate
    margin: float = 0.05           # refuse a candidate whose gate NDCG@10 is more than this below the serving one
    min_gate_targets: int = 20     # fewer held-back targets than this: refuse (nothing to judge a candidate by)
    # learning rate: ``lr``, or the parent's times ``lr_scale`` (window 2 after one fine-tune, 2 epochs: x1 0.0289,
    # x3 0.0336, x5 0.0352; retrain 0.0342; over two windows with 3 epochs x3 0.0471, x5 0.0481)
    lr: float | None = None
    lr_scale: float = 3.0
    batch_size: int | None = None  # None: the parent's
    ema_decay: float = 0.0         # > 0: export an exponential moving average of the fine-tuned weights
    resume_optimizer: bool = True  # start from the parent's Adam moments (new rows get zeros)
    seed: int = 0
    threads: int | None = None     # torch intra-op threads; None = all cores
    device: str = "cpu"

    def __post_init__(self):
        checks = [(self.time_budget_s > 0, "time_budget_s", "> 0"), (self.epochs >= 1, "epochs", ">= 1"),
                  (self.replay_ratio >= 0, "replay_ratio", ">= 0"), (0 < self.holdout < 1, "holdout", "in (0, 1)"),
                  (0 <= self.margin < 1, "margin", "in [0, 1)"), (self.min_gate_targets >= 1, "min_gate_targets",
                                                                   ">= 1"),
                  (self.lr is None or self.lr > 0, "lr", "> 0"), (self.lr_scale > 0, "lr_scale", "> 0"),
                  (self.batch_size is None or self.batch_size >= 1, "batch_size", ">= 1"),
                  (0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)")]
        for ok, key, allowed in checks:
            if not ok:
                raise ValueError(f"finetune setting {key!r} = {getattr(self, key)!r}: must be {allowed}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FinetuneResult:
    """What a fine-tune did.

    Attributes:
        manifest: the new bundle's manifest, or None when nothing was published.
        checkpoint: path of the new checkpoint (written only when published), else None.
        gate: ``gate.gate_decision``'s dict (candidate / serving HR@10 and NDCG@10 on the held-back events,
            ``relative``, ``margin``, ``targets``, ``cases``, ``passed``, ``reason``) plus ``skipped_no_context``.
        published: True when the bundle and the checkpoint were written.
        new_items: items seen for the first time (new embedding rows).
        events: new events used (trained on + held back), after dropping repeats of the previous item.
        seconds: wall time of the whole fine-tune.
        detail: counters and timings (trained / held-back events, updated and replayed sequences, epochs, seconds
            of training, export and gate, parent version, event cursor).
    """

    manifest: dict | None
    checkpoint: Path | None
    gate: dict
    published: bool
    new_items: int
    events: int
    seconds: float
    detail: dict


# ---------------------------------------------------------------------------------------------------------- events

@dataclasses.dataclass
class EventBatch:
    """New events, in time order (timestamp, then source order).

    Attributes:
        users / items: external ids (str), E each. events: int8 [E] codes (``data.EVENT_CODES``). ts: float64 [E]
        unix seconds. ids: int64 [E] source ids (collector row id, or line number).
        context: earlier items (oldest first) of shoppers the checkpoint does not know, from the source's rows at
            or below the cursor (the collector's older rows); empty for other sources.
        cursor: the highest collector row id read (the next fine-tune's ``after_id``); 0 for other sources.
        source: description (path, kind, rows dropped).
    """

    users: list[str]
    items: list[str]
    events: np.ndarray
    ts: np.ndarray
    ids: np.ndarray
    context: dict[str, list[str]]
    cursor: int
    source: dict

    def __len__(self) -> int:
        return len(self.users)


class EventSource(Protocol):
    """Where new events come from."""

    def read(self, after_id: int, known_users: Mapping[str, object] | set) -> EventBatch:
        """Events with an id above ``after_id`` (sources without ids return all), with the older rows of shoppers
        not in ``known_users`` as their context."""


def _sorted_batch(users, items, events, ts, ids, context, cursor, source) -> EventBatch:
    ts = np.asarray(ts, dtype=np.float64)
    ids = np.asarray(ids, dtype=np.int64)
    order = np.lexsort((ids, ts))
    return EventBatch([users[i] for i in order], [items[i] for i in order],
                      np.asarray(events, dtype=np.int8)[order], ts[order], ids[order], context, cursor, source)


class SqliteEvents:
    """The collector's SQLite file: table ``events(id, node, seq, user, item, event, ts, received)``, read-only.

    ``read(after_id)`` returns the rows ``id > after_id`` in time order; shoppers the checkpoint does not know get
    their rows ``id <= after_id`` as context. Events other than view / cart / purchase are dropped and counted.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise EventError(f"{self.path}: no such file")
        try:
            return sqlite3.connect(f"file:{self.path.resolve()}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise EventError(f"{self.path}: cannot open the collector database: {exc}") from None

    def read(self, after_id: int, known_users=()) -> EventBatch:
        con = self._connect()
        try:
            rows = con.execute("SELECT id, user, item, event, ts FROM events WHERE id > ? ORDER BY id",
                               (int(after_id),)).fetchall()
            new_users = sorted({str(r[1]) for r in rows if str(r[1]) not in known_users})
            earlier: dict[str, list[tuple[float, int, str]]] = {}
            for s in range(0, len(new_users), 500):
                part = new_users[s:s + 500]
                q = ("SELECT id, user, item, event, ts FROM events WHERE id <= ? AND user IN (%s) ORDER BY id"
                     % ",".join("?" * len(part)))
                for rid, user, item, event, ts in con.execute(q, (int(after_id), *part)):
                    if str(event) in EVENT_CODES:
                        earlier.setdefault(str(user), []).append((float(ts), int(rid), str(item)))
        except sqlite3.Error as exc:
            raise EventError(f"{self.path}: not a collector database with an events table: {exc}") from None
        finally:
            con.close()
        users, items, events, ts, ids, dropped = [], [], [], [], [], 0
        for rid, user, item, event, t in rows:
            code = EVENT_CODES.get(str(event))
            if code is None:
                dropped += 1
                continue
            users.append(str(user))
            items.append(str(item))
            events.append(code)
            ts.append(float(t))
            ids.append(int(rid))
        context = {u: [it for _, _, it in sorted(v)] for u, v in earlier.items()}
        cursor = max([int(after_id)] + [int(r[0]) for r in rows])
        return _sorted_batch(users, items, events, ts, ids, context, cursor,
                             {"path": str(self.path), "kind": "sqlite", "after_id": int(after_id),
                              "rows": len(rows), "dropped_events": dropped})


class TextEvents:
    """A text file of ``user item ts [event]`` rows (whitespace, tab or comma separated; ``ts`` in unix seconds; an
    optional header line), e.g. ``Beauty_time.txt``. Has no ids: every row is new."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self, after_id: int = 0, known_users=()) -> EventBatch:
        if not self.path.is_file():
            raise EventError(f"{self.path}: no such file")
        users, items, events, ts, ids, dropped = [], [], [], [], [], 0
        try:
            with open(self.path, "r", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    parts = line.replace(",", " ").split()
                    if not parts:
                        continue
                    if len(parts) not in (3, 4):
                        raise EventError(f"{self.path}:{lineno}: expected 'user item ts [event]', got "
                                         f"{line.strip()[:80]!r}")
                    try:
                        t = float(parts[2])
                    except ValueError:
                        if lineno == 1:
                            continue  # a header
                        raise EventError(f"{self.path}:{lineno}: timestamp {parts[2]!r} is not a number "
                                         f"(unix seconds)") from None
                    if not math.isfinite(t) or t < 0:
                        raise EventError(f"{self.path}:{lineno}: timestamp {parts[2]!r} is not a unix time in "
                                         "seconds")
                    code = EVENT_CODES.get(parts[3].lower(), None) if len(parts) == 4 else 0
                    if code is None:
                        dropped += 1
                        continue
                    users.append(parts[0])
                    items.append(parts[1])
                    events.append(code)
                    ts.append(t)
                    ids.append(lineno)
        except UnicodeDecodeError as exc:
            raise EventError(f"{self.path}: not a text file of events: {exc}") from None
        except OSError as exc:
            raise EventError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        return _sorted_batch(users, items, events, ts, ids, {}, 0,
                             {"path": str(self.path), "kind": "text", "rows": len(users) + dropped,
                              "dropped_events": dropped})


class EventRows:
    """Events already in memory (the stream benchmark): parallel sequences of users, items, unix times and, when
    given, event names."""

    def __init__(self, users: Sequence[str], items: Sequence[str], ts: Sequence[float],
                 events: Sequence[str] | None = None, name: str = "memory"):
        if not (len(users) == len(items) == len(ts)) or (events is not None and len(events) != len(users)):
            raise EventError(f"{name}: users, items, ts (and events) must have the same length")
        self.users, self.items, self.ts, self.events, self.name = users, items, ts, events, name

    def read(self, after_id: int = 0, known_users=()) -> EventBatch:
        codes = [0] * len(self.users) if self.events is None else [EVENT_CODES.get(e, 0) for e in self.events]
        return _sorted_batch([str(u) for u in self.users], [str(i) for i in self.items], codes, self.ts,
                             np.arange(len(self.users)), {}, 0, {"path": self.name, "kind": "memory",
                                                                 "rows": len(self.users), "dropped_events": 0})


def open_events(source: "EventSource | str | os.PathLike") -> EventSource:
    """A path -> ``SqliteEvents`` (a file starting with the SQLite header) or ``TextEvents``; a source as is.

    Raises:
        EventError: the path does not exist or cannot be read.
    """
    if not isinstance(source, (str, os.PathLike)):
        return source
    p = Path(source)
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise EventError(f"{p}: cannot read events: {exc.strerror or exc}") from None
    return SqliteEvents(p) if head == b"SQLite format 3\x00" else TextEvents(p)


def read_attributes(source: Mapping[str, Sequence[str]] | str | os.PathLike | None) -> dict[str, list[str]]:
    """Item attributes for new items: a mapping ``{item: [value, ...]}`` or a JSON file of one; None -> {}.

    Raises:
        EventError: the file cannot be read or is not such an object.
    """
    if source is None:
        return {}
    if not isinstance(source, (str, os.PathLike)):
        return {str(k): [str(v) for v in (vals if isinstance(vals, (list, tuple)) else [vals])]
                for k, vals in source.items()}
    try:
        with open(source, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise EventError(f"{source}: cannot read item attributes: {exc}") from None
    if not isinstance(raw, dict):
        raise EventError(f"{source}: expected a JSON object {{item: [attribute, ...]}}")
    return read_attributes(raw)


# --------------------------------------------------------------------------------------------------- new item rows

def _dedup(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(str(v) for v in values))


def add_item_rows(model: SASRec, item_attributes: list[list[str]] | None, attr_names: Sequence[str],
                  new_attributes: Sequence[Sequence[str]]) -> tuple[SASRec, list[list[str]] | None, list[str]]:
    """A copy of ``model`` with M = ``len(new_attributes)`` more items (tokens N + 1 .. N + M); old rows copied.

    Each new item's folded embedding (``SASRec.item_table``) is what ``edge_runtime.serving.compose.compose_items``
    gives for it with the parent's parts: ``id_mean + mean(attr_emb[v] for its known values v)``, or the mean item
    embedding when it has no known value (or the model has no side information). How:

    * its attribute codes are its values (deduplicated), known ones pointing at the parent's rows;
    * a value the parent has never seen gets a new ``attr_emb`` row: the mean, over the new items carrying it, of
      what keeps each item's bag mean unchanged: the mean of the item's known values' rows (then
      mean(known + new) = mean(known)), or ``item_mean - id_mean`` for an item with no known value;
    * the id row is ``target - bag`` (target: the composed embedding above, bag: the item's mean attribute row),
      which equals ``id_mean`` whenever the new rows fit exactly (every new value carried by items whose known
      values agree, e.g. by one item) and otherwise absorbs the difference, so the folded embedding is always
      exactly the composed one.

    Args:
        model: the parent (SASRec or BERT4Rec), N items.
        item_attributes: the parent's per-item attribute lists (N) or None; attr_names: its attribute value per
            ``attr_emb`` row.
        new_attributes: M lists of attribute values (str) of the new items (empty lists allowed).
    Returns:
        (the grown model in eval mode, the grown per-item attribute lists or None, the grown attribute names: the
        parent's then the new values in first-seen order, i.e. ``attribute_csr``'s order over the grown lists).
    """
    n, m_new = model.num_items, len(new_attributes)
    extra = model.extra_tokens
    grown = copy.deepcopy(model).eval()
    w = model.item_emb.weight.detach().cpu().to(torch.float64)            # [N + 1 + extra, d]
    d = w.shape[1]
    with torch.no_grad():
        table = model.item_table().detach().cpu().to(torch.float64)
    id_mean, item_mean = w[1:n + 1].mean(dim=0), table[1:n + 1].mean(dim=0)
    names = list(attr_names)
    new_lists = [_dedup(v) for v in new_attributes]
    side = model.attr_emb is not None and item_attributes is not None
    targets = torch.empty((m_new, d), dtype=torch.float64)
    if side:
        a = model.attr_emb.weight.detach().cpu().to(torch.float64)       # [V d]
        index = {v: j for j, v in enumerate(names)}
        wish: dict[str, list[torch.Tensor]] = {}
        for i, vals in enumerate(new_lists):
            known = [index[v] for v in vals if v in index]
            targets[i] = id_mean + a[known].mean(dim=0) if known else item_mean
            keep = a[known].mean(dim=0) if known else item_mean - id_mean
            for v in vals:
                if v not in index:
                    wish.setdefault(v, []).append(keep)
        added = list(wish)
        names += added
        rows = [a] + ([torch.stack([torch.stack(wish[v]).mean(dim=0) for v in added])] if added else [])
        a2 = torch.cat(rows) if len(rows) > 1 else a
        index = {v: j for j, v in enumerate(names)}
        all_lists = list(item_attributes) + new_lists
        indptr, codes, _ = attribute_codes(all_lists)
        bags = torch.stack([a2[[index[v] for v in vals]].mean(dim=0) if vals else torch.zeros(d, dtype=torch.float64)
                            for vals in new_lists]) if m_new else torch.zeros((0, d), dtype=torch.float64)
        new_ids = targets - bags
        bag_mod = nn.EmbeddingBag(max(1, len(names)), d, mode="mean")
        with torch.no_grad():
            bag_mod.weight.copy_(a2.to(bag_mod.weight.dtype) if len(names) else bag_mod.weight)
        grown.attr_emb = bag_mod
        grown.attr_codes = torch.as_tensor(codes, dtype=torch.int64)
        grown.attr_offsets = torch.as_tensor(indptr[:-1], dtype=torch.int64)
        out_attrs = all_lists
    else:
        new_ids = item_mean.expand(m_new, d).clone()
        out_attrs = (list(item_attributes) + new_lists) if item_attributes is not None else None
    emb = nn.Embedding(n + m_new + 1 + extra, d, padding_idx=0)
    with torch.no_grad():
        full = torch.cat([w[:n + 1], new_ids, w[n + 1:]])                 # [MASK] (BERT4Rec) moves to the end
        emb.weight.copy_(full.to(emb.weight.dtype))
    grown.item_emb = emb
    grown.num_items = n + m_new
    return grown.eval(), out_attrs, names


def _grow_optimizer_state(state: dict, model: nn.Module) -> dict:
    """The parent's Adam state for the grown model: moments of grown tensors padded with zero rows."""
    state = copy.deepcopy(state)
    params = list(model.parameters())
    for idx, st in state.get("state", {}).items():
        p = params[int(idx)]
        for key in ("exp_avg", "exp_avg_sq"):
            t = st.get(key)
            if t is not None and t.shape != p.shape and t.dim() == p.dim() and t.shape[1:] == p.shape[1:]:
                pad = torch.zeros((p.shape[0] - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype)
                if isinstance(model, BERT4Rec) and p is model.item_emb.weight:
                    st[key] = torch.cat([t[:-1], pad, t[-1:]])            # the [MASK] row stays last
                else:
                    st[key] = torch.cat([t, pad])
    return state


# ------------------------------------------------------------------------------------------------------- training

def _windows(seq: np.ndarray, first: int, end: int, max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Next-item windows of ``seq[:end]`` whose targets cover positions ``first .. end - 1`` (position p's target
    is seq[p], its input seq[p - 1]); each window up to ``max_len`` targets. Positions before ``first`` inside a
    window also count as targets (the shopper's own history, replayed)."""
    out = []
    e = end
    first = max(1, first)
    while e > first:
        lo = max(1, e - max_len)
        out.append((seq[lo - 1:e - 1], seq[lo:e]))
        e = lo
    return out


def _train(model: SASRec, tcfg: TrainConfig, cfg: FinetuneConfig, update: list, replay_pool: list,
           opt_state: dict | None, printer) -> tuple[SASRec, torch.optim.Optimizer, dict]:
    """Fine-tune ``model`` in place on ``update`` windows plus replayed ``replay_pool`` windows."""
    device = cfg.device
    model.to(device).train()
    lr = cfg.lr if cfg.lr is not None else tcfg.lr * cfg.lr_scale
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=tcfg.weight_decay)
    if opt_state is not None and cfg.resume_optimizer:
        opt.load_state_dict(_grow_optimizer_state(opt_state, model))
        for g in opt.param_groups:
            g["lr"] = lr
    ema = None
    if cfg.ema_decay > 0:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    bs = cfg.batch_size or tcfg.batch_size
    n_replay = min(len(replay_pool), int(round(cfg.replay_ratio * len(update))))
    is_bert = isinstance(model, BERT4Rec)
    start = time.perf_counter()
    epochs, steps, total = 0, 0, 0.0
    stop = False
    for epoch in range(cfg.epochs):
        picks = rng.choice(len(replay_pool), n_replay, replace=False) if n_replay else np.zeros(0, np.int64)
        wins = update + [replay_pool[i] for i in picks]
        if is_bert:   # whole windows (inputs + their last target); targets come from masking
            inputs = pad_left([np.concatenate([i, t[-1:]]) for i, t in wins], tcfg.max_len)
            targets = None
        else:
            inputs = pad_left([i for i, _ in wins], tcfg.max_len)
            targets = pad_left([t for _, t in wins], tcfg.max_len)
        lengths = (inputs > 0).sum(axis=1)
        order = rng.permutation(len(wins))
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            width = int(lengths[idx].max())
            inp = torch.from_numpy(inputs[idx, -width:]).to(device)
            if is_bert:
                inp, tgt = model.mask_items(inp, tcfg.mask_prob, gen)
            else:
                tgt = torch.from_numpy(targets[idx, -width:]).to(device)
            loss = sequence_loss(model, inp, tgt, tcfg.loss, tcfg.num_negatives, tcfg.negatives)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            total += float(loss.detach())
            steps += 1
            if time.perf_counter() - start > cfg.time_budget_s:
                stop = True
                break
        epochs += 1
        if stop:
            break
    out = ema.module if ema is not None else model
    out.eval()
    model.eval()
    info = {"epochs": epochs, "steps": steps, "loss": total / max(steps, 1), "replay_per_epoch": n_replay,
            "train_seconds": round(time.perf_counter() - start, 3), "lr": lr, "time_budget_hit": stop}
    return out, opt, info


# ---------------------------------------------------------------------------------------------------- the update

def _parent_model(ck: checkpoint_mod.Checkpoint, tcfg: TrainConfig) -> SASRec:
    side = "attr_emb.weight" in ck.state
    attrs = None
    if side:
        if ck.item_attributes is None:
            raise checkpoint_mod.CheckpointError("checkpoint has attribute embeddings but no item attributes")
        attrs = attribute_codes(ck.item_attributes)
    model = build_model(tcfg.model, ck.num_items, tcfg.max_len, tcfg.hidden, tcfg.blocks, tcfg.heads,
                        tcfg.dropout, tcfg.block_style, tcfg.init, attrs)
    try:
        model.load_state_dict(ck.state)
    except RuntimeError as exc:
        raise checkpoint_mod.CheckpointError(f"checkpoint weights do not fit its config: {exc}") from None
    return model.eval()


def _holdout_mask(ts: np.ndarray, share: float) -> np.ndarray:
    """True for the newest ``share`` of events by time; all events of the cut's timestamp go to the held side,
    unless that would hold back everything."""
    if len(ts) == 0:
        return np.zeros(0, dtype=bool)
    n_hold = max(1, int(math.ceil(share * len(ts))))
    cut = np.sort(ts)[len(ts) - n_hold]
    held = ts >= cut
    if held.all():
        held = ts > cut
    return held


def _refused(reason: str, t0: float, **detail) -> FinetuneResult:
    gate = {"passed": False, "reason": reason}
    return FinetuneResult(None, None, gate, False, int(detail.pop("new_items", 0)), int(detail.pop("events", 0)),
                          time.perf_counter() - t0, detail)


def finetune(checkpoint: str | os.PathLike, events: "EventSource | str | os.PathLike", out_dir: str | os.PathLike,
             cfg: FinetuneConfig = FinetuneConfig(), *,
             item_attributes: Mapping[str, Sequence[str]] | str | os.PathLike | None = None,
             after_id: int | None = None, checkpoint_out: str | os.PathLike | None = None,
             printer=print) -> FinetuneResult:
    """Fine-tune the checkpoint's model on new events; publish the bundle only if the gate passes (module docstring).

    Args:
        checkpoint: the parent's checkpoint file (``edgerec train`` writes ``<out>.ckpt``).
        events: an ``EventSource``, or a path: the collector's SQLite file or a ``user item ts [event]`` text file.
        out_dir: the new bundle's directory (must be new, empty or a bundle); untouched when the gate refuses.
        cfg: ``FinetuneConfig``.
        item_attributes: attribute values of items the checkpoint does not know (``{item: [value, ...]}`` or a JSON
            file of one); new items without an entry get the mean item embedding.
        after_id: read collector rows with a larger id (default: the checkpoint's ``event_cursor``).
        checkpoint_out: where the new checkpoint goes (default ``<out_dir>.ckpt``).
        printer: receives one line per step (``print`` by default; ``lambda *a: None`` for quiet).
    Returns:
        ``FinetuneResult`` (``published`` False when the gate refused or there was nothing to learn from).
    Raises:
        CheckpointError: the checkpoint is missing, corrupt or inconsistent.
        EventError: the events cannot be read.
        BundleError: ``out_dir`` exists and is not a bundle.
    """
    t0 = time.perf_counter()
    out_dir = check_out_dir(out_dir)
    ck = checkpoint_mod.load(checkpoint)
    try:
        tcfg = TrainConfig.from_dict(dict(ck.config))
    except (TypeError, ValueError) as exc:
        raise checkpoint_mod.CheckpointError(f"{checkpoint}: training config is not valid: {exc}") from None
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source = open_events(events)
    cursor0 = ck.event_cursor if after_id is None else int(after_id)
    uindex = {u: i for i, u in enumerate(ck.user_ids)}
    batch = source.read(cursor0, uindex)
    attrs_src = read_attributes(item_attributes)
    parent = _parent_model(ck, tcfg)
    n_old = ck.num_items

    # items seen for the first time, in first-seen order (contexts first, then the events)
    item_index = {it: t for t, it in enumerate(ck.item_ids, 1)}
    new_items: dict[str, None] = {}
    for it in [x for ctx in batch.context.values() for x in ctx] + batch.items:
        if it not in item_index and it not in new_items:
            new_items[it] = None
    new_ids = list(new_items)
    grown, grown_attrs, grown_names = add_item_rows(parent, ck.item_attributes, ck.attr_names,
                                                    [attrs_src.get(it, []) for it in new_ids])
    serving_items = grown.item_embeddings().detach().cpu().numpy().astype(np.float32)  # parent + composed rows
    for t, it in enumerate(new_ids, n_old + 1):
        item_index[it] = t
    item_ids = list(ck.item_ids) + new_ids

    # sequences: the checkpoint's, extended by the events (held-back ones last, by construction of the cut)
    held = _holdout_mask(batch.ts, cfg.holdout)
    user_ids = list(ck.user_ids)
    seqs = list(ck.sequences)
    fresh = np.asarray(ck.fresh, dtype=np.int64).copy()
    growing: dict[int, list[int]] = {}
    first_target: dict[int, int] = {}
    held_at: dict[int, list[tuple[int, float]]] = {}       # user -> (position, ts) of held-back items
    for u in np.flatnonzero(fresh > 0):
        growing[int(u)] = list(seqs[u])
        first_target[int(u)] = len(seqs[u]) - int(fresh[u])
    popularity = np.concatenate([np.asarray(ck.popularity, dtype=np.float64), np.zeros(len(new_ids))])
    used = trained = 0
    for user, item, ts, h in zip(batch.users, batch.items, batch.ts, held):
        u = uindex.get(user)
        if u is None:
            u = uindex[user] = len(user_ids)
            user_ids.append(user)
            ctx = [item_index[x] for x in batch.context.get(user, [])]
            seqs.append(np.zeros(0, np.int64))
            fresh = np.append(fresh, 0)
            growing[u] = [x for j, x in enumerate(ctx) if j == 0 or ctx[j - 1] != x]
            first_target[u] = 0
        elif u not in growing:
            growing[u] = list(seqs[u])
            first_target[u] = len(seqs[u])
        lst = growing[u]
        tok = item_index[item]
        popularity[tok - 1] += 1.0
        if lst and lst[-1] == tok:
            continue   # a repeat of the previous item (collapsed, as trainer.data does)
        lst.append(tok)
        used += 1
        if h:
            held_at.setdefault(u, []).append((len(lst) - 1, float(ts)))
        else:
            trained += 1
    detail = {"parent_version": ck.model_version, "source": batch.source, "cursor": max(batch.cursor, cursor0),
              "held_back": used - trained, "trained_events": trained, "new_users": len(user_ids) - len(ck.user_ids)}
    if used == 0:
        printer(f"no new events in {batch.source.get('path')} after id {cursor0}: nothing to learn from")
        return _refused("no new events", t0, events=0, new_items=0, **detail)

    # training windows
    update = []
    for u, lst in growing.items():
        arr = np.asarray(lst, dtype=np.int64)
        end = held_at[u][0][0] if u in held_at else len(arr)
        update += _windows(arr, first_target[u], end, tcfg.max_len)
    replay_pool = [(s[-tcfg.max_len - 1:-1], s[-tcfg.max_len - 1:][1:])
                   for u, s in enumerate(seqs[:len(ck.user_ids)]) if u not in growing and len(s) >= 2]
    printer(f"fine-tune of {ck.model_version}: {used} new events ({trained} to train on, {used - trained} held back "
            f"for the gate), {len(growing)} shoppers updated ({detail['new_users']} new), {len(new_ids)} new items, "
            f"{len(update)} update windows + {min(len(replay_pool), round(cfg.replay_ratio * len(update)))} "
            f"replayed per epoch")
    model, opt, info = _train(grown, tcfg, cfg, update, replay_pool, ck.optimizer, printer)
    detail.update(info, update_windows=len(update))
    printer(f"trained {info['epochs']} epoch(s), {info['steps']} steps in {info['train_seconds']:.1f} s "
            f"(loss {info['loss']:.3f})")

    # export and stage the candidate bundle
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir.parent))
    serving_tmp = Path(tempfile.mkdtemp(prefix=".serving-", dir=out_dir.parent))
    try:
        t1 = time.perf_counter()
        folded = model.folded()
        export_onnx(folded, staged / fmt.ENCODER_FP32, tcfg.max_len)
        quantize_int8(staged / fmt.ENCODER_FP32, staged / fmt.ENCODER_INT8, tcfg.int8_matmuls)
        if tcfg.int8_matmuls == "float":   # the same encoder for the node's native encoder
            export_native(folded, staged / fmt.ENCODER_INT8, staged / fmt.ENCODER_NATIVE)
        items = model.item_embeddings().detach().cpu().numpy().astype(np.float32)
        q, scales = stage_arrays(staged, items, item_ids, popularity, grown_attrs, compose_arrays(model))
        detail["export_seconds"] = round(time.perf_counter() - t1, 3)

        # the gate: held-back (shopper, timestamp) groups, each against the shopper's earlier items
        t2 = time.perf_counter()
        contexts, targets, no_context = [], [], 0
        for u, marks in held_at.items():
            lst = growing[u]
            g = 0
            while g < len(marks):
                h = g
                while h + 1 < len(marks) and marks[h + 1][1] == marks[g][1]:
                    h += 1
                start = marks[g][0]
                ctx = np.asarray(lst[:start], dtype=np.int64)
                seen = set(lst[:start])
                tg = np.asarray(list(dict.fromkeys(x for x in lst[start:marks[h][0] + 1] if x not in seen)),
                                dtype=np.int64)
                if len(tg):
                    if len(ctx):
                        contexts.append(ctx)
                        targets.append(tg)
                    else:
                        no_context += 1
                g = h + 1
        if ck.encoder_int8:
            (serving_tmp / fmt.ENCODER_INT8).write_bytes(ck.encoder_int8)
        else:   # an older checkpoint without the served encoder: export the parent's weights the same way
            export_onnx(parent.folded(), serving_tmp / fmt.ENCODER_FP32, tcfg.max_len)
            quantize_int8(serving_tmp / fmt.ENCODER_FP32, serving_tmp / fmt.ENCODER_INT8, tcfg.int8_matmuls)
        sq, ss = quantize_rows(serving_items)
        serving = ServedPath(Encoder(serving_tmp / fmt.ENCODER_INT8), sq, ss, popularity.astype(np.float32),
                             tcfg.max_len, encoder_items=n_old)
        candidate = ServedPath(Encoder(staged / fmt.ENCODER_INT8), q, scales, popularity.astype(np.float32),
                               tcfg.max_len)
        cand = summarize(rank_cases(candidate, contexts, targets)[0])
        serv = summarize(rank_cases(serving, contexts, targets)[0])
        gate = gate_decision(cand, serv, cfg.margin, cfg.min_gate_targets)
        gate["skipped_no_context"] = no_context
        detail["gate_seconds"] = round(time.perf_counter() - t2, 3)
        printer(f"gate on {gate['targets']} held-back targets ({gate['cases']} cases; {no_context} without context "
                f"skipped), int8 served path, full ranking over {len(item_ids)} items:")
        printer(f"  {'model':<28} {'HR@10':>8} {'NDCG@10':>8}")
        printer(f"  {'serving ' + ck.model_version:<28} {serv['HR@10']:8.4f} {serv['NDCG@10']:8.4f}")
        printer(f"  {'candidate':<28} {cand['HR@10']:8.4f} {cand['NDCG@10']:8.4f}")
        printer(f"  {'passed' if gate['passed'] else 'REFUSED'}: {gate['reason']}")
        if not gate["passed"]:
            return FinetuneResult(None, None, gate, False, len(new_ids), used, time.perf_counter() - t0, detail)

        created = _dt.datetime.now(_dt.timezone.utc)
        version = new_model_version(created, f"{ck.model_version}:{detail['cursor']}:{used}")
        manifest = {
            "model_version": version,
            "created_at": created.isoformat(timespec="seconds"),
            "model": {"architecture": type(model).__name__, "num_items": len(item_ids), "dim": int(items.shape[1]),
                      "max_len": tcfg.max_len, "encoder_input": "item_seq", "encoder_output": "user_vec"},
            "training_config": tcfg.to_dict(),
            "finetune_config": cfg.to_dict(),
            "dataset": dict(ck.lineage.get("dataset") or {}) | {"events": batch.source},
            "finetuned_from": ck.model_version,
            "events": {"used": used, "trained": trained, "held_back": used - trained, "cursor": detail["cursor"]},
            "new_items": len(new_ids),
            "gate": gate,
            "metrics": {"gate": {"candidate": cand, "serving": serv},
                        "finetune": {k: detail[k] for k in ("epochs", "steps", "loss", "train_seconds",
                                                            "export_seconds", "replay_per_epoch", "update_windows")}},
        }
        write_bundle(out_dir, staged, manifest)
        manifest = fmt.load_manifest(out_dir)
        # the new checkpoint: every event is in the sequences; the held-back ones are fresh (next fine-tune's)
        fresh_new = np.zeros(len(user_ids), dtype=np.int64)
        for u, lst in growing.items():
            seqs[u] = np.asarray(lst, dtype=np.int64)
        for u, marks in held_at.items():
            fresh_new[u] = len(growing[u]) - marks[0][0]
        new_ck = checkpoint_mod.Checkpoint(
            model_version=version, config=tcfg.to_dict(),
            state={k: v.detach().cpu() for k, v in model.state_dict().items()}, optimizer=opt.state_dict(),
            item_ids=item_ids, item_attributes=grown_attrs, attr_names=grown_names if model.attr_emb is not None
            else [], user_ids=user_ids, sequences=seqs, fresh=fresh_new, popularity=popularity,
            encoder_int8=(out_dir / fmt.ENCODER_INT8).read_bytes(), event_cursor=detail["cursor"],
            lineage={"created_at": manifest["created_at"], "finetuned_from": ck.model_version,
                     "dataset": dict(ck.lineage.get("dataset") or {}),
                     "chain": list(ck.lineage.get("chain", [])) + [ck.model_version]})
        ck_path = checkpoint_mod.save(new_ck, checkpoint_mod.default_path(out_dir) if checkpoint_out is None
                                      else checkpoint_out)
        seconds = time.perf_counter() - t0
        printer(f"bundle {version} written to {out_dir}; checkpoint {ck_path} ({seconds:.1f} s in all)")
        return FinetuneResult(manifest, ck_path, gate, True, len(new_ids), used, seconds, detail)
    finally:
        for p in (staged, serving_tmp):
            if p.exists():
                shutil.rmtree(p, ignore_errors=True)
