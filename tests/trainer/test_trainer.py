"""SASRec model, ONNX export and int8 quantization."""
from __future__ import annotations

from edgerec.process import PACKAGE_ROOT

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from edge_runtime.serving.encoder import Encoder
from edge_runtime.serving.model import Model, probe_batch_exact
from trainer.config import TrainConfig
from trainer.export import export_onnx, quantize_int8
from trainer.model import BERT4Rec, SASRec, build_model


def test_trimmed_batch_equals_padded_and_causality():
    torch.manual_seed(0)
    m = SASRec(50, max_len=10, hidden=16, blocks=2, heads=2, dropout=0.0).eval()
    seq = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 3, 4, 5], [0, 0, 0, 0, 0, 0, 0, 0, 7, 8]])
    full = m.encode(seq)
    trimmed = m.encode(seq[:, -3:])
    torch.testing.assert_close(full[:, -3:], trimmed, rtol=1e-5, atol=1e-5)
    # causal: the state at position i does not depend on later items
    other = seq.clone()
    other[0, -1] = 9
    torch.testing.assert_close(m.encode(other)[0, :-1], full[0, :-1])
    assert not torch.allclose(m(other)[0], m(seq)[0])
    assert m(seq).shape == (2, 16) and torch.isfinite(m(seq)).all()


def test_bert4rec_bidirectional_masking_and_trim():
    torch.manual_seed(0)
    m = BERT4Rec(50, max_len=10, hidden=16, blocks=2, heads=2, dropout=0.0).eval()
    seq = torch.tensor([[0, 0, 0, 0, 0, 0, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0, 0, 0, 7, 8]])
    other = seq.clone()
    other[0, -1] = 9
    # bidirectional: an earlier position's state depends on a later item
    assert not torch.allclose(m.encode(other)[0, -2], m.encode(seq)[0, -2])
    torch.testing.assert_close(m(seq[:, -4:]), m(seq), rtol=1e-5, atol=1e-5)   # trimmed window, same vector
    assert m.item_embeddings().shape == (50, 16) and m.item_emb.weight.shape[0] == 52
    inp, tgt = m.mask_items(seq, 0.5, torch.Generator().manual_seed(0))
    assert ((inp == m.mask_token) == (tgt > 0)).all() and (tgt > 0).any(dim=1).all()
    assert (tgt[tgt > 0] == seq[tgt > 0]).all() and (inp[seq == 0] == 0).all()
    with pytest.raises(ValueError, match="unknown model"):
        build_model("gru4rec", 10, 5, 8, 1, 1, 0.0)


