"""Pseudonymous shopper ids: HMAC-SHA256 of the raw id under a per-deployment secret key (RFC 2104).

No raw shopper id is written to disk: the event log, the restored sessions and everything the node keeps in memory
are keyed by ``Pseudonymizer(user)``, 32 hex characters (the first 128 bits of the HMAC). The key is 32 random
bytes, hex, in a file of mode 0600 (``edgerec keygen --pseudonym --out FILE``, or created at first start in the
state directory). ``key_id`` (8 hex characters of the key's sha256) is stored beside each logged event, so a key
can be rotated: events logged under an older key stay until the retention TTL removes them, and do not join the
new pseudonyms' sessions.

Pseudonymised data is still personal data (GDPR Art. 4(5), Recital 26): the log keeps it for a bounded time and
``forget`` erases one shopper.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from .. import const
from ..errors import ConfigError


class Pseudonymizer:
    """``p(user: str) -> str``: the 32-hex-character pseudonym of a raw shopper id (about 1 µs per call).

    Args:
        key: the secret, ``const.PSEUDONYM_KEY_BYTES`` bytes.
    """

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ConfigError("a pseudonym key needs at least 16 bytes")
        self.key_id = hashlib.sha256(key).hexdigest()[:8]
        self._hmac = hmac.new(key, digestmod=hashlib.sha256)   # keyed once; each call copies its state

    def __call__(self, user: str) -> str:
        h = self._hmac.copy()
        h.update(user.encode("utf-8", "surrogatepass"))
        return h.hexdigest()[:const.PSEUDONYM_HEX_CHARS]


def is_pseudonym(v) -> bool:
    """True for a string of exactly ``PSEUDONYM_HEX_CHARS`` lowercase hex characters (what ``Pseudonymizer``
    returns); the collector refuses anything else as a shopper id."""
    return isinstance(v, str) and len(v) == const.PSEUDONYM_HEX_CHARS and all(c in _HEX for c in v)


_HEX = frozenset("0123456789abcdef")


def create_key(path: str | os.PathLike) -> Path:
    """Write a new random key file (mode 0600, hex, one line).

    Raises:
        FileExistsError: the file exists (a key is never overwritten: the pseudonyms under it would be lost).
    """
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(const.PSEUDONYM_KEY_BYTES) + "\n")
    return path


def load_key(path: str | os.PathLike, create: bool = False) -> Pseudonymizer:
    """The pseudonymizer of a key file; with ``create``, a missing file is created first.

    Raises:
        ConfigError: the file is unreadable, not hex, too short, or readable by others (mode wider than 0600).
    """
    path = Path(path)
    if create and not path.exists():
        create_key(path)
    try:
        text = path.read_text(encoding="ascii").strip()
        mode = path.stat().st_mode & 0o077
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"pseudonym key {path}: cannot read it: {exc}") from None
    if mode:
        raise ConfigError(f"pseudonym key {path}: readable by group or others (mode {oct(mode)}); chmod 600 it")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"pseudonym key {path}: not a hex key (edgerec keygen --pseudonym writes one)") from None
    return Pseudonymizer(key)
