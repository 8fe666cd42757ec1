"""The served path and the offline evaluator agree: HR@10 / NDCG@10 from `recommend` over the socket (each test
user's history, exclude_seen, the held-out item looked for in the reply) equal trainer.evaluate's numbers for the
same int8 encoder and int8 item matrix."""
from __future__ import annotations

import numpy as np

from edge_runtime.client import Client
from edge_runtime.serving.model import Model
from edge_runtime.scoring import dense_scores
from trainer.evaluate import evaluate, loo_split, metrics_from_ranks, pad_left
from trainer.scorers import onnx_score_fn

USERS = 400


def test_socket_metrics_equal_offline_evaluator(daemon, tiny_bundle, beauty_data):
    split = loo_split(beauty_data.sequences)
    ctx, targets = split.test_ctx[:USERS], split.test_target[:USERS]
    model = Model(tiny_bundle)                     # what the daemon serves: int8 encoder, int8 item matrix
    # one user per encoder call, as served (int8 dynamic quantization scales activations per call)
    offline = evaluate(onnx_score_fn(model.encoder, model.items, model.scales, per_user=True), ctx, targets,
                       model.max_len, ks=(10,))
    ranks = []
    with Client(port=daemon[1]) as c:
        for history, target in zip(ctx, targets):
            reply = c.call("recommend", history=[beauty_data.item_ids[t - 1] for t in history], k=10)
            items = reply["items"]
            target_id = beauty_data.item_ids[target - 1]
            ranks.append(items.index(target_id) if target_id in items else 10 ** 6)
    served = metrics_from_ranks(np.asarray(ranks), ks=(10,))
    assert served["users"] == offline["users"] == USERS
    assert offline["HR@10"] > 0                     # the comparison means something
    # identical up to float summation order at an exact tie on the 10th place
    assert abs(served["HR@10"] - offline["HR@10"]) <= 1 / USERS
    assert abs(served["NDCG@10"] - offline["NDCG@10"]) <= 1 / USERS


def test_per_user_int8_scores_equal_the_served_encoder_call(tiny_bundle, beauty_data):
    """The offline int8 path encodes each user alone over the real window: bit-identical to Model.encode."""
    split = loo_split(beauty_data.sequences)
    model = Model(tiny_bundle)
    ctx = split.test_ctx[:64]
    batch = pad_left(ctx, model.max_len, trim=True)
    got = onnx_score_fn(model.encoder, model.items, model.scales, per_user=True)(batch)
    want = dense_scores(np.stack([model.encode(list(c - 1)) for c in ctx]), model.items, model.scales)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # the int8 encoder is batch-exact (float MatMuls, padding-exact attention): the padded batch in one call gives
    # every user bit for bit the vector of its lone call, as the daemon's batched requests get
    assert model.batch_exact
    np.testing.assert_array_equal(model.encoder(batch), np.stack([model.encode(list(c - 1)) for c in ctx]))
