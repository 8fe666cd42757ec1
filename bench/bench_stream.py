"""Streaming benchmark: does the model learn from its shoppers? Frozen vs incremental fine-tune vs full retrain.

    python bench/bench_stream.py --data ../shared/datasets/amazon_beauty_s3rec_time/Beauty_time.txt \\
        --t0 2014-03-07 --windows 5 [--quick] [--out bench/results/stream.json]

Works on any ``user item ts`` table (whitespace, tab or comma separated, unix seconds). Protocol (evaluate before
you train on a window, as Monolith does; ../shared/STYLE.md item 18):

* **pretrain** on every interaction before T0: the full ``edgerec train`` pipeline (``trainer.pipeline.run``) on that
  history, with the stream recipe (the default recipe, a smaller patience and epoch cap; printed and saved);
* split the rest into W windows of equal length in days, cut on day boundaries (same-day order is not real order);
* in each window, before the model sees it, predict every (shopper, day) of the window: context = the shopper's
  interactions on earlier days (all of them, pretrain period included), targets = that day's items not in the
  context, each ranked over every item the model knows with the context removed and the day's other targets not
  counted (``trainer.gate.rank_cases``: the int8 ONNX encoder of the bundle, one shopper per call, the int8 item
  matrix with per-row scales, as the node serves). An empty context (or one the model knows nothing of) gets the
  bundle's popularity list, as the node answers;
* then update: **frozen** keeps the pretrained model; **incremental** runs ``trainer.finetune.finetune`` on the
  window's events from the previous checkpoint (a refused update keeps the parent and its events stay pending for
  the next one); **retrain** trains from scratch on everything up to the window's end with the pretrain recipe.
  No update follows the last window (nothing would evaluate it).

Reported per window and over all windows: HR@10 / NDCG@10 for all targets and for items first seen after T0
("new items"), the compute seconds of each update (``update_s``: wall seconds of the whole update command:
training, export, evaluation or gate, bundle, checkpoint; ``update_cpu_s``: the process's CPU seconds over the same
call, less sensitive to other load on a shared machine; training seconds alone are in the detail). **New items before any fine-tune**: window
1's new-item targets ranked by the frozen model with the new items' embeddings composed from their attributes
(``edge_runtime.serving.compose.compose_items``: what a node does with ``add_items``), against the bundle's
training popularity and an online popularity (all interactions before the case's day); and, on window 2, the
targets that are items first seen in window 1: composed (frozen) against learned (the incremental model after its
first fine-tune; the retrained model too). Acceptance figures printed at the end: incremental's share of
retrain's NDCG@10 gain over frozen, (inc - frozen) / (retrain - frozen), target >= 0.90, and its compute share,
sum of incremental update seconds / sum of retrain update seconds, target <= 0.10.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_runtime.bundle import format as fmt  # noqa: E402
from edge_runtime.bundle.format import read_arrays  # noqa: E402
from edge_runtime.scoring.quantize import quantize_rows  # noqa: E402
from edge_runtime.serving.compose import compose_items  # noqa: E402
from edge_runtime.serving.encoder import Encoder  # noqa: E402
from trainer.checkpoint import default_path  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.finetune import EventRows, FinetuneConfig, finetune, read_attributes  # noqa: E402
from trainer.gate import ServedPath, rank_cases, rank_targets  # noqa: E402
from trainer.pipeline import run as train_pipeline  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import stream_e2e  # noqa: E402  (the --e2e section)
from bench_events import cpu_name  # noqa: E402

DEFAULT_ATTRIBUTES = ROOT.parent / "shared" / "datasets" / "amazon_beauty_s3rec" / "Beauty_item2attributes.json"
DAY = 86400

log = logging.getLogger("bench_stream")


def day_str(day: int) -> str:
    return _dt.datetime.fromtimestamp(int(day) * DAY, tz=_dt.timezone.utc).date().isoformat()


# ------------------------------------------------------------------------------------------------------ the stream

@dataclasses.dataclass
class Stream:
    """Interactions in time order (timestamp, then file order) and the windows after T0.

    Attributes:
        users / items: external ids (str) per interaction. ts: float64 unix seconds. day: int64 days since epoch.
        t0_day: first day after the pretrain period. bounds: per window (first day, end day) (end exclusive).
        attributes: {item: [value, ...]} or {}; attributes_path: its file or None.
        first_day: item -> the day it was first seen.
    """

    users: list[str]
    items: list[str]
    ts: np.ndarray
    day: np.ndarray
    t0_day: int
    bounds: list[tuple[int, int]]
    attributes: dict
    attributes_path: str | None
    first_day: dict
    source: dict

    def rows(self, lo_day: int | None, hi_day: int) -> np.ndarray:
        """Indices of interactions with lo_day <= day < hi_day (lo None: from the start), in time order."""
        lo = 0 if lo_day is None else int(np.searchsorted(self.day, lo_day, "left"))
        return np.arange(lo, int(np.searchsorted(self.day, hi_day, "left")))

    def new_items(self, lo_day: int | None = None, hi_day: int | None = None) -> set:
        """Items first seen after T0 (or within [lo_day, hi_day))."""
        lo = self.t0_day if lo_day is None else lo_day
        hi = math.inf if hi_day is None else hi_day
        return {it for it, d in self.first_day.items() if lo <= d < hi}


def load_stream(path: Path, t0: str, windows: int, attributes: Path | None, user_share: float = 1.0) -> Stream:
    users, items, ts = [], [], []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.replace(",", " ").split()
            if len(parts) < 3:
                continue
            try:
                t = float(parts[2])
            except ValueError:
                if lineno == 1:
                    continue
                raise SystemExit(f"{path}:{lineno}: timestamp {parts[2]!r} is not a number")
            if user_share < 1.0 and zlib.crc32(parts[0].encode()) % 1000 >= user_share * 1000:
                continue
            users.append(parts[0])
            items.append(parts[1])
            ts.append(t)
    ts_a = np.asarray(ts, dtype=np.float64)
    order = np.argsort(ts_a, kind="stable")
    users = [users[i] for i in order]
    items = [items[i] for i in order]
    ts_a = ts_a[order]
    day = (ts_a // DAY).astype(np.int64)
    t0_day = int(_dt.datetime.strptime(t0, "%Y-%m-%d").replace(tzinfo=_dt.timezone.utc).timestamp() // DAY)
    end_day = int(day.max()) + 1
    if not (day.min() < t0_day < end_day):
        raise SystemExit(f"--t0 {t0} is outside the data's days")
    length = int(math.ceil((end_day - t0_day) / windows))
    bounds = [(t0_day + w * length, min(t0_day + (w + 1) * length, end_day)) for w in range(windows)]
    bounds = [b for b in bounds if b[0] < b[1]]
    first_day: dict[str, int] = {}
    for it, d in zip(items, day):
        first_day.setdefault(it, int(d))
    attrs = read_attributes(attributes) if attributes else {}
    return Stream(users, items, ts_a, day, t0_day, bounds, attrs, str(attributes) if attributes else None, first_day,
                  {"path": str(path), "interactions": len(users), "users": len(set(users)), "items": len(first_day),
                   "user_share": user_share})


@dataclasses.dataclass
class Case:
    user: str
    day: int
    context: list[str]    # the shopper's items on earlier days, oldest first
    targets: list[str]    # that day's items not in the context


def window_cases(stream: Stream) -> list[list[Case]]:
    """Per window, every (shopper, day) with at least one target."""
    by_user: dict[str, list[int]] = {}
    for i, u in enumerate(stream.users):
        by_user.setdefault(u, []).append(i)
    out: list[list[Case]] = [[] for _ in stream.bounds]
    starts = [b[0] for b in stream.bounds]
    end = stream.bounds[-1][1]
    for u, rows in by_user.items():
        ctx: list[str] = []
        seen: set = set()
        j = 0
        while j < len(rows):
            d = int(stream.day[rows[j]])
            k = j
            while k < len(rows) and int(stream.day[rows[k]]) == d:
                k += 1
            today = [stream.items[r] for r in rows[j:k]]
            if stream.t0_day <= d < end:
                w = int(np.searchsorted(starts, d, "right")) - 1
                targets = list(dict.fromkeys(x for x in today if x not in seen))
                if targets:
                    out[w].append(Case(u, d, list(ctx), targets))
            for x in today:
                if not ctx or ctx[-1] != x:
                    ctx.append(x)
                seen.add(x)
            j = k
    for cases in out:
        cases.sort(key=lambda c: (c.day, c.user))
    return out


# ------------------------------------------------------------------------------------------------------ evaluation

@dataclasses.dataclass
class Model:
    """A served model and its item id -> token map."""

    path: ServedPath
    index: dict

    @classmethod
    def from_bundle(cls, bundle: Path) -> "Model":
        ids = json.loads((bundle / fmt.ITEM_IDS).read_text())
        return cls(ServedPath.from_bundle(bundle, verify=False), {it: t for t, it in enumerate(ids, 1)})


def composed(bundle: Path, extra: list[str], attributes: dict) -> Model:
    """The bundle as a node serves it after ``add_items(extra)``: the new items' rows composed from their
    attributes (``compose_items``), quantized per row; the encoder unchanged (new items are not in its input)."""
    a = read_arrays(bundle, "int8", verify=False)
    ids = list(a.item_ids)
    known = set(ids)
    extra = [x for x in extra if x not in known]
    items_f32 = np.load(bundle / fmt.ITEMS_F32)
    index_attr = {v: j for j, v in enumerate(a.attr_names)}
    emb, _ = compose_items([attributes.get(x, []) for x in extra], index_attr, a.attr_emb, a.id_mean,
                           items_f32.mean(axis=0))
    q2, s2 = quantize_rows(emb) if len(extra) else (np.zeros((0, a.items.shape[1]), np.int8), np.zeros(0, np.float32))
    path = ServedPath(Encoder(a.encoder_path), np.vstack([a.items, q2]), np.concatenate([a.scales, s2]),
                      np.concatenate([a.popularity, np.zeros(len(extra), np.float32)]),
                      int(a.manifest["model"]["max_len"]), encoder_items=len(ids))
    return Model(path, {it: t for t, it in enumerate(ids + extra, 1)})


def evaluate(model: Model, cases: list[Case], new_items: set) -> dict:
    """HR@10 / NDCG@10 over all targets and over new-item targets, with counts."""
    ctx = [np.asarray([model.index[x] for x in c.context if x in model.index], dtype=np.int64) for c in cases]
    tgt = [np.asarray([model.index.get(x, 0) for x in c.targets], dtype=np.int64) for c in cases]
    ranks, popular = rank_cases(model.path, ctx, tgt)
    return _metrics(ranks, cases, new_items, popular)


def _metrics(ranks: list[np.ndarray], cases: list[Case], new_items: set, popular: np.ndarray | None = None) -> dict:
    flat = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    is_new = np.asarray([x in new_items for c in cases for x in c.targets], dtype=bool)

    def m(r):
        hit = r < 10
        return {"hr10": float(hit.mean()) if len(r) else 0.0,
                "ndcg10": float(np.where(hit, 1.0 / np.log2(r + 2.0), 0.0).mean()) if len(r) else 0.0,
                "targets": int(len(r))}

    out = m(flat) | {"cases": len(cases), "new": m(flat[is_new])}
    if popular is not None:
        out["popularity_cases"] = int(popular.sum())
    out["_ranks"] = flat
    out["_new"] = is_new
    return out


def online_popularity(stream: Stream, cases: list[Case], new_items: set) -> dict:
    """Popularity counted over all interactions before each case's day (every item seen so far), context removed."""
    index = {it: t for t, it in enumerate(stream.first_day, 1)}
    counts = np.zeros(len(index), dtype=np.float32)
    tok = np.asarray([index[x] for x in stream.items], dtype=np.int64)
    pos = 0
    ranks = []
    for c in cases:                                     # sorted by day
        hi = int(np.searchsorted(stream.day, c.day, "left"))
        if hi > pos:
            np.add.at(counts, tok[pos:hi] - 1, 1.0)
            pos = hi
        ranks.append(rank_targets(counts, np.asarray([index[x] for x in c.context], dtype=np.int64),
                                  np.asarray([index[x] for x in c.targets], dtype=np.int64)))
    return _metrics(ranks, cases, new_items)


