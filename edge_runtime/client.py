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


class AsyncClient:
    """asyncio MessagePack-RPC client, one request at a time (the sync loop's transfers; peers and registry).

    ``await AsyncClient.connect(host, port, timeout)``; ``await c.call(method, **params)``; ``await c.close()``.

    Raises:
        OSError / asyncio.TimeoutError: cannot connect, connection lost, or no reply within ``timeout`` s;
        RpcError: the peer answered with an error.
    """

    def __init__(self, reader, writer, timeout: float):
        self.reader, self.writer, self.timeout = reader, writer, timeout
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=64 << 20)
        self._ids = itertools.count(1)

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float = 10.0) -> "AsyncClient":
        import asyncio

        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        return cls(reader, writer, timeout)

    async def call(self, method: str, **params) -> Any:
        import asyncio

        msgid = next(self._ids) & 0xFFFFFFFF
        self.writer.write(msgpack.packb([0, msgid, method, [params]], use_bin_type=True))
        await asyncio.wait_for(self.writer.drain(), self.timeout)
        while True:
            for msg in self.unpacker:
                if isinstance(msg, list) and len(msg) == 4 and msg[0] == 1 and msg[1] == msgid:
                    if msg[2] is not None:
                        raise RpcError(msg[2])
                    return msg[3]
            data = await asyncio.wait_for(self.reader.read(1 << 20), self.timeout)
            if not data:
                raise ConnectionError(f"connection closed while waiting for {method!r}")
            self.unpacker.feed(data)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
