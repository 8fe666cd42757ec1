"""What ``edgerec train`` does, end to end: data -> train -> export -> evaluate -> bundle.

``run(cfg, out_dir)``: read data -> leave-one-out split -> train (``train.py``: tqdm progress, early stopping on
validation NDCG@10) -> ONNX export and int8 quantization (``export.py``) -> item matrices, float32 and int8 with
per-row scales (``edge_runtime.bundle.writer``) -> test HR@10 / NDCG@10 (leave-one-out, full ranking,
``evaluate.py``) of the PyTorch model, of the fp32 ONNX encoder with the float32 items and of the int8 encoder with
the int8 items, one user per call as the node serves it -> fp32 / int8 top-10 agreement -> bundle in ``out_dir``
-> the trainer's checkpoint beside it (``checkpoint.py``; ``<out_dir>.ckpt`` by default), which ``finetune.py``
starts from.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_runtime import scoring
from edge_runtime.bundle import format as fmt
from edge_runtime.bundle.writer import (attribute_csr, check_out_dir, new_model_version, stage_arrays,
                                        write_bundle)
from edge_runtime.errors import BundleError
from edge_runtime.serving.encoder import Encoder, NativeEncoder, load_encoder

from . import checkpoint as checkpoint_mod
from . import data as data_mod
from . import distributed as distributed_mod
from .config import TrainConfig
from .evaluate import evaluate, topk_lists, topk_overlap
from .export import export_native, export_onnx, quantize_int8
from .scorers import onnx_score_fn, torch_score_fn
from .train import TrainResult, train


def run(cfg: TrainConfig, out_dir: str | os.PathLike, progress: bool = True, printer=print,
        checkpoint: str | os.PathLike | None = None) -> dict:
    """Everything ``edgerec train`` does; returns the bundle manifest (``{}`` on ranks other than 0). See the module
    docstring. ``checkpoint``: where the trainer's checkpoint goes (default ``checkpoint.default_path(out_dir)``,
    i.e. ``<out_dir>.ckpt``, outside the bundle).

    Raises:
        BundleError: ``out_dir`` exists and is not a bundle (checked before training).
        DataError: the data cannot be read or has no user to evaluate.
        OSError: the checkpoint cannot be written.
    """
    check_out_dir(out_dir)
    rank, world = distributed_mod.distributed()
    if rank != 0:
        printer = lambda *a, **k: None  # noqa: E731  (rank 0 reports and writes the bundle)
    data = data_mod.load(cfg.data, columns=cfg.columns, attributes=cfg.attributes)
    s = data.summary()
    printer(f"data: {data.source['path']} ({data.source['format']}): {s['users']} users, {s['items']} items, "
            f"{s['interactions']} interactions")
    result = train(cfg, data, progress=progress)
    printer(f"trained {len(result.history)} epochs in {result.train_seconds:.1f} s; best epoch {result.best_epoch} "
            f"(valid NDCG@10 {result.valid['NDCG@10']:.4f})")
    if world > 1:
        distributed_mod.barrier()
        if rank != 0:
            distributed_mod.shutdown()
            return {}
    manifest = build_bundle(cfg, data, result, out_dir, printer=printer)
    path = save_checkpoint(cfg, data, result, manifest, out_dir, checkpoint)
    printer(f"checkpoint written to {path}")
    if world > 1:
        distributed_mod.shutdown()
    return manifest


def save_checkpoint(cfg: TrainConfig, data: data_mod.Interactions, result: TrainResult, manifest: dict,
                    out_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Write the checkpoint of the bundle just built in ``out_dir`` (weights, optimizer, ids, attributes, config,
    every user's sequence, popularity, the int8 encoder's bytes); returns its path (default ``<out_dir>.ckpt``)."""
    model = result.model
    attr_names = (attribute_csr(data.item_attributes)[2]
                  if model.attr_emb is not None and data.item_attributes is not None else [])
    ck = checkpoint_mod.Checkpoint(
        model_version=manifest["model_version"], config=cfg.to_dict(),
        state={k: v.detach().cpu() for k, v in model.state_dict().items()},
        optimizer=result.optimizer.state_dict() if result.optimizer is not None else None,
        item_ids=list(data.item_ids), item_attributes=data.item_attributes, attr_names=attr_names,
        user_ids=list(data.user_ids), sequences=[np.asarray(s, dtype=np.int64) for s in data.sequences],
        fresh=np.zeros(data.num_users, dtype=np.int64), popularity=data.popularity(),
        encoder_int8=(Path(out_dir) / fmt.ENCODER_INT8).read_bytes(), event_cursor=0,
        lineage={"created_at": manifest.get("created_at"), "finetuned_from": None,
                 "dataset": {k: data.source.get(k) for k in ("path", "format", "fingerprint")}})
    return checkpoint_mod.save(ck, checkpoint_mod.default_path(out_dir) if path is None else path)


