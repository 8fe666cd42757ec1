"""serving/swap.py: the one swap path serves a checked model, rolls back one that fails its served check (the
previous model keeps answering), and tells its listeners only about models actually served."""
from __future__ import annotations

import asyncio

import pytest

from edge_runtime.errors import SwapError
from edge_runtime.serving.model import Model
from edge_runtime.serving.service import Service
from edge_runtime.serving.swap import ModelSwapper


def test_swap_rolls_back_a_model_that_fails_its_served_check(tiny_bundle):
    service = Service(None)
    swapper = ModelSwapper(service)
    seen: list[str] = []
    swapper.on_swap.append(seen.append)
    good = Model(tiny_bundle)
    bad = Model(tiny_bundle)
    bad.version = "broken"
    bad.encode = lambda rows: good.encode(rows) * float("nan")   # finite at load, NaN once served

    async def go():
        async with swapper.lock():
            await swapper.activate(good, "boot")
            assert swapper.current == good.version and seen == [good.version]
            with pytest.raises(SwapError, match="broken failed its served-path check"):
                await swapper.activate(bad, "sync")
        assert service.model is good and seen == [good.version]
        res = await service.recommend({"history": [good.item_ids[0]], "k": 5})
        assert res["model_version"] == good.version and len(res["items"]) == 5
        loaded = await swapper.load(lambda: Model(tiny_bundle, verify=False))
        assert loaded.version == good.version and loaded is not good

    try:
        asyncio.run(go())
    finally:
        service.executor.shutdown(wait=True)
