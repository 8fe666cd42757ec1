"""The one path by which a model starts being served, whichever way it arrives: at boot, from model sync, on
SIGHUP, by rollback.

1. load (``Model``: read + verify the bundle, load the encoder, ``check_model``), in a worker thread, beside the
   model being served;
2. compose the items added at the node (``Service.added``, ``add_items``) that the new model was not trained on
   onto it, in a worker thread (``Service.with_added``); the ones it was trained on get its trained rows;
3. swap it in atomically (``Service.swap_model``: requests in flight finish on the old model, new ones get the new
   one);
4. the served check: one request through the served path (``Service.served_check``: a scoring thread, the encoder,
   the scan, the reply shape); if it fails, the previous model is swapped back and ``SwapError`` raised; if it
   passes, the added items the model was trained on leave the added set (``Service.retire_known``);
5. drop the old model and hand its memory back to the OS (``memory.release_memory``);
6. warm up (``Service.warm_up``: every path and scoring thread a request touches, once, so the first real request
   costs what the next ones do; after step 5, which would hand back the pages it warms);
7. tell the listeners (``on_swap``: the zeroconf announcement of the version served).

Every model change holds ``lock()``, so a sync install, a rollback and a reload never interleave; steps 2 to 4 also
hold ``Service.items_lock()``, so no ``add_items`` lands between the composition and the swap.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from ..errors import SwapError
from .memory import release_memory
from .model import Model
from .service import Service

log = logging.getLogger(__name__)


class ModelSwapper:
    """Swaps models into one ``Service``; see the module docstring.

    Attributes:
        service: the service whose model is swapped.
        on_swap: callables(version: str) run after every successful swap.
    """

    def __init__(self, service: Service):
        self.service = service
        self.on_swap: list[Callable[[str], None]] = []
        self._lock: asyncio.Lock | None = None

    @property
    def current(self) -> str | None:
        """The version served now, or None."""
        m = self.service.model
        return m.version if m is not None else None

    def lock(self) -> asyncio.Lock:
        """The lock every model change holds (created on the event loop's first use)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def load(self, loader: Callable[[], Model]) -> Model:
        """Run ``loader`` (e.g. ``lambda: Model(path)``) in a worker thread, after handing freed memory back (a
        transfer's buffers must not stack on the new model's peak).

        Raises:
            whatever ``loader`` raises (BundleError for a bad bundle or a failed model check).
        """
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, release_memory)
        return await loop.run_in_executor(None, loader)

    async def activate(self, model: Model, reason: str) -> None:
        """Serve ``model`` with the node's added items composed onto it: swap, served check, rollback on failure,
        memory release, warm-up (``Service.warm_up``), ``on_swap``.

        Raises:
            SwapError: the served check failed; the previous model (or none) is served again.
        """
        loop = asyncio.get_running_loop()
        async with self.service.items_lock():
            if self.service.added:
                model = await loop.run_in_executor(None, self.service.with_added, model)
            old = self.service.model
            self.service.swap_model(model)
            try:
                await self.service.served_check(model)
            except Exception as exc:
                self.service.swap_model(old)
                raise SwapError(f"model {model.version} failed its served-path check ({reason}), still serving "
                                f"{old.version if old is not None else 'no model'}: {exc!r}") from exc
            self.service.retire_known()
        del old
        await loop.run_in_executor(None, release_memory)
        try:   # after the release, which would hand back the pages it warms
            await self.service.warm_up(model)
        except Exception as exc:   # noqa: BLE001 - the model passed its check; a warm-up failure only costs speed
            log.warning("warm-up of %s failed (serving it anyway): %r", model.version, exc)
        log.info("now serving %s (%s); encoder %s", model.version, reason,
                 "batch-exact: concurrent requests share encoder calls" if model.batch_exact
                 else "not batch-exact: one encoder call per request")
        for cb in self.on_swap:
            cb(model.version)
