"""Export: ONNX encoder, int8 quantization, fp32 / int8 quality check, bundle.

* ONNX export with ``torch.onnx.export`` (dynamo exporter), input ``item_seq`` int64 [B, L], output ``user_vec``
  float32 [B, d], dynamic batch.
* int8: the encoder's item-embedding lookup becomes an int8 table with per-row scales, then dynamic quantization of
  the MatMuls (int8 weights, activations quantized at run time) with Hugging Face optimum's ``ORTQuantizer``, which
  drives ONNX Runtime's quantizer. Item embeddings leave as a float32 matrix and as an int8
  matrix with per-row scales (``edge_runtime.scoring.quantize_rows``).
* Quality: test HR@10 / NDCG@10 (leave-one-out, full ranking, trainer.evaluate) of the PyTorch model, of the fp32
  ONNX encoder with the float32 item matrix and of the int8 encoder with the int8 item matrix (what the daemon
  serves), plus the mean top-10 overlap between the PyTorch model and the int8 path on held-out test users.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edge_runtime import bundle as bundle_mod
from edge_runtime.model import Encoder
from edge_runtime.scoring import dense_scores, quantize_rows

from .evaluate import evaluate, topk_lists, topk_overlap
from .train import TrainResult, torch_score_fn

log = logging.getLogger(__name__)


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, max_len: int) -> None:
    """Write the encoder as ONNX: ``item_seq`` int64 [B, l] (1 <= l <= max_len, left-padded) -> ``user_vec``
    float32 [B, d]. Both the batch and the window are dynamic: a short session costs a short encoder call."""
    model = model.eval().cpu()
    dummy = torch.zeros((2, max_len), dtype=torch.long)
    dummy[:, -3:] = torch.tensor([1, 2, 3])
    import warnings
    # torch's exporter logs a warning per torchvision op it cannot register; irrelevant here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            model, (dummy,), input_names=["item_seq"], output_names=["user_vec"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096),
                              1: torch.export.Dim("seq", min=1, max=max_len)},), dynamo=True, verbose=False,
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
    import onnx
    from onnx import TensorProto, helper, numpy_helper

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


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """int8 encoder: the item-embedding lookup as an int8 table with per-row scales (``int8_embedding_rows``), then
    int8 dynamic quantization of the MatMuls (int8 weights, activations quantized at run time) with optimum's
    ORTQuantizer (ONNX Runtime's quantizer)."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    fp32_path = Path(fp32_path)
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


def onnx_score_fn(encoder: Encoder, items: np.ndarray, scales: np.ndarray | None = None, per_user: bool = False):
    """score_fn for trainer.evaluate over an ONNX encoder and an item matrix (float32, or int8 + scales).

    ``per_user=True`` encodes each context alone over its real window ([1, l], padding stripped), exactly as the
    daemon does (``edge_runtime.model.Model.encode``). The int8 encoder needs it to match the served numbers:
    dynamic quantization takes one activation scale per tensor, so in a padded batch a user's vector depends on the
    other users of the batch (measured: HR@10 0.0927 batched vs 0.0921 served, d = 256).
    """
    if not per_user:
        return lambda seq: dense_scores(encoder(seq), items, scales)

    def fn(seq: np.ndarray) -> np.ndarray:
        users = np.stack([encoder(row[np.argmax(row > 0):].reshape(1, -1))[0] for row in seq])
        return dense_scores(users, items, scales)

    return fn


def _attributes_csr(attrs):
    indptr = np.zeros(len(attrs) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in attrs], out=indptr[1:])
    values = [v for a in attrs for v in a]
    return indptr, values


