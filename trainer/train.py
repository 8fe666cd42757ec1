"""Training loop: SASRec with softmax cross-entropy, early stopping on validation NDCG@10, then export.

``run(cfg, out_dir)`` is what ``edgerec train`` does: read data -> leave-one-out split -> train (tqdm progress,
early stopping on validation NDCG@10) -> test HR@10 / NDCG@10 of the PyTorch model -> ONNX export -> int8
quantization -> test metrics of the int8 encoder with the int8 item matrix (the served edge path) -> fp32 / int8
top-10 agreement -> signed-off bundle in ``out_dir``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as data_mod
from .config import TrainConfig
from .evaluate import LOOSplit, evaluate, loo_split, pad_left
from .model import BERT4Rec, SASRec, build_model

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    model: SASRec
    split: LOOSplit
    history: list[dict]          # per epoch: loss, valid metrics, seconds
    best_epoch: int
    valid: dict
    train_seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_windows(train_seqs, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-item windows: inputs ``seq[:-1]`` and targets ``seq[1:]``, last ``max_len``, left-padded.

    Returns int64 [U, L] inputs and targets for every training sequence with at least 2 items.
    """
    seqs = [s for s in train_seqs if len(s) >= 2]
    return pad_left([s[:-1] for s in seqs], max_len), pad_left([s[1:] for s in seqs], max_len)


def torch_score_fn(model: SASRec, device: str = "cpu"):
    """score_fn for trainer.evaluate: tokens [B, L] -> float32 [B, N] scores of the PyTorch model."""

    @torch.no_grad()
    def fn(seq: np.ndarray) -> np.ndarray:
        model.eval()
        u = model(torch.from_numpy(seq).to(device))
        return (u @ model.item_embeddings().T).float().cpu().numpy()

    return fn


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar-length sequences (sorted within chunks of 50 batches), so each batch can be
    trimmed to its longest sequence; the batch order is shuffled too."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for s in range(0, len(order), chunk):
        part = order[s:s + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def _loss(model: SASRec, inp: torch.Tensor, tgt: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    h = model.encode(inp)                  # [B L D]
    mask = tgt > 0
    h, y = h[mask], tgt[mask] - 1          # [P D], [P] item rows
    items = model.item_embeddings()        # [N D]
    if cfg.loss == "ce":
        return F.cross_entropy(h @ items.T, y)
    # Sampled softmax with shared uniform negatives (SASRec+); accidental hits are masked out.
    neg = torch.randint(0, items.shape[0], (cfg.num_negatives,), device=h.device)
    pos_logit = (h * items[y]).sum(-1, keepdim=True)                   # [P 1]
    neg_logit = (h @ items[neg].T).masked_fill(neg[None, :] == y[:, None], float("-inf"))  # [P K]
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(y), dtype=torch.long, device=h.device))


def train(cfg: TrainConfig, data: data_mod.Interactions, progress: bool = True) -> TrainResult:
    """Train SASRec on ``data`` with early stopping on validation NDCG@10 (leave-one-out)."""
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.device
    split = loo_split(data.sequences)
    if len(split.users) == 0:
        raise data_mod.DataError("no user has 3 or more interactions; leave-one-out evaluation needs them")
    if cfg.model == "bert4rec":   # whole windows; the targets are drawn by masking, batch by batch
        inputs = pad_left([s for s in split.train if len(s) >= 1], cfg.max_len)
        targets = None
    else:
        inputs, targets = training_windows(split.train, cfg.max_len)
    if len(inputs) == 0:
        raise data_mod.DataError("no training sequence has 2 or more items")
    lengths = (inputs > 0).sum(axis=1)
    model = build_model(cfg.model, data.num_items, cfg.max_len, cfg.hidden, cfg.blocks, cfg.heads,
                        cfg.dropout).to(device)
    mask_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    gen = np.random.default_rng(cfg.seed)
    history: list[dict] = []
    best = (-1.0, 0, None, {})
    start = time.perf_counter()
    score = torch_score_fn(model, device)
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        total, batches = 0.0, 0
        for idx in length_bucketed_batches(lengths, cfg.batch_size, gen):
            width = int(lengths[idx].max())
            inp = torch.from_numpy(inputs[idx, -width:]).to(device)
            if isinstance(model, BERT4Rec):
                inp, tgt = model.mask_items(inp, cfg.mask_prob, mask_gen)
            else:
                tgt = torch.from_numpy(targets[idx, -width:]).to(device)
            loss = _loss(model, inp, tgt, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().item()
            batches += 1
        valid = evaluate(score, split.valid_ctx, split.valid_target, cfg.max_len)
        row = {"epoch": epoch, "loss": total / max(batches, 1), "seconds": time.perf_counter() - t0,
               **{f"valid_{k}": v for k, v in valid.items() if k != "users"}}
        history.append(row)
        improved = valid["NDCG@10"] > best[0]
        if improved:
            best = (valid["NDCG@10"], epoch, {k: v.detach().clone() for k, v in model.state_dict().items()}, valid)
        bar.set_postfix(loss=f"{row['loss']:.3f}", ndcg10=f"{valid['NDCG@10']:.4f}", best=best[1])
        if not progress:
            log.info("epoch %d loss %.4f valid HR@10 %.4f NDCG@10 %.4f", epoch, row["loss"], valid["HR@10"],
                     valid["NDCG@10"])
        if epoch >= cfg.min_epochs and epoch - best[1] >= cfg.patience:
            break
        if cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s:
            log.info("time budget of %.0f s reached after epoch %d", cfg.time_budget_s, epoch)
            break
    bar.close()
    model.load_state_dict(best[2])
    model.eval()
    return TrainResult(model, split, history, best[1], best[3], time.perf_counter() - start)


def run(cfg: TrainConfig, out_dir: str | os.PathLike, progress: bool = True, printer=print) -> dict:
    """Everything ``edgerec train`` does; returns the bundle manifest. See the module docstring."""
    from edge_runtime.bundle import check_out_dir

    from .export import build_bundle

    check_out_dir(out_dir)
    data = data_mod.load(cfg.data, columns=cfg.columns, attributes=cfg.attributes)
    s = data.summary()
    printer(f"data: {data.source['path']} ({data.source['format']}): {s['users']} users, {s['items']} items, "
            f"{s['interactions']} interactions")
    result = train(cfg, data, progress=progress)
    printer(f"trained {len(result.history)} epochs in {result.train_seconds:.1f} s; best epoch {result.best_epoch} "
            f"(valid NDCG@10 {result.valid['NDCG@10']:.4f})")
    manifest = build_bundle(cfg, data, result, out_dir, printer=printer)
    return manifest
