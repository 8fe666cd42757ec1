"""The leave-one-out, full-ranking evaluator."""
from __future__ import annotations

import numpy as np

from trainer import evaluate as ev


def test_loo_split():
    seqs = [np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([7, 8, 9])]
    s = ev.loo_split(seqs)
    assert s.users.tolist() == [0, 2]
    assert [t.tolist() for t in s.train] == [[1, 2], [5, 6], [7]]
    assert s.valid_target.tolist() == [3, 8] and s.test_target.tolist() == [4, 9]
    assert [c.tolist() for c in s.test_ctx] == [[1, 2, 3], [7, 8]]


def test_ranks_mask_history_and_count_strictly_higher():
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]], dtype=np.float32)   # item rows 0..4 = tokens 1..5
    # target token 3 (row 2); history tokens 1 and 2 are masked, so nothing outranks it
    assert ev.target_ranks(scores.copy(), [np.array([1, 2])], np.array([3])).tolist() == [0]
    assert ev.target_ranks(scores.copy(), [np.array([5])], np.array([3])).tolist() == [2]
    # a target in the history is a miss
    assert ev.target_ranks(scores.copy(), [np.array([3])], np.array([3])).tolist() == [5]


def test_metrics_values():
    m = ev.metrics_from_ranks(np.array([0, 1, 9, 10, 50]), ks=(10,))
    assert m["HR@10"] == 3 / 5
    assert np.isclose(m["NDCG@10"], (1 + 1 / np.log2(3) + 1 / np.log2(11)) / 5)


def test_evaluate_with_oracle_and_pad_left():
    n = 6
    contexts = [np.array([1, 2]), np.array([3]), np.array([2, 4, 5])]
    targets = np.array([3, 4, 6])

    def oracle(seq):   # scores the true next item (last token + 1) highest
        out = np.zeros((len(seq), n), np.float32)
        out[np.arange(len(seq)), seq[:, -1]] = 1.0
        return out

    m = ev.evaluate(oracle, contexts, targets, max_len=4)
    assert m["HR@10"] == 1.0 and m["NDCG@10"] == 1.0 and m["users"] == 3
    assert ev.pad_left(contexts, 4).tolist() == [[0, 0, 1, 2], [0, 0, 0, 3], [0, 2, 4, 5]]
    assert ev.pad_left(contexts, 2, trim=True).tolist() == [[1, 2], [0, 3], [4, 5]]
    lists = ev.topk_lists(oracle, contexts, 4, k=2)
    assert lists[:, 0].tolist() == [2, 3, 5]
    assert ev.topk_overlap(lists, lists) == 1.0
