"""TLS contexts for the MessagePack-RPC listeners and clients (the standard library's ``ssl``; TLS 1.2 at least).

* server: the process's certificate chain and key; with a CA file, client certificates are asked for
  (``CERT_OPTIONAL``) and one that verifies against the CA gives its connection ``tls.client_cert_role``
  (mutual TLS between nodes and the trainer side); a client without a certificate authenticates with a token;
* client: verifies the server against the CA file (else the system's trust store), checks the host name unless
  ``check_hostname`` is off (a fleet addressed by IP needs IP subjectAltNames, or the switch), and presents the
  process's own certificate when it has one.
"""
from __future__ import annotations

import datetime as dt
import ssl

from ..errors import ConfigError

__all__ = ["certificate_window", "client_context", "server_context"]


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str, where: str) -> None:
    try:
        ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: cannot load the certificate {cert} / key {key or '(in the certificate file)'}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None


def _load_ca(ctx: ssl.SSLContext, ca: str, where: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: cannot load the CA file {ca}: {getattr(exc, 'strerror', None) or exc}") from None


def certificate_window(cert_file: str) -> tuple[dt.datetime, dt.datetime] | None:
    """(not valid before, not valid after), UTC, of the first certificate of the PEM chain ``cert_file`` (the
    process's own), read with ``cryptography``; None when the file cannot be parsed that way (``ssl`` loaded it,
    so it is still served; only its dates are unknown)."""
    from cryptography import x509
    try:
        with open(cert_file, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError):
        return None
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def server_context(cert_file: str, key_file: str = "", ca_file: str = "") -> ssl.SSLContext:
    """A server context: ``cert_file`` (PEM chain) and ``key_file``; with ``ca_file``, client certificates signed
    by it are verified when presented.

    Raises:
        ConfigError: a file is missing or not a valid certificate / key (named).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert_file, key_file, "tls.cert_file")
    if ca_file:
        _load_ca(ctx, ca_file, "tls.ca_file")
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(ca_file: str = "", cert_file: str = "", key_file: str = "",
                   check_hostname: bool = True) -> ssl.SSLContext:
    """A client context that verifies the server (``ca_file``, else the system's CAs) and presents ``cert_file``
    when given (mutual TLS).

    Raises:
        ConfigError: a file is missing or invalid (named).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca_file:
        _load_ca(ctx, ca_file, "tls.ca_file")
    else:
        ctx.load_default_certs()
    if cert_file:
        _load_chain(ctx, cert_file, key_file, "tls.cert_file")
    return ctx


