"""Fuzz the MessagePack-RPC services of real daemons with hypothesis (issue 15, point 6).

    python bench/fuzz_rpc.py --cases N [--seed S] [--json PATH] [--bundle DIR] [--max-seconds S]
                             [--case-timeout 5] [--check-every 1] [--workdir DIR]

Starts real processes on 127.0.0.1 only (``edgerec.process.start_daemon``):

* ``node``: ``edgerec serve --bundle B --state-dir D --trusted-key PUB --no-discovery`` (the event log on, model
  sync wired, so the peer methods and ``rollback`` are served), shipping its events to the collector below;
* ``registry``: ``edgerec registry --bundles DIR --collect DIR2 --no-discovery`` (the bundle methods and the
  collector's ``ingest`` / ``ingest_cursor`` / ``ingest_forget``);
* ``node-auth``: a node started with
  ``--token-file shop=FILE`` and fuzzed without ever authenticating: only ``auth`` and ``health`` may succeed.

Without ``--bundle`` a tiny bundle is trained once (the recipe of ``tests/conftest.py``: SASRec d=32 on the first
3,000 users of the embedded Beauty data, about 15 s) into ``bench/results/fuzz-bundle`` and reused afterwards.

The ``--cases`` are split across the targets (``TARGET_WEIGHTS``) and, inside each, across the kinds
(``KIND_SHARES``); hypothesis generates every case (``@given`` runs, ``database=None``, seeded from ``--seed``):

* ``raw``: random bytes, sent, then the connection half-closed;
* ``value``: random MessagePack values (nested arrays and maps, ints up to the 64-bit edges, floats incl. nan and
  inf, str, bin, ext, timestamps, bool, nil), each one frame, followed by a ``health`` ping;
* ``crafted``: hand-encoded frames: non-minimal encodings, invalid UTF-8, reserved bytes, declared lengths far
  beyond the bytes sent, nesting past any stack, frames over the 1 MiB limit, unhashable or duplicate map keys,
  bad timestamps, truncations, several frames glued with garbage;
* ``request``: ``[0, msgid, method, params]`` for every method of the service (listed live by the daemon itself,
  see ``live_methods``), params a random value; msgids mostly valid, some not;
* ``named``: the same with a map of the method's real parameter names (``METHOD_PARAMS``, the one table here) with
  plausible or random values, sometimes random extra keys;
* ``notify``: ``[2, method, params]`` (real and random methods) followed by a ``health`` ping: nothing but the
  ping's reply may come back;
* ``unknown``: requests for random method names and non-string methods.

Each case must end in the replies it is owed or in a clean close (EOF, or a reset after an error reply) within
``--case-timeout`` s; otherwise it is a HANG. Every reply must be a well-formed response (``[1, msgid, error,
result]``, error nil or ``{code, name, message}`` with a known code); an ``InternalError`` (a handler raised
something that is not an ``EdgeRuntimeError``), a reply to a notification, a reply to another msgid, or a success
without authentication is an UNEXPECTED reply. After every ``--check-every`` cases the process must be alive and
answer ``health`` on a fresh connection, else it is a CRASH (and that target stops). The daemons' logs are scanned
for tracebacks at the end.

Prints and writes (``--json``) cases per target and kind, methods hit, crashes, hangs, unexpected replies (each
with the hex frame that reproduces it), seconds and the CPU. Exit status 0 only with no crash, no hang and every
target answering at the end. ``--max-seconds`` stops early (and says so).
"""
from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures
import contextlib
import json
import math
import os
import platform
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypothesis  # noqa: E402
import msgpack  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edge_runtime import const, errors  # noqa: E402
from edgerec.process import PACKAGE_ROOT, free_port, start_daemon, stop_daemon  # noqa: E402
from bench_events import cpu_name  # noqa: E402  (the CPU line every benchmark prints)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "bench" / "results" / "fuzz-bundle"

# ------------------------------------------------------------------------------------------ the one table
# method -> {parameter name: value shape}. Every method any edgerec service serves must be here (``check_table``
# compares it with the live method lists and with the tables built from the code). The shapes name the
# plausible-value strategies of ``param_strategy``; nested maps list their own keys in NESTED_KEYS.
METHOD_PARAMS: dict[str, dict[str, str]] = {
    # the node (serving/service.py, ops/node.py)
    "recommend": {"user": "id", "history": "items", "k": "k", "exclude_seen": "bool", "filters": "filters"},
    "track": {"user": "id", "item": "item", "event": "event", "ts": "ts", "event_id": "event_id"},
    "track_batch": {"events": "event_maps"},
    "session": {"user": "id"},
    "forget": {"user": "id"},
    "add_items": {"items": "new_items"},
    "set_availability": {"items": "items", "in_stock": "bool"},
    "health": {},
    "model_info": {},
    "stats": {},
    "rollback": {},
    "reload": {},
    # bundles: the registry and every node with model sync (fleet/registry.py)
    "latest": {"channel": "channel"},
    "versions": {"channel": "channel"},
    "manifest": {"version": "version"},
    "fetch": {"version": "version", "file": "file", "offset": "offset", "length": "length"},
    # the collector in the registry process (fleet/collector.py)
    "ingest": {"node": "node_id", "after": "seq", "events": "ingest_rows", "dropped": "seq"},
    "ingest_cursor": {"node": "node_id"},
    "ingest_forget": {"node": "node_id", "user": "pseudonym"},
    # every server once tokens are configured (rpc/auth.py)
    "auth": {"token": "token"},
}
NESTED_KEYS: dict[str, tuple[str, ...]] = {
    "filters": ("category", "exclude"),                       # recommend.filters
    "event_map": ("user", "item", "event", "ts", "event_id"),  # track_batch.events[i]
    "new_item": ("id", "attributes"),                         # add_items.items[i]
}
OPEN_METHODS = ("auth", "health")   # what an unauthenticated connection may call once tokens are configured
SERVICES = ("node", "registry")

KINDS = ("raw", "value", "crafted", "request", "named", "notify", "unknown")
KIND_SHARES = {"raw": 0.10, "value": 0.15, "crafted": 0.10, "request": 0.20, "named": 0.30, "notify": 0.10,
               "unknown": 0.05}
TARGET_WEIGHTS = {"node": 3, "registry": 2, "node-auth": 1}
CHUNK = 100                 # examples per @given run (the runs of all targets and kinds interleave)
PING_ID = 0xFFFFFFF0        # the msgid of the health ping that follows value and notification cases
LIST_ID = 0xFFFFFFF1
CODES = {v: k for k, v in vars(errors).items() if k.isupper() and isinstance(v, int) and -32768 <= v <= -32000}
CLOSING_CODES = {errors.PARSE_ERROR, errors.FRAME_TOO_LARGE, errors.INVALID_REQUEST,
                 getattr(errors, "AUTH_FAILED", -32007)}
EVENTS = ("view", "cart", "purchase")


def code_methods(service: str) -> list[str]:
    """The methods of ``service`` as the code builds them (no process): the node's ``Service`` table, the peer
    methods and those ``ops/node.py`` adds by name (``stats``, ``rollback``, ``reload``); the registry's
    ``RegistryService`` with a ``CollectorStore`` (on a throw-away directory)."""
    if service == "node":
        from edge_runtime.fleet.registry import PEER_METHODS
        from edge_runtime.serving.service import Service

        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            names = set(Service(None, pool).methods) | set(PEER_METHODS)
        finally:
            pool.shutdown()
        return sorted(names | {"stats", "rollback", "reload"})
    if service == "registry":
        from edge_runtime.fleet.collector import CollectorStore
        from edge_runtime.fleet.registry import RegistryService

        with tempfile.TemporaryDirectory(prefix="fuzz-methods-") as tmp:
            names = set(RegistryService(Path(tmp) / "bundles").methods)
            store = CollectorStore(Path(tmp) / "collected.db")
            try:
                names |= set(store.methods())
            finally:
                store.close()
        return sorted(names)
    raise ValueError(f"unknown service {service!r}; one of {SERVICES}")


def check_table(methods: list[str]) -> list[str]:
    """The methods of ``methods`` that METHOD_PARAMS lacks (they are still fuzzed, with random params only)."""
    return sorted(m for m in methods if m not in METHOD_PARAMS)


