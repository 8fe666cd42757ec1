"""The training losses over target positions: the full softmax (``full_softmax_ce``) and the sampled softmax
(``sampled_softmax_logits``), and ``sequence_loss``, which applies either to a model's outputs.

Full-softmax cross-entropy over the whole item catalog without materializing the [P, N] logits:

Training SASRec+ with the full softmax (Klenitskiy & Vasilev, "Turning Dross Into Gold Loss: is BERT4Rec really
better than SASRec?", RecSys 2023) scores every target position against every item. On a CPU the plain
``F.cross_entropy(h @ E.T, y)`` spends most of its time allocating, page-faulting and streaming the [P, N] logits
and their gradient (160 MB each for P = 740 positions x N = 54,542 items), not in the matmuls. The function here
walks the catalog in item chunks with a running-max logsumexp, keeps one reused [P, chunk] buffer, and recomputes
each chunk's logits in the backward pass instead of storing them: the idea of Cut Cross-Entropy (Wijmans et al.,
"Cut Your Losses in Large-Vocabulary Language Models", ICLR 2025) and of Liger's fused linear cross-entropy,
written with torch ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of the reused [P, chunk] logits buffer (4 MB of float32; 1 M was the fastest of 0.25 / 0.5 / 1 / 2 / 3 / 8 M
# on a 2-core EPYC). The chunk of items scored at once is ELEMENTS // P, at least MIN_CHUNK items, so every matmul
# keeps a long inner dimension and the buffer stays in cache.
ELEMENTS = 1024 * 1024
MIN_CHUNK = 256


def _chunks(rows: int, items: int, elements: int):
    width = max(MIN_CHUNK, elements // max(rows, 1))
    return [(a, min(a + width, items)) for a in range(0, items, width)], min(width, items)


class _ChunkedLogSumExp(torch.autograd.Function):
    """lse_p = log sum_i exp(h_p . e_i) for every row p, over item chunks with an online (running max) logsumexp;
    the backward pass recomputes each chunk's logits (see the module docstring)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, items: torch.Tensor, elements: int) -> torch.Tensor:
        rows = h.shape[0]
        spans, width = _chunks(rows, items.shape[0], elements)
        buf = torch.empty(rows, width, dtype=h.dtype, device=h.device)
        peak = torch.full((rows, 1), float("-inf"), dtype=h.dtype, device=h.device)
        total = torch.zeros(rows, 1, dtype=h.dtype, device=h.device)
        for a, b in spans:
            logits = torch.mm(h, items[a:b].T, out=buf[:, :b - a])                # [P c]
            new_peak = torch.maximum(peak, logits.amax(dim=1, keepdim=True))
            total.mul_(torch.exp(peak - new_peak)).add_(logits.sub_(new_peak).exp_().sum(dim=1, keepdim=True))
            peak = new_peak
        lse = (peak + total.log()).squeeze(1)
        ctx.save_for_backward(h, items, lse)
        ctx.elements = elements
        return lse

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor):
        h, items, lse = ctx.saved_tensors
        spans, width = _chunks(h.shape[0], items.shape[0], ctx.elements)
        grad_h = torch.zeros_like(h)
        grad_items = torch.empty_like(items)
        buf = torch.empty(h.shape[0], width, dtype=h.dtype, device=h.device)
        for a, b in spans:
            p = torch.mm(h, items[a:b].T, out=buf[:, :b - a])                     # logits, recomputed
            p.sub_(lse[:, None]).exp_().mul_(grad_lse[:, None])                  # d lse / d logits = softmax
            grad_h.addmm_(p, items[a:b])
            torch.mm(p.T, h, out=grad_items[a:b])
        return grad_h, grad_items, None


