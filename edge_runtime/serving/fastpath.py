"""The ``recommend`` fast path: a plain request frame answered from its bytes in one native call.

The general path turns a frame into Python objects (the msgpack decoder, the parameter checks, id -> row lookups,
the result lists and map, the reply encoder): about 40 µs of interpreter per request on a 2-core AMD EPYC (Zen 3)
in a fast spell, 90 µs in a slow one, beside a 10 µs encoder call and a 100 µs scan on the Beauty bundle.
``_native.RecommendFrames`` (native/src/bindings.cpp, the MessagePack subset in native/src/frames.h) does all of
it in C++ for the frames it can answer exactly as the general path would:

    [0, msgid, "recommend", [{"history": [id, ...], "k": n, "exclude_seen": bool}]]   (k, exclude_seen optional)

with every history id a string the model knows (at most ``const.MAX_HISTORY_IDS``), k in 1 .. ``const.MAX_K``, k
plus the exclusions at most ``const.BATCH_MAX_FETCH``, nothing else in the map and nothing after the frame. Its
reply is byte for byte the general path's (tests/serving/test_fastpath.py checks it frame by frame, including
every way a frame falls back). Any other frame (a ``user``, filters, an unknown id, bad input, several frames in
one chunk) returns None and takes the general path, which gives errors their messages.

``Service.recommend_frame`` uses it only where the general path would score the request on the event loop: a
native encoder, the native kernel, a model scored inline (``Model.score_us``), no stock filter, no items added at
the node. Requests arriving together are batched by the general path (``batch.py``: one scan for the batch) where
that pays: when a batch saves each request more scan time (``batch_saving_us``, measured at load) than the general
path costs it beyond the fast path (``const.FAST_OVER_BATCH_US``); on a smaller catalog the fast path answers them
one by one (``Model.fast_concurrent``). ``EDGEREC_FAST_PATH=0`` turns it off (every frame then takes the general
path).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from .. import const, scoring
from ..config import env_value, score_inline_mode
from .encoder import NativeEncoder

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger("edgerec")


def enabled() -> bool:
    """False when ``EDGEREC_FAST_PATH`` is 0 / off / false / no."""
    v = (env_value("FAST_PATH") or "1").strip().lower()
    return v not in ("0", "off", "false", "no")


def batch_saving_us(model: "Model", size: int = 8, calls: int = 5) -> float:
    """The scan time a batch of ``size`` saves each of its requests, µs: the median lone top-10 scan minus the
    median per-query time of one ``per_query`` scan of ``size`` queries (the user vectors of the ``size`` most
    popular items), ``calls`` calls each, measured at load."""
    rows = np.argsort(-model.popularity, kind="stable")[:size].tolist() if model.num_items else [0]
    users = np.stack([model.encode([r]) for r in rows])
    k = min(10, max(1, model.num_items))
    lone, batch = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        scoring.topk(users[0], model.items, k, item_scales=model.scales, items_checked=True)
        t1 = time.perf_counter()
        scoring.topk(users, model.items, k, item_scales=model.scales, items_checked=True, per_query=True)
        t2 = time.perf_counter()
        lone.append(t1 - t0)
        batch.append((t2 - t1) / len(users))
    return float(np.median(lone) - np.median(batch)) * 1e6


def build(model: "Model"):
    """The model's ``_native.RecommendFrames`` (called as ``fast(frame: bytes) -> (reply: bytes, encoder_s:
    float, scan_s: float) | None``), or None when it cannot have one or would not use it: the ONNX Runtime encoder,
    no native kernel, the switch off, items added at the node (their rows are not the encoder's), or a model scored
    on the scoring threads (``Model.score_us`` above ``const.INLINE_SCORE_US``, unless ``EDGEREC_SCORE_INLINE=
    always``), where the fast path is never taken and its index (32-40 bytes per item) would be memory for
    nothing."""
    native = scoring.native_kernel()
    if native is None or not isinstance(model.encoder, NativeEncoder) or model.num_added or not enabled():
        return None
    inline = score_inline_mode()
    if inline == "never" or (inline == "auto" and model.score_us > const.INLINE_SCORE_US):
        return None
    try:
        return native.RecommendFrames(model.encoder.session_encoder, model.items, model.scales, model.item_ids,
                                      model.version, model.max_len, const.MAX_K, const.MAX_HISTORY_IDS, const.BATCH_MAX_FETCH,
                                      const.MAX_ID_CHARS, const.MAX_MSGID)
    except (ValueError, TypeError, RuntimeError, UnicodeError) as exc:   # a model it does not take: general path
        log.warning("model %s: no recommend fast path (%s)", model.version, exc)
        return None
