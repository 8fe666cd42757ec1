"""MessagePack-RPC clients for edgerec processes (any msgpack-rpc client works as well): ``Client`` (blocking, TCP
or Unix socket) and ``AsyncClient`` (asyncio, one request at a time; the sync loop's transfers).

>>> with Client(port=7700) as c:                                         # doctest: +SKIP
...     c.call("track", user="u1", item="42", event="view")
...     c.call("recommend", user="u1", k=10)["items"]

A server with roles (``rpc/auth.py``) wants ``auth {token}`` first: ``Client(..., token=...)`` sends it on connect;
``ssl=`` (an ``ssl.SSLContext``, ``rpc/tls.py`` ``client_context``) speaks TLS. ``Credentials`` carries both for the
fleet's own clients (sync, transfers, shipping, ``FleetClient``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl as _ssl
from typing import Any

from .. import const
from ..errors import RpcError
from .protocol import MsgIds, Replies, pack_notification, pack_request

__all__ = ["AsyncClient", "Client", "Credentials", "RpcError"]


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a client presents: ``token`` (sent as ``auth {token}`` on connect; None: no auth call) and ``ssl`` (a
    client ``ssl.SSLContext``; None: plain TCP). ``repr`` never shows the token."""

    token: str | None = dataclasses.field(default=None, repr=False)
    ssl: _ssl.SSLContext | None = None


NO_CREDENTIALS = Credentials()


class Client:
    """Blocking client over TCP (``host``, ``port``) or a Unix socket (``unix``); ``timeout`` s per socket operation.
    ``token``: authenticate with it on connect (``auth``); ``ssl``: a client TLS context (TCP only).

    Raises:
        OSError: cannot connect / connection lost (``ssl.SSLError`` for a TLS failure); RpcError: the daemon
            answered with an error (``AuthenticationFailed`` when the token is refused).
    """

    def __init__(self, host: str = const.DEFAULT_HOST, port: int = const.DEFAULT_PORT, unix: str | None = None,
                 timeout: float | None = const.CLIENT_TIMEOUT_SECONDS, token: str | None = None,
                 ssl: _ssl.SSLContext | None = None):
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(unix)
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl is not None:
                try:
                    self.sock = ssl.wrap_socket(self.sock, server_hostname=host)
                except BaseException:
                    self.sock.close()
                    raise
        self._replies = Replies()
        self._ids = MsgIds()
        self.role: str | None = None
        if token is not None:
            try:
                self.role = self.call("auth", token=token).get("role")
            except BaseException:
                self.sock.close()
                raise

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, method: str, **params) -> int:
        """Send a request without waiting; returns its msgid (read the reply with ``receive``)."""
        msgid = self._ids()
        self.sock.sendall(pack_request(msgid, method, params))
        return msgid

    def receive(self, msgid: int) -> Any:
        """Wait for the reply to ``msgid``; returns its result or raises RpcError."""
        while True:
            done, result = self._replies.take(msgid)
            if done:
                return result
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the daemon closed the connection")
            self._replies.feed(data)

    def call(self, method: str, **params) -> Any:
        """Request and wait: ``call("recommend", user="u1", k=10)``."""
        return self.receive(self.send(method, **params))

    def notify(self, method: str, **params) -> None:
        """Fire-and-forget notification (no reply, errors are not reported)."""
        self.sock.sendall(pack_notification(method, params))


class AsyncClient:
    """asyncio MessagePack-RPC client, one request at a time (the sync loop's transfers; peers and registry).

    ``await AsyncClient.connect(host, port, timeout, credentials)``; ``await c.call(method, **params)``;
    ``await c.close()``. With ``credentials`` (``Credentials``): TLS when it has a context, ``auth`` when a token.

    Raises:
        OSError / asyncio.TimeoutError: cannot connect, connection lost, or no reply within ``timeout`` s;
        RpcError: the peer answered with an error.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.reader, self.writer, self.timeout = reader, writer, timeout
        self._replies = Replies()
        self._ids = MsgIds()

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float = const.SYNC_TIMEOUT_SECONDS,
                      credentials: Credentials | None = None) -> "AsyncClient":
        cred = credentials or NO_CREDENTIALS
        tls = {"ssl": cred.ssl, "server_hostname": host} if cred.ssl is not None else {}
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, **tls), timeout)
        c = cls(reader, writer, timeout)
        if cred.token is not None:
            try:
                await c.call("auth", token=cred.token)
            except BaseException:
                await c.close()
                raise
        return c

    async def call(self, method: str, **params) -> Any:
        msgid = self._ids()
        self.writer.write(pack_request(msgid, method, params))
        await asyncio.wait_for(self.writer.drain(), self.timeout)
        while True:
            done, result = self._replies.take(msgid)
            if done:
                return result
            data = await asyncio.wait_for(self.reader.read(1 << 20), self.timeout)
            if not data:
                raise ConnectionError(f"connection closed while waiting for {method!r}")
            self._replies.feed(data)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