# ---------------------------------------------------------------------------------------- the targets
@dataclass
class Target:
    """One daemon under fuzz and what the strategies know of it (plausible values)."""
    name: str
    service: str                       # "node" or "registry": which methods and plausible values
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    methods: list[str] = field(default_factory=list)
    method_source: str = "table"       # "live" (the daemon listed them) or "code"
    items: list[str] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    node_ids: list[str] = field(default_factory=list)
    token: str | None = None           # the real token of an auth target: never sent, only near misses are
    unauthenticated: bool = False      # fuzzed without auth: only OPEN_METHODS may succeed


@dataclass(frozen=True)
class Spec:
    """How to start a target: ``name``, its ``service``, and the role of the token it is started with (None: no
    tokens; the target is then fuzzed unauthenticated)."""
    name: str
    service: str
    token_role: str | None = None


def target_specs() -> list[Spec]:
    """The fuzzed processes: a node, the registry with its collector, and a node with a shop token that is fuzzed
    without ever authenticating (only ``auth`` and ``health`` may succeed there)."""
    return [Spec("node", "node"), Spec("registry", "registry"), Spec("node-auth", "node", token_role="shop")]


def ensure_bundle(path: Path = DEFAULT_BUNDLE) -> Path:
    """``path`` if it holds a bundle, else a tiny one trained there (tests/conftest.py's recipe, ~15 s)."""
    if (path / "manifest.json").is_file():
        return path
    from trainer.config import TrainConfig
    from trainer.data import EMBEDDED_DIR
    from trainer.pipeline import run

    data = path.parent / (path.name + "-data")
    data.mkdir(parents=True, exist_ok=True)
    with open(EMBEDDED_DIR / "Beauty.txt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(3000)]
    (data / "Beauty.txt").write_text("".join(lines), encoding="utf-8")
    shutil.copy(EMBEDDED_DIR / "Beauty_item2attributes.json", data / "Beauty_item2attributes.json")
    cfg = TrainConfig(data=str(data / "Beauty.txt"), hidden=32, blocks=1, epochs=8, patience=8, batch_size=256,
                      loss="ce", lr=3e-3, dropout=0.3, ema_decay=0.0, int8_check_users=500)
    run(cfg, path, progress=False, printer=lambda *a: None)
    return path


def _rpc(port: int, frames: list[bytes], want: int, timeout: float = 5.0) -> dict:
    """Send ``frames`` on one fresh connection and return the reply to msgid ``want`` (raises OSError / KeyError)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"".join(frames))
        unp = msgpack.Unpacker(raw=False, strict_map_key=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = s.recv(1 << 16)
            if not data:
                break
            unp.feed(data)
            for msg in unp:
                if isinstance(msg, list) and len(msg) == 4 and msg[0] == 1 and msg[1] == want:
                    return {"error": msg[2], "result": msg[3]}
    raise KeyError(f"no reply to msgid {want}")


def live_methods(port: int, token: str | None = None) -> list[str] | None:
    """The methods the daemon on ``port`` serves, read from its own ``MethodNotFound`` message (which lists them);
    with ``token``, after authenticating on the same connection. None when it does not say."""
    frames = []
    if token is not None:
        frames.append(msgpack.packb([0, LIST_ID - 1, "auth", [{"token": token}]]))
    frames.append(msgpack.packb([0, LIST_ID, "\x00fuzz-list", []]))
    try:
        err = _rpc(port, frames, LIST_ID)["error"]
    except (OSError, KeyError):
        return None
    m = re.search(r"methods: (\[.*\])", (err or {}).get("message", "") if isinstance(err, dict) else "")
    if not m:
        return None
    try:
        names = ast.literal_eval(m.group(1))
    except (ValueError, SyntaxError):
        return None
    return sorted(str(n) for n in names)


def _context(target: Target, bundle: Path, registry_dir: Path) -> None:
    ids = json.loads((bundle / "item_ids.json").read_text())
    target.items = ids[:200] + ids[-50:]
    names_file = bundle / "item_attr_names.json"
    if names_file.is_file():
        target.attributes = [str(n) for n in json.loads(names_file.read_text())[:300]]
    target.versions = sorted(p.name for p in registry_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    from edge_runtime.bundle import format as bundle_format

    manifest = json.loads((bundle / bundle_format.MANIFEST).read_text())
    target.files = sorted(manifest["files"]) + [bundle_format.MANIFEST, bundle_format.SIGNATURE]
    target.node_ids = ["fuzz-node", "fuzz-node-2", "n1"]


@contextlib.contextmanager
def started_targets(bundle: str | os.PathLike, work: str | os.PathLike,
                    specs: list[Spec] | None = None, printer=print) -> Iterator[list[Target]]:
    """Start the targets of ``specs`` (default ``target_specs()``) on 127.0.0.1 under ``work`` and yield them as
    ``Target``s (methods listed live); every process is stopped on exit."""
    from edge_runtime.bundle import signing
    from edge_runtime.bundle.store import publish

    bundle, work = Path(bundle), Path(work)
    specs = target_specs() if specs is None else specs
    work.mkdir(parents=True, exist_ok=True)
    signing.keygen(work / "sign")
    reg = work / "registry"
    publish(bundle, reg, work / "sign.key", version="fuzz-v1")
    publish(bundle, reg, work / "sign.key", channel="beta", version="fuzz-v2")
    pub = str(work / "sign.pub")
    targets: list[Target] = []
    rport = None
    try:
        for spec in sorted(specs, key=lambda s: s.service != "registry"):   # the collector first: nodes ship to it
            t = Target(spec.name, spec.service, port=free_port(), log_path=work / f"{spec.name}.log")
            _context(t, bundle, reg)
            if spec.service == "registry":
                extra = ["--bundles", str(reg), "--collect", str(work / f"{spec.name}-collect"), "--no-discovery"]
                command, bundle_arg = "registry", None
            else:
                extra = ["--state-dir", str(work / f"{spec.name}-state"), "--trusted-key", pub, "--no-discovery",
                         "--node-id", f"fuzz-{spec.name}"]
                if rport is not None and spec.token_role is None:
                    extra += ["--upstream", f"127.0.0.1:{rport}"]
                command, bundle_arg = "serve", reg / "fuzz-v1"
            if spec.token_role is not None:
                tok = work / f"{spec.name}.token"
                subprocess.run([sys.executable, "-m", "edgerec", "keygen", "--token", spec.token_role, "--out",
                                str(tok)], check=True, capture_output=True, timeout=60, cwd=PACKAGE_ROOT)
                t.token = tok.read_text().split()[0]
                t.unauthenticated = True
                extra += ["--token-file", f"{spec.token_role}={tok}"]
            t.proc = start_daemon(bundle_arg, t.port, extra, timeout=180, log_path=t.log_path, command=command)
            if spec.service == "registry":
                rport = t.port
            live = live_methods(t.port, t.token)
            if live:
                t.methods, t.method_source = live, "live"
            else:
                t.methods, t.method_source = code_methods(spec.service), "code"
            if t.token is not None and "auth" not in t.methods:
                t.methods = sorted(t.methods + ["auth"])
            printer(f"started {t.name} ({command}, pid {t.proc.pid}) on 127.0.0.1:{t.port}: {len(t.methods)} "
                    f"methods ({t.method_source})")
            targets.append(t)
        yield targets
    finally:
        for t in targets:
            if t.proc is not None and t.proc.poll() is None:
                stop_daemon(t.proc)


# ------------------------------------------------------------------------------------------ strategies
INT_EDGES = [0, 1, -1, 127, 128, 255, 256, -32, -33, -128, -129, 2**15, 2**16 - 1, 2**16, 2**31 - 1, 2**31,
             2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -2**15, -2**31, -2**31 - 1, -2**63]
FLOAT_EDGES = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 5e-324, 1e10, 1e10 + 1, 3.4e38, 0.5]


def ints() -> st.SearchStrategy:
    return st.one_of(st.integers(-2**63, 2**64 - 1), st.sampled_from(INT_EDGES), st.integers(-3, 300))


def floats() -> st.SearchStrategy:
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(FLOAT_EDGES))


def texts(max_size: int = 40) -> st.SearchStrategy:
    return st.one_of(st.text(max_size=max_size), st.sampled_from(["", " ", "\x00", "view", "health", "None",
                                                                  "\u202e", "🛒", "a" * 300]))


def scalars() -> st.SearchStrategy:
    return st.one_of(st.none(), st.booleans(), ints(), floats(), texts(), st.binary(max_size=48),
                     st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=24)),
                     st.builds(msgpack.Timestamp, st.integers(-2**34, 2**34), st.integers(0, 999_999_999)))


def keys() -> st.SearchStrategy:
    return st.one_of(texts(), ints(), st.binary(max_size=8), st.none(), st.booleans(), floats())


def values(max_leaves: int = 24) -> st.SearchStrategy:
    """Random MessagePack values, nested."""
    return st.recursive(scalars(), _nest, max_leaves=max_leaves)


def _nest(kids: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.lists(kids, max_size=6), st.dictionaries(keys(), kids, max_size=6))


def pack(obj: Any, single_float: bool = False) -> bytes:
    """One MessagePack frame; ``single_float``: floats as float32 where they fit."""
    if single_float:
        try:
            return msgpack.packb(obj, use_bin_type=True, use_single_float=True)
        except OverflowError:
            pass
    return msgpack.packb(obj, use_bin_type=True)


def _sized(pool: list, sizes: list[int]) -> st.SearchStrategy:
    """Lists of exactly a bound's size (or one over), built from ``pool`` without drawing each element."""
    return st.sampled_from(sizes).map(lambda n: [pool[i % len(pool)] for i in range(n)])


def param_strategy(shape: str, t: Target, mixed: bool = True) -> st.SearchStrategy:
    """Plausible values for a parameter of ``shape`` (METHOD_PARAMS) on target ``t`` (most of them valid, with edge
    cases), mixed with random ones unless ``mixed`` is False."""
    items = t.items or ["1", "2", "3"]
    known = st.sampled_from(items)
    ident = st.one_of(st.text(min_size=1, max_size=24), st.integers(-2**63, 2**64 - 1), known,
                      st.sampled_from(["", "x" * const.MAX_ID_CHARS, "x" * (const.MAX_ID_CHARS + 1), "0", "-1"]))
    item_list = st.one_of(st.lists(st.one_of(known, ident), max_size=12),
                          _sized(items, [0, const.MAX_HISTORY_IDS, const.MAX_HISTORY_IDS + 1]))
    ts = st.one_of(st.floats(0, const.MAX_TS), st.integers(0, int(const.MAX_TS) + 10), floats(), ints(),
                   st.just(time.time()))
    pseudonym = st.text("0123456789abcdef", min_size=const.PSEUDONYM_HEX_CHARS,
                        max_size=const.PSEUDONYM_HEX_CHARS)
    attrs = st.sampled_from(t.attributes) if t.attributes else st.text(min_size=1, max_size=8)
    rnd = values(8)

    def maps(name: str, plausible: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
        return st.one_of(st.fixed_dictionaries({}, optional=plausible),
                         st.fixed_dictionaries({k: v for k, v in plausible.items()}),
                         st.dictionaries(st.sampled_from(NESTED_KEYS[name]), rnd, max_size=4), rnd)

    event_map = maps("event_map", {"user": ident, "item": st.one_of(known, ident),
                                   "event": st.sampled_from(EVENTS + ("", "View")), "ts": ts,
                                   "event_id": st.text(max_size=const.MAX_EVENT_ID_CHARS + 2)})
    new_item = maps("new_item", {"id": st.one_of(ident, st.text(min_size=1, max_size=12).map(lambda s: "new-" + s)),
                                 "attributes": st.one_of(st.lists(st.one_of(attrs, st.text(max_size=10)), max_size=8),
                                                         rnd)})
    ingest_row = st.tuples(ints(), st.one_of(pseudonym, ident), st.one_of(known, ident),
                           st.sampled_from(EVENTS + ("x",)), ts).map(list)

    @st.composite
    def ingest_rows(draw):
        if draw(st.booleans()):
            return draw(st.lists(st.one_of(ingest_row, rnd), max_size=6))
        start = draw(st.one_of(st.integers(-1, 20), st.integers(-2, 2**63 - 10)))   # strictly increasing seqs
        n = draw(st.integers(0, 6))
        return [[start + i + 1, draw(pseudonym), draw(known), draw(st.sampled_from(EVENTS)), time.time() - i]
                for i in range(n)]

    shapes = {
        "id": ident,
        "item": st.one_of(known, ident),
        "items": item_list,
        "k": st.one_of(st.integers(-2, const.MAX_K + 2), ints(), floats(), st.booleans()),
        "bool": st.booleans(),
        "filters": maps("filters", {"category": st.one_of(attrs, st.lists(attrs, max_size=4), ident,
                                                          _sized(t.attributes or ["1"], [const.MAX_FILTER_VALUES + 1])),
                                    "exclude": item_list}),
        "ts": ts,
        "event": st.one_of(st.sampled_from(EVENTS), st.sampled_from(EVENTS),
                           st.sampled_from(("", "VIEW", "click", "purchase "))),
        "event_id": st.one_of(st.text(max_size=const.MAX_EVENT_ID_CHARS + 2),
                              st.sampled_from(["e-1", "x" * const.MAX_EVENT_ID_CHARS])),
        "event_maps": st.one_of(st.lists(event_map, max_size=8),
                                _sized([{"user": "fuzz-u", "item": items[0], "event": "view"}],
                                       [const.MAX_BATCH_EVENTS + 1])),
        "new_items": st.one_of(st.lists(new_item, max_size=6),
                               _sized([{"id": "new-x"}], [const.MAX_ADD_ITEMS + 1])),
        "channel": st.one_of(st.sampled_from(["stable", "beta", "", "nightly"]), texts()),
        "version": st.one_of(st.sampled_from(t.versions or ["v1"]),
                             st.sampled_from(["..", ".", "../registry", "/etc", "fuzz-v1/..", ".publish-x"]), texts()),
        "file": st.one_of(st.sampled_from(t.files or ["manifest.json"]),
                          st.sampled_from(["../sign.key", "/etc/passwd", "encoder.onnx/../../sign.key", "", "."]),
                          texts()),
        "offset": st.one_of(st.integers(-2, 2_000_000), ints(), floats()),
        "length": st.one_of(st.integers(-2, 2 * const.MAX_CHUNK_BYTES), ints(), floats()),
        "node_id": st.one_of(st.sampled_from(t.node_ids or ["n1"]), ident),
        "seq": st.one_of(st.just(0), st.integers(-1, 50), ints()),   # ingest.after 0: a new node's first batch
        "ingest_rows": ingest_rows(),
        "pseudonym": st.one_of(pseudonym, ident),
        "token": _token_strategy(t),
    }
    return st.one_of(shapes[shape], shapes[shape], rnd) if mixed else shapes[shape]


def _token_strategy(t: Target) -> st.SearchStrategy:
    """Tokens that must all fail: random 64-hex ones, near misses of the real token (one character changed, cut,
    extended, upper-cased), the role names, and random values. The real token itself is never drawn."""
    hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
    out = [hex64, st.sampled_from(["", "shop", "ops", "peer", "x" * 513, "0" * 64]), texts(80)]
    real = t.token
    if real:
        def near(args):
            i, c, how = args
            i %= len(real)
            if how == 0:
                s = real[:i] + c + real[i + 1:]
            elif how == 1:
                s = real[:i]
            elif how == 2:
                s = real + c
            else:
                s = real.upper()
            return s if s != real else real[:-1]
        out.append(st.tuples(st.integers(0, 63), st.sampled_from("0123456789abcdefX "), st.integers(0, 3)).map(near))
    return st.one_of(*out)


def _params_wrap(m: Any) -> st.SearchStrategy:
    return st.sampled_from([[m], [m], [m], m, [m, {}], [m, None], [[m]]])


@dataclass(frozen=True)
class Case:
    """One fuzz case: the bytes sent and what must come back.

    ``expect``: ``stream`` (send, half-close, read to EOF: any valid replies), ``value`` (send plus a health ping,
    then half-close), ``reply`` (on the kept connection: one reply with msgid ``reply_id``), ``silent`` (kept
    connection, a ping after it: only the ping's reply may come). ``must_reply``: in ``value`` mode, a reply with
    ``reply_id`` must come back (a valid request, however it is encoded)."""
    kind: str
    payload: bytes
    expect: str
    method: Any = None
    reply_id: int | None = None
    must_reply: bool = False


def _valid_msgid(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= const.MAX_MSGID


def msgids() -> st.SearchStrategy:
    return st.one_of(st.integers(0, const.MAX_MSGID), st.integers(0, const.MAX_MSGID), st.integers(0, 1000),
                     st.sampled_from([-1, const.MAX_MSGID + 1, 2**64 - 1, -2**63, PING_ID]), values(3))


# -- crafted wire bytes ------------------------------------------------------------------------------------
def _uint(v: int, width: int) -> bytes:
    """``v`` >= 0 as a msgpack uint of ``width`` bits (0: the shortest form), possibly non-minimal."""
    if width == 0:
        return msgpack.packb(v)
    return {8: b"\xcc" + struct.pack(">B", v & 0xFF), 16: b"\xcd" + struct.pack(">H", v & 0xFFFF),
            32: b"\xce" + struct.pack(">I", v & 0xFFFFFFFF), 64: b"\xcf" + struct.pack(">Q", v & (2**64 - 1))}[width]


def _sint(v: int, width: int) -> bytes:
    """``v`` as a msgpack int (signed) of ``width`` bits; it must fit."""
    head, fmt = {8: (b"\xd0", ">b"), 16: (b"\xd1", ">h"), 32: (b"\xd2", ">i"), 64: (b"\xd3", ">q")}[width]
    return head + struct.pack(fmt, v)


def _str(raw: bytes, width: int) -> bytes:
    n = len(raw)
    if width == 0 and n < 32:
        return bytes([0xA0 | n]) + raw
    return {0: b"\xdb" + struct.pack(">I", n), 8: b"\xd9" + struct.pack(">B", n & 0xFF),
            16: b"\xda" + struct.pack(">H", n), 32: b"\xdb" + struct.pack(">I", n)}[width] + raw


def _arr(n: int, width: int) -> bytes:
    if width == 0 and n < 16:
        return bytes([0x90 | n])
    return (b"\xdc" + struct.pack(">H", n)) if width == 16 else (b"\xdd" + struct.pack(">I", n))


def _map(n: int, width: int) -> bytes:
    if width == 0 and n < 16:
        return bytes([0x80 | n])
    return (b"\xde" + struct.pack(">H", n)) if width == 16 else (b"\xdf" + struct.pack(">I", n))


HEADERS = [b"\xdc", b"\xdd", b"\xde", b"\xdf", b"\xd9", b"\xda", b"\xdb", b"\xc4", b"\xc5", b"\xc6", b"\xc7",
           b"\xc8", b"\xc9"]
HEADER_LEN_BYTES = {0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC4: 1, 0xC5: 2, 0xC6: 4,
                    0xC7: 1, 0xC8: 2, 0xC9: 4}


def crafted_strategy(t: Target) -> st.SearchStrategy:
    """Hand-encoded frames the ``values`` strategy cannot make (see the module docstring)."""
    methods = t.methods or ["health"]
    method = st.sampled_from(methods)
    widths = st.sampled_from([0, 8, 16, 32, 64])

    def envelope(msgid: int, name: bytes, params: bytes, w: tuple = (0, 0, 0, 0)) -> bytes:
        return _arr(4, w[0] and 16) + _uint(0, w[1] and 8) + _uint(msgid, w[2]) + _str(name, w[3]) + params

    @st.composite
    def noncanonical(draw):   # a valid request, encoded the long way: it must be answered
        mid = draw(st.integers(0, const.MAX_MSGID))
        m = draw(method)
        w = (draw(st.sampled_from([0, 16, 32])), draw(st.sampled_from([0, 8])),
             draw(widths.filter(lambda x: x == 0 or mid < 2 ** x)), draw(st.sampled_from([0, 8, 16, 32])))
        arr = _arr(4, w[0]) + (_uint(0, w[1]) if w[1] else b"\x00")
        signed = draw(st.sampled_from([0, 0, 8, 16, 32, 64]))   # a positive msgid as a signed int: still valid
        enc = _sint(mid, signed) if signed and mid < 2 ** (signed - 1) else _uint(mid, w[2])
        body = arr + enc + _str(m.encode(), w[3]) + _arr(1, draw(st.sampled_from([0, 16, 32]))) \
            + _map(0, draw(st.sampled_from([0, 16, 32])))
        return Case("crafted", body, "value", m, mid, must_reply=True)

    @st.composite
    def dup_keys(draw):       # duplicate keys: valid MessagePack (the last one wins); must be answered
        mid = draw(st.integers(0, const.MAX_MSGID))
        m = draw(method)
        names = list(METHOD_PARAMS.get(m, {})) or ["k"]
        k = draw(st.sampled_from(names)).encode()
        vals = draw(st.lists(values(3), min_size=2, max_size=3))
        body = _arr(4, 0) + b"\x00" + _uint(mid, 0) + _str(m.encode(), 0) + _arr(1, 0) + _map(len(vals), 0) \
            + b"".join(_str(k, 0) + pack(v) for v in vals)
        return Case("crafted", body, "value", m, mid, must_reply=True)

    @st.composite
    def deep(draw):
        depth = draw(st.sampled_from([64, 500, 1000, 1023, 1024, 1025, 5000, 100_000]))
        opener = draw(st.sampled_from([b"\x91", b"\x81\xc0", b"\xdc\x00\x01"]))
        inner = opener * depth + b"\xc0"
        if draw(st.booleans()):   # as the params of a request: the depth reaches the dispatcher
            inner = envelope(7, draw(method).encode(), b"\x91" + inner)
        return Case("crafted", inner, "stream")

    @st.composite
    def declared(draw):      # a length far beyond the bytes that follow
        h = draw(st.sampled_from(HEADERS))
        nbytes = HEADER_LEN_BYTES[h[0]]
        n = draw(st.sampled_from([1, 2**8 - 1, 2**16 - 1, 2**20, 2**20 + 1, 2**31, 2**32 - 1]))
        n &= (1 << (8 * nbytes)) - 1
        tail = draw(st.binary(max_size=64))
        head = h + n.to_bytes(nbytes, "big") + (b"\x05" if h[0] in (0xC7, 0xC8, 0xC9) else b"")
        if draw(st.booleans()):
            head = envelope(9, draw(method).encode(), b"\x91" + head)
        return Case("crafted", head + tail, "stream")

    @st.composite
    def oversize(draw):      # frames over the limit, sent whole or in part
        extra = draw(st.sampled_from([1, 100, 70_000]))
        n = const.MAX_FRAME_BYTES + extra
        sent = draw(st.sampled_from([n, 4096, 0]))
        blob = b"\xc6" + struct.pack(">I", n) + b"\x00" * sent
        if draw(st.booleans()):
            blob = envelope(11, b"track", b"\x91\x81" + _str(b"user", 0) + blob)
        return Case("crafted", blob, "stream")

    @st.composite
    def bad_utf8(draw):
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"he\x80llo", b"\xf4\x90\x80\x80"]))
        where = draw(st.sampled_from(["method", "key", "value"]))
        m = draw(method).encode()
        if where == "method":
            body = envelope(3, bad, b"\x90")
        elif where == "key":
            body = envelope(3, m, b"\x91\x81" + _str(bad, 0) + b"\xc0")
        else:
            body = envelope(3, m, b"\x91\x81" + _str(b"user", 0) + _str(bad, 0))
        return Case("crafted", body, "stream")

    @st.composite
    def odd_keys(draw):      # array / map / ext / float keys inside the params map
        key = draw(st.sampled_from([b"\x91\x01", b"\x80", b"\x81\x01\x02", b"\xd4\x01\x00", b"\xcb" + b"\x7f\xf8" +
                                    b"\x00" * 6, b"\xc0", b"\xc3", b"\xc4\x01x"]))
        body = envelope(5, draw(method).encode(), b"\x91\x81" + key + b"\x01")
        return Case("crafted", body, "stream")

    @st.composite
    def reserved(draw):
        at = draw(st.sampled_from(["alone", "params", "kind"]))
        if at == "alone":
            return Case("crafted", b"\xc1" + draw(st.binary(max_size=8)), "stream")
        if at == "kind":
            return Case("crafted", b"\x94\xc1\x01\xa6health\x90", "stream")
        return Case("crafted", envelope(5, draw(method).encode(), b"\x91\x81\xa1k\xc1"), "stream")

    @st.composite
    def timestamps(draw):   # ext -1: the unpacker decodes 4, 8 and 12 bytes; other lengths / nanoseconds fail
        data = draw(st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=8, max_size=8),
                              st.binary(min_size=12, max_size=12), st.binary(max_size=16)))
        code = draw(st.sampled_from([-1, -1, -1, -2, -128]))   # negative ext types are reserved by the spec
        ext = b"\xc7" + bytes([len(data), code & 0xFF]) + data
        return Case("crafted", envelope(5, draw(method).encode(), b"\x91\x81" + _str(b"ts", 0) + ext), "stream")

    @st.composite
    def truncated(draw):
        m = draw(method)
        frame = pack([0, 12, m, [{"k": 3, "user": "u", "history": ["1", "2"]}]])
        cut = draw(st.integers(1, len(frame) - 1))
        return Case("crafted", frame[:cut], "stream")

    @st.composite
    def glued(draw):        # several valid frames with garbage between them
        parts = []
        for i in range(draw(st.integers(1, 4))):
            parts.append(pack([0, 100 + i, draw(method), []]))
            if draw(st.booleans()):
                parts.append(draw(st.binary(max_size=12)))
        return Case("crafted", b"".join(parts), "stream")

    return st.one_of(noncanonical(), dup_keys(), deep(), declared(), oversize(), bad_utf8(), odd_keys(),
                     reserved(), timestamps(), truncated(), glued())