@pytest.mark.parametrize("kind", ["sasrec", "bert4rec"])
def test_onnx_export_matches_pytorch_and_int8_is_close(tmp_path, kind):
    torch.manual_seed(1)
    m = build_model(kind, 200, max_len=20, hidden=32, blocks=2, heads=2, dropout=0.1).eval()
    export_onnx(m, tmp_path / "e.onnx", 20)
    quantize_int8(tmp_path / "e.onnx", tmp_path / "e8.onnx")
    rng = np.random.default_rng(0)
    seq = np.zeros((8, 20), np.int64)
    for i in range(8):
        n = rng.integers(1, 21)
        seq[i, 20 - n:] = rng.integers(1, 201, n)
    with torch.no_grad():
        ref = m(torch.from_numpy(seq)).numpy()
    np.testing.assert_allclose(Encoder(tmp_path / "e.onnx")(seq), ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        short = m(torch.from_numpy(np.pad(seq[:, -5:], ((0, 0), (15, 0))))).numpy()
    np.testing.assert_allclose(Encoder(tmp_path / "e.onnx")(seq[:, -5:]), short, rtol=1e-4, atol=1e-5)
    out8 = Encoder(tmp_path / "e8.onnx")(seq)
    cos = (out8 * ref).sum(1) / np.linalg.norm(out8, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99
    assert (tmp_path / "e8.onnx").stat().st_size < (tmp_path / "e.onnx").stat().st_size


def _padded_sessions(rng, n_items: int, max_len: int, batch: int) -> tuple[np.ndarray, list[int]]:
    lengths = rng.integers(1, max_len + 1, batch).tolist()
    width = max(lengths)
    seq = np.zeros((batch, width), np.int64)
    for b, n in enumerate(lengths):
        seq[b, width - n:] = rng.integers(1, n_items + 1, n)
    return seq, lengths


@pytest.mark.parametrize("kind,style,heads,blocks", [("sasrec", "prenorm", 1, 2), ("sasrec", "sasrec", 2, 2),
                                                     ("bert4rec", "prenorm", 2, 2), ("sasrec", "prenorm", 1, 1),
                                                     ("bert4rec", "sasrec", 1, 1)])
def test_exported_encoder_is_batch_exact(tmp_path, monkeypatch, kind, style, heads, blocks):
    """The export's attention is padding-exact, so a left-padded batch in one ONNX Runtime call gives each session
    bit for bit the vector of its lone call over its real window, for the float32 encoder and for the int8 one
    (int8 table, float MatMuls); with int8 dynamic quantization of the MatMuls (one activation scale per call) it
    does not: the daemon encodes those one request per call (Model.batch_exact)."""
    torch.manual_seed(3)
    m = build_model(kind, 500, max_len=30, hidden=32, blocks=blocks, heads=heads, dropout=0.1,
                    block_style=style).eval()
    export_onnx(m, tmp_path / "e.onnx", 30)
    quantize_int8(tmp_path / "e.onnx", tmp_path / "e8.onnx")
    quantize_int8(tmp_path / "e.onnx", tmp_path / "dyn.onnx", matmuls="dynamic")
    rng = np.random.default_rng(5)
    differing = {}
    for name in ("e.onnx", "e8.onnx", "dyn.onnx"):
        enc = Encoder(tmp_path / name)
        bad = 0
        for trial in range(25):
            seq, lengths = _padded_sessions(rng, 500, 30, int(rng.integers(2, 17)))
            lone = np.stack([enc(seq[b:b + 1, seq.shape[1] - n:])[0] for b, n in enumerate(lengths)])
            bad += int((enc(seq) != lone).any(axis=1).sum())
        differing[name] = bad
    assert differing["e.onnx"] == 0 and differing["e8.onnx"] == 0
    assert differing["dyn.onnx"] > 0
    # the load-time probe agrees, and also rejects the same weights exported with a fused Softmax (the old export:
    # near-exact, the last bits of some padded calls differ), in every block
    with monkeypatch.context() as mp:
        mp.setattr("trainer.model._attend_padding_exact", lambda s, v: s.softmax(dim=-1) @ v)
        mp.setattr("trainer.model._attend_last_exact", lambda s, v: (s.softmax(dim=-1) @ v[..., :-1])[:, :, 0])
        export_onnx(m, tmp_path / "softmax.onnx", 30)
    probed = {name: probe_batch_exact(_ProbeModel(Encoder(tmp_path / name), 500, 30))[0]
              for name in ("e.onnx", "e8.onnx", "dyn.onnx", "softmax.onnx")}
    assert probed == {"e.onnx": True, "e8.onnx": True, "dyn.onnx": False, "softmax.onnx": False}


class _ProbeModel:
    """What ``probe_batch_exact`` reads of a served ``Model`` (its encode paths over a bare encoder), so an export
    can be probed without writing a bundle."""
    encode = Model.encode
    encode_padded = Model.encode_padded

    def __init__(self, encoder: Encoder, bundle_items: int, max_len: int):
        self.encoder, self.bundle_items, self.max_len = encoder, bundle_items, max_len


def test_padding_exact_attention_equals_softmax_attention():
    """Evaluation's attention (normalised after the weighted sum) is training's softmax attention up to float
    rounding, masked keys included."""
    from trainer.model import _attend_padding_exact

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 2, 7, 7, generator=g) * 4
    scores = scores.masked_fill(~torch.tril(torch.ones(7, 7, dtype=torch.bool)), float("-inf"))
    v = torch.randn(3, 2, 7, 5, generator=g)
    torch.testing.assert_close(_attend_padding_exact(scores, v), scores.softmax(-1) @ v, rtol=1e-5, atol=1e-6)
    m = build_model("sasrec", 100, max_len=12, hidden=16, blocks=2, heads=2, dropout=0.0)
    seq = torch.from_numpy(_padded_sessions(np.random.default_rng(1), 100, 12, 6)[0])
    with torch.no_grad():
        trained_form = m.train()(seq)        # dropout 0: the same function, computed with softmax
        served_form = m.eval()(seq)
    torch.testing.assert_close(served_form, trained_form, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,style,heads,blocks", [("sasrec", "prenorm", 1, 1), ("sasrec", "sasrec", 2, 2),
                                                     ("bert4rec", "prenorm", 2, 2), ("bert4rec", "sasrec", 1, 1)])
