"""A loaded model bundle, ready to serve: the session encoder, the item matrix, the item-id table, the attribute
index for category filters, the popularity list; and ``check_model``, the one check a model passes before it is
served.

A ``Model`` is immutable once loaded, so a request that took a reference to it finishes on it even if the daemon
swaps in another one meanwhile. Items added at the node (``add_items``) do not change it either: ``with_items``
returns a new ``Model`` (the same encoder and bundle, new item arrays with the composed rows appended) that the
service swaps in by reference.
"""
from __future__ import annotations

import copy
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .. import const, scoring
from ..bundle.format import read_arrays
from ..errors import BundleError
from ..scoring.quantize import quantize_rows
from . import fastpath
from .compose import compose_items
from .encoder import Encoder, NativeEncoder, load_encoder

__all__ = ["Encoder", "Model", "check_model"]


def check_model(model: "Model") -> float:
    """The model check every load runs (boot, sync, SIGHUP, rollback): the most popular item's session through the
    encoder and an exact top-``CHECK_K`` scan must give a user vector float32 [d] that is finite and
    ``min(CHECK_K, N)`` distinct valid rows with finite scores. The first calls also allocate what later calls
    reuse (the warm-up). Returns the scan's time in µs.

    Raises:
        BundleError: the model fails the check (the message names the bundle).
    """
    row = int(np.argmax(model.popularity)) if model.num_items else 0
    try:
        u = model.encode([row])
    except Exception as exc:  # onnxruntime raises its own types for a broken graph
        raise BundleError(f"{model.path}: the encoder fails on a one-item session: {exc}") from None
    if u.shape != (model.dim,):
        raise BundleError(f"{model.path}: encoder returned a vector of shape {u.shape}, expected ({model.dim},)")
    if not np.all(np.isfinite(u)):
        raise BundleError(f"{model.path}: encoder returned non-finite values (NaN or inf) for a one-item session")
    k = min(const.CHECK_K, model.num_items)
    t0 = time.perf_counter()
    ids, scores = scoring.topk(u, model.items, k, item_scales=model.scales)
    us = (time.perf_counter() - t0) * 1e6
    if len(set(ids.tolist())) != k or not np.all(np.isfinite(scores)) or (k and (ids.min() < 0
                                                                                 or ids.max() >= model.num_items)):
        raise BundleError(f"{model.path}: the top-{k} scan returns invalid rows or scores")
    return us


def probe_batch_exact(model: "Model", rows: int = 24, rounds: int = const.BATCH_PROBE_ROUNDS) -> tuple[bool, float]:
    """Whether the encoder is batch-exact on this machine: in each of ``rounds`` rounds, ``rows`` sessions of
    lengths spread over 1..max_len (fixed pseudo-random items, new ones each round), left-padded into one call (and
    the shorter half into a second call padded to their own longest), give bit for bit the vectors of calls with
    each session alone. True for bundles exported with float MatMuls and the padding-exact attention
    (``trainer.export.quantize_int8``); False for int8 dynamic quantization (one activation scale per call) or
    kernels that sum in another order for another shape. A sample, not a proof: an encoder that differs only now
    and then could pass. The older float32 export (a fused Softmax; about 1 padded call of 8 differs) passed one
    round for 2 seeds of 400, measured; four rounds leave about one in 10^9.

    Also returns the fixed cost of an encoder call in tokens (the intercept over the slope of a lone call's µs
    against its length, from the shortest and the longest window, best of 5 each; clamped to 1 .. 4 x max_len):
    how much padding ``Model.encode_many`` accepts to save a call.
    """
    n = max(1, model.bundle_items)
    lengths = np.unique(np.linspace(1, model.max_len, min(rows, model.max_len)).round().astype(int))
    exact = True
    for r in range(max(1, rounds)):
        rng = np.random.default_rng(r)
        seqs = [rng.integers(0, n, int(length)).tolist() for length in lengths]
        lone = np.stack([model.encode(s) for s in seqs])
        half = len(seqs) // 2
        try:
            exact = bool(np.array_equal(model.encode_padded(seqs), lone)
                         and np.array_equal(model.encode_padded(seqs[:half]), lone[:half]))
        except Exception:  # noqa: BLE001 - an encoder that takes no batches (onnxruntime's own error types)
            exact = False
        if not exact:
            break
    if len(seqs) < 2:
        return exact, 1.0
    best = []
    for s in (seqs[0], seqs[-1]):   # the shortest and the longest window, each already met once (warm)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            model.encode(s)
            times.append(time.perf_counter() - t0)
        best.append(min(times))
    slope = (best[1] - best[0]) / (len(seqs[-1]) - len(seqs[0]))
    tokens = (best[0] / slope - len(seqs[0])) if slope > 0 else 4.0 * model.max_len
    return exact, float(min(max(tokens, 1.0), 4.0 * model.max_len))


