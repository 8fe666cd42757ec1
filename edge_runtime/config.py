"""Daemon configuration: one TOML file, overridden by ``EDGEREC_*`` environment variables, overridden by flags;
and ``env_value``, the one reader of the project's other environment switches (``EDGEREC_SCORING`` ...).

Precedence (lowest first): built-in defaults -> the TOML file (``--config PATH``, else ``/etc/edgerec/edgerec.toml``
when it exists) -> environment variables ``EDGEREC_<SECTION>_<KEY>`` (e.g. ``EDGEREC_SERVER_PORT=7701``) ->
command-line flags. Every key is documented in ``deploy/edgerec.toml``. The whole configuration is validated at
start-up; an error names the key (``section.key``), the value and what is allowed, and nothing starts.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (Jetson L4T / Ubuntu 22.04): the same parser as a package
    import tomli as tomllib
from pathlib import Path
from typing import Any, Callable

from . import const
from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_PATH = const.CONFIG_PATH
_warned: set[str] = set()

__all__ = ["BY_DOTTED", "ConfigError", "DEFAULT_PATH", "KEYS", "Key", "env_flag", "env_value", "example", "load",
           "split_hostport"]


def env_value(name: str, env: dict | None = None) -> str | None:
    """The value of ``EDGEREC_<name>``, else of the deprecated ``EDGE_RUNTIME_<name>`` (a deprecation line is logged
    once per name), else None."""
    env = os.environ if env is None else env
    new, old = const.ENV_PREFIX + name, const.OLD_ENV_PREFIX + name
    if new in env:
        return env[new]
    if old in env:
        if old not in _warned:
            _warned.add(old)
            log.warning("%s is deprecated; set %s instead (the old name stops working in a later release)", old, new)
        return env[old]
    return None


def env_flag(name: str, env: dict | None = None) -> bool:
    """``env_value(name)`` read as a switch: 1 / true / yes / on."""
    return (env_value(name, env) or "").strip().lower() in ("1", "true", "yes", "on")


def score_inline_mode(env: dict | None = None) -> str:
    """``EDGEREC_SCORE_INLINE``: ``always`` / ``never`` (score every request on the event loop / on a scoring
    thread), else ``auto`` (by the model's measured scoring cost)."""
    mode = (env_value("SCORE_INLINE", env) or "auto").strip().lower()
    return mode if mode in ("auto", "always", "never") else "auto"


@dataclasses.dataclass(frozen=True)
class Key:
    section: str
    name: str
    kind: type            # int, float, str, bool, list (of str)
    default: Any
    check: Callable[[Any], bool] | None = None
    allowed: str = ""     # words for the error message
    flag: str | None = None   # argparse dest that overrides it (None: same as name)

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env(self) -> str:
        return f"EDGEREC_{self.section}_{self.name}".upper()


def _rng(lo, hi=None):
    return (lambda v: v >= lo) if hi is None else (lambda v: lo <= v <= hi)


KEYS: tuple[Key, ...] = (
    Key("model", "bundle", str, "", None, "a bundle directory path ('' = none: take it from --state-dir)"),
    Key("model", "precision", str, "int8", lambda v: v in ("int8", "fp32"), "'int8' or 'fp32'"),
    Key("model", "providers", list, ["CPUExecutionProvider"],
        lambda v: 0 < len(v) <= const.MAX_PROVIDERS and all(len(p) <= const.MAX_PROVIDER_CHARS for p in v) and all(v),
        f"a list of 1 to {const.MAX_PROVIDERS} ONNX Runtime execution provider names (at most "
        f"{const.MAX_PROVIDER_CHARS} characters each), most preferred first (e.g. "
        "['CUDAExecutionProvider', 'CPUExecutionProvider']; names this onnxruntime build lacks are skipped)"),
    Key("server", "host", str, const.DEFAULT_HOST, lambda v: bool(v), "an address to bind"),
    Key("server", "port", int, const.DEFAULT_PORT, _rng(-1, 65535), "an integer in -1..65535 (-1: no TCP)"),
    Key("server", "unix", str, "", None, "a socket path ('' = none)"),
    Key("server", "threads", int, const.SCORING_THREADS, _rng(1, 256), "an integer in 1..256"),
    Key("server", "batch_wait_us", float, const.BATCH_WAIT_US, _rng(0, 10_000),
        "µs in 0..10000 (how long a batch of concurrent recommend requests waits for more; 0: no wait)"),
    Key("server", "batch_max", int, const.BATCH_MAX_REQUESTS, _rng(1, 1024), "an integer in 1..1024"),
    Key("server", "drain_seconds", float, const.DRAIN_SECONDS, _rng(0, 3600), "seconds in 0..3600"),
    Key("server", "stalled_frame_seconds", float, const.STALLED_FRAME_SECONDS, _rng(0.1, 3600),
        "seconds in 0.1..3600"),
    Key("server", "idle_seconds", float, const.IDLE_SECONDS, _rng(1, 86400), "seconds in 1..86400"),
    Key("server", "max_connections", int, const.MAX_CONNECTIONS, _rng(1, 1_000_000), "an integer in 1..1e6"),
    Key("server", "max_connections_per_address", int, const.MAX_CONNECTIONS_PER_ADDRESS, _rng(1, 1_000_000),
        "an integer in 1..1e6"),
    Key("server", "insecure_listen", bool, False, None,
        "true or false (true: listen on a non-loopback address without TLS and tokens; warned at every start)",
        flag="insecure_listen"),
    Key("limits", "max_sessions", int, const.MAX_SESSIONS, _rng(1, 100_000_000), "an integer in 1..1e8"),
    Key("limits", "session_events", int, const.SESSION_EVENTS, _rng(1, 10_000), "an integer in 1..10000"),
    Key("limits", "cache_entries", int, const.CACHE_ENTRIES, _rng(0, 100_000_000), "an integer in 0..1e8"),
    Key("limits", "cache_items", int, const.CACHE_ITEMS, _rng(0, 1_000_000_000), "an integer in 0..1e9"),
    Key("sync", "state_dir", str, "", None, "a directory ('' = no model sync)"),
    Key("sync", "trusted_keys", list, [], None, "a list of public key (PEM) paths", flag="trusted_key"),
    Key("sync", "registry", str, "", lambda v: v == "" or _hostport(v), "'' or HOST:PORT"),
    Key("sync", "discovery", bool, True, None, "true or false"),
    Key("sync", "node_id", str, "", None, "a name ('' = HOSTNAME-PORT)"),
    Key("sync", "channel", str, const.DEFAULT_CHANNEL, lambda v: bool(v), "a channel name"),
    Key("sync", "keep", int, const.SYNC_KEEP, _rng(2, 1000), "an integer in 2..1000"),
    Key("sync", "poll_seconds", float, const.SYNC_POLL_SECONDS, _rng(0.1, 86400), "seconds in 0.1..86400"),
    Key("sync", "max_backoff", float, const.SYNC_MAX_BACKOFF_SECONDS, _rng(0.1, 86400), "seconds in 0.1..86400"),
    Key("events", "enabled", bool, True, None, "true or false (the log is on whenever sync.state_dir is set)",
        flag="events_enabled"),
    Key("events", "synchronous", str, "FULL", lambda v: v in ("FULL", "NORMAL"), "'FULL' or 'NORMAL'",
        flag="events_synchronous"),
    Key("events", "max_bytes", int, const.EVENT_LOG_MAX_BYTES, _rng(1 << 16, 1 << 50), "bytes in 65536..2^50",
        flag="events_max_bytes"),
    Key("events", "retention_seconds", float, float(const.EVENT_RETENTION_SECONDS), _rng(1, 10 * 365 * 86400),
        "seconds in 1..10 years", flag="events_retention_seconds"),
    Key("events", "session_ttl_seconds", float, float(const.SESSION_TTL_SECONDS), _rng(0, 10 * 365 * 86400),
        "seconds in 0..10 years", flag="events_session_ttl_seconds"),
    Key("events", "pseudonym_key", str, "", None, "a key file path ('' = <state_dir>/pseudonym.key, created)",
        flag="pseudonym_key"),
    Key("events", "upstream", str, "", lambda v: v in ("", "registry") or _hostport(v),
        "'' (no shipping), 'registry' (the registry that sync follows, configured or discovered) or HOST:PORT",
        flag="upstream"),
    Key("events", "transport", str, "rpc", lambda v: v in ("rpc", "nats"), "'rpc' (the collector) or 'nats'",
        flag="upstream_transport"),
    Key("events", "nats_url", str, "nats://127.0.0.1:4222", lambda v: v.startswith(("nats://", "tls://")),
        "a nats:// or tls:// URL", flag="nats_url"),
    Key("events", "ship_batch", int, const.SHIP_BATCH_EVENTS, _rng(1, const.MAX_INGEST_EVENTS),
        f"an integer in 1..{const.MAX_INGEST_EVENTS}"),
    Key("events", "ship_interval_seconds", float, const.SHIP_INTERVAL_SECONDS, _rng(0.01, 3600),
        "seconds in 0.01..3600"),
    Key("events", "ship_max_backoff", float, const.SHIP_MAX_BACKOFF_SECONDS, _rng(0.01, 86400),
        "seconds in 0.01..86400"),
    Key("auth", "token_files", list, [], lambda v: all(_role_file(x) for x in v),
        f"a list of 'ROLE=FILE' (ROLE one of {', '.join(const.ROLES)}; FILE from edgerec keygen --token ROLE)",
        flag="token_file"),
    Key("auth", "unix_roles", list, [], lambda v: all(_uid_role(x) for x in v),
        f"a list of 'UID=ROLE' or 'USER=ROLE' for Unix socket peers (ROLE one of {', '.join(const.ROLES)})"),
    Key("auth", "client_token_file", str, "", None,
        "the token file this process presents to registries, collectors and peers ('' = the first token of the "
        "peer role)", flag="client_token_file"),
    Key("auth", "deadline_seconds", float, const.AUTH_DEADLINE_SECONDS, _rng(0.1, 3600), "seconds in 0.1..3600"),
    Key("auth", "max_failures", int, const.AUTH_MAX_FAILURES, _rng(1, 1000), "an integer in 1..1000"),
    Key("tls", "cert_file", str, "", None, "a PEM certificate chain ('' = no TLS)", flag="tls_cert"),
    Key("tls", "key_file", str, "", None, "its PEM private key ('' = in cert_file)", flag="tls_key"),
    Key("tls", "ca_file", str, "", None,
        "PEM CA certificates: verify servers this process calls, and client certificates ('' = system CAs, no "
        "client certificates)", flag="tls_ca"),
    Key("tls", "client_cert_role", str, "peer", lambda v: v in ("",) + const.ROLES,
        f"the role of a verified client certificate: '' or one of {', '.join(const.ROLES)}"),
    Key("tls", "check_hostname", bool, True, None, "true or false (false: a fleet addressed by IP without IP SANs)"),
    Key("metrics", "host", str, const.METRICS_HOST, lambda v: bool(v), "an address to bind", flag="metrics_host"),
    Key("metrics", "port", int, 0, _rng(0, 65535), "an integer in 0..65535 (0: no metrics endpoint)",
        flag="metrics_port"),
    Key("log", "level", str, "INFO", lambda v: v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
        "DEBUG, INFO, WARNING or ERROR", flag="log_level"),
    Key("log", "format", str, "auto", lambda v: v in ("auto", "json", "plain"),
        "'auto' (plain under systemd, else JSON), 'json' or 'plain'", flag="log_format"),
)
BY_DOTTED = {k.dotted: k for k in KEYS}


def split_hostport(v: str) -> tuple[str, int]:
    """``host:port`` / ``[v6addr]:port`` -> (host, port).

    Raises:
        ValueError: not of that shape, or a port outside 1..65535.
    """
    host, sep, port = v.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "[" in host or "]" in host \
            or (":" in host and not bracketed):
        raise ValueError(f"{v!r} is not HOST:PORT (an IPv6 address goes in brackets: [::1]:7710)")
    return host, int(port)


def _role_file(v: str) -> bool:
    role, sep, path = v.partition("=")
    return bool(sep) and role.strip() in const.ROLES and bool(path.strip())


def _uid_role(v: str) -> bool:
    who, sep, role = v.rpartition("=")
    return bool(sep) and bool(who.strip()) and role.strip() in const.ROLES


def _hostport(v: str) -> bool:
    try:
        split_hostport(v)
        return True
    except ValueError:
        return False


def _coerce(key: Key, value: Any, where: str) -> Any:
    def bad(extra: str = "") -> ConfigError:
        return ConfigError(f"{key.dotted} = {value!r} ({where}): must be {key.allowed or key.kind.__name__}{extra}")

    if key.kind is bool:
        if isinstance(value, bool):
            v = value
        elif isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            v = value.lower() in ("1", "true", "yes", "on")
        else:
            raise bad()
    elif key.kind is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise bad() from None
        if not isinstance(value, int):
            raise bad()
        v = value
    elif key.kind is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad() from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad()
        v = float(value)
    elif key.kind is list:
        if isinstance(value, str):
            value = [p for p in value.split(",") if p.strip()]
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise bad()
        v = [x.strip() for x in value]
    else:
        if not isinstance(value, str):
            raise bad()
        v = value
    if key.check is not None and not key.check(v):
        raise bad()
    return v


def load(path: str | os.PathLike | None = None, env: dict[str, str] | None = None,
         flags: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The effective configuration as {section: {key: value}}.

    Args:
        path: TOML file; None = ``DEFAULT_PATH`` if it exists, else no file.
        env: environment (default ``os.environ``); only ``EDGEREC_<SECTION>_<KEY>`` names are read.
        flags: {flag dest: value} from the command line; None values mean "not given".

    Raises:
        ConfigError: unreadable file, unknown section or key, or an invalid value (named).
    """
    env = os.environ if env is None else env
    cfg = {k.section: {} for k in KEYS}
    for k in KEYS:
        cfg[k.section][k.name] = list(k.default) if isinstance(k.default, list) else k.default
    source: dict[str, str] = {}
    if path is None and Path(DEFAULT_PATH).is_file():
        path = DEFAULT_PATH
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        for section, table in raw.items():
            if section not in cfg:
                raise ConfigError(f"config file {path}: unknown section [{section}]; sections: {sorted(cfg)}")
            if not isinstance(table, dict):
                raise ConfigError(f"config file {path}: {section} must be a table ([{section}]), got "
                                  f"{type(table).__name__}")
            for name, value in table.items():
                key = BY_DOTTED.get(f"{section}.{name}")
                if key is None:
                    raise ConfigError(f"config file {path}: unknown key {section}.{name}; keys of [{section}]: "
                                      f"{sorted(k.name for k in KEYS if k.section == section)}")
                cfg[section][name] = _coerce(key, value, f"in {path}")
                source[key.dotted] = str(path)
    known_env = {k.env: k for k in KEYS}
    for name, value in env.items():
        if not name.startswith("EDGEREC_"):
            continue
        key = known_env.get(name)
        if key is None:
            if name.count("_") >= 2 and name.split("_")[1].lower() in cfg:
                raise ConfigError(f"environment variable {name} names no setting; known: {sorted(known_env)}")
            continue
        cfg[key.section][key.name] = _coerce(key, value, f"from ${name}")
    for k in KEYS:
        dest = k.flag or k.name
        if flags and flags.get(dest) not in (None, []):
            cfg[k.section][k.name] = _coerce(k, flags[dest], "from --" + dest.replace("_", "-"))
    return cfg


def example() -> str:
    """Every key with its default as TOML (the shape of deploy/edgerec.toml, without the comments)."""
    out, section = [], None
    for k in KEYS:
        if k.section != section:
            out.append(f"\n[{k.section}]")
            section = k.section
        v = k.default
        text = ("true" if v else "false") if isinstance(v, bool) else repr(v).replace("'", '"')
        out.append(f"{k.name} = {text}")
    return "\n".join(out).lstrip() + "\n"
