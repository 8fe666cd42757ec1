"""The configuration's ``[auth]`` and ``[tls]`` sections turned into what the processes use: the server's
``Authenticator`` and TLS context, the ``Credentials`` its own calls present, and the refusal to listen beyond
loopback unprotected.

The rule (README, "Security"): a daemon, registry or collector listening on an address outside 127.0.0.0/8 and ::1
needs TLS (``tls.cert_file``) and authentication (``auth.token_files``, or client certificates: ``tls.ca_file``
with ``tls.client_cert_role``), unless ``server.insecure_listen = true``, which logs a warning at every start.
A process's own calls (model sync, transfers from peers, event shipping) speak TLS when ``tls.cert_file`` or
``tls.ca_file`` is set (a fleet speaks TLS throughout), and present ``auth.client_token_file`` (default: the first
token of the ``peer`` role).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import pwd
import socket
import ssl

from .. import const
from ..errors import ConfigError
from ..rpc.auth import Authenticator, read_token_file
from ..rpc.client import Credentials
from ..rpc.tls import certificate_window, client_context, server_context

log = logging.getLogger("edgerec")

__all__ = ["Security", "check_listen", "client_credentials", "is_loopback_host", "load_tokens", "server_auth",
           "server_tls",
           "tcp_hosts", "unix_roles"]


def load_tokens(entries: list[str]) -> dict[str, list[str]]:
    """``["ROLE=FILE", ...]`` -> {role: [token, ...]} (files read with ``rpc.auth.read_token_file``).

    Raises:
        ConfigError: a malformed entry or a bad token file (named; tokens never appear in the message).
    """
    out: dict[str, list[str]] = {}
    for entry in entries:
        role, sep, path = entry.partition("=")
        if not sep:
            raise ConfigError(f"auth.token_files: {entry!r} is not ROLE=FILE")
        out.setdefault(role.strip(), []).extend(read_token_file(path.strip()))
    return out


def unix_roles(entries: list[str]) -> dict[int, str]:
    """``["UID=ROLE" | "USER=ROLE", ...]`` -> {uid: role}.

    Raises:
        ConfigError: an unknown user name or a malformed entry.
    """
    out: dict[int, str] = {}
    for entry in entries:
        who, sep, role = entry.rpartition("=")
        who = who.strip()
        if not sep or not who:
            raise ConfigError(f"auth.unix_roles: {entry!r} is not UID=ROLE or USER=ROLE")
        if who.isdigit():
            uid = int(who)
        else:
            try:
                uid = pwd.getpwnam(who).pw_uid
            except KeyError:
                raise ConfigError(f"auth.unix_roles: no user named {who!r} on this machine") from None
        out[uid] = role.strip()
    return out


def server_auth(cfg: dict) -> Authenticator:
    """The ``Authenticator`` of ``cfg`` (it enforces nothing while no credential is configured).

    Raises:
        ConfigError: a bad token file, user name or role.
    """
    a, t = cfg["auth"], cfg["tls"]
    cert_role = t["client_cert_role"] if t["ca_file"] and t["cert_file"] else None
    return Authenticator(load_tokens(a["token_files"]), unix_roles(a["unix_roles"]), cert_role=cert_role,
                         deadline_seconds=a["deadline_seconds"], max_failures=a["max_failures"])


def server_tls(cfg: dict) -> ssl.SSLContext | None:
    """The listeners' TLS context (None without ``tls.cert_file``).

    Raises:
        ConfigError: an unreadable or invalid certificate, key or CA file.
    """
    t = cfg["tls"]
    if not t["cert_file"]:
        if t["key_file"]:
            raise ConfigError("tls.key_file is set without tls.cert_file")
        return None
    ctx = server_context(t["cert_file"], t["key_file"], t["ca_file"])
    check_certificate_dates(t["cert_file"])
    return ctx


def check_certificate_dates(cert_file: str) -> str | None:
    """Log the process's certificate when clients will refuse it or soon will: an error when it has expired or is
    not valid yet, a warning within ``const.TLS_CERT_WARN_DAYS`` of its end. Serving goes on either way (the
    plain Unix socket still works; a renewed file is read at the next restart). Returns the message, or None."""
    window = certificate_window(cert_file)
    if window is None:
        return None
    start, end = window
    now = dt.datetime.now(dt.timezone.utc)
    if now >= end:
        msg = (f"tls.cert_file {cert_file} expired on {end:%Y-%m-%d %H:%M} UTC: TLS clients will refuse every "
               f"connection; renew it and restart")
        log.error("%s", msg)
    elif now < start:
        msg = (f"tls.cert_file {cert_file} is not valid before {start:%Y-%m-%d %H:%M} UTC: TLS clients will refuse "
               f"it until then (is this machine's clock right?)")
        log.error("%s", msg)
    elif end - now <= dt.timedelta(days=const.TLS_CERT_WARN_DAYS):
        left = end - now
        msg = (f"tls.cert_file {cert_file} expires on {end:%Y-%m-%d %H:%M} UTC, in {left.days} d "
               f"{left.seconds // 3600} h: renew it and restart before then")
        log.warning("%s", msg)
    else:
        return None
    return msg


def client_credentials(cfg: dict) -> Credentials:
    """What this process presents on its own calls (see the module docstring).

    Raises:
        ConfigError: an unreadable token, certificate or CA file.
    """
    a, t = cfg["auth"], cfg["tls"]
    token = None
    if a["client_token_file"]:
        token = read_token_file(a["client_token_file"])[0]
    else:
        peer = [e for e in a["token_files"] if e.partition("=")[0].strip() == "peer"]
        if peer:
            token = read_token_file(peer[0].partition("=")[2].strip())[0]
    ctx = None
    if t["cert_file"] or t["ca_file"]:
        ctx = client_context(t["ca_file"], t["cert_file"], t["key_file"], t["check_hostname"])
    return Credentials(token=token, ssl=ctx)


def is_loopback_host(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``; anything else (0.0.0.0, ::, a LAN address, another name) is not."""
    if host is None:
        return True
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(hosts: list[str], auth: Authenticator, tls: ssl.SSLContext | None, insecure: bool,
                 what: str) -> None:
    """Refuse to listen beyond loopback without TLS and authentication (see the module docstring).

    Args:
        hosts: the TCP addresses to be bound (Unix sockets are not listed: their file mode guards them).
        what: the process, for the messages ("node", "registry").

    Raises:
        ConfigError: a non-loopback address without TLS or without any credential, and ``insecure`` False (the
            message names the settings and flags).
    """
    exposed = [h for h in hosts if not is_loopback_host(h)]
    if not exposed:
        return
    missing = []
    if tls is None:
        missing.append("TLS (tls.cert_file / --tls-cert, tls.key_file / --tls-key)")
    if not auth.token_count and not auth.cert_role:
        missing.append("tokens (auth.token_files / --token-file ROLE=FILE)")
    if not missing:
        return
    if insecure:
        log.warning("%s listens on %s without %s because server.insecure_listen = true: anyone who can reach the "
                    "port can call %s", what, ", ".join(exposed), " and without ".join(missing),
                    "every method" if not auth.enforced else "auth and health")
        return
    raise ConfigError(f"{what}: refusing to listen on {', '.join(exposed)} (not loopback) without "
                      f"{' and without '.join(missing)}; configure them, or set server.insecure_listen = true "
                      f"(--insecure-listen) to accept the risk")


