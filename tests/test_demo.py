"""The demo's evidence: ``edgerec.demo.held_out_quality`` scores held-out shoppers through a real daemon, the model
beside the popularity list, with the offline evaluator's meaning; and the daemon's first ``recommend`` after READY
costs about what the next ones do."""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

from edge_runtime.client import Client
from edge_runtime.serving.model import Model
from edgerec.demo import held_out_quality
from edgerec.process import start_ready
from edgerec.process import free_port, stop_daemon
from trainer.evaluate import evaluate, metrics_from_ranks, target_ranks
from trainer.scorers import onnx_score_fn

USERS = 200


def test_held_out_quality_model_above_popularity_as_the_evaluator_counts(daemon, tiny_bundle, beauty_data):
    rng = np.random.default_rng(0)
    users = rng.choice([u for u, s in enumerate(beauty_data.sequences) if len(s) >= 3], USERS, replace=False)
    with Client(port=daemon[1]) as c:
        q = held_out_quality(c, beauty_data, users, k=10)
        short = SimpleNamespace(sequences=[beauty_data.sequences[0][:2]], item_ids=beauty_data.item_ids)
        with pytest.raises(ValueError, match="at least 3"):
            held_out_quality(c, short, [0])
    assert q["model"]["users"] == q["popularity"]["users"] == len(q["ms"]) == USERS
    assert q["model"]["HR@10"] > q["popularity"]["HR@10"] > 0
    assert q["model"]["NDCG@10"] > q["popularity"]["NDCG@10"] > 0
    # the same figures offline (trainer.evaluate: history masked, the target's rank among all items), so the demo's
    # numbers mean what the manifest's mean; ties at the 10th place may go either way (one user at most)
    model = Model(tiny_bundle)
    ctx = [beauty_data.sequences[u][:-1] for u in users]
    targets = np.asarray([beauty_data.sequences[u][-1] for u in users])
    offline = evaluate(onnx_score_fn(model.encoder, model.items, model.scales, per_user=True), ctx, targets,
                       model.max_len, ks=(10,))
    pop = model.popularity.astype(np.float32)
    pop_offline = metrics_from_ranks(np.concatenate([target_ranks(pop[None].copy(), [c], t[None])
                                                     for c, t in zip(ctx, targets)]), ks=(10,))
    for got, want in ((q["model"], offline), (q["popularity"], pop_offline)):
        assert abs(got["HR@10"] - want["HR@10"]) <= 1 / USERS, (got, want)
        assert abs(got["NDCG@10"] - want["NDCG@10"]) <= 1 / USERS, (got, want)


def _first_two(bundle, data, env_inline: str) -> tuple[float, float, dict]:
    """A fresh daemon, READY: (first recommend ms, second recommend ms, health before any request). Both are alike:
    a shopper's fresh session (10 to 20 real events, its track_batch right before it), k = 10. (Each right after
    its own track_batch: on a VM whose idle vCPUs halt, a request after other calls and waits meets colder caches
    than one right after a recommend, which made the first of two back-to-back recommends the slower by 0.3 ms.)"""
    users = [u for u, s in enumerate(data.sequences) if 10 <= len(s) <= 20][:2]
    port = free_port()
    proc = start_ready(bundle, port, env=dict(os.environ, EDGEREC_SCORE_INLINE=env_inline))
    try:
        with Client("127.0.0.1", port) as c:
            health = c.call("health")
            ms = []
            for u in users:
                c.call("track_batch", events=[{"user": f"first-{u}", "item": data.item_ids[t - 1], "event": "view"}
                                              for t in data.sequences[u][:-1]])
                t0 = time.perf_counter()
                c.call("recommend", user=f"first-{u}", k=10)
                ms.append((time.perf_counter() - t0) * 1e3)
    finally:
        assert stop_daemon(proc) == 0
    return ms[0], ms[1], health


@pytest.mark.parametrize("inline", ["auto", "never"])   # on the event loop / on the scoring threads
def test_first_recommend_after_ready_costs_about_the_second(tiny_bundle, beauty_data, inline):
    """The warm-up (``Service.warm_up``, after the swap's memory release) leaves nothing for the first
    request to set up: it is within 3x of the second (before: ~8x on an older tree). A latency ratio on shared
    cores can catch a scheduler hiccup, so a second fresh daemon gets a chance; a real regression fails both."""
    tries = []
    for _ in range(2):
        first, second, health = _first_two(tiny_bundle, beauty_data, inline)
        # the warm-up leaves no trace a client sees: no session, no cached result
        assert health["sessions"] == 0 and health["cache_entries"] == 0, health
        tries.append((round(first, 3), round(second, 3)))
        if first <= 3 * second:
            break
    assert first <= 3 * second, f"first / second recommend ms: {tries}"
