"""The training loop: SASRec or BERT4Rec with softmax cross-entropy (``losses.py``), early stopping on validation
NDCG@10 (leave-one-out, ``evaluate.py``), data-parallel under torchrun (``distributed.py``). What comes before and
after (data, export, bundle) is ``pipeline.py``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from edge_runtime.bundle.writer import attribute_csr

from . import data as data_mod
from .config import TrainConfig
from .distributed import broadcast_flag, distributed
from .evaluate import LOOSplit, evaluate, loo_split, pad_left
from .losses import sequence_loss
from .model import BERT4Rec, SASRec, build_model
from .scorers import torch_score_fn

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    model: SASRec
    split: LOOSplit
    history: list[dict]          # per epoch: loss, valid metrics, seconds
    best_epoch: int
    valid: dict
    train_seconds: float
    optimizer: torch.optim.Optimizer | None = None   # the Adam that trained ``model`` (its state goes to checkpoints)


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


def attribute_codes(item_attributes: list[list[str]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-item attribute lists -> (indptr int64 [N + 1], codes int64 [nnz], number of distinct values): the
    bundle's CSR (``edge_runtime.bundle.writer.attribute_csr``), as the model's side information takes it."""
    indptr, codes, names = attribute_csr(item_attributes)
    return indptr, codes.astype(np.int64), len(names)


def training_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                     bucketed: bool = False) -> list[np.ndarray]:
    """Index batches over the training sequences, a new draw per epoch.

    ``bucketed=True``: shuffled batches of similar-length sequences (sorted within chunks of 50 batches), so each
    batch can be trimmed to its longest sequence; the batch order is shuffled too. Fast, but the per-batch mean
    loss then weighs a target by 1 / (targets in its batch), so targets of short sequences count more.
    ``bucketed=False``: plain shuffled batches (as the SASRec+ reference code): every target weighs about the same;
    on BERT4Rec's Beauty files this lifted validation NDCG@10 by 6 % (bench/configs/beauty_bert4rec.toml).

    Returns int64 index arrays of ``batch_size`` (the last of a chunk may be shorter) covering every sequence once.
    """
    order = rng.permutation(len(lengths))
    if not bucketed:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    chunk = batch_size * 50
    batches = []
    for s in range(0, len(order), chunk):
        part = order[s:s + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


class _LossModule(torch.nn.Module):
    """The loss as a module's forward, so DistributedDataParallel sees the call it synchronizes gradients for."""

    def __init__(self, model: SASRec, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, inp: torch.Tensor, tgt: torch.Tensor, denom: torch.Tensor | None = None) -> torch.Tensor:
        return sequence_loss(self.model, inp, tgt, self.cfg.loss, self.cfg.num_negatives, self.cfg.negatives,
                             None if denom is None else float(denom))


class Progress:
    """The training progress bar, drawn over the bound that will end the run: ``cfg.epochs`` epochs, or the time
    budget in seconds (``cfg.time_budget_s``) when the epochs would not fit in it. Before the first epoch ends a
    budget is assumed to be the bound; after each epoch the mean epoch time so far decides (the bar switches when
    the other bound would end the run first). Early stopping (``patience``) may end it sooner; the postfix shows
    the epoch count either way. ``disable``: no bar (quiet runs, ranks other than 0)."""

    def __init__(self, cfg: TrainConfig, disable: bool, start: float):
        self.epochs, self.budget, self.start = cfg.epochs, cfg.time_budget_s, start
        self.by_time = self.budget is not None
        self.done, self.over = 0, False   # epochs finished; the budget passed
        self.bar = tqdm(disable=disable, **self._look())

    def _look(self) -> dict:
        if self.by_time:
            return dict(total=round(self.budget), desc=f"train ({self.budget:.0f} s budget)", unit="s",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}"
                                   "{postfix}]")
        return dict(total=self.epochs, desc=f"train ({self.epochs} epochs)", unit="epoch", bar_format=None)

    def _show(self, by_time: bool, epoch: int) -> None:
        """Redraw over the time budget (``by_time``) or the epochs, ``epoch`` epochs done."""
        if by_time != self.by_time:
            self.by_time = by_time
            look = self._look()
            self.bar.unit, self.bar.bar_format = look["unit"], look["bar_format"]
            self.bar.set_description_str(look["desc"], refresh=False)
            self.bar.reset(total=look["total"])
            if not by_time:
                self.bar.update(epoch)

    def tick(self, between_epochs: bool = False) -> None:
        """Every batch (and after each epoch, ``between_epochs``): a time bar follows the clock (tqdm redraws at
        most 10 times a second). The budget is checked after each epoch, so a budget passed mid-epoch lets the
        epoch under way finish, and the bar says so; passed at an epoch's end, the run ends there."""
        if self.by_time:
            elapsed = time.perf_counter() - self.start
            if elapsed >= self.budget and not self.over:
                self.over = True
                what = f"after epoch {self.done}" if between_epochs else f"finishing epoch {self.done + 1}"
                self.bar.set_description_str(f"train ({self.budget:.0f} s budget reached, {what})")
            now = min(int(elapsed), self.bar.total)
            if now > self.bar.n:
                self.bar.update(now - self.bar.n)

    def epoch_done(self, epoch: int, **postfix) -> None:
        self.done = epoch
        elapsed = time.perf_counter() - self.start
        by_time = self.budget is not None and elapsed / epoch * self.epochs > self.budget
        if by_time == self.by_time and not by_time:
            self.bar.update(1)
        self._show(by_time, epoch)
        self.tick(between_epochs=True)
        self.bar.set_postfix(epoch=f"{epoch}/{self.epochs}", **postfix)

    def close(self) -> None:
        self.bar.close()


