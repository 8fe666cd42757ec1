"""The model registry: a directory of signed bundle versions, served over MessagePack-RPC.

Layout: ``<root>/<model_version>/`` holds one bundle (``manifest.json``, ``manifest.sig`` and the files the manifest
lists). ``publish`` adds a version atomically (staged beside, then renamed); the registry daemon rescans the
directory, so a publish needs no restart. The same ``BundleStore`` serves peers: an edge node answers ``manifest`` /
``fetch`` for the versions in its own state directory, so a fleet update does not all land on the registry.

RPC methods (params: one map; ``registry`` is also announced over zeroconf as ``_edgerec-registry._tcp``):

* ``latest {channel?}`` -> ``{version, channel, published_at}`` or nil when the channel is empty.
* ``versions {}`` -> ``[{version, channel, published_at, bytes}, ...]`` oldest first.
* ``manifest {version}`` -> ``{version, manifest: bin (the exact manifest.json bytes), signature: map}``.
* ``fetch {version, file, offset, length}`` -> ``{data: bin, size: int (whole file, bytes), eof: bool}``;
  ``length`` is capped at ``MAX_CHUNK`` bytes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from . import bundle as bundle_mod
from . import signing
from .errors import BundleError, InvalidParams, MethodNotFound

log = logging.getLogger(__name__)

MAX_CHUNK = 1 << 20         # bytes per fetch reply (1 MiB): bounds the reply frame and the memory per transfer
DEFAULT_CHANNEL = "stable"
REGISTRY_PORT = 7710


def _manifest_meta(root: Path) -> dict | None:
    """Listing facts of one version directory, or None (logged) when its manifest is unreadable or malformed: a
    junk directory must not break the listing of the others."""
    try:
        with open(root / bundle_mod.MANIFEST, "rb") as f:
            m = json.loads(f.read())
        files = m["files"]
        version, channel = m.get("model_version", root.name), m.get("channel", DEFAULT_CHANNEL)
        published = m.get("published_at", 0.0) or 0.0
        if not isinstance(files, dict) or not isinstance(version, str) or not isinstance(channel, str) \
                or isinstance(published, bool) or not isinstance(published, (int, float)):
            raise TypeError("files / model_version / channel / published_at of the wrong type")
        size = 0
        for meta in files.values():
            if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or isinstance(meta["bytes"], bool):
                raise TypeError("a file entry without integer 'bytes'")
            size += meta["bytes"]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("%s: not listed (%s: %s)", root, type(exc).__name__, str(exc)[:200])
        return None
    return {"version": version, "channel": channel, "published_at": float(published), "bytes": size, "files": files}


class BundleStore:
    """Read side of a directory of signed bundle versions (the registry's, or an edge node's state directory).

    Only directories whose name equals their manifest's ``model_version`` and that hold a ``manifest.sig`` are
    listed; ``fetch`` serves only files the manifest lists (plus the manifest and signature), so a request can
    never name a path outside a bundle. ``bytes_served`` counts payload bytes sent by ``fetch``.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.bytes_served = 0
        self._cache: dict[str, tuple[float, dict]] = {}

    def _entries(self) -> dict[str, dict]:
        out = {}
        try:
            names = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except FileNotFoundError:
            return {}
        for d in names:
            try:
                if d.is_symlink():
                    continue   # a version directory must live in the store, not point elsewhere
                bundle_mod.check_version_name(d.name)
                mtime = (d / bundle_mod.MANIFEST).stat().st_mtime
            except (OSError, BundleError):
                continue
            hit = self._cache.get(d.name)
            if hit is None or hit[0] != mtime:
                meta = _manifest_meta(d)
                if meta is None or meta["version"] != d.name or not (d / signing.SIGNATURE_FILE).is_file():
                    continue
                hit = (mtime, meta)
                self._cache[d.name] = hit
            out[d.name] = hit[1]
        return out

    def versions(self, channel: str | None = None) -> list[dict]:
        """Listed versions, oldest first (by publish time, then version string)."""
        rows = [{k: v for k, v in m.items() if k != "files"} for m in self._entries().values()
                if channel is None or m["channel"] == channel]
        return sorted(rows, key=lambda r: (r["published_at"], r["version"]))

    def latest(self, channel: str | None = DEFAULT_CHANNEL) -> dict | None:
        rows = self.versions(channel)
        return rows[-1] if rows else None

    def has(self, version: str) -> bool:
        return version in self._entries()

    def _meta(self, version: Any) -> dict:
        if not isinstance(version, str) or not version:
            raise InvalidParams("'version' must be a non-empty string")
        meta = self._entries().get(version)
        if meta is None:
            raise InvalidParams(f"version {version[:80]!r} is not held here")
        return meta

    def manifest(self, version: Any) -> dict:
        self._meta(version)
        d = self.root / version
        try:
            raw = (d / bundle_mod.MANIFEST).read_bytes()
            sig = signing.parse_signature((d / signing.SIGNATURE_FILE).read_bytes())
        except (OSError, BundleError) as exc:
            raise InvalidParams(f"version {version!r} cannot be read here: {exc}") from None
        return {"version": version, "manifest": raw, "signature": sig}

    def fetch(self, version: Any, name: Any, offset: Any, length: Any) -> dict:
        meta = self._meta(version)
        if not isinstance(name, str) or name not in meta["files"]:
            raise InvalidParams(f"file {str(name)[:80]!r} is not listed in the manifest of {version!r}")
        for v, what in ((offset, "offset"), (length, "length")):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InvalidParams(f"'{what}' must be an integer >= 0")
        vdir = self.root / version
        path = vdir / bundle_mod.check_member_name(name)
        try:
            inside = vdir.resolve(strict=True) in path.resolve(strict=True).parents
        except (OSError, RuntimeError):
            inside = False
        if path.is_symlink() or not inside:
            raise InvalidParams(f"file {name!r} is a link or leaves the bundle; not served")
        length = min(length, MAX_CHUNK)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(min(offset, size))
                data = f.read(length)
        except OSError as exc:
            raise InvalidParams(f"file {name!r} of {version!r} cannot be read: {exc.strerror}") from None
        self.bytes_served += len(data)
        return {"data": data, "size": size, "eof": offset + len(data) >= size}