def frame_strategy(target: Target | str, kind: str | None = None) -> st.SearchStrategy:
    """Cases (``Case``) of ``kind`` (one of KINDS; None: any) for a target. ``target`` may be a service name
    ("node", "registry"): its methods then come from the code (``code_methods``) and plausible values are generic."""
    t = target if isinstance(target, Target) else Target(target, target, methods=code_methods(target))
    if kind is None:
        return st.one_of(*(frame_strategy(t, k) for k in KINDS))
    methods = t.methods or code_methods(t.service)
    method = st.sampled_from(methods)
    rnd = values()

    if kind == "raw":
        return st.one_of(st.binary(max_size=64), st.binary(max_size=2048)).map(lambda b: Case("raw", b, "stream"))
    if kind == "value":
        rpc_like = st.tuples(st.sampled_from([0, 1, 2, 3, -1, 0.0, True, None]),
                             st.lists(st.one_of(rnd, method, msgids()), max_size=4)).map(lambda x: [x[0], *x[1]])
        return st.tuples(st.one_of(rnd, rpc_like), st.booleans()).map(
            lambda x: Case("value", pack(x[0], single_float=x[1]), "value"))
    if kind == "crafted":
        return crafted_strategy(t)
    if kind == "request":
        return st.tuples(msgids(), method, st.one_of(rnd, rnd.flatmap(_params_wrap))).map(
            lambda x: Case("request", pack([0, x[0], x[1], x[2]]), "reply", x[1],
                           x[0] if _valid_msgid(x[0]) else None))
    named = {m: named_params(m, t) for m in methods}
    if kind == "named":
        return st.tuples(st.integers(0, const.MAX_MSGID), method.flatmap(lambda m: st.tuples(st.just(m), named[m]))
                         ).map(lambda x: Case("named", pack([0, x[0], x[1][0], x[1][1]]), "reply", x[1][0], x[0]))
    if kind == "notify":
        name = st.one_of(method, method, texts(), rnd)
        return name.flatmap(lambda m: st.tuples(st.just(m), named[m] if isinstance(m, str) and m in named else rnd)
                            ).map(lambda x: Case("notify", pack([2, x[0], x[1]]), "silent",
                                                 x[0] if isinstance(x[0], str) else "<non-str>"))
    if kind == "unknown":
        variants = method.flatmap(lambda m: st.sampled_from([m.upper(), m + " ", " " + m, m + "\x00", m[:-1],
                                                             m + "s", "_" + m, m.encode().decode() * 2]))
        name = st.one_of(texts(64).filter(lambda s: s not in methods), variants.filter(lambda s: s not in methods),
                         st.one_of(ints(), st.binary(max_size=8), st.none(), st.booleans(), floats(),
                                   st.lists(texts(), max_size=2)))
        return st.tuples(st.integers(0, const.MAX_MSGID), name, st.one_of(st.just([]), rnd.flatmap(_params_wrap))
                         ).map(lambda x: Case("unknown", pack([0, x[0], x[1], x[2]]), "reply",
                                              "<unknown>", x[0]))
    raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")


