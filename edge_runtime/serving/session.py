"""Per-shopper session state and the recommend result cache (both bounded, both LRU).

Both are used from the event-loop thread only, so they take no locks.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Hashable

EVENTS = ("view", "cart", "purchase")


class Session:
    """A shopper's recent events: a ring of (item id, event, ts), oldest first, plus a version that changes on every
    event (it keys the result cache)."""

    __slots__ = ("events", "version", "last_seen")

    def __init__(self, max_events: int):
        self.events: deque[tuple[str, str, float]] = deque(maxlen=max_events)
        self.version = 0
        self.last_seen = 0.0

    def items(self) -> list[str]:
        return [e[0] for e in self.events]


class SessionStore:
    """Bounded map user -> Session: at most ``max_sessions`` users (least recently active evicted first), each a ring
    of at most ``max_events`` events.

    Items are kept as external id strings, not model rows, so an item unknown to the current model stays in the
    session and counts as soon as a model that knows it is loaded.
    """

    def __init__(self, max_sessions: int, max_events: int):
        if max_sessions < 1 or max_events < 1:
            raise ValueError("max_sessions and max_events must be >= 1")
        self.max_sessions = max_sessions
        self.max_events = max_events
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self.evicted = 0
        self.events_tracked = 0
        # Session versions come from one clock, so a session re-created after eviction never reuses a version a
        # cached result was computed for.
        self._clock = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, user: str) -> Session | None:
        return self._sessions.get(user)

    def resize(self, max_sessions: int) -> None:
        """New bound (SIGHUP); the least recently active sessions beyond it are evicted now."""
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.max_sessions = max_sessions
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
            self.evicted += 1

    def drop(self, user: str) -> int:
        """Forget ``user``'s session; returns how many events it held."""
        s = self._sessions.pop(user, None)
        return len(s.events) if s is not None else 0

    def track(self, user: str, item: str, event: str, ts: float | None = None) -> Session:
        """Append an event (``ts`` in unix seconds, default now) and bump the session's version."""
        s = self._sessions.get(user)
        if s is None:
            s = self._sessions[user] = Session(self.max_events)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
                self.evicted += 1
        else:
            self._sessions.move_to_end(user)
        now = time.time()
        s.events.append((item, event, float(ts) if ts is not None else now))
        self._clock += 1
        s.version = self._clock
        s.last_seen = now
        self.events_tracked += 1
        return s


class ResultCache:
    """LRU cache of recommend results keyed by (user, request parameters), valid only for the session version and
    model version it was computed with. ``invalidate(user)`` drops every entry of a user (called on each event).

    Bounded twice: at most ``max_entries`` entries and at most ``max_items`` ids in all (an entry weighs
    1 + len(items) + len(ignored)), so large-k results cannot blow the memory budget."""

    def __init__(self, max_entries: int, max_items: int = 1_000_000):
        self.max_entries = max_entries
        self.max_items = max_items
        self._entries: OrderedDict[tuple[str, Hashable], tuple[int, str, dict]] = OrderedDict()
        self._by_user: dict[str, set] = {}
        self.weight = 0
        self.hits = 0
        self.misses = 0
        self.uncounted: str | None = None   # a user whose lookups are not counted (the swap path's warm-up)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user: str, params: Hashable, session_version: int, model_version: str) -> dict | None:
        hit = self._entries.get((user, params))
        counted = user != self.uncounted
        if hit is not None and hit[0] == session_version and hit[1] == model_version:
            self._entries.move_to_end((user, params))
            self.hits += counted
            return hit[2]
        self.misses += counted
        return None

    def put(self, user: str, params: Hashable, session_version: int, model_version: str, result: dict) -> None:
        if self.max_entries <= 0:
            return
        key = (user, params)
        old = self._entries.pop(key, None)
        if old is not None:
            self.weight -= _weight(old[2])
        self._entries[key] = (session_version, model_version, result)
        self.weight += _weight(result)
        self._by_user.setdefault(user, set()).add(params)
        self.resize(self.max_entries, self.max_items)

    def resize(self, max_entries: int, max_items: int) -> None:
        """New bounds (SIGHUP); the least recently used entries beyond them are dropped now."""
        self.max_entries, self.max_items = max_entries, max_items
        while self._entries and (len(self._entries) > self.max_entries or self.weight > self.max_items):
            (old_user, old_params), (_, _, res) = self._entries.popitem(last=False)
            self.weight -= _weight(res)
            keys = self._by_user.get(old_user)
            if keys is not None:
                keys.discard(old_params)
                if not keys:
                    del self._by_user[old_user]

    def invalidate(self, user: str) -> int:
        """Drop every cached result of ``user``; returns how many."""
        keys = self._by_user.pop(user, ())
        for params in keys:
            old = self._entries.pop((user, params), None)
            if old is not None:
                self.weight -= _weight(old[2])
        return len(keys)

    def clear(self) -> None:
        self._entries.clear()
        self._by_user.clear()
        self.weight = 0


def _weight(result: dict) -> int:
    return 1 + len(result.get("items", ())) + len(result.get("ignored", ()))
