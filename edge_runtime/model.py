"""A loaded model bundle: ONNX session encoder, item matrices, item-id table, filters, popularity.

A ``Model`` is immutable once loaded, so a request that took a reference to it finishes on it even if the daemon
swaps in another one meanwhile.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import bundle as bundle_mod
from . import scoring
from .errors import BundleError

log = logging.getLogger(__name__)


def limit_blas_threads(n: int = 1) -> None:
    """Cap BLAS threads (OpenBLAS / MKL, via threadpoolctl). The daemon runs requests in parallel scoring threads;
    BLAS spinning up its own threads per mat-vec on top of them costs more than it gains (bench_latency.py measured
    p99 10.4 ms -> 1.4 ms for one client on 2 cores)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")


def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None


def limit_malloc_arenas(n: int = 2) -> bool:
    """glibc only: at most ``n`` malloc arenas (mallopt M_ARENA_MAX; call before threads start). Each thread that
    allocates otherwise gets its own arena, and a model loaded in a worker thread during a hot swap would not reuse
    memory the event loop freed. Returns False where glibc is not there (musl, macOS)."""
    lib = _libc()
    return bool(lib and lib.mallopt(-8, n) == 1)   # -8 = M_ARENA_MAX


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; ctypes releases the GIL during the call). The
    hot swap calls it after a transfer (before loading the new model) and after dropping the old model, so neither
    the transfer's buffers nor the old model stack on top of the swap's peak RSS. No ``gc.collect()``: a model
    holds no reference cycles, and a full collection over a large session store would stall the event loop."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