class Security:
    """A process's ``[auth]`` / ``[tls]`` settings, loaded (the functions above): the server's ``auth`` and ``tls``
    context, the ``credentials`` its own calls present, ``insecure_listen``, and the connection caps.

    Raises:
        ConfigError: a bad token, certificate or CA file, user name or role.
    """

    def __init__(self, cfg: dict):
        self.auth = server_auth(cfg)
        self.tls = server_tls(cfg)
        self.credentials = client_credentials(cfg)
        self.insecure = cfg["server"]["insecure_listen"]
        self.server_options = {"max_connections": cfg["server"]["max_connections"],
                               "max_connections_per_address": cfg["server"]["max_connections_per_address"],
                               "auth": self.auth, "ssl": self.tls}

    def check_listen(self, hosts: list[str], what: str) -> None:
        check_listen(hosts, self.auth, self.tls, self.insecure, what)
        if self.auth.enforced:
            log.info("%s: roles enforced (%d token(s), %d unix uid(s), client certificates: %s); TLS %s", what,
                     self.auth.token_count, len(self.auth.unix_roles), self.auth.cert_role or "no",
                     "on" if self.tls is not None else "off")

    def reload(self, cfg: dict) -> None:
        """SIGHUP / ``reload``: the new token files and uid roles (rotation), applied only if all of them can be
        read and roles stay enforced where they were.

        Raises:
            ConfigError: a token file cannot be read, or the new settings would turn authentication off (no
                token, uid or client certificate role left): the previous tokens stay (logged).
        """
        try:
            tokens, uids = load_tokens(cfg["auth"]["token_files"]), unix_roles(cfg["auth"]["unix_roles"])
            if self.auth.enforced and not tokens and not uids and not self.auth.cert_role:
                raise ConfigError("the new [auth] settings hold no token and no uid role: that would open every "
                                  "method to anyone who can connect; restart the process to turn authentication off")
        except ConfigError as exc:
            log.error("reload: auth settings rejected, keeping the previous tokens: %s", exc)
            raise
        self.auth.replace(tokens, uids)
        self.auth.deadline_seconds = cfg["auth"]["deadline_seconds"]
        self.auth.max_failures = cfg["auth"]["max_failures"]


def tcp_hosts(host: str, port: int | None, sockets: list[socket.socket]) -> list[str]:
    hosts = [host] if port is not None else []
    for sock in sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            hosts.append(sock.getsockname()[0])
    return hosts
