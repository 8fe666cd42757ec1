"""Run ``edgerec serve`` as a subprocess on loopback (used by the demo, the benchmarks and the tests)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from .client import Client

# `python -m edge_runtime` puts the working directory first on sys.path; starting the child in the directory that
# holds the edge_runtime this process imported makes it run the same code (the installed package, native kernel
# included, rather than a source checkout that happens to be the working directory).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(bundle: str | os.PathLike, port: int, extra: list[str] | None = None,
                 timeout: float = 60.0) -> subprocess.Popen:
    """Start ``edgerec serve`` on 127.0.0.1:port as a subprocess and wait until it answers ``health``.

    Raises:
        RuntimeError: the daemon exited or did not answer within ``timeout`` s (its stderr is in the message).
    """
    cmd = [sys.executable, "-m", "edge_runtime", "serve", "--bundle", os.path.abspath(bundle), "--host",
           "127.0.0.1", "--port", str(port)] + (extra or [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PACKAGE_ROOT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            with Client("127.0.0.1", port, timeout=2) as c:
                if c.call("health")["status"] == "ok":
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"daemon did not answer within {timeout} s: {proc.stderr.read()}")


def stop_daemon(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM, wait for a clean exit; returns the exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