class Encoder:
    """ONNX Runtime session encoder: ``item_seq`` int64 [B, L] -> ``user_vec`` float32 [B, d].

    Args:
        path: ONNX file.
        threads: intra-op threads per call (1 suits a daemon that runs calls in parallel threads).
    Raises:
        BundleError: the file cannot be loaded by ONNX Runtime.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # No memory arena: the encoder is small, an arena costs ~1 MiB more per loaded model (two are loaded during
        # a hot swap) and measured no faster.
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
            raise BundleError(f"{path}: ONNX Runtime cannot load the encoder: {exc}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, item_seq: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: item_seq})[0]


class Model:
    """A verified bundle ready to serve.

    Attributes:
        version: the manifest's model_version.
        item_ids: external id (str) by item row; ``index`` maps id -> row.
        items / scales: the item matrix scanned by ``topk`` (int8 + float32 scales, or float32 with scales None).
        max_len: the encoder's window L.
    """

    def __init__(self, bundle_dir: str | os.PathLike, precision: str = "int8", verify: bool = True,
                 threads: int = 1):
        if precision not in ("int8", "fp32"):
            raise ValueError(f"precision must be 'int8' or 'fp32', got {precision!r}")
        t0 = time.perf_counter()
        self.path = Path(bundle_dir)
        self.manifest = bundle_mod.load_manifest(self.path, verify=verify)
        self.version = str(self.manifest.get("model_version", "unknown"))
        self.precision = precision
        info = self.manifest.get("model", {})
        self.max_len = int(info.get("max_len", 50))
        load = lambda name: np.load(self.path / name, allow_pickle=False)  # noqa: E731
        try:
            if precision == "int8":
                self.items, self.scales = load("items.i8.npy"), load("items.scale.npy").astype(np.float32)
                self.encoder = Encoder(self.path / "encoder.int8.onnx", threads)
            else:
                self.items, self.scales = load("items.f32.npy").astype(np.float32), None
                self.encoder = Encoder(self.path / ("encoder.onnx" if (self.path / "encoder.onnx").is_file()
                                                    else "encoder.int8.onnx"), threads)
            with open(self.path / "item_ids.json", "r", encoding="utf-8") as f:
                self.item_ids = [str(x) for x in json.load(f)]
            self.popularity = load("popularity.npy").astype(np.float32)
            self.attr_indptr = None
            attr_codes, attr_names = np.zeros(0, dtype=np.int64), []
            if (self.path / "item_attr_indptr.npy").is_file():
                self.attr_indptr = load("item_attr_indptr.npy")
                if (self.path / "item_attr_codes.npy").is_file():
                    attr_codes = load("item_attr_codes.npy").astype(np.int64)
                    with open(self.path / "item_attr_names.json", "r", encoding="utf-8") as f:
                        attr_names = [str(v) for v in json.load(f)]
                else:   # older bundles: one string per (item, attribute) pair
                    with open(self.path / "item_attr_values.json", "r", encoding="utf-8") as f:
                        codes: dict[str, int] = {}
                        attr_codes = np.fromiter((codes.setdefault(str(v), len(codes)) for v in json.load(f)),
                                                 dtype=np.int64)
                        attr_names = list(codes)
        except (OSError, ValueError) as exc:
            raise BundleError(f"{self.path}: cannot read bundle arrays: {exc}") from None
        n = len(self.item_ids)
        if self.items.shape[0] != n or self.popularity.shape != (n,):
            raise BundleError(f"{self.path}: item matrix has {self.items.shape[0]} rows, popularity "
                              f"{self.popularity.shape[0]}, item_ids {n}: they must agree")
        self.index = {item: row for row, item in enumerate(self.item_ids)}
        # [N, 1] float32 so the popularity list runs through the same top-k scan (and filters) as model scores.
        self.popularity_column = np.ascontiguousarray(self.popularity.reshape(-1, 1))
        self.dim = int(self.items.shape[1])
        # attribute value -> int64 item rows (an inverted index: a category mask costs O(rows of those values))
        # Built from integer codes: each value's rows are a view of one int64 array (no per-entry objects, so a
        # second model loaded beside the first during a hot swap costs little more than its arrays).
        self.attr_rows: dict[str, np.ndarray] = {}
        if self.attr_indptr is not None:
            if len(attr_codes) != int(self.attr_indptr[-1]) or len(self.attr_indptr) != n + 1 or (
                    len(attr_codes) and not 0 <= int(attr_codes.min()) <= int(attr_codes.max()) < len(attr_names)):
                raise BundleError(f"{self.path}: item attribute table is inconsistent ({len(attr_codes)} codes over "
                                  f"{len(attr_names)} names, indptr ending at {int(self.attr_indptr[-1])} over "
                                  f"{len(self.attr_indptr) - 1} items)")
            owners = np.repeat(np.arange(n, dtype=np.int64), np.diff(self.attr_indptr))
            order = np.argsort(attr_codes, kind="stable")
            rows_by_value = owners[order]
            bounds = np.searchsorted(attr_codes[order], np.arange(len(attr_names) + 1))
            for j, v in enumerate(attr_names):
                if bounds[j + 1] > bounds[j]:
                    self.attr_rows[v] = rows_by_value[bounds[j]:bounds[j + 1]]
        self._attr_masks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._attr_lock = threading.Lock()
        self.warmup_us = self._warmup()
        self.load_seconds = time.perf_counter() - t0

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def _warmup(self) -> float:
        """Run the encoder and a scan once (first calls allocate); returns the warm call's time in µs."""
        seq = np.zeros((1, self.max_len), dtype=np.int64)
        seq[0, -1] = 1
        u = self.encoder(seq)
        if u.shape != (1, self.dim) or not np.all(np.isfinite(u)):
            raise BundleError(f"{self.path}: encoder returned {u.shape} (expected (1, {self.dim})) or non-finite")
        t0 = time.perf_counter()
        scoring.topk(self.encoder(seq)[0], self.items, 10, item_scales=self.scales)
        return (time.perf_counter() - t0) * 1e6

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
        tail = np.asarray(rows[-self.max_len:], dtype=np.int64) + 1
        return self.encoder(tail.reshape(1, -1))[0]

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
            while len(self._attr_masks) > 256:
                self._attr_masks.popitem(last=False)
        return bits

    def summary(self) -> dict:
        m = self.manifest
        test = m.get("metrics", {}).get("test", {})
        return {"model_version": self.version, "created_at": m.get("created_at"), "precision": self.precision,
                "num_items": self.num_items, "dim": self.dim, "max_len": self.max_len,
                "architecture": m.get("model", {}).get("architecture"),
                "dataset": {k: m.get("dataset", {}).get(k) for k in ("path", "format", "fingerprint")},
                "metrics": {name: {k: v for k, v in vals.items() if k in ("HR@10", "NDCG@10")}
                            for name, vals in test.items()},
                "has_attributes": self.attr_indptr is not None, "bundle": str(self.path),
                "files": sorted(m.get("files", {}))}