def full_softmax_ce(h: torch.Tensor, items: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
                    elements: int = ELEMENTS) -> torch.Tensor:
    """Softmax cross-entropy of ``target`` among all items, equal to ``F.cross_entropy(h @ items.T, target)``.

    Args:
        h: float32 [P, D] hidden states (the user / session vectors at the target positions).
        items: float32 [N, D] item embeddings.
        target: int64 [P] item rows in ``[0, N)``.
        reduction: "mean" or "sum" over the P positions.
        elements: size of the logits buffer (items per chunk = elements // P, at least MIN_CHUNK); the extra
            memory is about ``elements * 4`` bytes instead of ``2 * P * N * 4`` (two [P, N] float32 tensors).

    Returns:
        0-d float32 loss, differentiable with respect to ``h`` and ``items``.

    Raises:
        ValueError: shapes disagree or ``reduction`` is unknown.
    """
    if h.ndim != 2 or items.ndim != 2 or h.shape[1] != items.shape[1] or target.shape != (h.shape[0],):
        raise ValueError(f"shapes h {tuple(h.shape)}, items {tuple(items.shape)}, target {tuple(target.shape)}: "
                         "need [P, D], [N, D], [P]")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r}: must be 'mean' or 'sum'")
    lse = _ChunkedLogSumExp.apply(h, items, elements)
    per_row = lse - (h * items[target]).sum(dim=1)
    return per_row.mean() if reduction == "mean" else per_row.sum()


def sampled_softmax_logits(h: torch.Tensor, y: torch.Tensor, items: torch.Tensor, num_negatives: int,
                           negatives: str = "shared") -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled softmax (SASRec+) with uniform negatives, shared by the batch (``negatives = "shared"``) or drawn per
    target position (``"per_position"``, as RecTools); accidental hits are masked out.

    Args:
        h: float [P, D] hidden states at the target positions. y: int64 [P] target item rows. items: float [N, D].
    Returns:
        logits float [P, 1 + K] (the target first) and labels int64 [P] (zeros).
    """
    pos_logit = (h * items[y]).sum(-1, keepdim=True)                   # [P 1]
    if negatives == "per_position":
        neg = torch.randint(0, items.shape[0], (len(y), num_negatives), device=h.device)   # [P K]
        neg_logit = torch.bmm(items[neg], h.unsqueeze(-1)).squeeze(-1)                    # [P K]
        neg_logit = neg_logit.masked_fill(neg == y[:, None], float("-inf"))
    else:
        neg = torch.randint(0, items.shape[0], (num_negatives,), device=h.device)
        neg_logit = F.linear(h, items[neg]).masked_fill(neg[None, :] == y[:, None], float("-inf"))  # [P K]
    return torch.cat([pos_logit, neg_logit], dim=1), torch.zeros(len(y), dtype=torch.long, device=h.device)


def sequence_loss(model: torch.nn.Module, inp: torch.Tensor, tgt: torch.Tensor, loss: str = "ce",
                  num_negatives: int = 0, negatives: str = "shared", denom: float | None = None) -> torch.Tensor:
    """Cross-entropy over the target positions (``tgt > 0``) of a SASRec / BERT4Rec batch: ``loss = "ce"`` the full
    softmax, ``"sampled_ce"`` the sampled one. Mean, or sum / ``denom`` (data-parallel training passes the global
    target count / world size, so averaging the ranks' gradients gives the single-process gradient).

    Args:
        model: has ``encode(inp) -> [B, L, D]`` and ``item_embeddings() -> [N, D]``.
        inp / tgt: int64 [B, L] tokens (0 = pad) and target tokens (item row + 1, 0 = no target).
    Returns:
        a scalar loss tensor.
    """
    h = model.encode(inp)                  # [B L D]
    mask = tgt > 0
    h, y = h[mask], tgt[mask] - 1          # [P D], [P] item rows
    items = model.item_embeddings()        # [N D]
    reduction = "mean" if denom is None else "sum"
    if loss == "ce":
        # the full softmax over all N items, chunked so the [P N] logits never exist at once
        out = full_softmax_ce(h, items, y, reduction=reduction)
    else:
        out = F.cross_entropy(*sampled_softmax_logits(h, y, items, num_negatives, negatives), reduction=reduction)
    return out if denom is None else out / denom
