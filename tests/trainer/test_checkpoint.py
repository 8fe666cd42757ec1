"""Trainer checkpoints: written beside every bundle, complete enough to rebuild the published model, and refused
(with the file named) when truncated, altered or carrying anything but plain data."""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct

import numpy as np
import pytest
import torch

from edge_runtime.bundle import format as fmt
from edgerec.cli import main
from trainer import checkpoint as ckpt
from trainer.config import TrainConfig
from trainer.finetune import _parent_model


def test_train_writes_a_checkpoint_that_rebuilds_the_bundle(tiny_bundle, tiny_manifest, beauty_data):
    path = ckpt.default_path(tiny_bundle)
    assert path == tiny_bundle.parent / (tiny_bundle.name + ".ckpt") and path.is_file()
    assert path.name not in tiny_manifest["files"]          # outside the bundle: never shipped to nodes
    ck = ckpt.load(path)
    assert ck.model_version == tiny_manifest["model_version"]
    assert ck.item_ids == json.loads((tiny_bundle / "item_ids.json").read_text()) == beauty_data.item_ids
    assert ck.user_ids == beauty_data.user_ids and len(ck.sequences) == 3000
    assert all(np.array_equal(a, b) for a, b in zip(ck.sequences, beauty_data.sequences))
    assert ck.fresh.shape == (3000,) and not ck.fresh.any() and ck.event_cursor == 0
    assert ck.config == TrainConfig.from_dict(dict(ck.config)).to_dict() and ck.config["hidden"] == 32
    assert ck.item_attributes == beauty_data.item_attributes
    assert ck.attr_names == json.loads((tiny_bundle / "item_attr_names.json").read_text())
    np.testing.assert_array_equal(ck.popularity, beauty_data.popularity())
    assert ck.encoder_int8 == (tiny_bundle / "encoder.int8.onnx").read_bytes()
    assert ck.lineage["finetuned_from"] is None
    model = _parent_model(ck, TrainConfig.from_dict(dict(ck.config)))
    params = list(model.parameters())
    assert ck.optimizer is not None and len(ck.optimizer["state"]) == len(params)   # Adam moments per parameter
    assert all(ck.optimizer["state"][i]["exp_avg"].shape == p.shape for i, p in enumerate(params))
    with torch.no_grad():
        items = model.item_embeddings().numpy()
    np.testing.assert_allclose(items, np.load(tiny_bundle / fmt.ITEMS_F32), rtol=0, atol=1e-6)


def _copy(tmp_path, tiny_bundle):
    p = tmp_path / "c.ckpt"
    p.write_bytes(ckpt.default_path(tiny_bundle).read_bytes())
    return p


def test_truncated_or_flipped_checkpoints_are_refused(tmp_path, tiny_bundle):
    raw = ckpt.default_path(tiny_bundle).read_bytes()
    p = tmp_path / "c.ckpt"
    cases = {
        "truncated": raw[:-1000],
        "truncated header": raw[:20],
        "flipped payload byte": raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0x01]) + raw[len(raw) // 2 + 1:],
        "flipped last byte": raw[:-1] + bytes([raw[-1] ^ 0x80]),
        "flipped digest byte": raw[:30] + bytes([raw[30] ^ 0xFF]) + raw[31:],
        "flipped magic": b"X" + raw[1:],
        "padded": raw + b"\0",
        "empty": b"",
    }
    messages = {}
    for name, data in cases.items():
        p.write_bytes(data)
        with pytest.raises(ckpt.CheckpointError) as err:
            ckpt.load(p)
        assert str(p) in str(err.value), name
        messages[name] = str(err.value)
    assert "corrupt" in messages["flipped payload byte"] and "corrupt" in messages["flipped last byte"]
    assert "truncated" in messages["truncated"] and "truncated" in messages["truncated header"]
    assert "magic" in messages["flipped magic"]
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load(tmp_path / "missing.ckpt")
    p.write_bytes(raw)
    assert ckpt.load(p).model_version        # the intact bytes still load


class _Payload:
    """Unpickling this would create a directory: weights_only must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_load_unpickles_nothing(tmp_path):
    marker = str(tmp_path / "unpickled")
    buf = io.BytesIO()
    torch.save({"model_version": "x", "evil": _Payload(marker)}, buf)
    payload = buf.getvalue()
    p = tmp_path / "evil.ckpt"
    p.write_bytes(struct.pack("<8sIQ32s", ckpt.MAGIC, ckpt.FORMAT_VERSION, len(payload),
                              hashlib.sha256(payload).digest()) + payload)   # a valid header and digest
    with pytest.raises(ckpt.CheckpointError, match="not readable"):
        ckpt.load(p)
    assert not os.path.exists(marker)


def test_round_trip_and_consistency_checks(tmp_path):
    ck = ckpt.Checkpoint(model_version="v1", config={"hidden": 8}, state={"w": torch.arange(6.0).reshape(2, 3)},
                         optimizer=None, item_ids=["a", "b", "c"], item_attributes=[["x"], [], ["x", "y"]],
                         attr_names=["x", "y"], user_ids=["u1", "u2"],
                         sequences=[np.array([1, 2, 3]), np.array([], dtype=np.int64)], fresh=np.array([1, 0]),
                         popularity=np.array([1.0, 1.0, 1.0]), encoder_int8=b"onnx", event_cursor=7,
                         lineage={"finetuned_from": "v0"})
    back = ckpt.load(ckpt.save(ck, tmp_path / "r.ckpt"))
    assert back.item_attributes == [["x"], [], ["x", "y"]] and back.user_ids == ["u1", "u2"]
    assert [s.tolist() for s in back.sequences] == [[1, 2, 3], []] and back.fresh.tolist() == [1, 0]
    assert back.encoder_int8 == b"onnx" and back.event_cursor == 7 and back.lineage == {"finetuned_from": "v0"}
    torch.testing.assert_close(back.state["w"], ck.state["w"])
    bad = ckpt.Checkpoint(**{**ck.__dict__, "sequences": [np.array([1, 4]), np.array([], dtype=np.int64)]})
    with pytest.raises(ckpt.CheckpointError, match="outside 1..3"):
        ckpt.save(bad, tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_cli_train_checkpoint_option(tmp_path):
    rng = np.random.default_rng(0)
    rows = [f"u{u}\ti{rng.integers(0, 30)}\t{1_600_000_000 + 60 * k}" for u in range(40) for k in range(6)]
    (tmp_path / "log.tsv").write_text("user_id\titem_id\ttimestamp\n" + "\n".join(rows) + "\n")
    where = tmp_path / "elsewhere" / "model.ckpt"
    rc = main(["train", "--data", str(tmp_path / "log.tsv"), "--out", str(tmp_path / "b"), "--epochs", "1",
               "--hidden", "8", "--num-negatives", "16", "--quiet", "--checkpoint", str(where)])
    assert rc == 0 and where.is_file() and not ckpt.default_path(tmp_path / "b").exists()
    assert ckpt.load(where).model_version == json.loads((tmp_path / "b" / "manifest.json").read_text())[
        "model_version"]
