"""One method table and one set of parameter checks for every service the RPC server runs (node, registry).

A handler takes the request's named-parameter map and returns a msgpack-serializable result; it raises only
``EdgeRuntimeError`` subclasses for bad input (``InvalidParams`` names the parameter), which the server sends as
error objects. The checks below are the only ones in the project: every service validates with them.
"""
from __future__ import annotations

import math
import reprlib
from typing import Any, Callable, Iterator

from .. import const
from ..errors import InvalidParams, MethodNotFound

Handler = Callable[[dict], Any]


class MethodTable:
    """Method name -> (handler, is_async). ``is_async`` handlers are coroutines run as tasks (their replies may
    interleave); the others run inline on the event loop and must be short, and may return an ``asyncio.Future``
    whose result is the reply (no task per request: the event log's commit path)."""

    def __init__(self, methods: dict[str, tuple[Handler, bool]] | None = None):
        self._methods: dict[str, tuple[Handler, bool]] = dict(methods or {})
        # (method, fn): fn(bytes of a whole request frame of that method) -> its reply's bytes, or None for the
        # general path (``set_frame_path``)
        self.frame_path: tuple[str, Callable[[bytes], bytes | None]] | None = None

    def set_frame_path(self, method: str, fn: Callable[[bytes], bytes | None] | None) -> None:
        """A fast path for whole request frames of ``method``: the server offers ``fn`` each chunk of bytes that is
        the start of a frame with nothing else buffered, nothing in flight on the connection and a role that may
        call ``method``; ``fn`` returns the reply's bytes (the server writes them and counts the request as
        ``method``), or None, having changed nothing, and the bytes take the general path. None removes it."""
        if fn is not None and method not in self._methods:
            raise ValueError(f"set_frame_path: no method {method!r} in the table")
        self.frame_path = (method, fn) if fn is not None else None

    def add(self, name: str, handler: Handler, is_async: bool = False) -> None:
        """Add or replace ``name``."""
        self._methods[name] = (handler, is_async)

    def update(self, other: "MethodTable", names: tuple[str, ...] | None = None) -> None:
        """Add ``other``'s methods (only ``names`` when given)."""
        for name in names if names is not None else list(other):
            self._methods[name] = other._methods[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._methods

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __getitem__(self, name: str) -> tuple[Handler, bool]:
        return self._methods[name]

    def __setitem__(self, name: str, entry: tuple[Handler, bool]) -> None:
        self._methods[name] = entry

    def lookup(self, method: Any) -> tuple[Handler, bool]:
        """(handler, is_async) for a method name.

        Raises:
            MethodNotFound: unknown or non-string method (the message lists the methods).
        """
        if not isinstance(method, str):
            raise MethodNotFound(f"method must be a string, got {type_name(method)}")
        try:
            return self._methods[method]
        except KeyError:
            raise MethodNotFound(f"unknown method {method[:64]!r}; methods: {sorted(self._methods)}") from None


# ---------------------------------------------------------------------------------------------------- checks
def type_name(v: Any) -> str:
    return "nil" if v is None else type(v).__name__


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict = 2, 4, 4
_repr.maxstring = _repr.maxother = const.REPR_CHARS


def short(v: Any) -> str:
    """A bounded repr for error messages (deeply nested or huge values stay short)."""
    return _repr.repr(v)


def check_keys(p: dict, allowed: tuple[str, ...], required: tuple[str, ...], where: str) -> None:
    """Unknown or missing parameters of ``where`` (a method, or a nested map such as ``events[3]``).

    Raises:
        InvalidParams: names the unknown or the first missing parameter.
    """
    unknown = [k for k in p if k not in allowed]
    if unknown:
        raise InvalidParams(f"{where}: unknown parameter(s) {short(unknown)}; allowed: {list(allowed)}")
    for k in required:
        if k not in p:
            raise InvalidParams(f"{where}: missing required parameter '{k}'")


def as_id(v: Any, name: str) -> str:
    """A user / item id: str, or int (normalized to its decimal string), 1 to ``MAX_ID_CHARS`` characters; bool,
    float and others are rejected."""
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise InvalidParams(f"'{name}' must be a string or an integer id, got {type_name(v)}")
    s = v if isinstance(v, str) else str(v)
    if not s or len(s) > const.MAX_ID_CHARS:
        raise InvalidParams(f"'{name}' must be 1 to {const.MAX_ID_CHARS} characters long, got {len(s)}")
    return s


def as_id_list(v: Any, name: str, max_len: int) -> list[str]:
    if not isinstance(v, (list, tuple)):
        raise InvalidParams(f"'{name}' must be an array of item ids, got {type_name(v)}")
    if len(v) > max_len:
        raise InvalidParams(f"'{name}' holds {len(v)} ids; at most {max_len} are accepted")
    limit = const.MAX_ID_CHARS
    if all(type(x) is str and 0 < len(x) <= limit for x in v):   # the common case, without a name per element
        return list(v)
    return [as_id(x, f"{name}[{i}]") for i, x in enumerate(v)]


def as_int(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidParams(f"'{name}' must be an integer, got {type_name(v)}")
    if not lo <= v <= hi:
        raise InvalidParams(f"'{name}' must be between {lo} and {hi}, got {v}")
    return v


def as_bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise InvalidParams(f"'{name}' must be true or false, got {type_name(v)}")
    return v


def as_str(v: Any, name: str, max_chars: int = const.MAX_ID_CHARS) -> str:
    """A non-empty string of at most ``max_chars`` characters."""
    if not isinstance(v, str) or not v:
        raise InvalidParams(f"'{name}' must be a non-empty string, got {type_name(v)}")
    if len(v) > max_chars:
        raise InvalidParams(f"'{name}' must be at most {max_chars} characters long, got {len(v)}")
    return v


def as_ts(v: Any, name: str) -> float:
    """A unix time in seconds, 0 to ``MAX_TS``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= const.MAX_TS:
        raise InvalidParams(f"'{name}' must be a unix time in seconds (0 to {const.MAX_TS:.0e}), got {short(v)}")
    return float(v)