def score_cost_us(model: "Model", calls: int = 5) -> float:
    """The median time in µs of one request's scoring (encoder on a one-item session + exact top-10 scan) over
    ``calls`` calls, measured at load: where a request is scored (``Service``: on the event loop when it is short,
    on a scoring thread when the hop pays)."""
    row = int(np.argmax(model.popularity)) if model.num_items else 0
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        u = model.encode([row])
        scoring.topk(u, model.items, min(10, max(1, model.num_items)), item_scales=model.scales,
                     items_checked=True)
        times.append((time.perf_counter() - t0) * 1e6)
    return float(np.median(times))


class Model:
    """A verified bundle ready to serve.

    Attributes:
        version: the manifest's model_version.
        item_ids: external id (str) by item row; ``index`` maps id -> row.
        items / scales: the item matrix scanned by ``topk`` (int8 + float32 scales, or float32 with scales None).
        max_len: the encoder's window L.
        bundle_items: rows from the bundle (the encoder knows them); rows from there on are items added at the
            node (``with_items``), ``num_added`` of them, whose ids and attributes ``added`` holds.
        attr_emb / id_mean: the bundle's compose arrays (float32 [V, d] / [d]), or None.
        provider: the ONNX Runtime execution provider the encoder runs on (``Encoder.provider``), or
            ``native-<level>`` for the native encoder (``encoder.load_encoder``); ``encoder_kind`` says which.
        batch_exact: one encoder call for several sessions gives each its lone call's vector bit for bit
            (``probe_batch_exact``, at load; the native encoder is by construction): ``encode_many`` then batches.
        call_tokens: the fixed cost of an encoder call, in tokens of window (``probe_batch_exact``).
        fast: the recommend fast path over this model (``fastpath.build``: plain frames from bytes to reply bytes in
            one native call), or None; ``fast_concurrent``: it also answers plain frames that arrive together (a
            batch would save them less scan time than the general path costs, ``fastpath.batch_saving_us``).
    """

    def __init__(self, bundle_dir: str | os.PathLike, precision: str = "int8", verify: bool = True,
                 threads: int = 1, providers: Sequence[str] | None = None):
        """Read the bundle (``bundle.format.read_arrays``; ``verify`` checks every sha256), load the encoder on the
        first available of ``providers`` (None: the process's list, ``encoder.configure_providers``), build the id
        and attribute indexes, then ``check_model``.

        Raises:
            ValueError: ``precision`` is not 'int8' or 'fp32', or ``providers`` is empty.
            BundleError: unreadable, inconsistent or altered bundle, or a model that fails its check.
        """
        t0 = time.perf_counter()
        self.path = Path(bundle_dir)
        arrays = read_arrays(self.path, precision, verify=verify)
        self.manifest = arrays.manifest
        self.version = str(self.manifest.get("model_version", "unknown"))
        self.precision = precision
        info = self.manifest.get("model", {})
        self.max_len = int(info.get("max_len", 50))
        self.items, self.scales = arrays.items, arrays.scales
        self.item_ids, self.popularity = arrays.item_ids, arrays.popularity
        self.attr_indptr = arrays.attr_indptr
        attr_codes, attr_names = arrays.attr_codes, arrays.attr_names
        n = len(self.item_ids)
        self.attr_names, self.attr_emb, self.id_mean = attr_names, arrays.attr_emb, arrays.id_mean
        self.bundle_items, self.num_added = n, 0
        self.added: dict[str, tuple[str, ...]] = {}
        self._item_mean: np.ndarray | None = None
        self._attr_index: dict[str, int] | None = None
        self.encoder = load_encoder(arrays.encoder_path, arrays.native_encoder_path, threads, providers,
                                    expect=(int(arrays.items.shape[1]), self.max_len, n))
        self.index = {item: row for row, item in enumerate(self.item_ids)}
        # [N, 1] float32 so the popularity list runs through the same top-k scan (and filters) as model scores.
        self.popularity_column = np.ascontiguousarray(self.popularity.reshape(-1, 1))
        self.dim = int(self.items.shape[1])
        # attribute value -> int64 item rows (an inverted index: a category mask costs O(rows of those values))
        # Built from integer codes: each value's rows are a view of one int64 array (no per-entry objects, so a
        # second model loaded beside the first during a hot swap costs little more than its arrays).
        self.attr_rows: dict[str, np.ndarray] = {}
        if self.attr_indptr is not None:   # read_arrays checked the table's consistency
            owners = np.repeat(np.arange(n, dtype=np.int64), np.diff(self.attr_indptr))
            order = np.argsort(attr_codes, kind="stable")
            rows_by_value = owners[order]
            bounds = np.searchsorted(attr_codes[order], np.arange(len(attr_names) + 1))
            for j, v in enumerate(attr_names):
                if bounds[j + 1] > bounds[j]:
                    self.attr_rows[v] = rows_by_value[bounds[j]:bounds[j + 1]]
        self._attr_masks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._attr_lock = threading.Lock()
        self.warmup_us = check_model(self)
        # the native encoder computes each session alone: batch-exact by construction, and one call for a batch
        self.batch_exact, self.call_tokens = ((True, 1.0) if isinstance(self.encoder, NativeEncoder)
                                              else probe_batch_exact(self))
        self.score_us = score_cost_us(self)
        self.fast = fastpath.build(self)   # the recommend fast path (fastpath.py), or None
        self.fast_concurrent = (self.fast is not None and self.score_us <= const.INLINE_SCORE_US
                                and fastpath.batch_saving_us(self) < const.FAST_OVER_BATCH_US)
        self.load_seconds = time.perf_counter() - t0

    @property
    def provider(self) -> str:
        return self.encoder.provider

    @property
    def encoder_kind(self) -> str:
        """``"native"`` (``NativeEncoder``) or ``"onnxruntime"``: which encoder serves (``health``, ``model_info``)."""
        return "native" if isinstance(self.encoder, NativeEncoder) else "onnxruntime"

    @property
    def encoder_name(self) -> str:
        """The encoder in words for the log: "the native encoder (native-avx512_vnni)" or "ONNX Runtime
        (CPUExecutionProvider)"."""
        if isinstance(self.encoder, NativeEncoder):
            return f"the native encoder ({self.provider}; EDGEREC_ENCODER=onnx for ONNX Runtime)"
        return f"ONNX Runtime ({self.provider})"

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def has_attributes(self) -> bool:
        """Whether category filters apply: the bundle has an attribute table, or added items brought attributes."""
        return self.attr_indptr is not None or bool(self.attr_rows)

    def trained(self, item: str) -> bool:
        """Whether ``item`` has a row from the bundle (not one added at the node)."""
        row = self.index.get(item)
        return row is not None and row < self.bundle_items

    def item_mean(self) -> np.ndarray:
        """float32 [d]: the mean of the bundle's item rows (dequantized for int8), computed once, in blocks of
        ``const.ITEM_MEAN_BLOCK_ROWS`` rows (no float32 copy of the whole matrix)."""
        if self._item_mean is None:
            acc = np.zeros(self.dim, dtype=np.float64)
            for lo in range(0, self.bundle_items, const.ITEM_MEAN_BLOCK_ROWS):
                hi = min(lo + const.ITEM_MEAN_BLOCK_ROWS, self.bundle_items)
                block = self.items[lo:hi].astype(np.float32)
                if self.scales is not None:
                    block *= self.scales[lo:hi, None]
                acc += block.sum(axis=0, dtype=np.float64)
            self._item_mean = (acc / max(1, self.bundle_items)).astype(np.float32)
        return self._item_mean

    def compose(self, attributes: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of new items from their attribute values (``compose.compose_items``, the trainer's rule: the
        bundle's mean id row + the mean embedding of the values it knows; without compose arrays in the bundle, or
        without a known value, the mean item embedding ``item_mean``).

        Returns:
            (float32 [M, d], int64 [M] known attribute values each was built from).
        """
        if self.attr_emb is not None and self._attr_index is None:
            self._attr_index = {v: j for j, v in enumerate(self.attr_names)}
        return compose_items(attributes, self._attr_index or {}, self.attr_emb, self.id_mean, self.item_mean())

    def with_items(self, items: Sequence[tuple[str, tuple[str, ...]]]) -> tuple["Model", np.ndarray]:
        """A new model serving this one's items plus ``items`` [(id, attribute values)]: an id new to this model
        gets the next row, an id added earlier (row >= ``bundle_items``) gets its row recomposed with the new
        attributes. Rows are composed by ``compose`` and stored as the served matrix is (int8 rows quantized per
        row by ``quantize_rows``, or float32); popularity 0. The attribute filter index gains the rows under every
        value (values the model has no embedding for included). This model is left as it is (a scan running on
        it is unaffected); the copy costs O(N d) bytes of the item matrix plus the O(N) id index.

        Returns:
            (the new model, int64 [M] known attribute values each item was composed from; 0 = mean item).

        Raises:
            ValueError: an id is one of the bundle's trained items, or appears twice in ``items``.
        """
        ids = [it for it, _ in items]
        if len(set(ids)) != len(ids):
            raise ValueError("with_items: an id appears twice")
        emb, known = self.compose([attrs for _, attrs in items])
        new = copy.copy(self)
        new.fast, new.fast_concurrent = None, False   # the bundle's rows and ids: added items take the general path
        new.index, new.item_ids, new.added = dict(self.index), list(self.item_ids), dict(self.added)
        rows = np.empty(len(items), dtype=np.int64)
        drops: dict[str, list[int]] = {}
        adds: dict[str, list[int]] = {}
        for j, (it, attrs) in enumerate(items):
            row = new.index.get(it)
            if row is None:
                row = new.index[it] = len(new.item_ids)
                new.item_ids.append(it)
            elif row < self.bundle_items:
                raise ValueError(f"with_items: {it!r} is a trained item of model {self.version}")
            else:
                for v in new.added[it]:
                    drops.setdefault(v, []).append(row)
            new.added[it] = tuple(attrs)
            rows[j] = row
            for v in dict.fromkeys(attrs):
                adds.setdefault(v, []).append(row)
        n, total = self.num_items, len(new.item_ids)
        new.num_added = total - self.bundle_items
        new.items = np.empty((total, self.dim), dtype=self.items.dtype)
        new.items[:n] = self.items
        if self.scales is not None:
            q, s = quantize_rows(emb)
            new.scales = np.empty(total, dtype=np.float32)
            new.scales[:n] = self.scales
            new.items[rows], new.scales[rows] = q, s
        else:
            new.items[rows] = emb
        new.popularity = np.zeros(total, dtype=np.float32)
        new.popularity[:n] = self.popularity
        new.popularity_column = new.popularity.reshape(-1, 1)
        new.attr_rows = dict(self.attr_rows)
        for v in drops.keys() | adds.keys():
            old = new.attr_rows.get(v, np.empty(0, dtype=np.int64))
            if v in drops:
                old = old[~np.isin(old, drops[v])]
            rows_v = np.concatenate([old, np.asarray(adds.get(v, ()), dtype=np.int64)])
            if len(rows_v):
                new.attr_rows[v] = rows_v
            else:
                new.attr_rows.pop(v, None)
        new._attr_masks = OrderedDict()
        new._attr_lock = threading.Lock()
        return new, known

    def rows(self, items: Iterable[str]) -> tuple[list[int], list[str]]:
        """External ids -> (known rows in order, unknown ids in first-seen order, deduplicated). O(len(items))."""
        known: list[int] = []
        unknown: dict[str, None] = {}
        get = self.index.get
        for it in items:
            r = get(it)
            if r is None:
                unknown[it] = None
            else:
                known.append(r)
        return known, list(unknown)

    def encode(self, rows: Sequence[int]) -> np.ndarray:
        """Item rows (oldest first, at least one) -> user vector float32 [d] from the last ``max_len`` of them.

        The encoder gets only the real window ([1, l], l <= max_len): it counts positions from the right, so this
        equals the padded [1, max_len] call and a short session costs a short call."""
        # row r is the encoder's token r + 1 (0 pads); one NumPy call (a cold ufunc costs µs on a lone request)
        return self.encoder(np.array([[r + 1 for r in rows[-self.max_len:]]], dtype=np.int64))[0]

    def encode_many(self, sessions: Sequence[Sequence[int]]) -> tuple[np.ndarray, int]:
        """Several sessions (item rows, oldest first, at least one each) -> (user vectors float32 [B, d], row b bit
        for bit ``encode(sessions[b])``; the number of encoder calls made).

        The native encoder (``NativeEncoder``) takes them all in one call, unpadded. With another batch-exact
        encoder (``batch_exact``), sessions are grouped by window length, longest first, a session joining the
        current group while its padding costs fewer tokens than a call of its own (``call_tokens``); each group is
        one left-padded encoder call. Otherwise one call per session.

        Raises:
            whatever the encoder raises (ONNX Runtime's own error types).
        """
        if not self.batch_exact or len(sessions) < 2:
            return np.stack([self.encode(s) for s in sessions]), len(sessions)
        if isinstance(self.encoder, NativeEncoder):   # one call, no padding: each session computed alone
            windows = [s[-self.max_len:] for s in sessions]
            offsets = np.zeros(len(windows) + 1, dtype=np.int64)
            np.cumsum([len(w) for w in windows], out=offsets[1:])
            tokens = np.fromiter((r + 1 for w in windows for r in w), dtype=np.int64, count=int(offsets[-1]))
            return self.encoder.encode_sessions(tokens, offsets), 1
        widths = [min(len(s), self.max_len) for s in sessions]
        order = sorted(range(len(sessions)), key=lambda b: -widths[b])
        out = np.empty((len(sessions), self.dim), dtype=np.float32)
        start = calls = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and widths[order[start]] - widths[order[end]] <= self.call_tokens:
                end += 1
            group = order[start:end]
            out[group] = self.encode_padded([sessions[b] for b in group])
            start, calls = end, calls + 1
        return out, calls

    def encode_padded(self, sessions: Sequence[Sequence[int]]) -> np.ndarray:
        """One encoder call: the sessions' last ``max_len`` rows left-padded to the longest -> float32 [B, d] (bit
        for bit each session's ``encode`` when ``batch_exact``)."""
        tails = [s[-self.max_len:] for s in sessions]
        width = max(len(t) for t in tails)
        tokens = np.full((len(tails), width), -1, dtype=np.int64)
        for b, t in enumerate(tails):
            tokens[b, width - len(t):] = t
        tokens += 1   # row r is the encoder's token r + 1, and -1 + 1 = 0 pads
        return self.encoder(tokens)

    def attribute_mask(self, values: tuple[str, ...]) -> np.ndarray:
        """Packed allow-bitset of items having any of the attribute ``values`` (LRU-cached per value set)."""
        with self._attr_lock:
            hit = self._attr_masks.get(values)
            if hit is not None:
                self._attr_masks.move_to_end(values)
                return hit
        mask = np.zeros(self.num_items, dtype=bool)
        for v in values:
            rows = self.attr_rows.get(v)
            if rows is not None:
                mask[rows] = True
        bits = scoring.pack_mask(mask)
        with self._attr_lock:
            self._attr_masks[values] = bits
            while len(self._attr_masks) > const.ATTRIBUTE_MASK_CACHE:
                self._attr_masks.popitem(last=False)
        return bits

    def summary(self) -> dict:
        m = self.manifest
        test = m.get("metrics", {}).get("test", {})
        return {"model_version": self.version, "created_at": m.get("created_at"), "precision": self.precision,
                "num_items": self.num_items, "dim": self.dim, "max_len": self.max_len, "encoder": self.encoder_kind, "provider": self.provider,
                "architecture": m.get("model", {}).get("architecture"),
                "dataset": {k: m.get("dataset", {}).get(k) for k in ("path", "format", "fingerprint")},
                "metrics": {name: {k: v for k, v in vals.items() if k in ("HR@10", "NDCG@10")}
                            for name, vals in test.items()},
                "has_attributes": self.has_attributes, "added_items": self.num_added,
                "can_compose": self.attr_emb is not None, "batch_exact": self.batch_exact,
                "encoder_call_tokens": round(self.call_tokens, 1), "fast_path": self.fast is not None,
                "fast_path_concurrent": bool(self.fast_concurrent), "bundle": str(self.path),
                "files": sorted(m.get("files", {}))}