def named_params(method: str, t: Target) -> st.SearchStrategy:
    """``params`` for ``method`` keyed by its real parameter names (all of them, or a random subset), plausible or
    random values, sometimes random extra keys; wrapped as the API expects (``[map]``) or otherwise."""
    table = METHOD_PARAMS.get(method, {})
    vals = {name: param_strategy(shape, t) for name, shape in table.items()}
    plausible = {name: param_strategy(shape, t, mixed=False) for name, shape in table.items()}
    full = st.fixed_dictionaries(vals)
    some = st.fixed_dictionaries({}, optional=vals)
    extra = st.dictionaries(keys(), values(6), max_size=2)
    base = st.one_of(full, some, st.tuples(st.one_of(full, some), extra).map(lambda x: {**x[0], **x[1]}))
    # a third: plausible values only, wrapped as the API expects, so that handlers run past their checks
    good = st.one_of(st.fixed_dictionaries(plausible), st.fixed_dictionaries({}, optional=plausible)).map(
        lambda m: [m])
    return st.one_of(good, base.flatmap(_params_wrap))


# ------------------------------------------------------------------------------------------- the runner
class TargetDown(BaseException):
    """A target crashed: its fuzzing stops (BaseException: hypothesis lets it through at once)."""


class TimeUp(BaseException):
    """``max_seconds`` reached: the whole run stops."""


