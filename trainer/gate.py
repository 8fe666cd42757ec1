"""The quality gate of a fine-tune, and the served-path ranking it (and ``bench/bench_stream.py``) measure with.

A *case* is one shopper at one moment: a context (the shopper's earlier items, oldest first) and the items the
shopper took next (its targets; the same timestamp, or the same day in the stream benchmark, has no real order, so
a case may hold several). Each target is ranked over every item the model knows, the way a node serves it: the
int8 ONNX encoder over the last ``max_len`` context items (one shopper per call), the int8 item matrix with per-row
scales (scores = dot products over the dequantized rows), the context's items removed, ties to the lower item row
(``edge_runtime.scoring.topk``'s rule). A target's rank counts the items ahead of it except the case's other targets.
A case with an empty context gets the popularity list (what the node answers). HR@10 / NDCG@10 average over targets.

``gate_decision`` compares a candidate with the serving model on the same held-back cases: the candidate passes
unless its NDCG@10 is below the serving model's by more than ``margin`` (relative), or too few targets were counted
to judge.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from edge_runtime.bundle.format import read_arrays
from edge_runtime.serving.encoder import Encoder

from .evaluate import metrics_from_ranks


@dataclasses.dataclass
class ServedPath:
    """What a node scores with.

    Attributes:
        encoder: int64 [1, l] tokens (1..``encoder_items``) -> float32 [1, d] user vector (the int8 ONNX encoder).
        items / scales: int8 [N, d] item matrix and float32 [N] per-row scales; token t is row t - 1.
        popularity: float32 [N], the list served to a shopper without context.
        max_len: the encoder's window L.
        encoder_items: tokens above this are unknown to the encoder (items added after it was exported, scored
            from composed rows): they are left out of its input but still removed from the ranking. Default N.
    """

    encoder: Callable[[np.ndarray], np.ndarray]
    items: np.ndarray
    scales: np.ndarray
    popularity: np.ndarray
    max_len: int
    encoder_items: int | None = None

    def __post_init__(self):
        if self.encoder_items is None:
            self.encoder_items = len(self.items)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @classmethod
    def from_bundle(cls, bundle_dir, verify: bool = True) -> "ServedPath":
        """The int8 served path of a bundle directory (``edge_runtime.bundle.format.read_arrays``).

        Raises:
            BundleError: unreadable or altered bundle.
        """
        a = read_arrays(bundle_dir, "int8", verify=verify)
        return cls(Encoder(a.encoder_path), a.items, a.scales, a.popularity.astype(np.float32),
                   int(a.manifest.get("model", {}).get("max_len", 50)))


def rank_cases(path: ServedPath, contexts: Sequence[np.ndarray], targets: Sequence[np.ndarray],
               chunk: int = 256) -> tuple[list[np.ndarray], np.ndarray]:
    """Rank every case's targets on ``path`` (see the module docstring).

    Args:
        contexts: per case an int64 array of tokens (1..N), oldest first; may be empty (popularity).
        targets: per case an int64 array of distinct target tokens not in the context; a token outside 1..N (an
            item the model does not know) is a miss.
    Returns:
        (per case int64 ranks, 0-based, N for a miss; bool [cases]: True where the popularity list answered).
    """
    ranks: list[np.ndarray] = [np.zeros(0, np.int64)] * len(contexts)
    popular = np.zeros(len(contexts), dtype=bool)
    items_f = path.items.astype(np.float32) * path.scales[:, None]   # dequantized int8 rows [N d]
    pop = path.popularity.astype(np.float32)
    for s in range(0, len(contexts), chunk):
        idx = range(s, min(s + chunk, len(contexts)))
        vecs, use = [], []
        for i in idx:
            ctx = np.asarray(contexts[i], dtype=np.int64)
            enc = ctx[(ctx >= 1) & (ctx <= path.encoder_items)][-path.max_len:]
            if len(enc):
                vecs.append(path.encoder(enc.reshape(1, -1))[0])
                use.append(i)
            else:
                popular[i] = True
        scores = {}
        if vecs:
            block = np.stack(vecs).astype(np.float32) @ items_f.T          # [B N]
            scores = dict(zip(use, block))
        for i in idx:
            ranks[i] = rank_targets(scores[i] if i in scores else pop, contexts[i], targets[i])
    return ranks, popular


def rank_targets(scores: np.ndarray, context: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based ranks of one case's targets in ``scores`` (float [N] over item rows; token t is row t - 1; not
    modified): the context's items removed, ties to the lower row, the case's other targets not counted.

    Returns:
        int64 [len(targets)]; N for a target outside 1..N, in the context, or scoring NaN.
    """
    n = len(scores)
    sc = np.array(scores, dtype=np.float32, copy=True)
    ctx = np.asarray(context, dtype=np.int64)
    sc[ctx[(ctx >= 1) & (ctx <= n)] - 1] = -np.inf
    tgt = np.asarray(targets, dtype=np.int64)
    known = (tgt >= 1) & (tgt <= n)
    out = np.full(len(tgt), n, dtype=np.int64)
    if known.any():
        t = tgt[known] - 1
        st = sc[t]
        rows = np.arange(n)
        ahead = (sc[None, :] > st[:, None]) | ((sc[None, :] == st[:, None]) & (rows[None, :] < t[:, None]))
        ahead[:, t] = False                                               # the case's other targets do not count
        rk = ahead.sum(axis=1).astype(np.int64)
        rk[~np.isfinite(st)] = n
        out[known] = rk
    return out


def summarize(ranks: Sequence[np.ndarray]) -> dict:
    """HR@10 / NDCG@10 over all targets of ``ranks`` (per case arrays) with the target and case counts."""
    flat = np.concatenate(list(ranks)) if len(ranks) else np.zeros(0, np.int64)
    m = metrics_from_ranks(flat, ks=(10,))
    return {"HR@10": m["HR@10"], "NDCG@10": m["NDCG@10"], "targets": int(len(flat)),
            "cases": int(sum(1 for r in ranks if len(r)))}


def gate_decision(candidate: dict, serving: dict, margin: float, min_targets: int) -> dict:
    """The gate's verdict on ``summarize`` results of the same cases.

    Returns:
        dict: candidate / serving HR@10 and NDCG@10, ``relative`` (candidate NDCG@10 / serving - 1), ``margin``,
        ``targets``, ``cases``, ``passed`` (bool) and ``reason`` (one line).
    """
    c, s = candidate["NDCG@10"], serving["NDCG@10"]
    rel = (c - s) / s if s > 0 else (0.0 if c == s else float("inf"))
    out = {"candidate": {"HR@10": candidate["HR@10"], "NDCG@10": c},
           "serving": {"HR@10": serving["HR@10"], "NDCG@10": s},
           "relative": rel, "margin": margin, "targets": candidate["targets"], "cases": candidate["cases"],
           "min_targets": min_targets}
    if candidate["targets"] < min_targets:
        out.update(passed=False, reason=f"only {candidate['targets']} held-back targets (the gate needs "
                                        f"{min_targets}); wait for more events")
    elif c < s * (1.0 - margin):
        out.update(passed=False, reason=f"candidate NDCG@10 {c:.4f} is {-100 * rel:.1f} % below the serving "
                                        f"model's {s:.4f} (margin {100 * margin:.1f} %)")
    else:
        out.update(passed=True, reason=f"candidate NDCG@10 {c:.4f} vs serving {s:.4f} ({100 * rel:+.1f} %, margin "
                                       f"{100 * margin:.1f} %)")
    return out
