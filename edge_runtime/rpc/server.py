"""The MessagePack-RPC server over TCP and Unix sockets (asyncio): framing, dispatch to a ``MethodTable``, replies.

It knows nothing of recommendations: it serves whatever table it is given (the node's, the registry's). The wire
format is in ``protocol.py``; the process around it (signals, systemd, drain) is ``ops/daemon.py``.

Robustness (every bound is in ``const.py``):
* one ``msgpack.Unpacker`` per connection; a frame over ``MAX_FRAME_BYTES``, or bytes that are not MessagePack, get
  an error reply with msgid nil and the connection is closed (the stream cannot be re-synchronized); so does a
  frame that is not an array at all (the peer does not speak msgpack-rpc);
* a well-formed array that is not a valid request gets an error reply (with its msgid when one can be read) and the
  connection stays open; a handler exception becomes an error reply carrying the request's msgid;
* back-pressure: at most ``MAX_INFLIGHT_PER_CONNECTION`` requests run per connection (further frames wait in the
  socket, not in memory), and reading stops while the client does not read its replies (transport high-water mark);
* at most ``MAX_CONNECTIONS`` connections, and ``MAX_CONNECTIONS_PER_ADDRESS`` from one TCP client address; at
  either cap a new connection is admitted by closing the longest-idle one (one that never sent a byte first,
  never one with a request in flight), so a flood of idle connections cannot lock legitimate clients out; a frame
  not complete ``STALLED_FRAME_SECONDS`` after its first byte closes its connection, and so does ``IDLE_SECONDS``
  without a byte or a request in flight;
* roles (``auth.py``): with an ``Authenticator`` that enforces, a connection gets a role from ``auth {token}``, its
  verified TLS client certificate or its Unix peer's uid; until then only ``auth`` and ``health`` answer, other
  methods get ``NotPermitted``; an unauthenticated connection closes ``AUTH_DEADLINE_SECONDS`` after it opened, and
  one with ``AUTH_MAX_FAILURES`` failed ``auth`` calls at once; until it has a role its frames are limited to
  ``MAX_ANONYMOUS_FRAME_BYTES``; TLS (``tls.py``) on the TCP listeners when given;
* a client that half-closes (EOF) still gets the replies to what it sent (TCP and Unix sockets; asyncio's TLS has
  no half-close, so there the connection ends);
* TLS starts after admission (``loop.start_tls``): a connection in its handshake counts against the caps, and bytes
  that arrive with the end of the handshake wait until the encrypted transport is in place.
"""
from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import os
import socket
import ssl as _ssl
import stat
import struct
import termios
import time
from collections import OrderedDict
from typing import Any, Protocol

import msgpack

from .. import const
from ..errors import (INTERNAL_ERROR, AuthenticationFailed, EdgeRuntimeError, FrameTooLarge, InvalidParams,
                      MethodNotFound, NotPermitted, ParseError, ProtocolError)
from .auth import PUBLIC_HEALTH, ROLE_OF, Authenticator
from .methods import MethodTable, check_keys
from .protocol import NOTIFICATION, REQUEST, error_object, is_int, pack_response, params_map, unpacker

log = logging.getLogger(__name__)


class Observer(Protocol):
    """Per-request accounting (``ops/metrics.py``): the server calls it for every request and every
    connection-fatal error; None for a server that keeps no metrics."""

    def observe(self, method: Any, seconds: float, code: int | None) -> None: ...

    def count_error(self, code: int) -> None: ...

    def count_auth_failure(self) -> None: ...

    def count_closed(self, reason: str) -> None: ...


class _NoObserver:
    def observe(self, method: Any, seconds: float, code: int | None) -> None:
        pass

    def count_error(self, code: int) -> None:
        pass

    def count_auth_failure(self) -> None:
        pass

    def count_closed(self, reason: str) -> None:
        pass