class Conn:
    """A raw client socket with a reply decoder and a deadline-bounded reader."""

    def __init__(self, port: int, timeout: float):
        self.sock = _connect(port, timeout)
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=64 << 20)
        self.msgs: list[Any] = []
        self.eof = False
        self.reset = False
        self.undecodable: str | None = None
        self.cases = 0

    def send(self, data: bytes, deadline: float) -> str:
        """"ok", "closed" (reset / broken pipe) or "timeout" (the daemon stopped reading and did not close)."""
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            self.sock.sendall(data)
            return "ok"
        except socket.timeout:
            return "timeout"
        except OSError:
            self.reset = True
            return "closed"

    def half_close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def read_until(self, done, deadline: float) -> str:
        """Read replies into ``msgs`` until ``done(msgs)``: "done", "closed" (EOF / reset) or "timeout"."""
        while True:
            if done(self.msgs):
                return "done"
            if self.eof or self.reset:
                return "closed"
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                return "timeout"
            except OSError:
                self.reset = True
                continue
            if not data:
                self.eof = True
                continue
            try:
                self.unpacker.feed(data)
                self.msgs.extend(self.unpacker)
            except Exception as exc:   # the daemon sent bytes that are not MessagePack
                self.undecodable = f"{type(exc).__name__}: {exc}"
                self.eof = True

    def take(self) -> list[Any]:
        out, self.msgs = self.msgs, []
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def _connect(port: int, timeout: float) -> socket.socket:
    for attempt in range(40):   # EADDRNOTAVAIL: this client ran out of ephemeral ports (TIME_WAIT); wait
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError as exc:
            if exc.errno != 99 or attempt == 39:
                raise
            time.sleep(0.25)
    raise AssertionError("unreachable")


