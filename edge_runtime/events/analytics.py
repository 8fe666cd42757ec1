"""Real-time analysis of the events a node commits, at bounded cost: per-minute buckets over the last hour.

* events per second by type: per-second counts over the last 60 s (a ring of 60 slots per type);
* distinct active shoppers in the last 5 minutes and the last hour: one HyperLogLog per minute (Flajolet et al.,
  "HyperLogLog: the analysis of a near-optimal cardinality estimation algorithm", AofA 2007; 2^12 registers, ~1.6 %
  standard error), merged by register-wise max; the pseudonym's own HMAC bits are the hash;
* the most viewed / carted / purchased items of the last hour: one Misra-Gries summary per minute and type (at most
  ``ANALYTICS_ITEMS_PER_MINUTE`` counters each; Misra & Gries, "Finding repeated elements", 1982), summed over the
  hour when asked.

``observe`` costs O(1) per event (amortized); ``snapshot`` costs O(minutes x counters), independent of traffic.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections import Counter

import numpy as np

from .. import const

_M = 1 << const.HLL_BITS
_ALPHA = 0.7213 / (1 + 1.079 / _M)


class _Minute:
    __slots__ = ("minute", "hll", "items")

    def __init__(self, minute: int, types: tuple[str, ...]):
        self.minute = minute
        self.hll = np.zeros(_M, dtype=np.uint8)
        self.items: dict[str, Counter] = {t: Counter() for t in types}


def _hll_estimate(registers: np.ndarray) -> float:
    z = float(np.sum(np.ldexp(1.0, -registers.astype(np.int64))))
    est = _ALPHA * _M * _M / z
    zeros = int(np.count_nonzero(registers == 0))
    if est <= 2.5 * _M and zeros:
        est = _M * math.log(_M / zeros)   # small-range (linear counting) correction
    return est


class Analytics:
    """See the module docstring. ``types``: the event types (``session.EVENTS``)."""

    def __init__(self, types: tuple[str, ...]):
        self.types = types
        self._minutes: dict[int, _Minute] = {}
        self._seconds = {t: np.zeros(60, dtype=np.int64) for t in types}
        self._second_of_slot = np.full(60, -1, dtype=np.int64)

    def _bucket(self, now: float) -> _Minute:
        minute = int(now // 60)
        b = self._minutes.get(minute)
        if b is None:
            b = self._minutes[minute] = _Minute(minute, self.types)
            for old in [m for m in self._minutes if m <= minute - const.ANALYTICS_MINUTES]:
                del self._minutes[old]
        return b

    def observe(self, user: str, item: str, event: str, now: float | None = None) -> None:
        """One committed event: ``user`` is the pseudonym (hex HMAC: its bits are uniform; a raw id, on a node
        without an event log, is hashed first)."""
        now = time.time() if now is None else now
        b = self._bucket(now)
        try:
            h = int(user[:16], 16) if len(user) >= 16 else None
        except ValueError:
            h = None
        if h is None:
            h = int.from_bytes(hashlib.blake2b(user.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
        idx = h & (_M - 1)
        rest = h >> const.HLL_BITS
        rank = (64 - const.HLL_BITS) - rest.bit_length() + 1
        if rank > b.hll[idx]:
            b.hll[idx] = rank
        counts = b.items[event]
        if item in counts or len(counts) < const.ANALYTICS_ITEMS_PER_MINUTE:
            counts[item] += 1
        else:   # Misra-Gries: every counter loses one, the zeros go
            for k in list(counts):
                counts[k] -= 1
                if counts[k] <= 0:
                    del counts[k]
        sec = int(now)
        slot = sec % 60
        if self._second_of_slot[slot] != sec:
            self._second_of_slot[slot] = sec
            for t in self.types:
                self._seconds[t][slot] = 0
        self._seconds[event][slot] += 1

    def snapshot(self, now: float | None = None) -> dict:
        """``{events_per_second: {type: rate over the last 60 s}, active_shoppers: {"5m": n, "1h": n},
        top_items_1h: {type: [[item, count], ...]}}``."""
        now = time.time() if now is None else now
        sec = int(now)
        fresh = (self._second_of_slot > sec - 60) & (self._second_of_slot <= sec)
        rates = {t: float(self._seconds[t][fresh].sum()) / 60.0 for t in self.types}
        minute = int(now // 60)
        out_active = {}
        for label, span in (("5m", 5), ("1h", const.ANALYTICS_MINUTES)):
            regs = np.zeros(_M, dtype=np.uint8)
            any_b = False
            for m, b in self._minutes.items():
                if minute - span < m <= minute:
                    np.maximum(regs, b.hll, out=regs)
                    any_b = True
            out_active[label] = int(round(_hll_estimate(regs))) if any_b and regs.any() else 0
        top = {}
        for t in self.types:
            total: Counter = Counter()
            for m, b in self._minutes.items():
                if minute - const.ANALYTICS_MINUTES < m <= minute:
                    total.update(b.items[t])
            top[t] = [[item, int(c)] for item, c in total.most_common(const.ANALYTICS_TOP_ITEMS)]
        return {"events_per_second": rates, "active_shoppers": out_active, "top_items_1h": top}
