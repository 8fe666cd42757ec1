"""Resumable, verified bundle transfers from a registry or a peer into a node's state directory.

``Transfer.download``: ``manifest`` (its Ed25519 signature verified before a single file byte is fetched) -> every
file in bounded chunks (``fetch``), appended to ``staging/<version>/<file>.part``, which survives restarts so a
transfer resumes where it stopped -> each file's sha256 checked against the signed manifest (a mismatch discards
the file) -> the staged directory renamed to ``bundles/<version>`` (atomic). Files finished by an earlier attempt
are hashed again: staging is not trusted.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path

from .. import const
from ..bundle import format as bundle_mod
from ..bundle import signing
from ..errors import BundleError, SyncError
from ..rpc.client import AsyncClient, Credentials

log = logging.getLogger(__name__)


class Transfer:
    """Downloads signed bundle versions into ``bundles/`` through ``staging/``.

    Args:
        bundles / staging: the state directory's two folders.
        trusted: {key_id: Ed25519 public key} (``signing.load_public_keys``).
        chunk_bytes: bytes per fetch call (capped at ``const.MAX_CHUNK_BYTES``, which the server enforces too).
        timeout: seconds per RPC call.
        credentials: TLS context and token presented to registries and peers (``rpc.client.Credentials``).

    Attributes:
        bytes_from: payload bytes received, by source kind ("registry", "peer").
    """

    def __init__(self, bundles: Path, staging: Path, trusted: dict, chunk_bytes: int = const.SYNC_CHUNK_BYTES,
                 timeout: float = const.SYNC_TIMEOUT_SECONDS, credentials: Credentials | None = None):
        self.bundles, self.staging, self.trusted = bundles, staging, trusted
        self.credentials = credentials
        self.chunk_bytes = max(1, min(chunk_bytes, const.MAX_CHUNK_BYTES))
        self.timeout = timeout
        self.bytes_from = {"registry": 0, "peer": 0}

    async def download(self, kind: str, host: str, port: int, version: str) -> None:
        """Fetch ``version`` from a registry or peer at host:port into ``bundles/<version>`` (see the module
        docstring).

        Raises:
            SignatureError: the manifest is not signed by a trusted key (nothing was fetched).
            BundleError / SyncError: a bad manifest, file name, chunk or checksum (the bad part is discarded).
            OSError / asyncio.TimeoutError / RpcError: the source failed (what is staged is kept for a resume);
                ENOSPC when the disk is full.
        """
        loop = asyncio.get_running_loop()
        c = await AsyncClient.connect(host, port, self.timeout, self.credentials)
        try:
            rep = await c.call("manifest", version=version)
            if not isinstance(rep, dict) or not isinstance(rep.get("manifest"), bytes) \
                    or not isinstance(rep.get("signature"), dict):
                raise SyncError(f"{kind} answered 'manifest' with {type(rep).__name__}, not "
                                "{manifest: bin, signature: map}")
            raw, sig = rep["manifest"], rep["signature"]
            signing.verify_bytes(raw, sig, self.trusted)   # before a single file byte
            manifest = json.loads(raw)
            if not isinstance(manifest, dict) or manifest.get("model_version") != version:
                raise BundleError(f"manifest names version {manifest.get('model_version')!r}, asked {version!r}")
            files = manifest.get("files")
            if not isinstance(files, dict):
                raise BundleError("manifest has no file table")
            for name, meta in files.items():
                bundle_mod.check_member_name(name)
                if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) \
                        or not isinstance(meta.get("sha256"), str) or not 0 <= meta["bytes"] <= const.MAX_FILE_BYTES:
                    raise BundleError(f"manifest entry for {name!r} lacks bytes / sha256 or is over "
                                      f"{const.MAX_FILE_BYTES} bytes")
            stage = self.staging / version
            stage.mkdir(parents=True, exist_ok=True)
            old = stage / bundle_mod.MANIFEST
            if old.is_file() and old.read_bytes() != raw:   # a different bundle under the same version: restart
                shutil.rmtree(stage)
                stage.mkdir(parents=True)
            old.write_bytes(raw)
            for name, meta in sorted(files.items()):
                await self._fetch_file(c, kind, version, stage, name, meta, loop)
            (stage / bundle_mod.SIGNATURE).write_text(json.dumps(sig) + "\n", encoding="utf-8")
            os.chmod(stage, 0o755)
            dst = self.bundles / version
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(stage, dst)
            log.info("sync: fetched %s from %s %s:%d", version, kind, host, port)
        finally:
            await c.close()

    async def _fetch_file(self, c: AsyncClient, kind: str, version: str, stage: Path, name: str, meta: dict,
                          loop) -> None:
        final = stage / name
        if final.is_file() and not final.is_symlink() and final.stat().st_size == meta["bytes"]:
            # finished in an earlier attempt: hashed again, staging is not trusted
            if await loop.run_in_executor(None, bundle_mod.sha256_file, final) == meta["sha256"]:
                return
            final.unlink()
        part = stage / (name + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        offset = part.stat().st_size if part.exists() else 0
        if offset > meta["bytes"]:
            part.unlink()
            offset = 0
        if offset:
            log.info("sync: resuming %s/%s at byte %d of %d", version, name, offset, meta["bytes"])
        with open(part, "ab") as f:
            while offset < meta["bytes"]:
                rep = await c.call("fetch", version=version, file=name, offset=offset,
                                   length=min(self.chunk_bytes, meta["bytes"] - offset))
                data = rep.get("data") if isinstance(rep, dict) else None
                if not isinstance(data, bytes) or not data or offset + len(data) > meta["bytes"]:
                    raise SyncError(f"{kind} sent a bad chunk of {name} at offset {offset}")
                self._write_chunk(f, data)
                offset += len(data)
                self.bytes_from[kind] += len(data)
        digest = await loop.run_in_executor(None, bundle_mod.sha256_file, part)
        if digest != meta["sha256"]:
            part.unlink()
            raise SyncError(f"{name} of {version} from {kind}: sha256 mismatch (corrupted transfer); discarded")
        os.replace(part, final)

    @staticmethod
    def _write_chunk(f, data: bytes) -> None:
        f.write(data)
        f.flush()