# what an unexpected reply is: category -> meaning (the report counts each)
CATEGORIES = {
    "protocol": "not a well-formed response (shape, msgid, error object, error code, error with a result)",
    "internal_error": "InternalError: a handler raised something that is not an EdgeRuntimeError (a bug)",
    "stray_reply": "a reply to a notification, or to a msgid nobody sent",
    "no_reply": "a valid request that got no reply, or a fresh connection closed without one",
    "auth_bypass": "a method other than auth / health succeeded, or state changed, without authentication",
    "undecodable": "reply bytes that are not MessagePack",
}


def reply_problem(msg: Any, t: Target, method: Any) -> tuple[str, str] | None:
    """What is wrong with one message the daemon sent: (category, detail), or None."""
    if not (isinstance(msg, list) and len(msg) == 4 and msg[0] == 1):
        return "protocol", f"not a response [1, msgid, error, result]: {_short(msg)}"
    _, mid, err, res = msg
    if mid is not None and not _valid_msgid(mid):
        return "protocol", f"response msgid {mid!r} is not a uint32 or nil"
    if err is None:
        if t.unauthenticated and method not in OPEN_METHODS:
            return "auth_bypass", f"{method!r} succeeded on a connection that never authenticated"
        return None
    if not (isinstance(err, dict) and {"code", "name", "message"} <= set(err)
            and isinstance(err["code"], int) and isinstance(err["name"], str) and isinstance(err["message"], str)):
        return "protocol", f"malformed error object {_short(err)}"
    if err["code"] not in CODES:
        return "protocol", f"unknown error code {err['code']} ({err['name']})"
    if err["code"] == errors.INTERNAL_ERROR and err["name"] == "InternalError":
        return "internal_error", f"internal error: {err['message'][:200]}"
    if res is not None:
        return "protocol", f"error reply carries a result {_short(res)}"
    return None


def _short(v: Any, n: int = 160) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n] + "..."


def _code(msg: Any) -> int | None:
    if isinstance(msg, list) and len(msg) == 4 and isinstance(msg[2], dict):
        c = msg[2].get("code")
        return c if isinstance(c, int) else None
    return None


@dataclass
class TargetStats:
    cases: int = 0
    kinds: collections.Counter = field(default_factory=collections.Counter)
    methods: collections.Counter = field(default_factory=collections.Counter)
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    codes: collections.Counter = field(default_factory=collections.Counter)
    replies: int = 0
    successes: int = 0
    method_successes: collections.Counter = field(default_factory=collections.Counter)
    health_checks: int = 0
    crashes: int = 0
    hangs: int = 0
    unexpected: int = 0
    categories: collections.Counter = field(default_factory=collections.Counter)
    down: bool = False

    def as_dict(self) -> dict:
        return {"cases": self.cases, "kinds": dict(self.kinds), "methods": dict(sorted(self.methods.items())),
                "outcomes": dict(self.outcomes), "error_codes": {str(k): v for k, v in sorted(self.codes.items())},
                "replies": self.replies, "successes": self.successes,
                "method_successes": dict(sorted(self.method_successes.items())), "health_checks": self.health_checks,
                "crashes": self.crashes, "hangs": self.hangs, "unexpected": self.unexpected,
                "unexpected_by_category": dict(self.categories)}


class Runner:
    """Runs cases against one target: a kept connection for requests and notifications, fresh ones for the
    stream cases; the health check; the records of what went wrong."""

    def __init__(self, t: Target, case_timeout: float, check_every: int, failures: list, max_records: int):
        self.t, self.timeout, self.check_every = t, case_timeout, max(1, check_every)
        self.stats = TargetStats()
        self.failures, self.max_records = failures, max_records
        self.conn: Conn | None = None
        self.recent: collections.deque = collections.deque(maxlen=6)
        self.ping = pack([0, PING_ID, "health", []])

    # -- records -------------------------------------------------------------------------------------------
    def record(self, what: str, case: Case | None, detail: str, category: str | None = None) -> None:
        """Count a crash, a hang or an unexpected reply (``category``: a key of CATEGORIES) and keep the first few
        records of each with the frame that reproduces it."""
        if what == "crash":
            self.stats.crashes += 1
        elif what == "hang":
            self.stats.hangs += 1
        else:
            self.stats.unexpected += 1
            self.stats.categories[category or "protocol"] += 1
        same = sum(1 for f in self.failures if f["target"] == self.t.name and f["what"] == what
                   and f["detail"][:60] == detail[:60])
        if same >= 3 or len(self.failures) >= self.max_records:
            return   # counted; the record keeps the first few of each
        rec = {"target": self.t.name, "what": what, "detail": detail}
        if category:
            rec["category"] = category
        if case is not None:
            rec.update(kind=case.kind, method=case.method if isinstance(case.method, str) else repr(case.method),
                       frame_hex=case.payload[:4096].hex(), frame_bytes=len(case.payload))
        if what == "crash":
            rec["recent_frames_hex"] = [c.payload[:1024].hex() for c in self.recent]
            rec["log_tail"] = _tail(self.t.log_path)
        self.failures.append(rec)

    def _check_msgs(self, case: Case, msgs: list, expected_ids: set | None = None) -> None:
        """Validate what came back for ``case``; ``expected_ids``: the only msgids a reply may carry (None: any, for
        the stream cases, whose frames may hold requests of their own)."""
        methods = {case.reply_id: case.method} if case.expect == "reply" else embedded_methods(case.payload)
        methods[PING_ID] = "health"
        for msg in msgs:
            self.stats.replies += 1
            code = _code(msg)
            if code is not None:
                self.stats.codes[code] += 1
            mid = msg[1] if isinstance(msg, list) and len(msg) > 1 else None
            try:
                method = methods.get(mid, "<unknown>")
            except TypeError:
                method = "<unknown>"
            if code is None and isinstance(msg, list) and len(msg) == 4 and msg[2] is None and mid != PING_ID:
                self.stats.successes += 1
                self.stats.method_successes[method if isinstance(method, str) else "<non-str>"] += 1
            problem = reply_problem(msg, self.t, method)
            if problem is None and expected_ids is not None and mid not in expected_ids \
                    and not (mid is None and code in CLOSING_CODES):
                problem = "stray_reply", f"a reply nobody asked for (msgid {mid!r}): {_short(msg)}"
            if problem:
                self.record("unexpected", case, problem[1], problem[0])

    # -- cases ---------------------------------------------------------------------------------------------
    def run(self, case: Case) -> None:
        self.recent.append(case)
        self.stats.cases += 1
        self.stats.kinds[case.kind] += 1
        if case.kind in ("request", "named", "notify") and isinstance(case.method, str):
            self.stats.methods[case.method] += 1
        outcome = {"stream": self._stream, "value": self._value, "reply": self._reply,
                   "silent": self._silent}[case.expect](case)
        self.stats.outcomes[f"{case.kind}:{outcome}"] += 1
        if outcome == "hang":
            self.record("hang", case, f"{case.kind}: no reply and no close within {self.timeout:g} s")
        if self.stats.cases % self.check_every == 0:
            self.check_alive(case)

    def _fresh(self) -> Conn | None:
        try:
            return Conn(self.t.port, self.timeout)
        except OSError as exc:
            self.check_alive(None, f"cannot connect: {exc}")
            return None

    def _stream(self, case: Case) -> str:
        c = self._fresh()
        if c is None:
            return "refused"
        try:
            deadline = time.monotonic() + self.timeout
            sent = c.send(case.payload, deadline)
            if sent == "timeout":
                return "hang"
            c.half_close()
            got = c.read_until(lambda m: False, deadline)
            self._check_msgs(case, c.take())
            if c.undecodable:
                self.record("unexpected", case, f"reply bytes are not MessagePack: {c.undecodable}", "undecodable")
            return "hang" if got == "timeout" else "closed"
        finally:
            c.close()

    def _value(self, case: Case) -> str:
        c = self._fresh()
        if c is None:
            return "refused"
        try:
            deadline = time.monotonic() + self.timeout
            if c.send(case.payload + self.ping, deadline) == "timeout":
                return "hang"
            got = c.read_until(lambda m: any(_is_reply(x, PING_ID) for x in m), deadline)
            if got == "timeout":
                return "hang"
            c.half_close()
            end = c.read_until(lambda m: False, time.monotonic() + self.timeout)
            msgs = c.take()
            if case.must_reply and got == "done" and not any(_is_reply(x, case.reply_id) for x in msgs):
                self.record("unexpected", case, "a valid request (non-canonical encoding or duplicate keys) got no "
                                                "reply", "no_reply")
            self._check_msgs(case, msgs)
            if c.undecodable:
                self.record("unexpected", case, f"reply bytes are not MessagePack: {c.undecodable}", "undecodable")
            if end == "timeout":
                return "hang"
            return "replied" if got == "done" else "closed"
        finally:
            c.close()

    def _kept(self) -> Conn | None:
        if self.conn is not None and (self.conn.eof or self.conn.reset):
            self.conn.close()
            self.conn = None
        if self.conn is None:
            self.conn = self._fresh()
        return self.conn

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _exchange(self, case: Case, payload: bytes, want: Any) -> tuple[str, Any, list, bool]:
        """Send ``payload`` on the kept connection and read until the reply to msgid ``want`` (or a close or the
        deadline): (outcome so far, the connection, messages read, whether it was the connection's first case);
        ``want``'s msgid set is checked against what came back."""
        c = self._kept()
        if c is None:
            return "refused", None, [], False
        fresh = c.cases == 0
        c.cases += 1
        deadline = time.monotonic() + self.timeout
        if c.send(payload, deadline) == "timeout":
            self._drop()
            return "hang", c, [], fresh
        got = c.read_until(lambda m: any(_is_reply(x, want) for x in m), deadline)
        msgs = c.take()
        self._check_msgs(case, msgs, {want})
        if got == "timeout":
            self._drop()
            return "hang", c, msgs, fresh
        return got, c, msgs, fresh

    def _reply(self, case: Case) -> str:
        got, c, msgs, fresh = self._exchange(case, case.payload, case.reply_id)
        if c is not None and c.undecodable:
            self.record("unexpected", case, f"reply bytes are not MessagePack: {c.undecodable}", "undecodable")
        if got in ("refused", "hang"):
            return got
        if got == "closed":
            if fresh and not msgs and not self.t.unauthenticated:
                self.record("unexpected", case, "a well-formed request on a fresh connection: closed without a "
                                                "reply", "no_reply")
            self._drop()
            return "closed"
        if any(_code(x) in CLOSING_CODES and isinstance(x, list) and x[1] is None for x in msgs):
            self._drop()
        return "replied"

    def _silent(self, case: Case) -> str:
        got, _c, _msgs, fresh = self._exchange(case, case.payload + self.ping, PING_ID)
        if got in ("refused", "hang"):
            return got
        if got == "closed":
            if fresh and not self.t.unauthenticated:
                self.record("unexpected", case, "a notification on a fresh connection closed it", "no_reply")
            self._drop()
            return "closed"
        return "replied"

    # -- liveness ------------------------------------------------------------------------------------------
    def health(self) -> dict | None:
        """``health`` on a fresh connection, or None."""
        try:
            c = Conn(self.t.port, self.timeout)
        except OSError:
            return None
        try:
            deadline = time.monotonic() + self.timeout
            if c.send(pack([0, 1, "health", []]), deadline) != "ok":
                return None
            if c.read_until(lambda m: any(_is_reply(x, 1) for x in m), deadline) != "done":
                return None
            msg = next(x for x in c.msgs if _is_reply(x, 1))
            return msg[3] if msg[2] is None and isinstance(msg[3], dict) else None
        finally:
            c.close()

    def alive(self) -> tuple[bool, str]:
        if self.t.proc is not None and self.t.proc.poll() is not None:
            return False, f"the process exited with status {self.t.proc.returncode}"
        for attempt in range(3):
            h = self.health()
            if h is not None and "status" in h:
                return True, ""
            time.sleep(0.5 * (attempt + 1))
            if self.t.proc is not None and self.t.proc.poll() is not None:
                return False, f"the process exited with status {self.t.proc.returncode}"
        return False, "alive but not answering health on a fresh connection"

    def check_alive(self, case: Case | None, why: str = "") -> None:
        self.stats.health_checks += 1
        ok, detail = self.alive()
        if not ok:
            self.record("crash", case, detail + (f" ({why})" if why else ""))
            self.stats.down = True
            raise TargetDown(detail)

    def close(self) -> None:
        self._drop()


