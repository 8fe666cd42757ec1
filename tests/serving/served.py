"""A ``Service`` serving a model through the real swap path (check, warm-up), for the serving tests."""
from __future__ import annotations

import asyncio

from edge_runtime.serving.model import Model
from edge_runtime.serving.service import Service
from edge_runtime.serving.swap import ModelSwapper


def serve(model: Model, mode: str = "auto", **kwargs) -> Service:
    """``Service(None, **kwargs)`` scoring ``mode`` (``score_inline``: auto / always / never), ``model`` activated
    (in an event loop of its own; the service's requests may run in another). Shut ``service.executor`` down after."""
    service = Service(None, **kwargs)
    service.score_inline = mode

    async def boot():
        swapper = ModelSwapper(service)
        async with swapper.lock():
            await swapper.activate(model, "test")
    asyncio.run(boot())
    return service
