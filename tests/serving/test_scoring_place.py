"""Where a ``recommend`` is scored (``Service.recommend_now``): on the event loop when the model's measured scoring
cost is small, on a scoring thread otherwise. Both places must give the same replies, errors included, and the
RPC handler must return the reply itself (inline) or a future of it (thread)."""
from __future__ import annotations

import asyncio

import pytest

from edge_runtime import const
from edge_runtime.errors import InvalidParams
from edge_runtime.serving.model import Model
from served import serve


@pytest.fixture(scope="module")
def model(tiny_bundle) -> Model:
    return Model(tiny_bundle)


def test_score_cost_is_measured_at_load(model):
    assert 0 < model.score_us < 1e6
    assert model.score_us <= const.INLINE_SCORE_US   # the tiny catalog scores inline by default


def test_inline_and_threaded_scoring_give_the_same_replies(model):
    ids = model.item_ids
    requests = [{"history": [ids[i], ids[i + 3], ids[i + 7]], "k": 20} for i in range(0, 200, 10)]
    requests += [{"history": [ids[5]], "k": 5, "exclude_seen": False}, {"history": ["unknown-item"], "k": 7},
                 {"history": [ids[9]], "k": 10, "filters": {"exclude": [ids[1], ids[2]]}}]
    replies = {}
    for mode in ("always", "never"):
        service = serve(model, mode)

        async def go():
            out = []
            for p in requests:
                await asyncio.sleep(0.025)   # a lone request (batch.RECENT_S after the last burst): never batched
                r = service.recommend_now(dict(p))
                assert isinstance(r, asyncio.Future) is (mode == "never")
                out.append(await r if isinstance(r, asyncio.Future) else r)
            with pytest.raises(InvalidParams):   # a bad request fails the same way in both places
                service.recommend_now({"history": [ids[0]], "k": 0})
            return out

        try:
            replies[mode] = asyncio.run(go())
        finally:
            service.executor.shutdown(wait=True)
    assert replies["always"] == replies["never"]
    assert all(len(r["items"]) == p["k"] for r, p in zip(replies["always"], requests))
    assert replies["always"][-2]["source"] == "popularity" and replies["always"][-2]["ignored"] == ["unknown-item"]
