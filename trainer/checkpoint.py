"""Trainer checkpoints: everything a published model needs to be fine-tuned later (``trainer/finetune.py``).

A checkpoint is written beside every bundle the trainer publishes and never ships to nodes, so it lives outside the
bundle directory: ``edgerec train --out DIR`` writes ``DIR.ckpt`` (``default_path``), ``--checkpoint PATH``
overrides. It holds the published weights, the optimizer state, the item id map and attributes (and the order of
the attribute-value embedding rows), the training config, every user's item sequence (contexts and replay for the
next fine-tune), the training popularity, the published int8 encoder (the gate's serving path, byte for byte what
the nodes run) and the model version with its lineage.

File layout (little-endian)::

    b"EDGERECK"           8 bytes magic
    format version        uint32
    payload length        uint64 (bytes)
    sha256(payload)       32 bytes
    payload               torch.save of a dict of tensors, str, int, float, bytes, None, lists and dicts

``load`` checks the magic, the length (truncation) and the sha256 (a flipped byte anywhere) before it reads the
payload with ``torch.load(weights_only=True)``, so nothing is unpickled; every failure is a ``CheckpointError``
naming the file. ``save`` writes a temporary file beside the target and renames it into place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from edge_runtime.bundle.writer import attribute_csr

MAGIC = b"EDGERECK"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")   # magic, format version, payload bytes, sha256 of the payload
SUFFIX = ".ckpt"


class CheckpointError(ValueError):
    """A checkpoint cannot be read: missing, truncated, altered, of another format, or inconsistent; the message
    names the file."""


@dataclasses.dataclass
class Checkpoint:
    """What the trainer keeps of a published model.

    Attributes:
        model_version: the published bundle's ``model_version``.
        config: the ``TrainConfig`` as a dict (``TrainConfig.to_dict``).
        state: the published model's ``state_dict`` (the EMA weights when the recipe averages), CPU tensors.
        optimizer: the Adam ``state_dict`` at the end of training (moments of the raw weights), or None.
        item_ids: external id (str) of token ``t`` is ``item_ids[t - 1]``; N items.
        item_attributes: per item row a list of attribute values (str), or None.
        attr_names: attribute value of each row of the model's attribute embedding (``attribute_csr`` order over
            ``item_attributes``); empty without side information.
        user_ids: external id (str) per sequence; U users.
        sequences: per user an int64 array of tokens in ``1..N``, oldest first (the whole history).
        fresh: int64 [U]: the number of trailing items of each sequence the model has not been trained on yet
            (a fine-tune's held-back events; the next fine-tune trains on them).
        popularity: float64 [N]: training interaction count per item row (the bundle's popularity list).
        encoder_int8: the published ``encoder.int8.onnx`` bytes (b"" when unknown).
        event_cursor: the highest collector event id (SQLite ``events.id``) already in ``sequences``; 0 for none.
        lineage: ``created_at``, ``finetuned_from`` (parent version or None), ``dataset`` (source summary) etc.
    """

    model_version: str
    config: dict
    state: dict[str, torch.Tensor]
    optimizer: dict | None
    item_ids: list[str]
    item_attributes: list[list[str]] | None
    attr_names: list[str]
    user_ids: list[str]
    sequences: list[np.ndarray]
    fresh: np.ndarray
    popularity: np.ndarray
    encoder_int8: bytes = b""
    event_cursor: int = 0
    lineage: dict = dataclasses.field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


def default_path(out_dir: str | os.PathLike) -> Path:
    """The checkpoint of the bundle directory ``out_dir``: ``<out_dir>.ckpt`` beside it (outside the bundle)."""
    p = Path(out_dir)
    return p.with_name(p.name + SUFFIX)


def _payload(ck: Checkpoint) -> dict:
    lengths = np.fromiter((len(s) for s in ck.sequences), dtype=np.int64, count=len(ck.sequences))
    flat = np.concatenate(ck.sequences).astype(np.int64) if ck.sequences else np.zeros(0, np.int64)
    attrs = None
    if ck.item_attributes is not None:
        indptr, codes, names = attribute_csr(ck.item_attributes)
        attrs = {"indptr": torch.from_numpy(indptr), "codes": torch.from_numpy(codes.astype(np.int64)),
                 "names": names}
    return {
        "model_version": ck.model_version, "config": dict(ck.config),
        "state": {k: v.detach().cpu().clone() for k, v in ck.state.items()},
        "optimizer": ck.optimizer, "item_ids": [str(i) for i in ck.item_ids], "item_attributes": attrs,
        "attr_names": list(ck.attr_names), "user_ids": [str(u) for u in ck.user_ids],
        "seq_lengths": torch.from_numpy(lengths), "seq_tokens": torch.from_numpy(flat),
        "fresh": torch.from_numpy(np.asarray(ck.fresh, dtype=np.int64)),
        "popularity": torch.from_numpy(np.asarray(ck.popularity, dtype=np.float64)),
        "encoder_int8": bytes(ck.encoder_int8), "event_cursor": int(ck.event_cursor), "lineage": dict(ck.lineage),
    }


def save(ck: Checkpoint, path: str | os.PathLike) -> Path:
    """Write ``ck`` to ``path`` atomically (temporary file + rename); returns the path.

    Raises:
        CheckpointError: the checkpoint is inconsistent (sequence tokens out of range, lengths disagree).
        OSError: the file cannot be written.
    """
    path = Path(path)
    n, u = len(ck.item_ids), len(ck.user_ids)
    if len(ck.sequences) != u or len(ck.fresh) != u or len(ck.popularity) != n \
            or (ck.item_attributes is not None and len(ck.item_attributes) != n):
        raise CheckpointError(f"{path}: checkpoint parts disagree: {n} items, {u} users, {len(ck.sequences)} "
                              f"sequences, {len(ck.fresh)} fresh counts, {len(ck.popularity)} popularity entries")
    if any(len(s) and (s.min() < 1 or s.max() > n) for s in ck.sequences):
        raise CheckpointError(f"{path}: a sequence holds a token outside 1..{n}")
    buf = io.BytesIO()
    torch.save(_payload(ck), buf)
    payload = buf.getvalue()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint written by ``save``.

    Raises:
        CheckpointError: missing or unreadable file, wrong magic or format version, truncated or longer than its
            header says, sha256 mismatch (any altered byte), or a payload that is not a checkpoint.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc.strerror or exc}") from None
    if len(raw) < _HEADER.size:
        raise CheckpointError(f"{path}: not a checkpoint or truncated ({len(raw)} bytes, header is {_HEADER.size})")
    magic, version, length, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CheckpointError(f"{path}: not an edgerec checkpoint (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version}, this trainer reads format {FORMAT_VERSION}")
    payload = memoryview(raw)[_HEADER.size:]
    if len(payload) != length:
        raise CheckpointError(f"{path}: truncated or padded checkpoint: payload is {len(payload)} bytes, the header "
                              f"says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: checkpoint is corrupt (sha256 of the payload does not match its header)")
    try:
        d = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        lengths = d["seq_lengths"].numpy()
        flat = d["seq_tokens"].numpy()
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        sequences = [flat[bounds[i]:bounds[i + 1]].copy() for i in range(len(lengths))]
        attrs = None
        if d["item_attributes"] is not None:
            a = d["item_attributes"]
            indptr, codes, names = a["indptr"].numpy(), a["codes"].numpy(), a["names"]
            attrs = [[names[c] for c in codes[indptr[r]:indptr[r + 1]]] for r in range(len(indptr) - 1)]
        ck = Checkpoint(model_version=str(d["model_version"]), config=dict(d["config"]), state=dict(d["state"]),
                        optimizer=d["optimizer"], item_ids=list(d["item_ids"]), item_attributes=attrs,
                        attr_names=list(d["attr_names"]), user_ids=list(d["user_ids"]), sequences=sequences,
                        fresh=d["fresh"].numpy().astype(np.int64), popularity=d["popularity"].numpy(),
                        encoder_int8=bytes(d["encoder_int8"]), event_cursor=int(d["event_cursor"]),
                        lineage=dict(d["lineage"]))
    except Exception as exc:  # torch's unpickler and the field reads raise several types
        raise CheckpointError(f"{path}: checkpoint payload is not readable: {exc}") from None
    if len(ck.sequences) != len(ck.user_ids) or len(ck.popularity) != ck.num_items:
        raise CheckpointError(f"{path}: checkpoint parts disagree ({len(ck.user_ids)} users, {len(ck.sequences)} "
                              f"sequences, {ck.num_items} items, {len(ck.popularity)} popularity entries)")
    return ck
