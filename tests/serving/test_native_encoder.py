"""The native session encoder (native/src/encoder-inl.h, ``serving.encoder.NativeEncoder``): the function of the
bundle's int8 ONNX encoder at every SIMD level this machine runs, each session alone, and the choice a node makes
between it and ONNX Runtime (``load_encoder``)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from edge_runtime import scoring
from edge_runtime.bundle import format as fmt
from edge_runtime.errors import BundleError
from edge_runtime.serving.encoder import Encoder, NativeEncoder, load_encoder, native_agreement
from edge_runtime.serving.model import Model

pytestmark = pytest.mark.skipif(scoring.native_kernel() is None, reason="the native kernel is not in use")

ITEMS, MAX_LEN = 400, 20


def _levels() -> list[str]:
    return scoring.native_kernel().available_levels() if scoring.native_kernel() is not None else []


def _export(tmp_path, kind, style, heads, blocks, hidden=32):
    from trainer.export import export_native, export_onnx, quantize_int8
    from trainer.model import build_model

    torch.manual_seed(7)
    m = build_model(kind, ITEMS, max_len=MAX_LEN, hidden=hidden, blocks=blocks, heads=heads, dropout=0.1,
                    block_style=style).eval()
    with torch.no_grad():   # trained-looking LayerNorms and biases, not the initial 1 / 0
        for name, p in m.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    export_onnx(m, tmp_path / "e.onnx", MAX_LEN)
    quantize_int8(tmp_path / "e.onnx", tmp_path / "e8.onnx")
    assert export_native(m, tmp_path / "e8.onnx", tmp_path / "e8.npz")
    return m, Encoder(tmp_path / "e8.onnx"), tmp_path / "e8.npz"


def _padded(rng, rows: int, n: int) -> tuple[np.ndarray, list[int]]:
    lengths = [1, MAX_LEN] + rng.integers(1, MAX_LEN + 1, n - 2).tolist()
    seq = np.zeros((n, MAX_LEN), dtype=np.int64)
    for b, length in enumerate(lengths):
        seq[b, MAX_LEN - length:] = rng.integers(1, rows, length)
    return seq, lengths


@pytest.mark.parametrize("kind,style,heads,blocks", [("sasrec", "prenorm", 1, 1), ("sasrec", "prenorm", 2, 2),
                                                     ("sasrec", "sasrec", 2, 3), ("bert4rec", "prenorm", 1, 2),
                                                     ("bert4rec", "sasrec", 4, 1)])
def test_native_encoder_equals_onnx_runtime_at_every_level(tmp_path, kind, style, heads, blocks):
    model, onnx_enc, weights = _export(tmp_path, kind, style, heads, blocks)
    rng = np.random.default_rng(11)
    seq, lengths = _padded(rng, ITEMS + 1, 40)
    seq[5, :] = 0               # a row of padding only (the model's ln_out(0) for SASRec)
    seq[6, 7] = 0               # padding inside a session: a hidden key, as in the model
    want = onnx_enc(seq)
    with torch.no_grad():
        torch_ref = model(torch.from_numpy(seq)).numpy()
    for level in _levels():
        enc = NativeEncoder(weights, level=level)
        assert enc.level == level and enc.provider == f"native-{level}" and enc.dim == 32
        got = enc(seq)
        assert got.dtype == np.float32 and got.shape == (40, 32)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5, err_msg=level)
        # and the trained model itself (its int8 table costs a little more)
        assert np.max(np.abs(got - torch_ref)) < 0.05
        # each session alone: the padded batch, lone calls and the unpadded form agree bit for bit
        lone = np.stack([enc(seq[b:b + 1, MAX_LEN - max(n, 1):])[0] for b, n in enumerate(lengths)])
        np.testing.assert_array_equal(got[[b for b in range(40) if b not in (5, 6)]],
                                      lone[[b for b in range(40) if b not in (5, 6)]])
        tails = [seq[b, MAX_LEN - n:] for b, n in enumerate(lengths)]
        offsets = np.concatenate([[0], np.cumsum([len(t) for t in tails])]).astype(np.int64)
        np.testing.assert_array_equal(enc.encode_sessions(np.concatenate(tails), offsets), got)
        assert native_agreement(enc, onnx_enc) < 1e-5


def test_native_encoder_reads_the_last_max_len_tokens(tmp_path):
    _, onnx_enc, weights = _export(tmp_path, "sasrec", "prenorm", 1, 1)
    enc = NativeEncoder(weights)
    long = np.arange(1, 2 * MAX_LEN + 1, dtype=np.int64)
    got = enc.encode_sessions(long, np.array([0, len(long)], dtype=np.int64))
    np.testing.assert_allclose(got, onnx_enc(long[-MAX_LEN:].reshape(1, -1)), rtol=1e-4, atol=2e-5)
    # an empty session: the vector of a row of padding
    empty = enc.encode_sessions(np.zeros(0, dtype=np.int64), np.array([0, 0], dtype=np.int64))
    np.testing.assert_allclose(empty, onnx_enc(np.zeros((1, 3), dtype=np.int64)), rtol=1e-5, atol=1e-6)
    assert enc(np.zeros((0, 4), dtype=np.int64)).shape == (0, 32)


def test_native_encoder_refuses_bad_input_with_a_clear_error(tmp_path):
    _, _, weights = _export(tmp_path, "sasrec", "prenorm", 1, 1)
    enc = NativeEncoder(weights)
    ok = np.array([[1, 2, 3]], dtype=np.int64)
    cases = [
        (lambda: enc(ok.astype(np.int32)), "dtype"),
        (lambda: enc(np.array([1, 2], dtype=np.int64)), "dimension"),
        (lambda: enc(np.array([[1, ITEMS + 1]], dtype=np.int64)), "outside the table"),
        (lambda: enc(np.array([[-1, 2]], dtype=np.int64)), "outside the table"),
        (lambda: enc(np.ones((1, MAX_LEN + 1), dtype=np.int64)), "columns"),
        (lambda: enc(np.ones((2, 0), dtype=np.int64)), "columns"),
        (lambda: enc(np.asfortranarray(np.ones((3, 4), dtype=np.int64))), "C-contiguous"),
        (lambda: enc.encode_sessions(np.ones(4, dtype=np.int64), np.array([0, 5], dtype=np.int64)), "offsets"),
        (lambda: enc.encode_sessions(np.ones(4, dtype=np.int64), np.array([0, 3, 2, 4], dtype=np.int64)),
         "non-decreasing"),
        (lambda: enc.encode_sessions(np.ones(4, dtype=np.int64), np.zeros(0, dtype=np.int64)), r"B \+ 1"),
    ]
    for call, words in cases:
        with pytest.raises(ValueError, match=words):
            call()
    np.testing.assert_array_equal(enc(ok), enc(ok))   # still serving after every refusal
    # an equivalent dtype is taken as it is (int64 is longlong on LP64)
    np.testing.assert_array_equal(enc(ok.astype(np.longlong)), enc(ok))


def test_a_damaged_weights_file_is_refused_by_name(tmp_path):
    _, _, weights = _export(tmp_path, "sasrec", "prenorm", 1, 1)
    with np.load(weights) as z:
        arrays = {k: z[k] for k in z.files}
    bad = dict(arrays, b0_wq=arrays["b0_wq"][:, :5])
    np.savez(tmp_path / "short.npz", **bad)
    with pytest.raises(BundleError, match="b0_wq must be float32"):
        NativeEncoder(tmp_path / "short.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(BundleError, match="junk.npz: not a native encoder weights file"):
        NativeEncoder(tmp_path / "junk.npz")
    cfg = arrays["config"].copy()
    cfg[0] = 99
    np.savez(tmp_path / "future.npz", **dict(arrays, config=cfg))
    with pytest.raises(BundleError, match="form 1"):
        NativeEncoder(tmp_path / "future.npz")
    # whatever NumPy or the binding raises for a bad file is a BundleError naming it (found by a breaker run:
    # EOFError, TypeError and MemoryError escaped and stopped a node from booting)
    huge = arrays["config"].copy()
    huge[1] = 1 << 40
    np.savez(tmp_path / "huge.npz", **dict(arrays, config=huge))
    np.savez(tmp_path / "empty.npz")
    np.save(tmp_path / "plain.npy", arrays["table"])
    (tmp_path / "plain.npy").rename(tmp_path / "plain.npz")
    np.savez(tmp_path / "bytes_eps.npz", **dict(arrays, eps=np.array([b"1e-8"])))
    for name in ("huge.npz", "empty.npz", "plain.npz", "bytes_eps.npz"):
        with pytest.raises(BundleError, match=f"{name}: not a native encoder weights file"):
            NativeEncoder(tmp_path / name)
        assert isinstance(load_encoder(tmp_path / "e8.onnx", tmp_path / name), Encoder)


def test_load_encoder_serves_native_only_when_it_agrees(tmp_path, caplog):
    _, _, weights = _export(tmp_path, "sasrec", "prenorm", 1, 1)
    onnx_path = tmp_path / "e8.onnx"
    assert isinstance(load_encoder(onnx_path, weights), NativeEncoder)
    assert isinstance(load_encoder(onnx_path, weights, mode="onnx"), Encoder)
    assert isinstance(load_encoder(onnx_path, None), Encoder)
    with pytest.raises(BundleError, match="no native encoder weights"):
        load_encoder(onnx_path, None, mode="native")
    with pytest.raises(ValueError, match="EDGEREC_ENCODER"):
        load_encoder(onnx_path, weights, mode="fast")
    # weights that are not this ONNX file's (one value moved): ONNX Runtime serves, and a warning says why
    with np.load(weights) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["b0_f1b"] = arrays["b0_f1b"] + np.float32(0.05)
    np.savez(tmp_path / "other.npz", **arrays)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.serving.encoder"):
        picked = load_encoder(onnx_path, tmp_path / "other.npz")
    assert isinstance(picked, Encoder)
    assert "differs from ONNX Runtime" in caplog.text
    with pytest.raises(BundleError, match="differs from ONNX Runtime"):
        load_encoder(onnx_path, tmp_path / "other.npz", mode="native")
    # one table row off (its scale NaN, or 100 times larger): every row is compared at load, not a sample
    for value in (np.nan, 100.0):
        with np.load(weights) as z:
            bad = {k: z[k] for k in z.files}
        bad["table_scale"][ITEMS - 7] *= np.float32(value)
        np.savez(tmp_path / "row.npz", **bad)
        assert native_agreement(NativeEncoder(tmp_path / "row.npz"), Encoder(onnx_path)) > 1e-3
        assert isinstance(load_encoder(onnx_path, tmp_path / "row.npz"), Encoder)
    # weights of another shape than the bundle's (d, max_len, items): ONNX Runtime serves
    assert isinstance(load_encoder(onnx_path, weights, expect=(32, MAX_LEN, ITEMS)), NativeEncoder)
    for expect in ((32, MAX_LEN - 1, ITEMS), (16, MAX_LEN, ITEMS), (32, MAX_LEN, ITEMS + 5)):
        assert isinstance(load_encoder(onnx_path, weights, expect=expect), Encoder)
    with pytest.raises(BundleError, match="do not fit the bundle"):
        load_encoder(onnx_path, weights, mode="native", expect=(32, MAX_LEN, ITEMS + 5))


def test_bundle_model_serves_the_native_encoder(tiny_bundle):
    """The trainer writes the weights into the bundle (listed and hashed in the manifest); the node serves them,
    and with EDGEREC_ENCODER=onnx the same bundle's ONNX encoder gives the same vectors up to float rounding."""
    manifest = fmt.load_manifest(tiny_bundle)
    assert fmt.ENCODER_NATIVE in manifest["files"]
    model = Model(tiny_bundle)
    assert model.provider == f"native-{scoring.simd_level()}" and model.batch_exact
    ort_model = Model(tiny_bundle, verify=False)
    ort_model.encoder = Encoder(tiny_bundle / fmt.ENCODER_INT8)
    rng = np.random.default_rng(2)
    sessions = [rng.integers(0, model.bundle_items, int(n)).tolist() for n in rng.integers(1, 60, 30)]
    vectors, calls = model.encode_many(sessions)
    assert calls == 1
    want = np.stack([ort_model.encode(s) for s in sessions])
    np.testing.assert_allclose(vectors, want, rtol=1e-4, atol=2e-5)
    np.testing.assert_array_equal(vectors, np.stack([model.encode(s) for s in sessions]))
    # fp32 serving keeps ONNX Runtime (the native file is the int8 encoder's)
    assert Model(tiny_bundle, precision="fp32").provider == "CPUExecutionProvider"
