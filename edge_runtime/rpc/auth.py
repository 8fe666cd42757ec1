"""Who may call what: the role of every method, tokens, and the ``Authenticator`` the RPC server asks.

Every method of every service (the node, the registry, the collector) belongs to one role, in ``ROLES`` below and
nowhere else (the README prints the same table; ``tests/rpc/test_auth.py`` checks that every method of every
service has one):

* ``shop``: the shop's backend: recommend, record events, add items;
* ``ops``: the operator: stock, rollback, erasure, sessions, statistics, model information, reload;
* ``peer``: node to node and node to trainer side: bundle versions and chunks, event shipping.

``auth`` and ``health`` are open to every connection. A connection gets a role once: from ``auth {token}`` as its
first call, from its verified TLS client certificate (``tls.client_cert_role``), or, on the Unix socket, from the
peer's uid (``SO_PEERCRED``, ``auth.unix_roles``). While no credential of any kind is configured, nothing is
enforced (the loopback default, as before roles existed); once one is, a connection without a role may call only
``auth`` and ``health``, and every other method answers ``NotPermitted`` and does nothing.

Tokens are 256-bit random secrets (``new_token``), kept in files of mode 0600, one or more per line (several are
valid at once, so a token is rotated by adding the new one, moving the clients, then removing the old one). The
server keeps only their SHA-256 digests and compares a presented token's digest with every one of them with
``hmac.compare_digest`` (constant time, no early exit); no token is ever logged or echoed in an error.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from .. import const
from ..errors import ConfigError

# method -> role, one table for every service. Methods not listed are refused to everyone once auth is enforced.
ROLES: dict[str, tuple[str, ...]] = {
    "shop": ("recommend", "track", "track_batch", "add_items", "health"),
    "ops": ("set_availability", "rollback", "forget", "session", "stats", "model_info", "reload"),
    "peer": ("latest", "versions", "manifest", "fetch", "ingest", "ingest_cursor", "ingest_forget"),
}
OPEN = ("auth", "health")   # callable before authenticating
# What ``health`` tells a connection without a role on a server that enforces roles (a load balancer's probe):
# liveness and the model served, not the state directory's paths, the sync and shipping details or counts.
PUBLIC_HEALTH = ("status", "model_version", "uptime_s", "offline")
ROLE_OF: dict[str, str] = {m: role for role, methods in ROLES.items() for m in methods}
assert tuple(ROLES) == const.ROLES

__all__ = ["Authenticator", "OPEN", "PUBLIC_HEALTH", "ROLES", "ROLE_OF", "new_token", "read_token_file",
           "write_token_file"]


def new_token() -> str:
    """A new token: ``const.TOKEN_BYTES`` (32) random bytes from the OS CSPRNG as 64 lowercase hex characters."""
    return secrets.token_hex(const.TOKEN_BYTES)


def write_token_file(path: str | os.PathLike) -> Path:
    """Write a new token to ``path`` (mode 0600, one line); returns the path.

    Raises:
        FileExistsError: the file exists (a token file is never overwritten; rotate by writing a new file).
        OSError: it cannot be written.
    """
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_token() + "\n")
    return path


def read_token_file(path: str | os.PathLike) -> list[str]:
    """The tokens of a token file: one per line, blank lines and ``#`` comments ignored, in file order.

    Raises:
        ConfigError: unreadable, readable by group or others (mode wider than 0600), empty, or a line shorter
            than ``const.MIN_TOKEN_CHARS`` / longer than ``const.MAX_TOKEN_CHARS`` or not printable ASCII
            (the message names the file and the line number, never the line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
        mode = path.stat().st_mode & 0o777
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"token file {path}: cannot read it ({reason})") from None
    if mode & 0o077:
        raise ConfigError(f"token file {path}: readable by group or others (mode {mode:04o}); chmod 600 it")
    tokens = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not const.MIN_TOKEN_CHARS <= len(line) <= const.MAX_TOKEN_CHARS or not line.isprintable() \
                or any(c.isspace() for c in line):
            raise ConfigError(f"token file {path}, line {n}: not a token ({const.MIN_TOKEN_CHARS} to "
                              f"{const.MAX_TOKEN_CHARS} printable characters; edgerec keygen --token ROLE writes "
                              f"one)")
        tokens.append(line)
    if not tokens:
        raise ConfigError(f"token file {path}: holds no token (edgerec keygen --token ROLE --out {path})")
    return tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Authenticator:
    """What the RPC server asks about roles (see the module docstring).

    Args:
        tokens: {role: [token, ...]} accepted tokens (only their SHA-256 digests are kept).
        unix_roles: {uid: role} for peers of the Unix socket (``SO_PEERCRED``).
        cert_role: the role of a connection whose TLS client certificate the server verified (None: none).
        deadline_seconds: an unauthenticated connection is closed this long after it opened (enforced only).
        max_failures: failed ``auth`` calls before the connection is closed.

    Attributes:
        enforced: True once any credential is configured (tokens, uids or client certificates).
        failures: failed ``auth`` calls so far (every connection; the metrics export it).

    Raises:
        ConfigError: a role that is not one of ``const.ROLES``.
    """

    def __init__(self, tokens: dict[str, list[str]] | None = None, unix_roles: dict[int, str] | None = None,
                 cert_role: str | None = None, deadline_seconds: float = const.AUTH_DEADLINE_SECONDS,
                 max_failures: int = const.AUTH_MAX_FAILURES):
        self.deadline_seconds = deadline_seconds
        self.max_failures = max_failures
        self.failures = 0
        self.cert_role = cert_role or None
        self.unix_roles: dict[int, str] = {}
        self._digests: list[tuple[bytes, str]] = []
        for role in [cert_role] if cert_role else []:
            _check_role(role, "tls.client_cert_role")
        self.replace(tokens or {}, unix_roles or {})

    def replace(self, tokens: dict[str, list[str]], unix_roles: dict[int, str]) -> None:
        """Swap in new tokens and uid roles (SIGHUP: rotation without a restart); connections keep their role.

        Raises:
            ConfigError: a role that is not one of ``const.ROLES``.
        """
        digests = []
        for role, toks in tokens.items():
            _check_role(role, "auth.token_files")
            digests += [(_digest(t), role) for t in toks]
        for uid, role in unix_roles.items():
            _check_role(role, "auth.unix_roles")
        self._digests, self.unix_roles = digests, dict(unix_roles)

    @property
    def enforced(self) -> bool:
        return bool(self._digests or self.unix_roles or self.cert_role)

    @property
    def token_count(self) -> int:
        return len(self._digests)

    def role_of_token(self, token: str) -> str | None:
        """The role ``token`` grants, or None. Compares its digest with every configured digest (constant time
        per comparison, all of them compared, so the time does not tell which one matched or how early)."""
        found = None
        d = _digest(token)
        for digest, role in self._digests:
            if hmac.compare_digest(digest, d):
                found = role
        return found

    @staticmethod
    def permitted(role: str | None, method: str) -> bool:
        """May a connection of ``role`` (None: not authenticated) call ``method``? (Enforced servers only.)"""
        return method in OPEN or (role is not None and ROLE_OF.get(method) == role)


def _check_role(role: str, where: str) -> None:
    if role not in const.ROLES:
        raise ConfigError(f"{where}: unknown role {role!r}; roles: {list(const.ROLES)}")