def compose_arrays(model) -> tuple[np.ndarray, np.ndarray] | None:
    """(attribute-value embeddings float32 [V, d], mean id embedding float32 [d]) of a model with side information,
    for the bundle (a node composes new items from them, ``edge_runtime.serving.compose``); None without."""
    if model.attr_emb is None:
        return None
    w = model.item_emb.weight.detach().cpu().numpy()
    return (model.attr_emb.weight.detach().cpu().numpy().astype(np.float32),
            w[1:model.num_items + 1].mean(axis=0).astype(np.float32))


def _checked_native(staged: Path, printer) -> NativeEncoder | None:
    """The staged native encoder weights (``export_native``), checked against the int8 ONNX encoder as a node checks
    them at load (``load_encoder``): the encoder, or None when there is no file or no native kernel here. A file
    that fails the check is removed (the bundle then serves through ONNX Runtime) and a line says why."""
    path = staged / fmt.ENCODER_NATIVE
    if not path.is_file() or scoring.native_kernel() is None:
        return None
    try:
        return load_encoder(staged / fmt.ENCODER_INT8, path, mode="native")
    except BundleError as exc:
        path.unlink()
        printer(f"native encoder not bundled: {exc}")
        return None


def build_bundle(cfg: TrainConfig, data: data_mod.Interactions, result: TrainResult, out_dir: str | os.PathLike,
                 printer=print) -> dict:
    """Export, quantize, evaluate and write the bundle; returns its manifest."""
    model, split = result.model, result.split
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir.parent))
    try:
        t0 = time.perf_counter()
        folded = model.folded()
        export_onnx(folded, staged / fmt.ENCODER_FP32, cfg.max_len)
        quantize_int8(staged / fmt.ENCODER_FP32, staged / fmt.ENCODER_INT8, cfg.int8_matmuls)
        if cfg.int8_matmuls == "float":   # the same encoder for the node's native encoder
            export_native(folded, staged / fmt.ENCODER_INT8, staged / fmt.ENCODER_NATIVE)
        export_s = time.perf_counter() - t0
        items = model.item_embeddings().detach().cpu().numpy().astype(np.float32)
        q, scales = stage_arrays(staged, items, data.item_ids, data.popularity(), data.item_attributes,
                                 compose_arrays(model))
        enc32 = Encoder(staged / fmt.ENCODER_FP32)
        enc8 = Encoder(staged / fmt.ENCODER_INT8)
        paths = {
            "pytorch_fp32": torch_score_fn(model),
            "onnx_fp32": onnx_score_fn(enc32, items),
            "onnx_int8": onnx_score_fn(enc8, q, scales, per_user=True),   # as served: one user per call
        }
        native = _checked_native(staged, printer)
        if native is not None:   # what a node serves by default (edge_runtime.serving.encoder.load_encoder)
            paths["native_int8"] = onnx_score_fn(native, q, scales, per_user=True)
        metrics = {name: evaluate(fn, split.test_ctx, split.test_target, cfg.max_len) for name, fn in paths.items()}
        n_check = min(cfg.int8_check_users, len(split.test_ctx))
        check = np.random.default_rng(cfg.seed).choice(len(split.test_ctx), n_check, replace=False)
        ctx = [split.test_ctx[i] for i in check]
        ref = topk_lists(paths["pytorch_fp32"], ctx, cfg.max_len, 10)
        overlap = {name: topk_overlap(ref, topk_lists(paths[name], ctx, cfg.max_len, 10))
                   for name in paths if name != "pytorch_fp32"}
        f32, i8 = metrics["pytorch_fp32"], metrics["onnx_int8"]
        rel = (i8["NDCG@10"] - f32["NDCG@10"]) / f32["NDCG@10"] if f32["NDCG@10"] else 0.0
        printer("test (leave-one-out, full ranking over %d items, %d users):" % (data.num_items, f32["users"]))
        printer(f"  {'path':<34} {'HR@10':>8} {'NDCG@10':>8} {'HR@20':>8} {'NDCG@20':>8}")
        labels = {"pytorch_fp32": "fp32 (PyTorch)", "onnx_fp32": "fp32 (ONNX, float32 items)",
                  "onnx_int8": "int8 (ONNX int8, int8 items)", "native_int8": "int8 (native encoder, int8 items)"}
        for name, m in metrics.items():
            printer(f"  {labels[name]:<34} {m['HR@10']:8.4f} {m['NDCG@10']:8.4f} {m['HR@20']:8.4f} "
                    f"{m['NDCG@20']:8.4f}")
        printer(f"  int8 vs fp32 NDCG@10: {100 * rel:+.2f}% relative; top-10 overlap with PyTorch on {n_check} "
                f"held-out users: fp32 ONNX {overlap['onnx_fp32']:.3f}, int8 {overlap['onnx_int8']:.3f}")
        created = _dt.datetime.now(_dt.timezone.utc)
        manifest = {
            "model_version": new_model_version(created, data.source.get("fingerprint", "")),
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
        out = write_bundle(out_dir, staged, manifest)
        printer(f"bundle {manifest['model_version']} written to {out}")
        return fmt.load_manifest(out)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
