"""A directory of signed bundle versions: the registry's, or an edge node's state directory (``bundles/``).

Layout: ``<root>/<model_version>/`` holds one bundle (``manifest.json``, ``manifest.sig`` and the files the manifest
lists). ``publish`` adds a version atomically (staged beside, then renamed); the registry rescans the directory, so
a publish needs no restart. ``BundleStore`` is the read side that ``fleet/registry.py`` serves over MessagePack-RPC
(to nodes from the registry, and to peers from a node, so a fleet update does not all land on the registry).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import const
from ..errors import BundleError, InvalidParams
from . import format as bundle_mod
from . import signing

log = logging.getLogger(__name__)

MAX_CHUNK = const.MAX_CHUNK_BYTES
DEFAULT_CHANNEL = const.DEFAULT_CHANNEL


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
    if not isinstance(channel, str) or not channel or len(channel) > const.MAX_CHANNEL_CHARS \
            or not channel.isprintable():
        raise BundleError(f"channel {str(channel)[:80]!r} is not allowed (1-{const.MAX_CHANNEL_CHARS} printable "
                          "characters)")
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