class StoreMethods:
    """The bundle-serving RPC methods over a BundleStore, as a mixin-able method table."""

    def __init__(self, store: BundleStore):
        self.store = store

    def table(self) -> dict[str, tuple[Callable, bool]]:
        return {"latest": (self.rpc_latest, False), "versions": (self.rpc_versions, False),
                "manifest": (self.rpc_manifest, False), "fetch": (self.rpc_fetch, False)}

    @staticmethod
    def _params(p: dict, allowed: tuple[str, ...], required: tuple[str, ...], where: str) -> None:
        unknown = sorted(repr(k)[:40] for k in set(p) - set(allowed))
        if unknown:
            raise InvalidParams(f"{where}: unknown parameter(s) {unknown}; allowed: {list(allowed)}")
        missing = [k for k in required if k not in p]
        if missing:
            raise InvalidParams(f"{where}: missing parameter(s) {missing}")

    def rpc_latest(self, p: dict) -> dict | None:
        self._params(p, ("channel",), (), "latest")
        ch = p.get("channel", DEFAULT_CHANNEL)
        if not isinstance(ch, str):
            raise InvalidParams("'channel' must be a string")
        return self.store.latest(ch)

    def rpc_versions(self, p: dict) -> list[dict]:
        self._params(p, ("channel",), (), "versions")
        return self.store.versions(p.get("channel"))

    def rpc_manifest(self, p: dict) -> dict:
        self._params(p, ("version",), ("version",), "manifest")
        return self.store.manifest(p["version"])

    def rpc_fetch(self, p: dict) -> dict:
        self._params(p, ("version", "file", "offset", "length"), ("version", "file"), "fetch")
        return self.store.fetch(p["version"], p["file"], p.get("offset", 0), p.get("length", MAX_CHUNK))


class RegistryService:
    """What ``edgerec registry`` serves: the StoreMethods plus ``health``; shaped like ``service.Service`` for the
    RPC server (``lookup``, ``observe``, ``count_error``, ``executor``)."""

    def __init__(self, root: str | os.PathLike):
        self.store = BundleStore(root)
        self.methods = StoreMethods(self.store).table()
        self.methods["health"] = (self.health, False)
        self.started = time.time()
        self.executor = None
        self.model = None

    def observe(self, method: Any, seconds: float, code: int | None) -> None:
        pass   # the registry keeps no request metrics

    def count_error(self, code: int) -> None:
        pass

    def lookup(self, method: Any):
        if not isinstance(method, str) or method not in self.methods:
            raise MethodNotFound(f"unknown method {str(method)[:64]!r}; methods: {sorted(self.methods)}")
        return self.methods[method]

    def health(self, p: dict) -> dict:
        latest = self.store.latest(None)
        return {"status": "ok", "role": "registry", "versions": len(self.store.versions()),
                "latest": latest["version"] if latest else None, "bytes_served": self.store.bytes_served,
                "uptime_s": round(time.time() - self.started, 3)}


def publish(bundle_dir: str | os.PathLike, registry_dir: str | os.PathLike, key_path: str | os.PathLike,
            channel: str = DEFAULT_CHANNEL, version: str | None = None) -> str:
    """Verify a bundle's checksums, stamp ``channel`` and ``published_at`` into its manifest, sign it with the
    Ed25519 key and move it into the registry directory as ``<model_version>/`` (atomic rename).

    ``version`` overrides the manifest's model_version (republishing the same files as a new version).

    Raises:
        BundleError: the bundle fails its checksums, or the version is already published.
        SignatureError: the key cannot be read.
    """
    key = signing.load_private_key(key_path)
    src = Path(bundle_dir)
    manifest = bundle_mod.load_manifest(src, verify=True)
    version = bundle_mod.check_version_name(version or manifest.get("model_version"))
    if not isinstance(channel, str) or not channel or len(channel) > 64 or not channel.isprintable():
        raise BundleError(f"channel {str(channel)[:80]!r} is not allowed (1-64 printable characters)")
    reg = Path(registry_dir)
    reg.mkdir(parents=True, exist_ok=True)
    if (reg / version).exists():
        raise BundleError(f"version {version} is already in the registry {reg}")
    staged = Path(tempfile.mkdtemp(prefix=".publish-", dir=reg))
    try:
        for name in manifest["files"]:
            dst = staged / bundle_mod.check_member_name(name)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst)
        manifest = dict(manifest, model_version=version, channel=channel, published_at=time.time())
        (staged / bundle_mod.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                                                  encoding="utf-8")
        signing.sign_bundle(staged, key)
        bundle_mod.load_manifest(staged, verify=True)
        os.chmod(staged, 0o755)
        os.replace(staged, reg / version)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    log.info("published %s (channel %s) to %s", version, channel, reg)
    return version