def test_serving_form_equals_the_model(kind, style, heads, blocks):
    """The exported form (last block on the last position only, fused weights) is the model's forward up to float
    rounding, for left-padded batches, full and trimmed windows, side information folded in; the model is left as
    it was (training mode, weights)."""
    torch.manual_seed(4)
    indptr = np.arange(0, 2 * 300 + 1, 2)
    codes = np.random.default_rng(2).integers(0, 40, 2 * 300)
    m = build_model(kind, 300, max_len=16, hidden=32, blocks=blocks, heads=heads, dropout=0.2, block_style=style,
                    item_attributes=(indptr, codes, 40))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    serving = m.serving()
    assert m.training and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    seq, lengths = _padded_sessions(np.random.default_rng(6), 300, 16, 12)
    seq = torch.from_numpy(seq)
    with torch.no_grad():
        want = m.eval()(seq)
        torch.testing.assert_close(serving(seq), want, rtol=1e-5, atol=1e-5)
        wide = torch.nn.functional.pad(seq, (16 - seq.shape[1], 0))
        torch.testing.assert_close(serving(wide), want, rtol=1e-5, atol=1e-5)
        one = seq[:, -1:]
        torch.testing.assert_close(serving(one), m(one), rtol=1e-5, atol=1e-5)
        # rows the daemon never sends: padding only, and real items followed by padding
        odd = torch.zeros_like(seq[:3])
        odd[1, :4] = seq[1, -4:]
        odd[2, 2] = 7
        torch.testing.assert_close(serving(odd), m(odd), rtol=1e-5, atol=1e-5)
    assert want.shape == (12, 32) and not torch.allclose(want[0], want[1])


@pytest.mark.parametrize("kind,max_len", [("sasrec", 1), ("sasrec", 2), ("bert4rec", 1), ("bert4rec", 2)])
def test_export_of_windows_of_one_and_two_items(tmp_path, kind, max_len):
    """A window of one item (a static dimension in the export) or two exports and equals the model; a row of
    padding only gives the model's vector, not NaN."""
    torch.manual_seed(5)
    m = build_model(kind, 40, max_len=max_len, hidden=16, blocks=2, heads=2, dropout=0.0).eval()
    export_onnx(m, tmp_path / "e.onnx", max_len)
    seq = np.array([[3] * max_len, [0] * (max_len - 1) + [9], [0] * max_len], dtype=np.int64)
    with torch.no_grad():
        want = m(torch.from_numpy(seq)).numpy()
    got = Encoder(tmp_path / "e.onnx")(seq)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_quantize_int8_rejects_unknown_matmul_scheme(tmp_path):
    with pytest.raises(ValueError, match="int8 MatMuls 'static'"):
        quantize_int8(tmp_path / "e.onnx", tmp_path / "e8.onnx", matmuls="static")
    with pytest.raises(ValueError, match="int8_matmuls"):
        TrainConfig(int8_matmuls="int4")


def test_tiny_bundle_int8_close_to_fp32(tiny_manifest):
    test = tiny_manifest["metrics"]["test"]
    f32, i8 = test["pytorch_fp32"]["NDCG@10"], test["onnx_int8"]["NDCG@10"]
    assert abs(i8 - f32) / f32 < 0.05
    # chance level is HR@10 = 10 / N; a broken export or id mapping lands there, a trained model far above it
    chance = 10 / tiny_manifest["model"]["num_items"]
    assert test["pytorch_fp32"]["HR@10"] > 5 * chance and test["onnx_int8"]["HR@10"] > 5 * chance