def embedded_methods(payload: bytes) -> dict:
    """msgid -> method of the requests a payload holds (as far as it decodes): whose replies a stream case may get."""
    out: dict = {}
    unp = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(payload) + 16)
    try:
        unp.feed(payload)
        for msg in unp:
            if isinstance(msg, list) and len(msg) == 4 and msg[0] == 0 and _valid_msgid(msg[1]):
                out[msg[1]] = msg[2] if isinstance(msg[2], str) else "<non-str>"
    except Exception:
        pass
    return out


def _is_reply(msg: Any, msgid: Any) -> bool:
    return isinstance(msg, list) and len(msg) == 4 and msg[0] == 1 and msg[1] == msgid


def _tail(path: Path | None, n: int = 3000) -> str:
    if path is None or not path.is_file():
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]


def log_errors(path: Path | None, limit: int = 5) -> tuple[int, list[str]]:
    """Tracebacks and handler failures a daemon logged (notifications have no reply: only the log shows a handler
    that raised for one): (count, the first few)."""
    if path is None or not path.is_file():
        return 0, []
    pattern = re.compile(r"Traceback \(most recent call last\)|handler .{0,80} failed|Fatal error|"
                         r"Exception in callback|Task exception")
    hits = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if pattern.search(line)]
    return len(hits), [line[:1500] for line in hits[:limit]]


def _case_runner(r: Runner, deadline: float):
    def one(case: Case) -> None:
        if time.monotonic() > deadline:
            raise TimeUp()
        r.run(case)
    return one


