"""The MessagePack-RPC wire format, shared by the server and every client; it knows nothing of recommendations.

Spec: github.com/msgpack-rpc/msgpack-rpc, spec.md. Request ``[0, msgid, method, params]``, response
``[1, msgid, error, result]``, notification ``[2, method, params]``; msgid is a uint32. edgerec passes ``params``
as an array holding one map of named parameters (an empty array, or a bare map, is accepted too). Errors are maps
``{code, name, message}`` (codes in ``errors.py``). Responses may come out of order: ``Replies`` matches them by
msgid.
"""
from __future__ import annotations

from typing import Any

import msgpack

from .. import const
from ..errors import INTERNAL_ERROR, EdgeRuntimeError, InvalidParams, RpcError

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2


def is_int(v: Any) -> bool:
    """An integer that is not a bool (msgpack decodes both; only integers are msgids and kinds)."""
    return isinstance(v, int) and not isinstance(v, bool)


def params_map(params: Any) -> dict:
    """The named-parameter map of a request's ``params``: ``[{...}]``, ``[]`` or a bare map.

    Raises:
        InvalidParams: any other shape.
    """
    if isinstance(params, dict):
        return params
    if isinstance(params, (list, tuple)):
        if len(params) == 0:
            return {}
        if len(params) == 1 and isinstance(params[0], dict):
            return params[0]
    raise InvalidParams("params must be an array holding one map of named parameters, e.g. [{\"k\": 10}]")


def error_object(exc: BaseException) -> dict:
    """The wire error map for an exception; anything that is not an ``EdgeRuntimeError`` is an internal error whose
    details stay in the log (a bug must not leak its message to a client)."""
    if isinstance(exc, EdgeRuntimeError):
        return exc.to_wire()
    return {"code": INTERNAL_ERROR, "name": "InternalError", "message": f"internal error: {type(exc).__name__}"}


def pack_request(msgid: int, method: str, params: dict) -> bytes:
    return msgpack.packb([REQUEST, msgid, method, [params]], use_bin_type=True)


def pack_notification(method: str, params: dict) -> bytes:
    return msgpack.packb([NOTIFICATION, method, [params]], use_bin_type=True)


def pack_response(msgid: int | None, error: Any, result: Any) -> bytes:
    """Raises whatever msgpack raises for an unserializable result (the server reports it as an internal error)."""
    return msgpack.packb([RESPONSE, msgid, error, result], use_bin_type=True)


def unpacker(max_buffer_size: int = const.CLIENT_MAX_BUFFER_BYTES) -> msgpack.Unpacker:
    """A streaming decoder as every edgerec end uses it (str as str, bin as bytes, integer map keys allowed)."""
    return msgpack.Unpacker(raw=False, max_buffer_size=max_buffer_size, strict_map_key=False)


class Replies:
    """Client-side reply matching: feed received bytes, take the reply of a msgid when it has arrived.

    Replies to other msgids are kept until asked for (responses may come out of order); messages that are not
    responses are dropped.
    """

    def __init__(self, max_buffer_size: int = const.CLIENT_MAX_BUFFER_BYTES):
        self._unpacker = unpacker(max_buffer_size)
        self._pending: dict[Any, tuple[Any, Any]] = {}

    def feed(self, data: bytes) -> None:
        self._unpacker.feed(data)
        for msg in self._unpacker:
            if isinstance(msg, (list, tuple)) and len(msg) == 4 and msg[0] == RESPONSE:
                self._pending[msg[1]] = (msg[2], msg[3])

    def take(self, msgid: int) -> tuple[bool, Any]:
        """(True, result) once the reply to ``msgid`` is here, (False, None) before.

        Raises:
            RpcError: the reply is an error.
        """
        if msgid not in self._pending:
            return False, None
        error, result = self._pending.pop(msgid)
        if error is not None:
            raise RpcError(error)
        return True, result


class MsgIds:
    """uint32 msgids, 1, 2, ... wrapping at 2^32."""

    def __init__(self):
        self._next = 0

    def __call__(self) -> int:
        self._next = (self._next + 1) & const.MAX_MSGID
        return self._next