def train(cfg: TrainConfig, data: data_mod.Interactions, progress: bool = True) -> TrainResult:
    """Train SASRec or BERT4Rec (``cfg.model``) on ``data`` with early stopping on validation NDCG@10 (leave-one-out);
    data-parallel under torchrun (see ``distributed``)."""
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
    rank, world = distributed()
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    attrs = None
    if cfg.side_info == "attributes" or (cfg.side_info == "auto" and data.item_attributes is not None):
        if data.item_attributes is None:
            raise data_mod.DataError("side_info = 'attributes' needs item attributes (--attributes FILE, or "
                                     "<stem>_item2attributes.json beside a sequence file)")
        attrs = attribute_codes(data.item_attributes)
    model = build_model(cfg.model, data.num_items, cfg.max_len, cfg.hidden, cfg.blocks, cfg.heads,
                        cfg.dropout, cfg.block_style, cfg.init, attrs).to(device)
    mask_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    step = _LossModule(model, cfg)
    if world > 1:
        # Every rank holds the same model (same seed) and walks the same batches; each takes its slice of a batch.
        step = DistributedDataParallel(step)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    # Exponential moving average of the weights (Polyak averaging; torch.optim.swa_utils): validation, early
    # stopping and the exported model use the average, which is smoother than the last step's weights.
    ema = None
    if cfg.ema_decay > 0:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    evaluated = ema.module if ema is not None else model
    gen = np.random.default_rng(cfg.seed)
    history: list[dict] = []
    best = (-1.0, 0, None, {})
    start = time.perf_counter()
    score = torch_score_fn(evaluated, device)
    bar = Progress(cfg, not progress or rank != 0, start)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        total, batches = 0.0, 0
        for idx in training_batches(lengths, cfg.batch_size, gen, cfg.batching == "bucketed"):
            if len(idx) < world:
                continue  # every rank needs a share of the batch
            width = int(lengths[idx].max())
            inp = torch.from_numpy(inputs[idx, -width:]).to(device)
            if isinstance(model, BERT4Rec):
                inp, tgt = model.mask_items(inp, cfg.mask_prob, mask_gen)
            else:
                tgt = torch.from_numpy(targets[idx, -width:]).to(device)
            if world > 1:
                # loss = this rank's sum / (batch targets / world): the ranks' mean gradient is the batch's
                denom = (tgt > 0).sum().float() / world
                inp, tgt = inp[rank::world], tgt[rank::world]
                loss = step(inp, tgt, denom)
            else:
                loss = step(inp, tgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            total += loss.detach().item()
            batches += 1
            bar.tick()
        valid = evaluate(score, split.valid_ctx, split.valid_target, cfg.max_len)
        row = {"epoch": epoch, "loss": total / max(batches, 1), "seconds": time.perf_counter() - t0,
               **{f"valid_{k}": v for k, v in valid.items() if k != "users"}}
        history.append(row)
        improved = valid["NDCG@10"] > best[0]
        if improved:
            best = (valid["NDCG@10"], epoch, {k: v.detach().clone() for k, v in evaluated.state_dict().items()},
                    valid)
        bar.epoch_done(epoch, loss=f"{row['loss']:.3f}", ndcg10=f"{valid['NDCG@10']:.4f}", best=best[1])
        if not progress and rank == 0:
            log.info("epoch %d loss %.4f valid HR@10 %.4f NDCG@10 %.4f", epoch, row["loss"], valid["HR@10"],
                     valid["NDCG@10"])
        stop = epoch >= cfg.min_epochs and epoch - best[1] >= cfg.patience
        if cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s:
            log.info("time budget of %.0f s reached after epoch %d", cfg.time_budget_s, epoch)
            stop = True
        if world > 1:  # rank 0 decides (clocks differ between ranks), everyone follows
            stop = broadcast_flag(stop, device)
        if stop:
            break
    bar.close()
    model.load_state_dict(best[2])
    model.eval()
    return TrainResult(model, split, history, best[1], best[3], time.perf_counter() - start, opt)
