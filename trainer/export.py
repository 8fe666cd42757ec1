"""Export of the session encoder: ONNX, then int8.

* ONNX export of the serving form (``trainer.model.ServingEncoder``) with ``torch.onnx.export`` (dynamo
  exporter), input ``item_seq`` int64 [B, L], output ``user_vec`` float32 [B, d], dynamic batch and window.
* int8: the encoder's item-embedding lookup becomes an int8 table with per-row scales; the MatMuls stay float32
  (batch-exact, the default) or get dynamic quantization (int8 weights, activations quantized at run time) with
  Hugging Face optimum's ``ORTQuantizer``, which drives ONNX Runtime's quantizer (``quantize_int8``).

The item matrices, the quality check and the bundle are ``pipeline.py``'s.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.scoring.quantize import quantize_rows

log = logging.getLogger(__name__)


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, max_len: int) -> None:
    """Write the encoder as ONNX: ``item_seq`` int64 [B, l] (1 <= l <= max_len, left-padded) -> ``user_vec``
    float32 [B, d]. Both the batch and the window are dynamic: a short session costs a short encoder call.

    A SASRec / BERT4Rec is exported in its serving form (``SASRec.serving``: the last block computes only the last
    position, with fewer graph nodes; batch-exact); any other module as it is. ``model`` is not changed."""
    if hasattr(model, "serving"):
        model = model.serving()
    model = model.eval().cpu()
    dummy = torch.zeros((2, max_len), dtype=torch.long)
    real = min(3, max_len)
    dummy[:, -real:] = torch.arange(1, real + 1)
    # a window of one item is a static dimension (torch.export has no dynamic Dim with min = max)
    seq = {1: torch.export.Dim("seq", min=1, max=max_len)} if max_len > 1 else {}
    # torch's exporter logs a warning per torchvision op it cannot register; irrelevant here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            model, (dummy,), input_names=["item_seq"], output_names=["user_vec"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096), **seq},), dynamo=True, verbose=False,
            optimize=True)
    onnx_program.save(str(path))


def int8_embedding_rows(src: str | os.PathLike, dst: str | os.PathLike, table: str = "item_emb.weight") -> bool:
    """Rewrite the encoder's input item-embedding lookup to an int8 table with per-row scales.

    ONNX Runtime's dynamic quantizer would store the [N + 1, d] ``Gather`` table as uint8 with ONE scale for the
    whole tensor; with tens of thousands of items of very different norms that costs accuracy (on the 54,542-item
    Beauty file, bench/bench_int8.py: test NDCG@10 -1.52 % against fp32, against -0.25 % with per-row scales).
    Here each row gets its own symmetric scale (``edge_runtime.scoring.quantize_rows``, as the served item matrix):
    ``Gather(table)`` becomes ``Cast(Gather(table_i8), float) * Gather(row_scales)``; 1 byte per weight as before,
    plus 4 bytes per row.

    Args:
        src, dst: ONNX files (float32 encoder in, rewritten encoder out; may be the same path).
        table: name of the float32 [rows, d] initializer read by ``Gather`` nodes.

    Returns:
        True when a lookup was rewritten; False (``dst`` is then a copy) when the graph has no such table or another
        kind of node also reads it (a tied output layer), which the rewrite would break.
    """
    m = onnx.load(str(src))
    init = {i.name: i for i in m.graph.initializer}
    users = [n for n in m.graph.node if n.op_type == "Gather" and n.input[0] == table]
    others = [n for n in m.graph.node if table in n.input and n not in users]
    if table not in init or not users or others:
        if Path(src) != Path(dst):
            shutil.copyfile(src, dst)
        return False
    q, scales = quantize_rows(numpy_helper.to_array(init[table]))
    m.graph.initializer.remove(init[table])
    m.graph.initializer.extend([numpy_helper.from_array(q, f"{table}_i8"),
                                numpy_helper.from_array(scales.reshape(-1, 1), f"{table}_row_scale")])
    nodes = []
    for n in m.graph.node:
        if n in users:
            out, idx = n.output[0], n.input[1]
            nodes += [helper.make_node("Gather", [f"{table}_i8", idx], [f"{out}_i8"], axis=0),
                      helper.make_node("Cast", [f"{out}_i8"], [f"{out}_f32"], to=TensorProto.FLOAT),
                      helper.make_node("Gather", [f"{table}_row_scale", idx], [f"{out}_scale"], axis=0),
                      helper.make_node("Mul", [f"{out}_f32", f"{out}_scale"], [out])]
        else:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return True


INT8_MATMULS = ("float", "dynamic")


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, matmuls: str = "float") -> None:
    """The int8 encoder: the item-embedding lookup as an int8 table with per-row scales (``int8_embedding_rows``:
    the bulk of the weights, N x d), and the Transformer's MatMuls by ``matmuls``:

    * ``"float"`` (default): float32 weights and activations. The encoder is then batch-exact: a padded batch of
      shoppers gives each, bit for bit, the vector of a call with that shopper alone (the export's attention is
      padding-exact, ``trainer.model._attend_padding_exact``), so the daemon encodes concurrent requests in one call
      (``Model.batch_exact``). Measured on the Beauty bundle's serving form (d = 64, 2-core Xeon, sessions of 8
      items): a lone call 28-29 µs against 33 µs with dynamic quantization, 4 sessions in one call 10 µs each
      against 12 µs.
    * ``"dynamic"``: int8 dynamic quantization of the MatMuls (int8 weights, activations quantized at run time, one
      scale per call) with optimum's ORTQuantizer (ONNX Runtime's quantizer): smaller MatMul weights and int8
      GEMMs, which pay for large hidden sizes; one activation scale per call makes a user's vector depend on the
      others of a batch, so the daemon encodes each request alone.

    Raises:
        ValueError: ``matmuls`` is not one of ``INT8_MATMULS``.
    """
    if matmuls not in INT8_MATMULS:
        raise ValueError(f"int8 MatMuls {matmuls!r}: must be one of {list(INT8_MATMULS)}")
    fp32_path = Path(fp32_path)
    if matmuls == "float":
        int8_embedding_rows(fp32_path, out_path)
        return
    # imported here: optimum pulls in transformers (seconds), which only this step needs
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # ONNX Runtime's quantizer logs one INFO line per tensor on the root logger
    # optimum warns that our encoder has no Hugging Face config.json (it needs none)
    logging.getLogger("optimum.onnxruntime.quantization").setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = Path(tmp) / "rows" / fp32_path.name
            rows.parent.mkdir()
            int8_embedding_rows(fp32_path, rows)
            quantizer = ORTQuantizer.from_pretrained(rows.parent, file_name=rows.name)
            qconfig = AutoQuantizationConfig.avx2(is_static=False, per_channel=False, operators_to_quantize=["MatMul"])
            quantizer.quantize(save_dir=Path(tmp) / "out", quantization_config=qconfig)
            produced = list((Path(tmp) / "out").glob("*.onnx"))
            if len(produced) != 1:
                raise RuntimeError(f"optimum produced {[p.name for p in produced]}, expected one .onnx file")
            shutil.move(str(produced[0]), out_path)
    finally:
        root.setLevel(level)


NATIVE_FORM = 1   # the layout of the native encoder's weights file (edge_runtime.serving.encoder.NativeEncoder)


def export_native(model: torch.nn.Module, int8_path: str | os.PathLike, out_path: str | os.PathLike) -> bool:
    """Write the native encoder's weights (``edge_runtime.serving.encoder.NativeEncoder``, native/src/encoder-inl.h)
    for the int8 encoder at ``int8_path``: the same function as that ONNX file, computed by the node's own kernel
    in a few µs instead of an ONNX Runtime call (48 graph nodes, 28-45 µs for a session of 8 items on the Beauty
    bundle, most of it per-node overhead).

    One ``.npz`` (NumPy, no pickle): ``config`` int64 [8] (form, d, heads, max_len, blocks, causal, sasrec style,
    [MASK] token or -1), ``eps`` float64 [1], the token table exactly as the int8 ONNX file holds it (``table``
    int8 [rows, d], ``table_scale`` float32 [rows]: scaled, side information folded in, per-row scales), ``pos``
    float32 [max_len, d], ``ln_out_w`` / ``ln_out_b`` [d], and per block ``b<i>_`` its LayerNorms, query / key /
    value / output projections and feed-forward layers as float32 [in, out] matrices and [out] biases.

    Args:
        model: the trained SASRec / BERT4Rec, folded (``SASRec.folded``: what ``export_onnx`` exported).
        int8_path: the int8 encoder written by ``quantize_int8`` with float MatMuls.
        out_path: the ``.npz`` to write.

    Returns:
        True when written; False (nothing written) for a model that is not a SASRec / BERT4Rec, or an int8 file
        without the per-row int8 table (the native encoder computes only that form).
    """
    if not hasattr(model, "serving") or getattr(model, "attr_emb", None) is not None:
        return False
    init = {i.name: i for i in onnx.load(str(int8_path)).graph.initializer}
    if "item_emb.weight_i8" not in init or "item_emb.weight_row_scale" not in init:
        return False
    m = model.eval()
    d, heads = m.hidden, m.blocks[0].heads
    t = lambda lin_w: lin_w.detach().cpu().numpy().astype(np.float32).T.copy()   # noqa: E731  [out, in] -> [in, out]
    v = lambda x: x.detach().cpu().numpy().astype(np.float32).copy()              # noqa: E731
    out = {
        "config": np.array([NATIVE_FORM, d, heads, m.max_len, len(m.blocks), int(m.causal),
                            int(m.blocks[0].style == "sasrec"), m.mask_token if m.extra_tokens else -1],
                           dtype=np.int64),
        "eps": np.array([m.ln_out.eps], dtype=np.float64),
        "table": numpy_helper.to_array(init["item_emb.weight_i8"]).astype(np.int8),
        "table_scale": numpy_helper.to_array(init["item_emb.weight_row_scale"]).reshape(-1).astype(np.float32),
        "pos": v(m.pos_emb.weight), "ln_out_w": v(m.ln_out.weight), "ln_out_b": v(m.ln_out.bias),
    }
    for i, blk in enumerate(m.blocks):
        w, b = blk.qkv.weight, blk.qkv.bias
        p = f"b{i}_"
        out.update({p + "ln1_w": v(blk.ln_attn.weight), p + "ln1_b": v(blk.ln_attn.bias),
                    p + "wq": t(w[:d]), p + "bq": v(b[:d]), p + "wk": t(w[d:2 * d]), p + "bk": v(b[d:2 * d]),
                    p + "wv": t(w[2 * d:]), p + "bv": v(b[2 * d:]),
                    p + "wo": t(blk.out.weight), p + "bo": v(blk.out.bias),
                    p + "ln2_w": v(blk.ln_ffn.weight), p + "ln2_b": v(blk.ln_ffn.bias),
                    p + "f1": t(blk.ffn[0].weight), p + "f1b": v(blk.ffn[0].bias),
                    p + "f2": t(blk.ffn[3].weight), p + "f2b": v(blk.ffn[3].bias)})
    with open(out_path, "wb") as f:
        np.savez(f, **out)
    return True