def pooled(results: list[dict]) -> dict:
    """All windows' targets together."""
    flat = np.concatenate([r["_ranks"] for r in results])
    new = np.concatenate([r["_new"] for r in results])

    def m(r):
        hit = r < 10
        return {"hr10": float(hit.mean()) if len(r) else 0.0,
                "ndcg10": float(np.where(hit, 1.0 / np.log2(r + 2.0), 0.0).mean()) if len(r) else 0.0,
                "targets": int(len(r))}

    return m(flat) | {"new": m(flat[new])}


def public(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------------------- updates

def stream_recipe(args) -> TrainConfig:
    """The pretrain / retrain recipe: ``edgerec train``'s default with a smaller patience and epoch cap."""
    return TrainConfig.from_dict({}, epochs=args.epochs, patience=args.patience, threads=args.threads)


def train_full(stream: Stream, end_day: int, out: Path, recipe: TrainConfig, reuse: bool) -> dict:
    """``edgerec train`` (``trainer.pipeline.run``) on every interaction before ``end_day``; bundle in ``out``,
    checkpoint ``out.ckpt``. With ``reuse`` an earlier run's bundle of the same recipe and data is taken as is."""
    info_path = out.with_name(out.name + ".json")
    rows = stream.rows(None, end_day)
    key = {"recipe": recipe.to_dict(), "rows": int(len(rows)), "data": stream.source, "end_day": end_day}
    if reuse and info_path.is_file() and (out / fmt.MANIFEST).is_file() and default_path(out).is_file():
        info = json.loads(info_path.read_text())
        if info.get("key") == key:
            log.info("reusing %s (trained earlier in %.1f s)", out, info["seconds"])
            return info | {"reused": True}
    table = out.with_name(out.name + ".history.tsv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(table, "w", encoding="utf-8") as f:
        f.write("user_id\titem_id\ttimestamp\n")
        for i in rows:
            f.write(f"{stream.users[i]}\t{stream.items[i]}\t{int(stream.ts[i])}\n")
    cfg = dataclasses.replace(recipe, data=str(table), attributes=stream.attributes_path)
    if out.exists():
        shutil.rmtree(out)
    t0, c0 = time.perf_counter(), time.process_time()
    manifest = train_pipeline(cfg, out, progress=False, printer=lambda *a: log.info(" ".join(map(str, a))))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    met = manifest["metrics"]
    info = {"key": key, "bundle": str(out), "checkpoint": str(default_path(out)), "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu, 2),
            "train_seconds": met["train_seconds"], "epochs": met["epochs"], "best_epoch": met["best_epoch"],
            "valid_ndcg10": met["valid_best"]["NDCG@10"], "interactions": int(len(rows)),
            "model_version": manifest["model_version"]}
    info_path.write_text(json.dumps(info, indent=2))
    return info


def finetune_cfg(args) -> FinetuneConfig:
    given = dict(replay_ratio=args.replay_ratio, epochs=args.ft_epochs, lr=args.ft_lr, holdout=args.holdout,
                 margin=args.margin, time_budget_s=args.ft_time_budget, ema_decay=args.ft_ema)
    return dataclasses.replace(FinetuneConfig(), **{k: v for k, v in given.items() if v is not None})


# ------------------------------------------------------------------------------------------------------ the sections

def run_offline(stream: Stream, args, work: Path) -> dict:
    """Frozen, incremental and retrain on the stream's windows (module docstring); returns the JSON sections."""
    recipe = stream_recipe(args)
    fcfg = finetune_cfg(args)
    cases = window_cases(stream)
    W = len(stream.bounds)
    new_all = stream.new_items()
    log.info("stream: %d interactions, %d windows of %d days from %s; cases per window %s; %d items first seen "
             "after T0", len(stream.users), W, stream.bounds[0][1] - stream.bounds[0][0],
             day_str(stream.t0_day), [len(c) for c in cases], len(new_all))

    pre = train_full(stream, stream.t0_day, work / "pretrain", recipe, args.reuse)
    log.info("pretrain: %d interactions, %d epochs (best %d), %.1f s", pre["interactions"], pre["epochs"],
             pre["best_epoch"], pre["seconds"])
    frozen = Model.from_bundle(Path(pre["bundle"]))
    variants = {"frozen": {"windows": [], "update_s": [], "update_cpu_s": []},
                "incremental": {"windows": [], "update_s": [], "update_cpu_s": [], "updates": []},
                "retrain": {"windows": [], "update_s": [], "update_cpu_s": [], "updates": []}}
    inc_ck, inc_model = Path(pre["checkpoint"]), frozen
    ret_model = frozen
    pending: list[int] = []
    new_item_section: dict = {}
    for w, (lo, hi) in enumerate(stream.bounds):
        wc = cases[w]
        for name, model in (("frozen", frozen), ("incremental", inc_model), ("retrain", ret_model)):
            t = time.perf_counter()
            r = evaluate(model, wc, new_all)
            r["eval_s"] = round(time.perf_counter() - t, 2)
            r["window"] = w + 1
            variants[name]["windows"].append(r)
        log.info("window %d (days %s .. %s): %d cases, %d targets (%d new-item): NDCG@10 frozen %.4f inc %.4f "
                 "retrain %.4f", w + 1, day_str(lo), day_str(hi - 1),
                 len(wc), variants["frozen"]["windows"][-1]["targets"], variants["frozen"]["windows"][-1]["new"]
                 ["targets"], *(variants[v]["windows"][-1]["ndcg10"] for v in ("frozen", "incremental", "retrain")))
        if w == 0:
            new_item_section = new_items_before_finetune(stream, cases, Path(pre["bundle"]), frozen)
        if w == 1 and "w2_learned" in new_item_section:
            sec = new_item_section["w2_learned"]
            w1_items = stream.new_items(stream.bounds[0][0], stream.bounds[0][1])
            sub = [Case(c.user, c.day, c.context, [x for x in c.targets if x in w1_items]) for c in wc]
            sub = [c for c in sub if c.targets]
            sec["cases"], sec["targets"] = len(sub), sum(len(c.targets) for c in sub)
            sec["incremental_after_first_finetune"] = public(evaluate(inc_model, sub, w1_items))
            sec["retrain"] = public(evaluate(ret_model, sub, w1_items))
            sec["online_popularity"] = public(online_popularity(stream, sub, w1_items))
        for key in ("update_s", "update_cpu_s"):
            variants["frozen"][key].append(0.0 if w < W - 1 else None)
        if w == W - 1:
            for name in ("incremental", "retrain"):
                variants[name]["update_s"].append(None)
                variants[name]["update_cpu_s"].append(None)
            break
        # incremental: fine-tune on the window's events (plus any a refused update left pending)
        pending += list(stream.rows(lo, hi))
        out = work / f"incremental_w{w + 1}"
        for p in (out, default_path(out)):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        ev = EventRows([stream.users[i] for i in pending], [stream.items[i] for i in pending],
                       stream.ts[pending], name=f"window {w + 1}")
        c0 = time.process_time()
        res = finetune(inc_ck, ev, out, fcfg, item_attributes=stream.attributes,
                       printer=lambda *a: log.info(" ".join(map(str, a))))
        variants["incremental"]["update_s"].append(round(res.seconds, 2))
        variants["incremental"]["update_cpu_s"].append(round(time.process_time() - c0, 2))
        variants["incremental"]["updates"].append({
            "after_window": w + 1, "published": res.published, "seconds": round(res.seconds, 2),
            "events": res.events, "new_items": res.new_items, "gate": res.gate,
            "detail": {k: v for k, v in res.detail.items() if k != "source"}})
        if res.published:
            inc_ck, inc_model = res.checkpoint, Model.from_bundle(out)
            pending = []
        # retrain: from scratch on everything up to the window's end
        info = train_full(stream, hi, work / f"retrain_w{w + 1}", recipe, args.reuse)
        variants["retrain"]["update_s"].append(info["seconds"])
        variants["retrain"]["update_cpu_s"].append(info.get("cpu_seconds"))
        variants["retrain"]["updates"].append({"after_window": w + 1} | {k: v for k, v in info.items() if k != "key"})
        ret_model = Model.from_bundle(Path(info["bundle"]))
        log.info("updates after window %d: incremental %.1f s (%s), retrain %.1f s (%d epochs)", w + 1, res.seconds,
                 "published" if res.published else "refused: " + res.gate.get("reason", ""), info["seconds"],
                 info["epochs"])

    out: dict = {}
    for name, v in variants.items():
        over = pooled(v["windows"])
        out[name] = {"ndcg10": [r["ndcg10"] for r in v["windows"]], "hr10": [r["hr10"] for r in v["windows"]],
                     "new_items": {"ndcg10": [r["new"]["ndcg10"] for r in v["windows"]],
                                   "hr10": [r["new"]["hr10"] for r in v["windows"]]},
                     "update_s": v["update_s"], "update_cpu_s": v["update_cpu_s"], "overall": over,
                     "per_window": [public(r) for r in v["windows"]]}
        if "updates" in v:
            out[name]["updates"] = v["updates"]
    out["pretrain"] = {k: v for k, v in pre.items() if k != "key"}
    out["new_items_before_finetune"] = new_item_section
    out["windows"] = [{"window": w + 1, "first_day": day_str(lo),
                       "last_day": day_str(hi - 1), "cases": len(cases[w]),
                       "interactions": int(len(stream.rows(lo, hi)))} for w, (lo, hi) in enumerate(stream.bounds)]
    out["new_items"] = {"first_seen_after_t0": len(new_all),
                        "per_window": [len(stream.new_items(lo, hi)) for lo, hi in stream.bounds]}
    out["recipe"] = {"pretrain_and_retrain": recipe.to_dict(), "finetune": fcfg.to_dict()}
    out["acceptance"] = acceptance(out)
    return out


def new_items_before_finetune(stream: Stream, cases: list[list[Case]], bundle: Path, frozen: Model) -> dict:
    """Window 1's new-item targets: the frozen model with the new items composed from their attributes (a node's
    ``add_items``) vs the bundle's popularity list and an online popularity; and the entry for window 2 (targets that
    are window 1's new items: composed vs learned), filled in when window 2 is evaluated."""
    lo, hi = stream.bounds[0]
    w1_items = stream.new_items(lo, hi)
    sub = [Case(c.user, c.day, c.context, [x for x in c.targets if x in w1_items]) for c in cases[0]]
    sub = [c for c in sub if c.targets]
    comp = composed(bundle, sorted(w1_items, key=stream.first_day.get), stream.attributes)
    have_attr = sum(1 for x in w1_items if stream.attributes.get(x))
    pop_model = Model(dataclasses.replace(comp.path, encoder_items=0), comp.index)   # popularity list only
    sec = {"what": "window 1 targets that are items first seen in window 1; every new item of window 1 added "
                   "(composed) before the window starts",
           "cases": len(sub), "targets": sum(len(c.targets) for c in sub), "new_items": len(w1_items),
           "new_items_with_attributes": have_attr,
           "frozen_composed": public(evaluate(comp, sub, w1_items)),
           "frozen_without_new_items": public(evaluate(frozen, sub, w1_items)),
           "bundle_popularity": public(evaluate(pop_model, sub, w1_items)),
           "online_popularity": public(online_popularity(stream, sub, w1_items))}
    if len(stream.bounds) > 1:
        lo2, hi2 = stream.bounds[1]
        sub2 = [Case(c.user, c.day, c.context, [x for x in c.targets if x in w1_items]) for c in cases[1]]
        sub2 = [c for c in sub2 if c.targets]
        comp2 = composed(bundle, sorted(stream.new_items(lo, hi2), key=stream.first_day.get), stream.attributes)
        sec["w2_learned"] = {"what": "window 2 targets that are items first seen in window 1: the frozen model "
                                     "with composed rows (items of windows 1-2 added) vs the incremental model after "
                                     "its first fine-tune (learned rows) vs the model retrained after window 1",
                             "frozen_composed": public(evaluate(comp2, sub2, w1_items))}
    return sec


def run_e2e(stream: Stream, args, work: Path, offline: dict) -> dict:
    """The end-to-end section (``--e2e``, ``stream_e2e.py``): registry + collector, 2 nodes and ``edgerec loop`` as
    real processes, from this run's pretrained bundle; returns its JSON section."""
    pre = offline["pretrain"]
    return stream_e2e.run_e2e(stream, args, work, Path(pre["bundle"]), Path(pre["checkpoint"]))


def acceptance(out: dict) -> dict:
    f, i, r = (out[v]["overall"]["ndcg10"] for v in ("frozen", "incremental", "retrain"))
    fh, ih, rh = (out[v]["overall"]["hr10"] for v in ("frozen", "incremental", "retrain"))
    inc_s = sum(s for s in out["incremental"]["update_s"] if s is not None)
    ret_s = sum(s for s in out["retrain"]["update_s"] if s is not None)
    inc_c = sum(s for s in out["incremental"].get("update_cpu_s", []) if s is not None)
    ret_c = sum(s for s in out["retrain"].get("update_cpu_s", []) if s is not None)
    share = (i - f) / (r - f) if r != f else float("nan")
    return {"gain_share_ndcg10": share, "gain_share_hr10": (ih - fh) / (rh - fh) if rh != fh else float("nan"),
            "compute_share": inc_s / ret_s if ret_s else float("nan"), "incremental_update_s": round(inc_s, 2),
            "retrain_update_s": round(ret_s, 2),
            "compute_share_cpu": inc_c / ret_c if ret_c else float("nan"), "incremental_update_cpu_s": round(inc_c, 2),
            "retrain_update_cpu_s": round(ret_c, 2), "targets": {"gain_share": ">= 0.90", "compute_share": "<= 0.10"},
            "met": bool(share >= 0.9 and (inc_s / ret_s if ret_s else 1.0) <= 0.1)}


# ------------------------------------------------------------------------------------------------------ the report

def report(out: dict) -> None:
    W = len(out["windows"])
    rec, ft = out["recipe"]["pretrain_and_retrain"], out["recipe"]["finetune"]
    shown = {k: ft[k] for k in ("epochs", "replay_ratio", "holdout", "lr", "lr_scale", "margin") if k in ft}
    print(f"\nstream recipe (pretrain and retrain): edgerec train's default, epochs <= {rec['epochs']}, patience "
          f"{rec['patience']}; fine-tune: {json.dumps(shown)}")
    print(f"pretrain: {out['pretrain']['interactions']} interactions, {out['pretrain']['epochs']} epochs, "
          f"{out['pretrain']['seconds']:.1f} s")
    print(f"\n{'window':<8}{'cases':>7}{'tgts':>7}{'new':>6} | " + " | ".join(
        f"{v:^27}" for v in ("frozen", "incremental", "retrain")))
    print(f"{'':<28} | " + " | ".join(f"{'NDCG@10':>8}{'HR@10':>7}{'new HR':>7}{'upd s':>5}" for _ in range(3)))
    for w in range(W):
        fw = out["frozen"]["per_window"][w]
        row = f"{w + 1:<8}{fw['cases']:>7}{fw['targets']:>7}{fw['new']['targets']:>6} | "
        cells = []
        for v in ("frozen", "incremental", "retrain"):
            r = out[v]["per_window"][w]
            s = out[v]["update_s"][w]
            secs = "" if s is None else f"{s:.0f}"
            cells.append(f"{r['ndcg10']:8.4f}{r['hr10']:7.4f}{r['new']['hr10']:7.4f}{secs:>5}")
        print(row + " | ".join(cells))
    print(f"{'all':<28} | " + " | ".join(
        f"{out[v]['overall']['ndcg10']:8.4f}{out[v]['overall']['hr10']:7.4f}{out[v]['overall']['new']['hr10']:7.4f}"
        f"{sum(s for s in out[v]['update_s'] if s is not None):5.0f}" for v in ("frozen", "incremental", "retrain")))
    s = out["new_items_before_finetune"]
    if s:
        print(f"\nnew items before any fine-tune (window 1, {s['targets']} targets on {s['new_items']} new items, "
              f"{s['new_items_with_attributes']} with attributes): HR@10 frozen+composed "
              f"{s['frozen_composed']['hr10']:.4f}, bundle popularity {s['bundle_popularity']['hr10']:.4f}, online "
              f"popularity {s['online_popularity']['hr10']:.4f}, frozen without them "
              f"{s['frozen_without_new_items']['hr10']:.4f}")
        if "incremental_after_first_finetune" in s.get("w2_learned", {}):
            t = s["w2_learned"]
            print(f"window 1's new items asked in window 2 ({t['targets']} targets): HR@10 frozen+composed "
                  f"{t['frozen_composed']['hr10']:.4f}, incremental after its first fine-tune "
                  f"{t['incremental_after_first_finetune']['hr10']:.4f}, retrain {t['retrain']['hr10']:.4f}, online "
                  f"popularity {t['online_popularity']['hr10']:.4f}")
    a = out["acceptance"]
    print(f"\nacceptance: incremental's share of retrain's NDCG@10 gain over frozen {a['gain_share_ndcg10']:.3f} "
          f"(target >= 0.90; HR@10 {a['gain_share_hr10']:.3f}); compute share {a['compute_share']:.3f} "
          f"({a['incremental_update_s']:.0f} s / {a['retrain_update_s']:.0f} s wall; target <= 0.10); in CPU seconds "
          f"{a.get('compute_share_cpu', float('nan')):.3f} ({a.get('incremental_update_cpu_s', 0):.0f} s / "
          f"{a.get('retrain_update_cpu_s', 0):.0f} s)")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    W = len(out["windows"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for v, style in (("frozen", "o-"), ("incremental", "s-"), ("retrain", "^-")):
        axes[0].plot(range(1, W + 1), out[v]["ndcg10"], style, label=v)
        axes[1].plot(range(1, W + 1), out[v]["new_items"]["ndcg10"], style, label=v)
    axes[0].set_title("NDCG@10, all targets")
    axes[1].set_title("NDCG@10, items first seen after T0")
    for ax in axes:
        ax.set_xlabel("window")
        ax.set_xticks(range(1, W + 1))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("served int8 path, each window predicted before the model sees it")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "amazon_beauty_s3rec_time" /
                                          "Beauty_time.txt"), help="user item ts table")
    ap.add_argument("--attributes", default=str(DEFAULT_ATTRIBUTES) if DEFAULT_ATTRIBUTES.is_file() else None,
                    help="item attributes JSON (default: the S3-Rec Beauty file when present; '' for none)")
    ap.add_argument("--t0", default="2014-03-07", help="first day after the pretrain period (UTC)")
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 windows, a fifth of the shoppers, 3 epochs")
    ap.add_argument("--users", type=float, default=None, help="share of shoppers kept (by a hash of the id)")
    ap.add_argument("--epochs", type=int, default=None, help="stream recipe epoch cap (default 25; quick 3)")
    ap.add_argument("--patience", type=int, default=None, help="stream recipe patience (default 3; quick 1)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--replay-ratio", type=float, default=None)
    ap.add_argument("--ft-epochs", type=int, default=None)
    ap.add_argument("--ft-lr", type=float, default=None)
    ap.add_argument("--ft-ema", type=float, default=None)
    ap.add_argument("--ft-time-budget", type=float, default=None)
    ap.add_argument("--holdout", type=float, default=None)
    ap.add_argument("--margin", type=float, default=None)
    ap.add_argument("--workdir", default=None, help="bundles and checkpoints (default bench/results/stream-work)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse pretrain / retrain bundles of an earlier run with the same recipe and data")
    ap.add_argument("--out", default=None, help="JSON (default bench/results/stream.json; quick: stream-quick.json)")
    ap.add_argument("--e2e", action="store_true", help="also run the end-to-end section (stream_e2e.py)")
    stream_e2e.add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "optimum"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.quick:
        args.windows = min(args.windows, 2)
        args.users = 0.2 if args.users is None else args.users
        args.epochs = 3 if args.epochs is None else args.epochs
        args.patience = 1 if args.patience is None else args.patience
    args.epochs = 25 if args.epochs is None else args.epochs
    args.patience = 3 if args.patience is None else args.patience
    out_path = Path(args.out or ("bench/results/stream-quick.json" if args.quick else "bench/results/stream.json"))
    work = Path(args.workdir or ("bench/results/stream-work-quick" if args.quick else "bench/results/stream-work"))
    work.mkdir(parents=True, exist_ok=True)
    attributes = Path(args.attributes) if args.attributes else None
    t0 = time.perf_counter()
    stream = load_stream(Path(args.data), args.t0, args.windows, attributes, args.users or 1.0)
    result = run_offline(stream, args, work)
    if args.e2e:
        result["e2e"] = run_e2e(stream, args, work, result)
    result["cpu"] = {"model": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                     "torch_threads": __import__("torch").get_num_threads()}
    result["config"] = {k: v for k, v in vars(args).items()} | {"data_summary": stream.source,
                                                                "seconds_total": round(time.perf_counter() - t0, 1)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=float))
    plot(result, out_path.with_suffix(".png"))
    report(result)
    print(f"\n{out_path} and {out_path.with_suffix('.png')} written ({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
