"""Leave-one-out, full-ranking evaluation (the field's protocol; NumPy only, no torch).

Protocol (S3-Rec / FMLP-Rec ``run_finetune_full.py``; Kang & McAuley 2018; see ../shared/datasets/ANCHORS.md):
for every user with at least 3 interactions, the last item is the test target (context: everything before it) and
the second-last the validation target (context: everything before that). The model ranks *all* N items; the items
of the user's own context are removed from the ranking (S3-Rec: ``rating_pred[train_matrix > 0] = 0``); the
target's rank is the number of remaining items that score strictly higher. HR@K = mean(rank < K);
NDCG@K = mean(1 / log2(rank + 2) if rank < K). The context fed to the encoder is the last ``max_len`` items.

One module serves training (early stopping), export checks, the benchmark and the tests: everything is phrased as
``score_fn(item_seq [B, L] int64) -> scores [B, N] float32``, so PyTorch, ONNX fp32, ONNX int8 + int8 item matrix
and the daemon's served path are all measured by the same code.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

ScoreFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class LOOSplit:
    """Leave-one-out split.

    Attributes:
        train: per user the training sequence (int64 tokens): ``seq[:-2]`` for evaluable users, else ``seq``.
        users: int64 indices of the evaluable users (at least ``min_len`` interactions).
        valid_ctx / test_ctx: per evaluable user the context (``seq[:-2]`` / ``seq[:-1]``).
        valid_target / test_target: int64 target tokens.
    """

    train: list[np.ndarray]
    users: np.ndarray
    valid_ctx: list[np.ndarray]
    valid_target: np.ndarray
    test_ctx: list[np.ndarray]
    test_target: np.ndarray


def loo_split(sequences: Sequence[np.ndarray], min_len: int = 3) -> LOOSplit:
    """Split chronological token sequences by leave-one-out (see module docstring)."""
    train, users, vctx, vt, tctx, tt = [], [], [], [], [], []
    for u, seq in enumerate(sequences):
        if len(seq) >= min_len:
            train.append(seq[:-2])
            users.append(u)
            vctx.append(seq[:-2])
            vt.append(seq[-2])
            tctx.append(seq[:-1])
            tt.append(seq[-1])
        else:
            train.append(seq)
    return LOOSplit(train, np.asarray(users, dtype=np.int64), vctx, np.asarray(vt, dtype=np.int64), tctx,
                    np.asarray(tt, dtype=np.int64))


def pad_left(contexts: Sequence[np.ndarray], max_len: int, trim: bool = False) -> np.ndarray:
    """Contexts (int64 token arrays) -> int64 [B, max_len], last ``max_len`` tokens, left-padded with 0.

    With ``trim`` the width is the longest context (capped at ``max_len``) instead of ``max_len``; encoders count
    positions from the right, so this changes no score, only the work.
    """
    if trim:
        max_len = max(1, min(max_len, max((len(c) for c in contexts), default=1)))
    out = np.zeros((len(contexts), max_len), dtype=np.int64)
    for i, c in enumerate(contexts):
        c = c[-max_len:]
        if len(c):
            out[i, max_len - len(c):] = c
    return out


def target_ranks(scores: np.ndarray, contexts: Sequence[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target among all items after removing the user's context items.

    Args:
        scores: float32 [B, N] over item rows (token t is row t - 1). Modified in place (history masked).
        contexts: B int64 token arrays (the full history, not only the encoder window).
        targets: int64 [B] tokens.
    Returns:
        int64 [B]; a target that is itself in the history, or scores NaN, gets rank N (a miss).
    """
    b, n = scores.shape
    rows = np.concatenate([np.full(len(c), i) for i, c in enumerate(contexts)]) if b else np.zeros(0, int)
    cols = np.concatenate(list(contexts)) - 1 if b else np.zeros(0, int)
    scores[rows, cols] = -np.inf
    tgt = scores[np.arange(b), targets - 1]
    ranks = (scores > tgt[:, None]).sum(axis=1).astype(np.int64)
    ranks[~np.isfinite(tgt)] = n
    return ranks


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """HR@K and NDCG@K (K in ``ks``) from 0-based ranks; also the user count."""
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) if len(ranks) else 0.0
    out["users"] = int(len(ranks))
    return out


def _length_sorted_chunks(contexts: Sequence[np.ndarray], batch_size: int):
    order = np.argsort([len(c) for c in contexts], kind="stable")
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]


def evaluate(score_fn: ScoreFn, contexts: Sequence[np.ndarray], targets: np.ndarray, max_len: int,
             ks: Sequence[int] = (10, 20), batch_size: int = 1024) -> dict[str, float]:
    """Leave-one-out full-ranking HR@K / NDCG@K of ``score_fn`` (see module docstring).

    Users are scored in batches of similar context length; ``score_fn`` receives int64 [B, l] with
    ``l <= max_len`` (the batch's longest context), left-padded.
    """
    ranks = np.empty(len(targets), dtype=np.int64)
    for idx in _length_sorted_chunks(contexts, batch_size):
        ctx = [contexts[i] for i in idx]
        scores = np.array(score_fn(pad_left(ctx, max_len, trim=True)), dtype=np.float32, copy=True)
        ranks[idx] = target_ranks(scores, ctx, targets[idx])
    return metrics_from_ranks(ranks, ks)


def topk_lists(score_fn: ScoreFn, contexts: Sequence[np.ndarray], max_len: int, k: int = 10,
               batch_size: int = 1024) -> np.ndarray:
    """Top-k item rows per context (history masked), int64 [B, k]; used for fp32 vs int8 agreement."""
    out = np.zeros((len(contexts), k), dtype=np.int64)
    for idx in _length_sorted_chunks(contexts, batch_size):
        ctx = [contexts[i] for i in idx]
        scores = np.array(score_fn(pad_left(ctx, max_len, trim=True)), dtype=np.float32, copy=True)
        rows = np.concatenate([np.full(len(c), i) for i, c in enumerate(ctx)])
        scores[rows, np.concatenate(list(ctx)) - 1] = -np.inf
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[idx] = np.take_along_axis(part, order, axis=1)
    return out


def topk_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |top-k(a) ∩ top-k(b)| / k over rows of two int [B, k] arrays."""
    if len(a) == 0:
        return 1.0
    return float(np.mean([len(np.intersect1d(x, y)) / a.shape[1] for x, y in zip(a, b)]))