def build_bundle(cfg, data, result: TrainResult, out_dir, printer=print) -> dict:
    """Export, quantize, evaluate and write the bundle; returns its manifest."""
    model, split = result.model, result.split
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir.parent))
    try:
        t0 = time.perf_counter()
        export_onnx(model.folded(), staged / "encoder.onnx", cfg.max_len)
        quantize_int8(staged / "encoder.onnx", staged / "encoder.int8.onnx")
        export_s = time.perf_counter() - t0
        items = model.item_embeddings().detach().cpu().numpy().astype(np.float32)
        q, scales = quantize_rows(items)
        np.save(staged / "items.f32.npy", items, allow_pickle=False)
        np.save(staged / "items.i8.npy", q, allow_pickle=False)
        np.save(staged / "items.scale.npy", scales, allow_pickle=False)
        np.save(staged / "popularity.npy", data.popularity().astype(np.float32), allow_pickle=False)
        with open(staged / "item_ids.json", "w", encoding="utf-8") as f:
            json.dump(data.item_ids, f)
        if data.item_attributes is not None:
            indptr, values = _attributes_csr(data.item_attributes)
            names: dict[str, int] = {}
            codes = np.fromiter((names.setdefault(v, len(names)) for v in values), dtype=np.int32, count=len(values))
            np.save(staged / "item_attr_indptr.npy", indptr, allow_pickle=False)
            np.save(staged / "item_attr_codes.npy", codes, allow_pickle=False)
            with open(staged / "item_attr_names.json", "w", encoding="utf-8") as f:
                json.dump(list(names), f)

        enc32 = Encoder(staged / "encoder.onnx")
        enc8 = Encoder(staged / "encoder.int8.onnx")
        paths = {
            "pytorch_fp32": torch_score_fn(model),
            "onnx_fp32": onnx_score_fn(enc32, items),
            "onnx_int8": onnx_score_fn(enc8, q, scales, per_user=True),   # as served: one user per call
        }
        metrics = {name: evaluate(fn, split.test_ctx, split.test_target, cfg.max_len) for name, fn in paths.items()}
        n_check = min(cfg.int8_check_users, len(split.test_ctx))
        check = np.random.default_rng(cfg.seed).choice(len(split.test_ctx), n_check, replace=False)
        ctx = [split.test_ctx[i] for i in check]
        ref = topk_lists(paths["pytorch_fp32"], ctx, cfg.max_len, 10)
        overlap = {name: topk_overlap(ref, topk_lists(paths[name], ctx, cfg.max_len, 10))
                   for name in ("onnx_fp32", "onnx_int8")}
        f32, i8 = metrics["pytorch_fp32"], metrics["onnx_int8"]
        rel = (i8["NDCG@10"] - f32["NDCG@10"]) / f32["NDCG@10"] if f32["NDCG@10"] else 0.0
        printer("test (leave-one-out, full ranking over %d items, %d users):" % (data.num_items, f32["users"]))
        printer(f"  {'path':<34} {'HR@10':>8} {'NDCG@10':>8} {'HR@20':>8} {'NDCG@20':>8}")
        labels = {"pytorch_fp32": "fp32 (PyTorch)", "onnx_fp32": "fp32 (ONNX, float32 items)",
                  "onnx_int8": "int8 (ONNX int8, int8 items)"}
        for name, m in metrics.items():
            printer(f"  {labels[name]:<34} {m['HR@10']:8.4f} {m['NDCG@10']:8.4f} {m['HR@20']:8.4f} "
                    f"{m['NDCG@20']:8.4f}")
        printer(f"  int8 vs fp32 NDCG@10: {100 * rel:+.2f}% relative; top-10 overlap with PyTorch on {n_check} "
                f"held-out users: fp32 ONNX {overlap['onnx_fp32']:.3f}, int8 {overlap['onnx_int8']:.3f}")
        created = _dt.datetime.now(_dt.timezone.utc)
        manifest = {
            "model_version": bundle_mod.new_model_version(created, data.source.get("fingerprint", "")),
            "created_at": created.isoformat(timespec="seconds"),
            "model": {"architecture": type(model).__name__, "num_items": data.num_items, "dim": int(items.shape[1]),
                      "max_len": cfg.max_len, "encoder_input": "item_seq", "encoder_output": "user_vec"},
            "training_config": cfg.to_dict(),
            "dataset": {k: v for k, v in data.source.items()} | {"summary": data.summary()},
            "metrics": {"test": metrics, "valid_best": result.valid, "best_epoch": result.best_epoch,
                        "epochs": len(result.history), "train_seconds": round(result.train_seconds, 2),
                        "export_seconds": round(export_s, 2), "int8_ndcg10_relative_change": rel,
                        "top10_overlap_vs_pytorch": overlap, "overlap_users": n_check,
                        "history": result.history},
        }
        out = bundle_mod.write_bundle(out_dir, staged, manifest)
        printer(f"bundle {manifest['model_version']} written to {out}")
        return bundle_mod.load_manifest(out)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
