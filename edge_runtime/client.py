"""A small blocking MessagePack-RPC client for edgerec daemons (any msgpack-rpc client works as well).

>>> with Client(port=7700) as c:                                         # doctest: +SKIP
...     c.call("track", user="u1", item="42", event="view")
...     c.call("recommend", user="u1", k=10)["items"]
"""
from __future__ import annotations

import itertools
import socket
from typing import Any

import msgpack

from . import const


class RpcError(Exception):
    """An error reply: ``code`` (int), ``name`` (str), ``message`` (str)."""

    def __init__(self, error: Any):
        if isinstance(error, dict):
            self.code, self.name, self.message = error.get("code"), error.get("name"), error.get("message")
        else:
            self.code, self.name, self.message = None, None, str(error)
        super().__init__(f"[{self.code}] {self.name}: {self.message}")


class Client:
    """Blocking client over TCP (``host``, ``port``) or a Unix socket (``unix``).

    Raises:
        OSError: cannot connect / connection lost; RpcError: the daemon answered with an error.
    """

    def __init__(self, host: str = const.DEFAULT_HOST, port: int = const.DEFAULT_PORT, unix: str | None = None,
                 timeout: float | None = 30.0):
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(unix)
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[Any, Any]] = {}

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, method: str, **params) -> int:
        """Send a request without waiting; returns its msgid (read the reply with ``receive``)."""
        msgid = next(self._ids) & 0xFFFFFFFF
        self.sock.sendall(msgpack.packb([0, msgid, method, [params]], use_bin_type=True))
        return msgid

    def receive(self, msgid: int) -> Any:
        """Wait for the reply to ``msgid``; returns its result or raises RpcError."""
        while msgid not in self._pending:
            for msg in self.unpacker:
                if isinstance(msg, list) and len(msg) == 4 and msg[0] == 1:
                    self._pending[msg[1]] = (msg[2], msg[3])
            if msgid in self._pending:
                break
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the daemon closed the connection")
            self.unpacker.feed(data)
        error, result = self._pending.pop(msgid)
        if error is not None:
            raise RpcError(error)
        return result

    def call(self, method: str, **params) -> Any:
        """Request and wait: ``call("recommend", user="u1", k=10)``."""
        return self.receive(self.send(method, **params))

    def notify(self, method: str, **params) -> None:
        """Fire-and-forget notification (no reply, errors are not reported)."""
        self.sock.sendall(msgpack.packb([2, method, [params]], use_bin_type=True))