def test_config_rejects_unknown_and_invalid(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nhiden = 64\n")
    with pytest.raises(ValueError, match="unknown config key"):
        TrainConfig.from_toml(p)
    p.write_text("[train]\ndropout = 1.5\n")
    with pytest.raises(ValueError, match="'dropout'"):
        TrainConfig.from_toml(p)
    p.write_text("[train]\nbatching = \"sorted\"\n")
    with pytest.raises(ValueError, match="'batching'"):
        TrainConfig.from_toml(p)
    p.write_text("[train]\nhidden = 48\nepochs = 3\n")
    assert TrainConfig.from_toml(p, epochs=7).epochs == 7 and TrainConfig.from_toml(p).hidden == 48


@pytest.mark.parametrize("bucketed", [True, False])
def test_training_batches_cover_every_sequence_once(bucketed):
    """Both batchings are a partition of the sequences into batches of batch_size (the last may be short);
    bucketed batches hold similar lengths (sorted within chunks), plain shuffled ones mix them."""
    from trainer.train import training_batches

    lengths = np.random.default_rng(0).integers(1, 51, size=5000)
    batches = training_batches(lengths, 64, np.random.default_rng(1), bucketed=bucketed)
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(5000))
    assert sum(len(b) != 64 for b in batches) <= (5000 // (64 * 50) + 1 if bucketed else 1)
    spread = np.mean([np.ptp(lengths[b]) for b in batches if len(b) == 64])
    assert (spread < 5) if bucketed else (spread > 40)


def test_daemon_modules_do_not_import_torch():
    code = ("import sys, edgerec.cli, edge_runtime.ops.node, edge_runtime.rpc.server, edge_runtime.serving.service, "
            "edge_runtime.client; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE_ROOT)


def test_bert4rec_trains_and_exports(tmp_path, beauty_subset):
    from trainer.pipeline import run

    cfg = TrainConfig(data=str(beauty_subset), model="bert4rec", hidden=16, blocks=1, epochs=2, batch_size=256,
                      loss="ce", ema_decay=0.0, int8_check_users=200)
    manifest = run(cfg, tmp_path / "b", progress=False, printer=lambda *a: None)
    assert manifest["model"]["architecture"] == "BERT4Rec"
    test = manifest["metrics"]["test"]
    assert test["onnx_fp32"]["NDCG@10"] == pytest.approx(test["pytorch_fp32"]["NDCG@10"], rel=1e-3)
    assert test["pytorch_fp32"]["HR@10"] > 10 / manifest["model"]["num_items"]   # above chance


def test_config_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "c.toml"
    p.write_text('[train]\ndata = "../log.csv"\nmodel = "bert4rec"\n')
    cfg = TrainConfig.from_toml(p)
    assert cfg.data == str((tmp_path / "log.csv").resolve()) and cfg.model == "bert4rec"


def test_cli_train_on_a_table(tmp_path):
    """`edgerec train` end to end on a small CSV with event types and categories (Taobao-like columns)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(120):
        start = rng.integers(0, 60)
        for j, t in enumerate(range(start, start + rng.integers(4, 12))):
            rows.append(f"{u},{t % 80},{t % 7},{['pv', 'cart', 'buy'][j % 3]},{1600000000 + j * 60}")
    p = tmp_path / "log.csv"
    p.write_text("\n".join(rows) + "\n")
    out = subprocess.run([sys.executable, "-m", "edgerec", "train", "--data", str(p), "--out",
                          str(tmp_path / "b"), "--epochs", "2", "--hidden", "16", "--batching", "bucketed", "--quiet"],
                         capture_output=True, text=True, timeout=600, cwd=PACKAGE_ROOT)
    assert out.returncode == 0, out.stderr
    assert "int8 (ONNX int8, int8 items)" in out.stdout and "NDCG@10" in out.stdout
    assert (tmp_path / "b" / "manifest.json").is_file() and (tmp_path / "b" / "item_attr_indptr.npy").is_file()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["training_config"]["batching"] == "bucketed" and manifest["training_config"]["hidden"] == 16
    bad = subprocess.run([sys.executable, "-m", "edgerec", "train", "--data", str(tmp_path / "nope.csv"),
                          "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=120, cwd=PACKAGE_ROOT)
    assert bad.returncode == 2 and "no such file" in bad.stderr


@pytest.mark.parametrize("kind", ["sasrec", "bert4rec"])
def test_attribute_side_info_folds_into_the_exported_table(kind):
    """With item attributes, an item's embedding is id + mean(attribute embeddings); ``folded`` bakes that into the
    plain table the ONNX encoder carries, and gives the same user vectors and item matrix."""
    from trainer.train import attribute_codes

    attrs = [["a", "b"], [], ["b"], ["c", "a", "d"]] * 10      # 40 items, one without attributes in every 4
    indptr, codes, nv = attribute_codes(attrs)
    assert nv == 4 and indptr[-1] == len(codes) == 60
    m = build_model(kind, 40, max_len=8, hidden=16, blocks=1, heads=1, dropout=0.0,
                    item_attributes=(indptr, codes, nv)).eval()
    with torch.no_grad():
        m.attr_emb.weight.normal_()
        table = m.item_table()
        # item row 0 (token 1) has attributes a, b: id + mean(a, b); item row 1 (token 2) has none: id only
        expect = m.item_emb.weight[1] + (m.attr_emb.weight[0] + m.attr_emb.weight[1]) / 2
        assert torch.allclose(table[1], expect, atol=1e-6)
        assert torch.equal(table[2], m.item_emb.weight[2])
        f = m.folded()
        assert f.attr_emb is None and not hasattr(f, "attr_codes")
        seq = torch.tensor([[0, 0, 3, 7, 1], [2, 5, 9, 11, 40]])
        assert torch.allclose(m(seq), f(seq), atol=1e-5)
        assert torch.allclose(m.item_embeddings(), f.item_embeddings(), atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("elements", [300, 1 << 20])   # many small item chunks (at least MIN_CHUNK) / one chunk
def test_chunked_full_softmax_equals_cross_entropy(reduction, elements):
    from trainer.losses import full_softmax_ce

    torch.manual_seed(0)
    h0, e0 = torch.randn(37, 16) * 2.0, torch.randn(1000, 16)   # large logits: the running-max logsumexp matters
    y = torch.randint(0, 1000, (37,))
    h, e = h0.clone().requires_grad_(), e0.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h @ e.T, y, reduction=reduction)
    ref.backward()
    h2, e2 = h0.clone().requires_grad_(), e0.clone().requires_grad_()
    got = full_softmax_ce(h2, e2, y, reduction=reduction, elements=elements)
    got.backward(torch.tensor(1.0))
    assert float(ref.detach()) > 1.0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad, h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(e2.grad, e.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        full_softmax_ce(h0, e0[:, :8], y)
    with pytest.raises(ValueError, match="reduction"):
        full_softmax_ce(h0, e0, y, reduction="none")


def test_int8_lookup_has_per_row_scales_and_beats_one_scale(tmp_path):
    """Items of very different norms: the per-row int8 lookup stays closer to fp32 than ONNX Runtime's default
    (one scale for the whole table), and the float table is gone from the int8 encoder."""
    import onnx
    from onnx import numpy_helper

    from trainer.export import int8_embedding_rows

    torch.manual_seed(2)
    m = build_model("sasrec", 3000, max_len=20, hidden=32, blocks=1, heads=1, dropout=0.0).eval()
    with torch.no_grad():   # norms spread over two orders of magnitude, as in a long-tail catalog
        m.item_emb.weight.mul_(torch.logspace(-1, 1, 3001).unsqueeze(1)[torch.randperm(3001)])
    export_onnx(m, tmp_path / "e.onnx", 20)
    assert int8_embedding_rows(tmp_path / "e.onnx", tmp_path / "rows.onnx")
    g = onnx.load(tmp_path / "rows.onnx").graph
    tables = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    assert "item_emb.weight" not in tables and tables["item_emb.weight_i8"].dtype == np.int8
    assert tables["item_emb.weight_row_scale"].shape == (3001, 1)
    assert not int8_embedding_rows(tmp_path / "rows.onnx", tmp_path / "again.onnx")   # nothing left to rewrite
    quantize_int8(tmp_path / "e.onnx", tmp_path / "e8.onnx")

    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    (tmp_path / "ort").mkdir()
    ORTQuantizer.from_pretrained(tmp_path, file_name="e.onnx").quantize(
        save_dir=tmp_path / "ort", quantization_config=AutoQuantizationConfig.avx2(is_static=False))
    rng = np.random.default_rng(0)
    seq = rng.integers(1, 3001, (256, 20)).astype(np.int64)
    ref = Encoder(tmp_path / "e.onnx")(seq)
    rows_fp = Encoder(tmp_path / "rows.onnx")(seq)
    ours = Encoder(tmp_path / "e8.onnx")(seq)
    ort = Encoder(next((tmp_path / "ort").glob("*.onnx")))(seq)

    def err(x):
        return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))

    assert err(rows_fp) < 0.01          # the per-row lookup alone is within 1 %
    # the whole int8 encoder: 0.6 % here, against 15 % with one scale for the table
    assert err(ours) < 0.02 and err(ours) < err(ort) / 5


def test_int8_lookup_rewrite_leaves_a_shared_table_alone(tmp_path):
    """A table that a non-Gather node also reads (a tied output layer) is not rewritten: removing it would break
    the graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from trainer.export import int8_embedding_rows

    table = numpy_helper.from_array(np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32),
                                    "item_emb.weight")
    g = helper.make_graph(
        [helper.make_node("Gather", ["item_emb.weight", "idx"], ["h"], axis=0),
         helper.make_node("Gemm", ["h", "item_emb.weight"], ["scores"], transB=1)],
        "tied", [helper.make_tensor_value_info("idx", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [3, 10])], [table])
    onnx.save(helper.make_model(g), tmp_path / "tied.onnx")
    assert not int8_embedding_rows(tmp_path / "tied.onnx", tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == (tmp_path / "tied.onnx").read_bytes()
