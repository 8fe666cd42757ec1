"""Log output: one JSON object per line (python-json-logger), or journald-friendly plain lines under systemd.

``format="auto"`` picks plain lines when stderr goes to the journal (``$JOURNAL_STREAM``, systemd.under_systemd)
and JSON otherwise. Plain lines carry the sd-daemon(3) priority prefix (``<3>`` error ... ``<7>`` debug) so
journald files each line at its level and adds its own timestamp. JSON lines hold ``ts`` (ISO 8601 UTC), ``level``,
``logger``, ``message`` and any ``extra=`` fields.

The daemon never logs shopper ids (users or their histories) at INFO or above; tests check its output for them.
"""
from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from . import systemd

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def setup(level: str = "INFO", fmt: str = "auto", stream=None) -> str:
    """Configure the root logger; returns the format used ("json" or "plain")."""
    if fmt == "auto":
        fmt = "plain" if systemd.under_systemd() else "json"
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter("{asctime}{levelname}{name}{message}", style="{",
                                           rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
                                           datefmt="%Y-%m-%dT%H:%M:%S%z"))
    else:
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return fmt