class RpcConnection(asyncio.Protocol):
    """One client connection: framing -> dispatch -> reply. Handlers run as tasks so replies may interleave."""

    def __init__(self, server: "RpcServer"):
        self.server = server
        self.methods = server.methods
        self.observer = server.observer
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None   # its loop, from connection_made on
        self.anonymous = server.auth is not None and server.auth.enforced   # no role yet: smaller frames
        self.unpacker = unpacker(self._frame_limit())
        self._base = 0   # stream offset where the current unpacker started (it is replaced once a role is set)
        self.inflight = 0
        self.reading_paused = False
        self.write_paused = False
        self.eof = False
        self.closed = False
        self.discarding = False
        self._stall: asyncio.TimerHandle | None = None
        self._stall_frame = -1   # stream offset of the frame the stall deadline belongs to
        self._idle: asyncio.TimerHandle | None = None
        self._last_active = 0.0
        self._linger: asyncio.TimerHandle | None = None
        # The Unpacker parses incrementally (max_buffer_size bounds unparsed bytes, not a frame), so the frame size
        # is tracked here: bytes fed so far minus the stream offset where the current frame started.
        self.fed = 0
        self.frame_start = 0
        self.address: str | None = None   # the TCP client's address (None: Unix socket)
        self.requested = False            # has sent a request (idle connections that never did go first)
        self.role: str | None = None      # auth.py: None until authenticated
        self.auth_failures = 0
        self._auth_timer: asyncio.TimerHandle | None = None
        self.handshaking = False
        self._tls_task: asyncio.Future | None = None
        self._early: list[bytes] = []

    # -- transport callbacks ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.address = str(peer[0])
        if not self.server.admit(self):
            self.closed = True
            transport.close()
            return
        self.transport.set_write_buffer_limits(high=const.WRITE_HIGH_WATER_BYTES)
        self._touch()
        if self.server.ssl is not None and self.address is not None:
            # TLS after admission: a connection in its handshake counts against the caps like any other
            self.handshaking = True
            transport.pause_reading()   # the ClientHello is for start_tls, not for the msgpack decoder
            self._tls_task = asyncio.ensure_future(self._start_tls())
            return
        self._authorize()

    async def _start_tls(self) -> None:
        try:
            tls = await asyncio.get_running_loop().start_tls(
                self.transport, self, self.server.ssl, server_side=True,
                ssl_handshake_timeout=const.TLS_HANDSHAKE_SECONDS)
        except (OSError, asyncio.TimeoutError, ConnectionError, RuntimeError) as exc:   # ssl.SSLError is OSError
            log.debug("TLS handshake with %s failed: %r", self.address, exc)
            self.closed = True
            self.transport.close()
            self.server.forget(self)
            return
        if tls is None or self.closed:   # closed (evicted, idle) while the handshake ran
            if tls is not None:
                tls.close()
            self.closed = True
            self.server.forget(self)
            return
        self.transport = tls
        self.handshaking = False
        tls.set_write_buffer_limits(high=const.WRITE_HIGH_WATER_BYTES)
        self._authorize()
        early, self._early = self._early, []
        for data in early:   # requests that arrived with the end of the handshake, before start_tls returned
            self.data_received(data)

    def _authorize(self) -> None:
        """The role the transport proves, or the deadline to authenticate (servers that enforce roles)."""
        auth = self.server.auth
        if auth is not None and auth.enforced:
            role = self._credential_role(auth)
            if role is not None:
                self._granted(role)
            else:
                self._auth_timer = asyncio.get_running_loop().call_later(auth.deadline_seconds, self._auth_deadline)
        else:
            self.anonymous = False

    def _credential_role(self, auth: Authenticator) -> str | None:
        """The role the transport itself proves: a verified TLS client certificate, or the Unix peer's uid."""
        if self.transport.get_extra_info("ssl_object") is not None:
            return auth.cert_role if auth.cert_role and self.transport.get_extra_info("peercert") else None
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX and auth.unix_roles:
            try:
                _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                      struct.calcsize("3i")))
            except (OSError, struct.error):
                return None
            return auth.unix_roles.get(uid)
        return None

    def _auth_deadline(self) -> None:
        if not self.closed and not self.discarding and self.role is None:
            self.server.note_closed("auth_deadline")
            self._fatal(AuthenticationFailed(f"not authenticated within {self.server.auth.deadline_seconds:g} s "
                                             f"(call auth {{token}} first); closing"), quiet=True)

    def _touch(self) -> None:
        """Restart the idle deadline: a connection with nothing in flight and no bytes for IDLE_SECONDS closes.
        Per chunk received this only notes the time; the one timer re-arms itself for what is left when it fires
        (a cancelled and re-created timer per request cost more than the dispatch of a small request). The loop is
        the one kept at connection_made: looking it up costs a getpid() system call per chunk on Python < 3.12."""
        loop = self._loop
        self._last_active = loop.time()
        if self._idle is None:
            self._idle = loop.call_later(self.server.idle_seconds, self._idle_check)

    def _idle_check(self) -> None:
        self._idle = None
        if self.closed:
            return
        left = self._last_active + self.server.idle_seconds - self._loop.time()
        if left > 0:
            self._idle = self._loop.call_later(left, self._idle_check)
            return
        if self.inflight or self.reading_paused:
            self._touch()
            return
        log.info("closing a connection idle for %g s", self.server.idle_seconds)
        self.closed = True
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for timer in (self._linger, self._stall, self._idle, self._auth_timer):
            if timer is not None:
                timer.cancel()
        self.server.forget(self)

    def evict(self) -> None:
        """Closed to admit a new connection at a connection cap (the server has already unlisted it)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # Reading is paused while too many requests run, while the client does not read its replies, or both.
    def _update_reading(self) -> None:
        if self.closed or self.transport is None or self.discarding:
            return
        want_pause = self.inflight >= self.server.max_inflight or self.write_paused or self.server.draining
        if want_pause and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        elif not want_pause and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
            self._process()  # frames already buffered wait in the unpacker until now

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()

    def eof_received(self) -> bool:
        """Half-close: keep the transport open to answer what was sent; close once nothing is in flight. TLS has no
        half-close in asyncio: there the connection ends (a TLS client waits for its replies before closing)."""
        self.eof = True
        self._process()
        self._close_if_done()
        return self.transport is None or self.transport.get_extra_info("ssl_object") is None

    def _close_if_drained(self) -> None:
        """Draining, every received frame dispatched: once nothing runs, a lingering close (replies flushed, EOF
        sent, what the client still sends discarded) so the client reads its replies rather than a reset."""
        if not self.server.draining or self.inflight or self.closed or self.transport is None \
                or self.discarding:
            return
        if self.transport.can_write_eof():
            self.discarding = True
            self.unpacker = None
            self.transport.write_eof()
            self.transport.resume_reading()
            self.reading_paused = False
            self._linger = asyncio.get_running_loop().call_later(const.LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

    def _close_if_done(self) -> None:
        if self.eof and self.inflight == 0 and not self.closed and self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.discarding:
            return
        if self.handshaking:   # TLS: the decrypted transport is not ours yet (see _start_tls)
            if sum(map(len, self._early)) + len(data) > self._frame_limit():
                self._early = []
                self.closed = True
                self.transport.close()
                return
            self._early.append(data)
            return
        self._touch()
        fast = self.methods.frame_path
        if fast is not None and self.fed == self.frame_start and self._fast_frame(fast, data):
            return
        self.fed += len(data)
        try:
            self.unpacker.feed(data)
        except msgpack.BufferFull:
            self._fatal(self._too_large())
            return
        self._process()

    def _fast_frame(self, fast: tuple, data: bytes) -> bool:
        """``data`` (nothing buffered before it) offered to the method table's frame path (``MethodTable.
        set_frame_path``) when the general path would dispatch it at once: nothing in flight or paused, not
        draining, within the frame limit, and a role that may call the method. True: it was one whole request,
        answered (the reply written, the request counted as the general path counts it); False: nothing changed."""
        method, fn = fast
        if self.inflight or self.write_paused or self.server.draining or len(data) > self._frame_limit():
            return False
        auth = self.server.auth
        if auth is not None and auth.enforced and not auth.permitted(self.role, method):
            return False
        t0 = time.perf_counter()
        try:
            reply = fn(data)
        except Exception as exc:  # noqa: BLE001 - a fault of the fast path: the general path answers this frame
            self.server.note("frame_path", f"the frame path of {method!r} failed ({exc!r}); the general path answers")
            return False
        if reply is None:
            return False
        n = len(data)
        self.fed += n
        self.frame_start = self.fed
        self._base += n   # the unpacker never saw these bytes: its offsets start later in the stream
        self.server.received += 1
        self.server.active(self)
        if not self.transport.is_closing():
            self.transport.write(reply)
        self.observer.observe(method, time.perf_counter() - t0, None)
        return True

    def _frame_limit(self) -> int:
        """``max_frame_bytes``; before a connection has a role on a server that enforces roles, at most
        ``const.MAX_ANONYMOUS_FRAME_BYTES`` (what an anonymous client may make the server buffer and decode)."""
        if self.anonymous:
            return min(self.server.max_frame_bytes, const.MAX_ANONYMOUS_FRAME_BYTES)
        return self.server.max_frame_bytes

    def _granted(self, role: str) -> None:
        """The connection has ``role`` now: full-size frames (the bytes buffered so far move to a new decoder)."""
        self.role = role
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        if self.anonymous and self.unpacker is not None:
            self.anonymous = False
            pos = self._base + self.unpacker.tell()
            rest = self.unpacker.read_bytes(self.fed - pos)
            self.unpacker = unpacker(self._frame_limit())
            self.unpacker.feed(rest)
            self._base = pos
        self.anonymous = False

    def _too_large(self) -> FrameTooLarge:
        limit = self._frame_limit()
        before = " before authenticating" if self.anonymous else ""
        return FrameTooLarge(f"frame larger than {limit} bytes{before}; split the request "
                             f"(e.g. fewer events per track_batch); closing")

    def _process(self) -> None:
        """Dispatch buffered frames while the in-flight limit and the client's reading allow it."""
        while not self.closed and not self.discarding and self.unpacker is not None:
            if self.server.draining:   # shutting down: read nothing more; frames already received still run
                self._update_reading()
                self._cancel_stall_timer()
            if self.inflight >= self.server.max_inflight or self.write_paused:
                self._update_reading()
                self._cancel_stall_timer()  # waiting on us (or on the client reading), not a stalled frame
                return
            try:
                msg = next(self.unpacker)
            except StopIteration:
                if self.fed - self.frame_start > self._frame_limit():
                    self._fatal(self._too_large())
                if self.server.draining:
                    self._close_if_drained()
                    return
                break
            except msgpack.BufferFull:
                self._fatal(self._too_large())
                return
            except ValueError as exc:
                # msgpack raises ValueError for declared lengths over its limits (derived from the frame limit)
                if "exceeds" in str(exc):
                    self._fatal(self._too_large())
                else:
                    self._fatal(ParseError(f"bytes are not a valid MessagePack frame ({type(exc).__name__}); "
                                           f"closing"))
                return
            except Exception as exc:  # ExtraData, FormatError, StackError, UnicodeDecodeError, TypeError
                self._fatal(ParseError(f"bytes are not a valid MessagePack frame ({type(exc).__name__}); closing"))
                return
            end = self._base + self.unpacker.tell()
            size, self.frame_start = end - self.frame_start, end
            if size > self._frame_limit():
                self._fatal(self._too_large())
                return
            try:
                self._dispatch(msg)
            except RecursionError:
                self._fatal(ProtocolError("message nested too deeply; closing"))
                return
        self._arm_stall_timer()

    def _cancel_stall_timer(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._stall_frame = -1

    def _arm_stall_timer(self) -> None:
        """A frame must complete within STALLED_FRAME_SECONDS of its first byte, however its bytes trickle in
        (slow-loris connections are closed); the deadline belongs to the frame, not to the last chunk."""
        if self.closed or self.fed <= self.frame_start:
            self._cancel_stall_timer()
            return
        if self._stall is not None and self._stall_frame == self.frame_start:
            return  # same partial frame: keep its deadline
        self._cancel_stall_timer()
        self._stall_frame = self.frame_start
        self._stall = asyncio.get_running_loop().call_later(self.server.stalled_frame_seconds, self._stalled)

    def _stalled(self) -> None:
        if not self.closed and self.fed > self.frame_start and self._stall_frame == self.frame_start:
            self._fatal(ProtocolError(f"partial frame stalled for {self.server.stalled_frame_seconds:g} s; closing"))

    # -- dispatch ----------------------------------------------------------------------------------------------
    def _dispatch(self, msg: Any) -> None:
        self.server.received += 1
        self.server.active(self)
        if not isinstance(msg, (list, tuple)):
            self._fatal(ProtocolError(f"a msgpack-rpc message is an array, got {type(msg).__name__}; closing"))
            return
        kind = msg[0] if msg and is_int(msg[0]) else None
        msgid = msg[1] if kind == REQUEST and len(msg) > 1 and is_int(msg[1]) and 0 <= msg[1] <= const.MAX_MSGID \
            else None
        if kind == REQUEST and len(msg) == 4 and msgid is not None:
            self._run(msgid, msg[2], msg[3])
        elif kind == NOTIFICATION and len(msg) == 3:
            self._run(None, msg[1], msg[2])
        else:
            first = type(msg[0]).__name__ if msg else "nothing"
            self._reply(msgid, ProtocolError(
                "expected [0, msgid:uint32, method:str, params:array] or [2, method:str, params:array], "
                f"got an array of {len(msg)} element(s) starting with {first}").to_wire(), None)

    def _run(self, msgid: int | None, method: Any, params: Any) -> None:
        t0 = time.perf_counter()
        auth = self.server.auth
        try:
            if method == "auth":
                self._finish(msgid, self._auth(params), None)
                self.observer.observe(method, time.perf_counter() - t0, None)
                return
            if auth is not None and auth.enforced:
                if method in self.methods:
                    if not auth.permitted(self.role, method):
                        raise self._not_permitted(method)
                elif self.role is None and isinstance(method, str):   # the method list only for a role
                    raise MethodNotFound(f"unknown method {method[:64]!r} (auth {{token}} first for the list)")
            handler, is_async = self.methods.lookup(method)
            p = params_map(params)
            if not is_async:
                result = handler(p)
                if method == "health" and self.role is None and auth is not None and auth.enforced \
                        and isinstance(result, dict):
                    result = {k: result[k] for k in PUBLIC_HEALTH if k in result}
                if isinstance(result, asyncio.Future):   # a reply that comes later (e.g. after a disk commit)
                    self._pending(result, msgid, method, t0)
                    return
                self._finish(msgid, result, None)
                self.observer.observe(method, time.perf_counter() - t0, None)
                return
        except EdgeRuntimeError as exc:
            self._finish(msgid, None, exc)
            self.observer.observe(method, time.perf_counter() - t0, exc.code)
            if isinstance(exc, AuthenticationFailed) and auth is not None \
                    and self.auth_failures >= auth.max_failures:
                self.server.note_closed("auth_failures")
                self._fatal(AuthenticationFailed(f"{self.auth_failures} failed auth attempts; closing"), quiet=True)
            return
        except Exception as exc:  # a bug in a handler must not take the connection down
            log.exception("handler %r failed", method)
            self._finish(msgid, None, exc)
            self.observer.observe(method, time.perf_counter() - t0, INTERNAL_ERROR)
            return
        self._pending(asyncio.ensure_future(handler(p)), msgid, method, t0)

    def _not_permitted(self, method: str) -> NotPermitted:
        need = ROLE_OF.get(method)
        if need is None:
            return NotPermitted(f"{method!r} is open to no role on this server")
        if self.role is None:
            return NotPermitted(f"{method!r} needs the {need!r} role; this connection has not authenticated "
                                f"(call auth {{token}} first)")
        return NotPermitted(f"{method!r} needs the {need!r} role; this connection has the {self.role!r} role")

    def _auth(self, params: Any) -> dict:
        """``auth {token}``: the connection's role. The token is never logged or echoed.

        Raises:
            InvalidParams: no ``token`` string (counted as a failed attempt).
            AuthenticationFailed: not a valid token here (counted; the connection closes after a few).
            ProtocolError: the connection already has a role.
        """
        auth = self.server.auth
        if auth is None or not auth.enforced:
            return {"role": None, "enforced": False}
        try:
            p = params_map(params)
            check_keys(p, ("token",), ("token",), "auth")
            token = p["token"]
            if not isinstance(token, str) or not 0 < len(token) <= const.MAX_TOKEN_CHARS:
                raise InvalidParams(f"auth: 'token' must be a string of 1 to {const.MAX_TOKEN_CHARS} characters")
        except InvalidParams as exc:
            self._failed_auth()
            raise AuthenticationFailed(str(exc)) from None
        role = auth.role_of_token(token)
        if self.role is not None:
            if role == self.role:
                return {"role": role, "enforced": True}
            raise ProtocolError(f"this connection has the {self.role!r} role already; open another connection "
                                f"for another role")
        if role is None:
            self._failed_auth()
            raise AuthenticationFailed("auth: the token is not valid on this server")
        self._granted(role)
        return {"role": role, "enforced": True}

    def _failed_auth(self) -> None:
        self.auth_failures += 1
        self.server.auth.failures += 1
        self.observer.count_auth_failure()
        self.server.note("auth_failed", f"failed auth attempt from {self.address or 'the unix socket'}")

    def _pending(self, task: asyncio.Future, msgid: int | None, method: str, t0: float) -> None:
        """A request whose reply is ``task``'s outcome (a coroutine handler's task, or a future a handler returned):
        counted in flight (back-pressure, drain) until it is done."""
        self.server.tasks.add(task)
        self.inflight += 1
        task.add_done_callback(lambda t, msgid=msgid, method=method: self._task_done(t, msgid, method, t0))

    def _task_done(self, task: asyncio.Task, msgid: int | None, method: str, t0: float) -> None:
        self.server.tasks.discard(task)
        self.inflight -= 1
        code = self._reply_from(task, msgid, method)
        self.observer.observe(method, time.perf_counter() - t0, code)
        self._update_reading()
        if not self.reading_paused or self.server.draining:
            self._process()
        self._close_if_done()

    def _reply_from(self, task: asyncio.Task, msgid: int | None, method: str) -> int | None:
        """Reply with the task's outcome; returns the error code sent, or None."""
        if task.cancelled():
            exc = EdgeRuntimeError("request cancelled: the daemon is shutting down")
            self._finish(msgid, None, exc)
            return exc.code
        exc = task.exception()
        if exc is not None and not isinstance(exc, EdgeRuntimeError):
            log.error("handler %r failed: %r", method, exc, exc_info=exc)
        self._finish(msgid, None if exc else task.result(), exc)
        if exc is None:
            return None
        return exc.code if isinstance(exc, EdgeRuntimeError) else INTERNAL_ERROR

    def _finish(self, msgid: int | None, result: Any, exc: BaseException | None) -> None:
        wire = error_object(exc) if exc is not None else None
        if msgid is not None:
            self._reply(msgid, wire, result if exc is None else None)

    def _reply(self, msgid: int | None, error: Any, result: Any) -> None:
        if self.closed or self.discarding or self.transport is None or self.transport.is_closing():
            return
        try:
            self.transport.write(pack_response(msgid, error, result))
        except Exception:  # an unserializable result is a bug: report it instead of dropping the reply
            log.exception("cannot encode reply to msgid %r", msgid)
            self.transport.write(pack_response(msgid, {"code": INTERNAL_ERROR, "name": "InternalError",
                                                       "message": "reply could not be encoded"}, None))

    def _fatal(self, exc: EdgeRuntimeError, quiet: bool = False) -> None:
        """Reply with msgid nil and close: used when the byte stream cannot be trusted any more.

        A lingering close: send the reply and EOF, discard what the client still sends for up to
        ``const.LINGER_SECONDS``, then close, so the client reads the error instead of a connection reset.
        ``quiet``: no log line of its own (the caller's ``RpcServer.note_closed`` counts it, rate-limited)."""
        if not quiet:
            log.info("closing connection: %s", exc)
        self.observer.count_error(exc.code)   # no request to observe: the stream itself was bad
        self._reply(None, exc.to_wire(), None)
        self.discarding = True
        self.unpacker = None
        if self.transport is None:
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._linger = asyncio.get_running_loop().call_later(const.LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


class RpcServer:
    """Listeners (TCP and/or Unix) serving one ``MethodTable``, with graceful shutdown.

    Args:
        methods: the table requests are dispatched to.
        observer: per-request accounting (``Observer``), or None.
    """

    def __init__(self, methods: MethodTable, observer: Observer | None = None,
                 max_frame_bytes: int = const.MAX_FRAME_BYTES,
                 max_inflight: int = const.MAX_INFLIGHT_PER_CONNECTION, max_connections: int = const.MAX_CONNECTIONS,
                 stalled_frame_seconds: float = const.STALLED_FRAME_SECONDS,
                 idle_seconds: float = const.IDLE_SECONDS,
                 max_connections_per_address: int = const.MAX_CONNECTIONS_PER_ADDRESS,
                 auth: Authenticator | None = None, ssl: _ssl.SSLContext | None = None):
        self.methods = methods
        self.observer = observer if observer is not None else _NoObserver()
        self.max_frame_bytes = max_frame_bytes
        self.max_inflight = max_inflight
        self.max_connections = max_connections
        self.max_per_address = max_connections_per_address
        self.stalled_frame_seconds = stalled_frame_seconds
        self.idle_seconds = idle_seconds
        self.auth = auth
        self.ssl = ssl
        self._unix_inode: int | None = None
        self.connections: set[RpcConnection] = set()
        # least recently active first (activity = a frame dispatched): where the idle connection to close is found
        self._order: OrderedDict[RpcConnection, None] = OrderedDict()
        self._by_address: dict[str, OrderedDict[RpcConnection, None]] = {}
        self._notes: dict[str, list] = {}
        self.tasks: set[asyncio.Task] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self.addresses: list[str] = []
        self.received = 0
        self.draining = False

    # -- admission ---------------------------------------------------------------------------------------------
    def admit(self, conn: RpcConnection) -> bool:
        """List a new connection; at the per-address or the global cap, close the longest-idle connection of that
        scope to make room (``evict``). False (refuse the new one) only when every connection there is busy."""
        addr = conn.address
        peers = self._by_address.get(addr) if addr is not None else None
        if peers is not None and len(peers) >= self.max_per_address and not self._evict(peers, "address_cap"):
            self.note_closed("refused")
            return False
        if len(self.connections) >= self.max_connections and not self._evict(self._order, "connection_cap"):
            self.note_closed("refused")
            return False
        self.connections.add(conn)
        self._order[conn] = None
        if addr is not None:
            self._by_address.setdefault(addr, OrderedDict())[conn] = None
        return True

    def _evict(self, order: "OrderedDict[RpcConnection, None]", reason: str) -> bool:
        """Close the connection of ``order`` that has been idle longest, never one with a request in flight: first
        one that never sent a byte (none read, none waiting in its socket: a legitimate client whose first request
        the loop has not read yet is spared), then one that never completed a request, then the least recently
        active one without a role (when roles are enforced: an anonymous client cannot push out an authenticated
        one), then the least recently active one."""
        enforced = self.auth is not None and self.auth.enforced
        victim, best = None, 4
        for c in order:   # tiers: 0 never sent a byte, 1 never a whole request, 2 no role (roles enforced), 3 idle
            if c.inflight or c.reading_paused:
                continue
            if c.requested:
                tier = 2 if enforced and c.role is None else 3
            else:
                tier = 1 if c.fed or _bytes_waiting(c.transport) else 0
            if tier < best:
                victim, best = c, tier
                if tier == 0:
                    break
        if victim is None:
            return False
        self.forget(victim)
        victim.evict()
        self.note_closed(reason)
        return True

    def active(self, conn: RpcConnection) -> None:
        """A frame from ``conn``: it moves to the most recently active end."""
        conn.requested = True
        if conn in self._order:
            self._order.move_to_end(conn)
            if conn.address is not None:
                self._by_address[conn.address].move_to_end(conn)

    def forget(self, conn: RpcConnection) -> None:
        self.connections.discard(conn)
        self._order.pop(conn, None)
        peers = self._by_address.get(conn.address) if conn.address is not None else None
        if peers is not None:
            peers.pop(conn, None)
            if not peers:
                del self._by_address[conn.address]

    def note_closed(self, reason: str) -> None:
        """Count a connection closed (or refused) by a bound: address_cap, connection_cap, refused, auth_deadline,
        auth_failures; logged at most once per ``const.SECURITY_LOG_SECONDS`` per reason."""
        self.observer.count_closed(reason)
        self.note(reason, f"connection closed ({reason})")

    def note(self, kind: str, what: str) -> None:
        """A warning that a flood would repeat thousands of times: the first one, then a count at most every
        ``const.SECURITY_LOG_SECONDS``."""
        now = time.monotonic()
        entry = self._notes.setdefault(kind, [-const.SECURITY_LOG_SECONDS, 0])
        entry[1] += 1
        if now - entry[0] >= const.SECURITY_LOG_SECONDS:
            more = f"; {entry[1]} such in the last {now - entry[0]:.0f} s" if entry[1] > 1 else ""
            log.warning("%s (%d connections open%s)", what, len(self.connections), more)
            entry[0], entry[1] = now, 0

    async def start(self, host: str | None = const.DEFAULT_HOST, port: int | None = const.DEFAULT_PORT,
                    unix: str | None = None, sockets: list[socket.socket] | None = None) -> list[str]:
        """Bind the listeners; returns their addresses (``tcp://host:port``, ``unix:///path``). ``sockets``:
        listening sockets handed over by systemd socket activation, served instead of binding host / port / unix."""
        loop = asyncio.get_running_loop()
        factory = lambda: RpcConnection(self)  # noqa: E731
        if sockets:
            for sock in sockets:
                sock.setblocking(False)
                if sock.family == socket.AF_UNIX:
                    srv = await loop.create_unix_server(factory, sock=sock)
                    self.addresses.append(f"unix://{sock.getsockname()} (socket activation)")
                else:
                    srv = await loop.create_server(factory, sock=sock, backlog=const.ACCEPT_BATCH)
                    _deepen_backlog(srv)
                    addr = sock.getsockname()
                    scheme = "tls" if self.ssl is not None else "tcp"
                    self.addresses.append(f"{scheme}://{addr[0]}:{addr[1]} (socket activation)")
                self.servers.append(srv)
            return self.addresses
        if port is not None:
            srv = await loop.create_server(factory, host, port, reuse_address=True, backlog=const.ACCEPT_BATCH)
            _deepen_backlog(srv)
            self.servers.append(srv)
            for sock in srv.sockets:
                addr = sock.getsockname()
                scheme = "tls" if self.ssl is not None else "tcp"
                self.addresses.append(f"{scheme}://{addr[0]}:{addr[1]}" if sock.family == socket.AF_INET
                                      else f"{scheme}://[{addr[0]}]:{addr[1]}")
        if unix is not None:
            _remove_stale_socket(unix)
            srv = await loop.create_unix_server(factory, unix)
            os.chmod(unix, 0o660)
            self._unix_inode = os.stat(unix).st_ino
            self.servers.append(srv)
            self.addresses.append(f"unix://{unix}")
        return self.addresses

    @property
    def tcp_port(self) -> int | None:
        """The bound TCP port (the one picked when started with port 0), or None without TCP."""
        for srv in self.servers:
            for sock in srv.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return sock.getsockname()[1]
        return None

    @property
    def inflight(self) -> int:
        """Requests running now, over every connection (the load a node announces)."""
        return sum(c.inflight for c in self.connections)

    async def shutdown(self, timeout: float = const.DRAIN_SECONDS) -> None:
        """Stop accepting connections and reading requests, let the requests in flight finish (at most ``timeout`` s;
        each connection closes once its replies are written), then close what is left."""
        self.draining = True
        for srv in self.servers:
            srv.close()
        for conn in list(self.connections):
            conn._update_reading()
            conn._process()
        deadline = time.monotonic() + timeout
        while self.tasks and time.monotonic() < deadline:
            await asyncio.wait(list(self.tasks), timeout=max(0.0, deadline - time.monotonic()))
        for t in list(self.tasks):
            t.cancel()
        await asyncio.sleep(0)
        # lingering closes: give clients a moment to read their replies and close first (bounded)
        linger_end = time.monotonic() + min(const.LINGER_SECONDS, max(0.2, deadline - time.monotonic()))
        while any(c.transport is not None and not c.closed for c in self.connections) \
                and time.monotonic() < linger_end:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        for srv in self.servers:
            await srv.wait_closed()

    def remove_unix_socket(self, path: str) -> None:
        """Unlink our socket file, unless another process has bound the path since."""
        try:
            if self._unix_inode is not None and os.stat(path).st_ino == self._unix_inode:
                os.unlink(path)
        except OSError:
            pass


def _deepen_backlog(srv: asyncio.base_events.Server) -> None:
    """asyncio uses one number for the kernel's accept queue and for the connections accepted per loop turn; keep
    the turn short (``const.ACCEPT_BATCH``: a flood cannot hold the loop) and the queue long
    (``const.LISTEN_BACKLOG``: a legitimate SYN is not dropped into a 1 s retransmit while a flood fills it)."""
    for ts in srv.sockets:
        try:
            with socket.socket(fileno=os.dup(ts.fileno())) as s:
                s.listen(const.LISTEN_BACKLOG)
        except OSError:
            pass


def _bytes_waiting(transport: asyncio.BaseTransport | None) -> bool:
    """Bytes received by the kernel that the loop has not read yet (``FIONREAD``); True when it cannot tell."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return True
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf, True)
    except OSError:
        return True
    return buf[0] > 0


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead daemon; refuse one a live daemon still answers on.

    Raises:
        OSError: the path is a live socket or not a socket.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; choose another --unix path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: stale
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise OSError(f"another process is listening on {path}; stop it or choose another --unix path")
