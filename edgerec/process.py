"""Run ``edgerec serve`` (or ``edgerec registry``) as a subprocess on loopback: the demo, the benchmarks and the
tests start real daemons with it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from edge_runtime.errors import RpcError
from edge_runtime.rpc.client import Client

# `python -m edgerec` puts the working directory first on sys.path; starting the child in the directory that holds
# the edgerec this process imported makes it run the same code (the installed package, native kernel included,
# rather than a source checkout that happens to be the working directory).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(bundle: str | os.PathLike | None, port: int, extra: list[str] | None = None,
                 timeout: float = 60.0, log_path: str | os.PathLike | None = None,
                 command: str = "serve", ready: tuple[str, ...] = ("ok",), env: dict | None = None,
                 pass_fds: tuple = (), ssl=None) -> subprocess.Popen:
    """Start ``edgerec serve`` (or another ``command``, e.g. ``registry``) on 127.0.0.1:port as a subprocess and
    wait until it answers ``health`` with a status in ``ready``.

    ``env``: the child's environment (default: this one's). ``pass_fds``: file descriptors the child inherits.
    ``bundle`` None: no ``--bundle`` (a node that gets its model from a registry). ``log_path``: the child's stderr
    goes to this file (long runs: a pipe nobody reads would fill up and block the child); else to a pipe.
    ``ssl``: a client ``ssl.SSLContext`` for a daemon that serves TLS (``health`` is asked over it).

    Raises:
        RuntimeError: the daemon exited, answered ``health`` with an error (it is killed), or did not answer within
            ``timeout`` s (its stderr is in the message).
    """
    cmd = [sys.executable, "-m", "edgerec", command, "--host", "127.0.0.1", "--port", str(port)]
    if bundle is not None:
        cmd += ["--bundle", os.path.abspath(bundle)]
    cmd += extra or []
    err = open(log_path, "w") if log_path is not None else subprocess.PIPE
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL if log_path else subprocess.PIPE, stderr=err,
                                text=True, cwd=PACKAGE_ROOT, env=env, pass_fds=pass_fds)
    finally:
        if log_path is not None:
            err.close()

    def stderr() -> str:
        if log_path is not None:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-4000:]
        return proc.stderr.read()

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}: {stderr()}")
        try:
            with Client("127.0.0.1", port, timeout=2, ssl=ssl) as c:
                if c.call("health")["status"] in ready:
                    return proc
        except OSError:
            time.sleep(0.1)
        except RpcError as exc:   # it answers, but its health fails: a broken daemon, not a slow one
            proc.kill()
            proc.wait()
            raise RuntimeError(f"daemon answered health with an error ({exc}): {stderr()}") from None
    proc.kill()
    proc.wait()
    raise RuntimeError(f"daemon did not answer within {timeout} s: {stderr()}")


def start_ready(bundle: str | os.PathLike, port: int, extra: list[str] | None = None,
                log_path: str | os.PathLike | None = None, timeout: float = 60.0,
                env: dict | None = None) -> subprocess.Popen:
    """``start_daemon``, returning only once the daemon has sent ``READY=1`` (sd_notify(3): one datagram to
    ``$NOTIFY_SOCKET``, here a Unix socket this process binds), which it does after its warm-up and its start-up
    components (zeroconf announcements probe for ~1.5 s), as systemd waits for it; ``health`` answers 'ok' as soon
    as the listener is bound, before that. ``env``: the daemon's environment (default: this one's).

    Raises:
        RuntimeError: the daemon exited, or did not answer or say READY within ``timeout`` s (it is killed).
    """
    with tempfile.TemporaryDirectory(prefix="edgerec-notify-") as d, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.path.join(d, "notify"))
        proc = start_daemon(bundle, port, extra, timeout=timeout, log_path=log_path,
                            env=dict(os.environ if env is None else env, NOTIFY_SOCKET=os.path.join(d, "notify")))
        deadline = time.monotonic() + timeout
        sock.settimeout(0.2)
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if "READY=1" in sock.recv(4096).decode(errors="replace").splitlines():
                    return proc
            except socket.timeout:
                continue
        proc.kill()
        proc.wait()
        raise RuntimeError(f"daemon did not say READY=1 within {timeout} s (exit status {proc.returncode})")


def stop_daemon(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM, wait for a clean exit; returns the exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class TcpRelay:
    """A TCP relay on 127.0.0.1 (``port``) in front of ``target_port``, for fault tests and benchmarks: ``cut()``
    closes every relayed connection and refuses new ones (a network cut); ``heal()`` accepts again; ``target_port``
    may be changed while it runs (a restarted upstream on another port)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._open = threading.Event()
        self._open.set()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False
        self._srv = socket.create_server(("127.0.0.1", self.port))
        self._srv.settimeout(0.1)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self._srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if not self._open.is_set():
                c.close()
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def heal(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stop = True
        self.cut()
        self._srv.close()
