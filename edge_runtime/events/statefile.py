"""Small state files written atomically: a temporary file beside the target, fsynced, renamed over it (POSIX
``rename`` is atomic), so a crash leaves the old file or the new one, never a torn one. Used for the node's
``upstream.json`` and ``added_items.json`` and ``edgerec loop``'s ``loop.json``."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``text`` (UTF-8), created with ``mode``; the directory is created if missing.

    Raises:
        OSError: it cannot be written (the previous file is left as it was).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