def split_cases(total: int, targets: list[Target]) -> dict[str, int]:
    weights = {t.name: TARGET_WEIGHTS.get(t.name, 1) for t in targets}
    s = sum(weights.values())
    out = {n: total * w // s for n, w in weights.items()}
    for n in list(out)[: total - sum(out.values())]:
        out[n] += 1
    return out


def split_kinds(n: int) -> dict[str, int]:
    out = {k: int(n * KIND_SHARES[k]) for k in KINDS}
    rest = n - sum(out.values())
    for k in sorted(KINDS, key=lambda k: -KIND_SHARES[k])[:rest]:
        out[k] += 1
    return out


def run_fuzz(targets: list[Target], cases: int | dict[str, int], seed: int = 0, max_seconds: float = 3600.0,
             case_timeout: float = 5.0, check_every: int = 1, max_records: int = 60, printer=print) -> dict:
    """Fuzz ``targets`` with ``cases`` cases in all (split by TARGET_WEIGHTS) or per target name; returns the
    report (see the module docstring). Never raises for what it finds."""
    per_target = split_cases(cases, targets) if isinstance(cases, int) else {t.name: int(cases.get(t.name, 0))
                                                                               for t in targets}
    failures: list[dict] = []
    fuzzer_errors: list[str] = []
    runners = {t.name: Runner(t, case_timeout, check_every, failures, max_records) for t in targets}
    plan = []   # [target, kind, examples left]: each round runs a chunk of each, kinds across targets in turn
    shares = {t.name: split_kinds(per_target.get(t.name, 0)) for t in targets}
    for kind in KINDS:
        for t in targets:
            if shares[t.name][kind]:
                plan.append([t, kind, shares[t.name][kind]])
    t0 = time.monotonic()
    deadline = t0 + max_seconds
    stopped = None
    last_print = t0
    strategies: dict[tuple[str, str], st.SearchStrategy] = {}
    rounds = 0
    while plan and stopped is None:
        rounds += 1
        for entry in list(plan):
            t, kind, left = entry
            r = runners[t.name]
            if r.stats.down:
                plan.remove(entry)
                continue
            want = min(CHUNK, left)
            before = r.stats.kinds[kind]
            strat = strategies.setdefault((t.name, kind), frame_strategy(t, kind))

            test = given(strat)(_case_runner(r, deadline))
            test = settings(max_examples=want, database=None, deadline=None, phases=[Phase.generate],
                            suppress_health_check=list(HealthCheck), derandomize=False)(test)
            test = hypothesis_seed(zlib.crc32(f"{seed}/{t.name}/{kind}/{rounds}".encode()))(test)
            try:
                test()
            except TargetDown:
                plan.remove(entry)
                continue
            except TimeUp:
                stopped = f"--max-seconds {max_seconds:g} reached"
                break
            except Exception as exc:   # a bug of this fuzzer (a strategy that cannot draw), not of the daemon
                fuzzer_errors.append(f"{t.name}/{kind}: {type(exc).__name__}: {str(exc)[:500]}")
            done = r.stats.kinds[kind] - before
            entry[2] = left - max(done, 1)
            if entry[2] <= 0:
                plan.remove(entry)
            if time.monotonic() - last_print > 10:
                last_print = time.monotonic()
                n = sum(x.stats.cases for x in runners.values())
                printer(f"  {n} cases, {time.monotonic() - t0:.0f} s; crashes "
                        f"{sum(x.stats.crashes for x in runners.values())}, hangs "
                        f"{sum(x.stats.hangs for x in runners.values())}, unexpected "
                        f"{sum(x.stats.unexpected for x in runners.values())}")
    seconds = time.monotonic() - t0
    out_targets = {}
    for t in targets:
        r = runners[t.name]
        r.close()
        ok, why = (False, "crashed during the run") if r.stats.down else r.alive()
        h = r.health() if ok else None
        if t.unauthenticated and h is not None:   # nothing an unauthenticated connection sent may have been applied
            ev = h.get("events") if isinstance(h.get("events"), dict) else {}
            if h.get("sessions", 0) or ev.get("committed", 0) or h.get("added_items", 0):
                r.record("unexpected", None, f"state changed on a target nobody authenticated to: sessions "
                                             f"{h.get('sessions')}, committed {ev.get('committed')}, added "
                                             f"{h.get('added_items')}", "auth_bypass")
        nlog, samples = log_errors(t.log_path)
        d = r.stats.as_dict()
        d.update(service=t.service, port=t.port, requested=per_target.get(t.name, 0), answering=ok,
                 answering_detail=why, alive=t.proc is None or t.proc.poll() is None,
                 methods_served=t.methods, method_source=t.method_source, methods_untabled=check_table(t.methods),
                 methods_not_hit=sorted(set(t.methods) - set(r.stats.methods)),
                 log=str(t.log_path) if t.log_path else None, log_errors=nlog, log_error_samples=samples,
                 health_after=h)
        out_targets[t.name] = d
    report = {
        "cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "hypothesis": hypothesis.__version__, "msgpack": ".".join(map(str, msgpack.version)), "seed": seed,
        "cases_requested": sum(per_target.values()),
        "cases": sum(d["cases"] for d in out_targets.values()),
        "crashes": sum(d["crashes"] for d in out_targets.values()),
        "hangs": sum(d["hangs"] for d in out_targets.values()),
        "unexpected": sum(d["unexpected"] for d in out_targets.values()),
        "unexpected_by_category": dict(sum((collections.Counter(d["unexpected_by_category"])
                                            for d in out_targets.values()), collections.Counter())),
        "log_errors": sum(d["log_errors"] for d in out_targets.values()),
        "all_answering": all(d["answering"] for d in out_targets.values()),
        "seconds": round(seconds, 2), "stopped_early": stopped, "case_timeout_s": case_timeout,
        "check_every": check_every, "targets": out_targets, "failures": failures, "fuzzer_errors": fuzzer_errors,
    }
    return report


def print_report(rep: dict, printer=print) -> None:
    printer(f"CPU: {rep['cpu']} ({rep['cpus']} CPUs), Python {rep['python']}, hypothesis {rep['hypothesis']}, "
            f"seed {rep['seed']}")
    head = f"{'target':<10} {'cases':>6} " + " ".join(f"{k:>7}" for k in KINDS) + \
        f" {'replies':>7} {'crash':>5} {'hang':>5} {'unexp':>5} {'logerr':>6} answering"
    printer(head)
    for name, d in rep["targets"].items():
        printer(f"{name:<10} {d['cases']:>6} " + " ".join(f"{d['kinds'].get(k, 0):>7}" for k in KINDS) +
                f" {d['replies']:>7} {d['crashes']:>5} {d['hangs']:>5} {d['unexpected']:>5} {d['log_errors']:>6} "
                f"{'yes' if d['answering'] else 'NO: ' + d['answering_detail']}")
        printer(f"{'':<10} methods ({d['method_source']}, {len(d['methods_served'])}): " +
                ", ".join(f"{m} {n}" for m, n in d["methods"].items() if m in d["methods_served"]))
        if d["methods_untabled"]:
            printer(f"{'':<10} NOT IN METHOD_PARAMS (random params only): {d['methods_untabled']}")
        printer(f"{'':<10} successes by method: {d['method_successes']}")
        printer(f"{'':<10} outcomes {d['outcomes']}; error codes {d['error_codes']}")
    for e in rep["fuzzer_errors"][:10]:
        printer(f"  FUZZER ERROR (not the daemon's): {e}")
    for f in rep["failures"][:20]:
        printer(f"  {f['what'].upper()} {f['target']} {f.get('kind', '')} {f.get('method', '')} "
                f"[{f.get('category', '')}]: {f['detail']}"
                + (f"\n    frame {f['frame_hex'][:240]}" if f.get("frame_hex") else ""))
    printer(f"{rep['cases']} cases in {rep['seconds']:.1f} s: {rep['crashes']} crashes, {rep['hangs']} hangs, "
            f"{rep['unexpected']} unexpected replies, {rep['log_errors']} logged errors; every target answering: "
            f"{'yes' if rep['all_answering'] else 'NO'}"
            + (f"; unexpected by category {rep['unexpected_by_category']}" if rep["unexpected"] else "")
            + (f"; STOPPED EARLY: {rep['stopped_early']}"
                                                           if rep["stopped_early"] else ""))


def replay(port: int, frame_hex: str, timeout: float = 5.0) -> list:
    """Send one recorded frame (``failures[i].frame_hex``) on a fresh connection, half-close, and return what came
    back: the reproducer of a failure."""
    c = Conn(port, timeout)
    try:
        deadline = time.monotonic() + timeout
        c.send(bytes.fromhex(frame_hex), deadline)
        c.half_close()
        c.read_until(lambda m: False, deadline)
        return c.take()
    finally:
        c.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, required=True, help="fuzz cases in all, split across the targets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--bundle", default=None, help=f"bundle to serve (default: {DEFAULT_BUNDLE}, trained if absent)")
    ap.add_argument("--max-seconds", type=float, default=3600.0, help="stop fuzzing after this long")
    ap.add_argument("--case-timeout", type=float, default=5.0, help="s a case may take before it is a hang")
    ap.add_argument("--check-every", type=int, default=1, help="health check after this many cases")
    ap.add_argument("--workdir", default=None, help="state, registry and logs (default: a temporary directory, "
                                                    "kept when something failed)")
    args = ap.parse_args(argv)
    bundle = Path(args.bundle) if args.bundle else ensure_bundle()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fuzz-rpc-"))
    print(f"CPU: {cpu_name()} ({os.cpu_count()} CPUs); bundle {bundle}; work {work}")
    t0 = time.monotonic()
    with started_targets(bundle, work) as targets:
        start_s = time.monotonic() - t0
        rep = run_fuzz(targets, args.cases, seed=args.seed, max_seconds=args.max_seconds,
                       case_timeout=args.case_timeout, check_every=args.check_every)
    rep["start_seconds"] = round(start_s, 2)
    rep["bundle"] = str(bundle)
    rep["workdir"] = str(work)
    print_report(rep)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rep, indent=2, default=repr))
        print(f"report: {path}")
    ok = rep["crashes"] == 0 and rep["hangs"] == 0 and rep["all_answering"]
    if ok and rep["unexpected"] == 0 and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs and state kept in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
