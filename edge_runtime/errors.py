"""Every error type of the node. Each also derives from the builtin a caller would catch (ValueError, RuntimeError).

Errors that reach a client travel as MessagePack-RPC error objects ``{"code": int, "name": str, "message": str}``;
the codes follow JSON-RPC 2.0's reserved range where one fits, so existing tooling reads them.
"""
from __future__ import annotations

PARSE_ERROR = -32700      # bytes that are not MessagePack (the connection is closed after the reply)
INVALID_REQUEST = -32600  # MessagePack, but not a msgpack-rpc request / notification
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
FRAME_TOO_LARGE = -32001  # a frame over const.MAX_FRAME_BYTES (the connection is closed after the reply)
OVERLOADED = -32002       # too many requests in flight
MODEL_NOT_LOADED = -32003
EVENT_LOG_UNAVAILABLE = -32004   # the event log cannot store events now (disk full, read-only); nothing was stored
SEQUENCE_MISMATCH = -32005  # an ingest batch does not continue what the collector holds for its node
NOT_PERMITTED = -32006    # the connection's role (or no role: not authenticated) may not call this method
AUTH_FAILED = -32007      # an auth call with a token that is not valid here (closed after a few)


class EdgeRuntimeError(Exception):
    """Base class of every edgerec error."""

    code = INTERNAL_ERROR

    def to_wire(self) -> dict:
        """The msgpack-rpc error object."""
        return {"code": self.code, "name": type(self).__name__, "message": str(self)}


class ProtocolError(ValueError, EdgeRuntimeError):
    """A frame is not a valid msgpack-rpc message."""

    code = INVALID_REQUEST


class ParseError(ProtocolError):
    """Bytes that are not MessagePack."""

    code = PARSE_ERROR


class FrameTooLarge(ProtocolError):
    """A frame exceeds the configured maximum size."""

    code = FRAME_TOO_LARGE


class MethodNotFound(ProtocolError):
    """The request names a method the daemon does not have."""

    code = METHOD_NOT_FOUND


class InvalidParams(ValueError, EdgeRuntimeError):
    """Missing, unknown or mistyped parameters; the message names the parameter."""

    code = INVALID_PARAMS


class Overloaded(RuntimeError, EdgeRuntimeError):
    """The daemon has too many requests in flight; retry later."""

    code = OVERLOADED


class BundleError(ValueError, EdgeRuntimeError):
    """A model bundle is missing, malformed or fails its checksums; the message names the file."""


class ModelNotLoadedError(RuntimeError, EdgeRuntimeError):
    """No model is loaded."""

    code = MODEL_NOT_LOADED


class SignatureError(BundleError):
    """A bundle is unsigned, signed by a key that is not trusted, or its signature does not verify."""


class SyncError(RuntimeError, EdgeRuntimeError):
    """Model sync failed (registry unreachable, transfer or verification failure); the node keeps serving."""


class EventLogUnavailable(RuntimeError, EdgeRuntimeError):
    """The event log cannot commit events now (disk full, read-only or broken state directory); the events of the
    request were not stored and not applied. Retry later: the node recovers by itself when the disk does."""

    code = EVENT_LOG_UNAVAILABLE


class SequenceMismatch(ValueError, EdgeRuntimeError):
    """An ingest batch does not continue the node's stream as the collector holds it: it starts after a sequence
    number the collector never acknowledged (a gap), or re-sends a sequence number with a different event (the
    node's log restarted its numbering). Nothing of the batch was stored; the node asks ``ingest_cursor`` again."""

    code = SEQUENCE_MISMATCH


class NotPermitted(PermissionError, EdgeRuntimeError):
    """The method belongs to a role this connection does not hold (``rpc/auth.py``); nothing was done."""
    code = NOT_PERMITTED


class AuthenticationFailed(PermissionError, EdgeRuntimeError):
    """``auth`` with a token that is not valid on this server (the token is never echoed or logged)."""
    code = AUTH_FAILED


class SwapError(RuntimeError, EdgeRuntimeError):
    """A model failed its check on the served path and was not (or no longer) served; the previous model is."""


class ConfigError(ValueError, EdgeRuntimeError):
    """An invalid configuration value or an unknown key; the message names it (``section.key``)."""


class RpcError(EdgeRuntimeError):
    """An error reply received by a client: ``code`` (int), ``name`` (str), ``message`` (str) of the peer's
    error object."""

    def __init__(self, error):
        if isinstance(error, dict):
            self.code, self.name, self.message = error.get("code"), error.get("name"), error.get("message")
        else:
            self.code, self.name, self.message = None, None, str(error)
        super().__init__(f"[{self.code}] {self.name}: {self.message}")

    def to_wire(self) -> dict:
        return {"code": self.code, "name": self.name, "message": self.message}
