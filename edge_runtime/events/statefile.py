"""Small state files written atomically: a temporary file beside the target, fsynced, renamed over it (POSIX
``rename`` is atomic), so a crash leaves the old file or the new one, never a torn one. Used for the node's
``upstream.json`` and ``added_items.json`` and ``edgerec loop``'s ``loop.json``."""
from __future__ import annotations

import os
import threading
from pathlib import Path

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(path: Path) -> threading.Lock:
    key = os.path.abspath(path)
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def write_atomic(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``text`` (UTF-8), created with ``mode``; the directory is created if missing. Writers of
    one path in this process are serialized (they share the temporary file's name).

    Raises:
        OSError: it cannot be written (the previous file is left as it was).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with _lock(path):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path
