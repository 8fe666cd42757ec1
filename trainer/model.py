"""SASRec: a causal self-attention sequential recommender.

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018 (arXiv:1808.09781). The encoder turns a
shopper's recent items into a user vector u (the hidden state at the last position); the score of item i is
``e_i . u`` with the input item embedding table tied to the output (so serving is exact MIPS over the item
embedding matrix). Trained here with a softmax cross-entropy over items (full, or sampled with many negatives:
"SASRec+", Klenitskiy & Vasilev, RecSys 2023, arXiv:2309.07602), which beats the paper's 1-negative BCE.

Conventions (from the reference implementation pmixer/SASRec.pytorch, kept where they export cleanly):
token 0 is padding and item row r is token r + 1; sequences are left-padded so the most recent item is at the last
position; item embeddings are scaled by sqrt(d); pre-LayerNorm blocks; learned positional embeddings.
The forward pass uses tensors only (no NumPy, no Python control flow on values) so it traces to ONNX.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn


def _attend_padding_exact(scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(scores) @ v with the normalisation after the weighted sum: exp(s - max) @ [v, 1], then the value
    columns divided by the last (the sum of the weights), as FlashAttention defers it (Dao et al., NeurIPS 2022,
    arXiv:2205.14135). Equal to the softmax form up to float rounding.

    What it buys (the form the encoder is exported and evaluated in): left padding and batching leave every real
    position's output bit-identical. A padded key's weight is exp(-inf) = 0 exactly, the maximum is
    order-independent, and a MatMul sums over keys in key order, so leading zero terms change no partial sum;
    a fused Softmax instead sums its row in SIMD lanes whose assignment moves with the padding (measured: ONNX
    Runtime's Softmax changed the last bits of 1 in 3 padded calls). So one encoder call for a padded batch of
    shoppers gives each the vector it gets alone (``edge_runtime.serving.model.Model.batch_exact``).

    Args:
        scores: float [B, H, L, L], masked entries -inf (every row has at least one finite entry).
        v: float [B, H, L, Dh].
    Returns:
        float [B, H, L, Dh].
    """
    e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    o = e @ torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    return o[..., :-1] / o[..., -1:]


def _attend_last_exact(scores: torch.Tensor, v_one: torch.Tensor) -> torch.Tensor:
    """The serving form's attention of one query row (``ServingEncoder``): ``_attend_padding_exact`` with the
    column of ones already in the values (the value projection writes it: zero weights, bias 1, so the column is
    exactly 1.0) and the query row given twice.

    Why twice: ONNX Runtime's MatMul sums the keys of a one-row product (M = 1) in an order that moves with the
    number of keys (measured: 27 of 30 padded batches changed the last bits), while for two rows and more it sums
    them in key order, as the full-sequence form relies on. Row 0 of the result is kept.

    Args:
        scores: float [B, H, 2, L], the same row twice, masked keys at the lowest finite float.
        v_one: float [B, H, L, Dh + 1], the values with a last column of ones.
    Returns:
        float [B, H, Dh].
    """
    e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    o = (e @ v_one)[:, :, 0]
    return o[..., :-1] / o[..., -1:]


def _split_heads(t: torch.Tensor, heads: int, width: int) -> torch.Tensor:
    """[B, L, heads * width] -> [B, heads, L, width] (one head: an Unsqueeze, no Reshape / Transpose in the graph)."""
    if heads == 1:
        return t.unsqueeze(1)
    b, length = t.shape[0], t.shape[1]
    return t.reshape(b, length, heads, width).transpose(1, 2)


class _Block(nn.Module):
    """One Transformer block.

    ``style="prenorm"``: x + Attn(LN(x)), then x + FFN(LN(x)) with GELU (the GPT-2 layout).
    ``style="sasrec"``: the block of the SASRec reference code (Kang & McAuley; pmixer/SASRec.pytorch): queries are
    LN(x) while keys and values are x, the residual adds to LN(x), FFN(LN(.)) with ReLU adds to its own input.
    """

    def __init__(self, hidden: int, heads: int, dropout: float, style: str = "prenorm"):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of heads {heads}")
        self.heads, self.style = heads, style
        self.ln_attn = nn.LayerNorm(hidden, eps=1e-8)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ln_ffn = nn.LayerNorm(hidden, eps=1e-8)
        act = nn.ReLU() if style == "sasrec" else nn.GELU()
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), act, nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # x: [B L D]; allowed: [B 1 L L] bool (query may attend key)
        b, length, d = x.shape
        h = self.ln_attn(x)
        dh = d // self.heads
        if self.style == "sasrec":
            w, bias = self.qkv.weight, self.qkv.bias
            q = nn.functional.linear(h, w[:d], bias[:d])
            kv = nn.functional.linear(x, w[d:], bias[d:])
            k, v = kv[..., :d], kv[..., d:]
            q, k, v = (t.reshape(b, length, self.heads, dh).transpose(1, 2) for t in (q, k, v))  # [B H L Dh]
        else:
            q, k, v = self.qkv(h).view(b, length, 3, self.heads, dh).permute(2, 0, 3, 1, 4)  # [B H L Dh]
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(dh))  # [B H L L]
        att = att.masked_fill(~allowed, float("-inf"))
        if self.training:
            y = self.drop(att.softmax(dim=-1)) @ v
        else:
            y = _attend_padding_exact(att, v)
        y = self.out(y.transpose(1, 2).reshape(b, length, d))  # [B L D]
        if self.style == "sasrec":
            x = h + self.drop(y)
            f = self.ln_ffn(x)
            return f + self.drop(self.ffn(f))
        x = x + self.drop(y)
        x = x + self.drop(self.ffn(self.ln_ffn(x)))
        return x


def _attention_mask(item_seq: torch.Tensor, causal: bool) -> torch.Tensor:
    """``SASRec.attention_mask`` for either kind (``causal``), shared with ``ServingEncoder``'s earlier blocks."""
    length = item_seq.shape[1]
    eye = torch.eye(length, dtype=torch.bool, device=item_seq.device)
    key_ok = (item_seq > 0).unsqueeze(1)  # [B 1 L]
    if causal:
        key_ok = key_ok & torch.tril(torch.ones(length, length, dtype=torch.bool, device=item_seq.device))
    return (key_ok | eye).unsqueeze(1)


class SASRec(nn.Module):
    """Causal Transformer encoder over item sequences.

    Args:
        num_items: N; the embedding table has N + 1 rows (row 0 = padding).
        max_len: L, the number of most recent items the encoder reads.
        hidden: d, embedding and hidden size.
        blocks, heads, dropout: Transformer depth, attention heads, dropout rate (embeddings, attention, FFN).

    ``forward(item_seq)``: int64 [B, L] tokens, left-padded with 0 -> float32 [B, d] user vectors.
    """

    causal = True      # SASRec: each position attends to itself and earlier positions only
    extra_tokens = 0   # rows after the N items in the embedding table (BERT4Rec: the [MASK] token)

    def __init__(self, num_items: int, max_len: int = 50, hidden: int = 64, blocks: int = 2, heads: int = 1,
                 dropout: float = 0.2, block_style: str = "prenorm", init: str = "normal",
                 item_attributes: tuple[np.ndarray, np.ndarray, int] | None = None):
        super().__init__()
        self.num_items = num_items
        self.max_len = max_len
        self.hidden = hidden
        self.item_emb = nn.Embedding(num_items + 1 + self.extra_tokens, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([_Block(hidden, heads, dropout, block_style) for _ in range(blocks)])
        self.ln_out = nn.LayerNorm(hidden, eps=1e-8)
        # Side information (item attributes, e.g. brand and category): an item's embedding is its id embedding plus
        # the mean of its attribute embeddings (as in RecTools' CatFeaturesItemNet; S3-Rec exploits the same
        # Beauty attributes by pre-training). ``item_attributes`` = (indptr int64 [N + 1], codes int64 [nnz],
        # number of distinct values). Export folds the sum into a plain table (``folded``).
        self.attr_emb: nn.EmbeddingBag | None = None
        if item_attributes is not None:
            indptr, codes, num_values = item_attributes
            self.attr_emb = nn.EmbeddingBag(max(1, num_values), hidden, mode="mean")
            self.register_buffer("attr_codes", torch.as_tensor(np.asarray(codes, dtype=np.int64)), persistent=False)
            self.register_buffer("attr_offsets", torch.as_tensor(np.asarray(indptr[:-1], dtype=np.int64)),
                                 persistent=False)
        # "normal": N(0, 0.02) weights, item embeddings scaled by sqrt(d) at the input (BERT / pmixer);
        # "xavier": Glorot-normal weights, no input scaling (RecTools' SASRec)
        self.emb_scale = math.sqrt(hidden) if init == "normal" else 1.0
        self.apply(self._init_xavier if init == "xavier" else self._init_weights)

    @staticmethod
    def _init_xavier(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding, nn.EmbeddingBag)):
            nn.init.xavier_normal_(module.weight)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding, nn.EmbeddingBag)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def attention_mask(self, item_seq: torch.Tensor) -> torch.Tensor:
        """[B L] tokens -> [B 1 L L] bool: padded keys hidden, causal for SASRec, bidirectional for BERT4Rec (each
        position always sees itself, so no softmax row is empty)."""
        return _attention_mask(item_seq, self.causal)

    def encode(self, item_seq: torch.Tensor) -> torch.Tensor:
        """[B l] int64 tokens, l <= max_len, left-padded -> [B l D] hidden state at every position.

        Positions count from the right (the last column is position max_len - 1), so a batch trimmed to its
        longest sequence gives exactly the hidden states of the same batch padded to max_len.
        """
        length = item_seq.shape[1]
        positions = torch.arange(length, device=item_seq.device) + (self.max_len - length)
        table = self.item_table()
        x = nn.functional.embedding(item_seq, table) * self.emb_scale + self.pos_emb(positions)  # [B L D]
        x = self.emb_drop(x)
        pad = (item_seq > 0).unsqueeze(-1).to(x.dtype)  # [B L 1]
        x = x * pad
        allowed = self.attention_mask(item_seq)
        for block in self.blocks:
            x = block(x, allowed) * pad
        return self.ln_out(x)

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        """[B L] int64 tokens (left-padded) -> [B D] float32 user vector (hidden state of the last position)."""
        return self.encode(item_seq)[:, -1, :]

    def item_table(self) -> torch.Tensor:
        """[N + 1 + extra, D]: the id embeddings plus, with side information, the mean attribute embedding of each
        item (padding and [MASK] rows get none; an item without attributes gets zeros from the empty bag)."""
        w = self.item_emb.weight
        if self.attr_emb is None:
            return w
        bag = self.attr_emb(self.attr_codes, self.attr_offsets)          # [N D]
        return w + torch.cat([w.new_zeros(1, w.shape[1]), bag, w.new_zeros(self.extra_tokens, w.shape[1])])

    def item_embeddings(self) -> torch.Tensor:
        """[N D] output item embedding matrix (rows of the tied table without the padding row)."""
        return self.item_table()[1:self.num_items + 1]

    def folded(self) -> "SASRec":
        """A copy whose plain id table already holds the side information (what ONNX export gets: the encoder
        then needs only item tokens, and its outputs equal this model's)."""
        m = copy.deepcopy(self)
        if m.attr_emb is not None:
            with torch.no_grad():
                m.item_emb.weight.copy_(self.item_table())
            m.attr_emb = None
            del m.attr_codes, m.attr_offsets
        return m

    def serving(self) -> "ServingEncoder":
        """The form the encoder is exported in (``trainer.export.export_onnx``): ``ServingEncoder``."""
        return ServingEncoder(self)


class BERT4Rec(SASRec):
    """BERT4Rec: a bidirectional Transformer trained by masked item prediction.

    Sun et al., "BERT4Rec: Sequential Recommendation with Bidirectional Encoder Representations from Transformer",
    CIKM 2019 (arXiv:1904.06690). Same blocks as SASRec without the causal mask, plus a [MASK] token (row N + 1).
    Training replaces random items by [MASK] and predicts them (``mask_items``); at inference ``forward`` appends
    [MASK] after the context and returns its hidden state, so the exported encoder has SASRec's interface
    (``item_seq`` int64 [B, l] -> ``user_vec`` float32 [B, d]) and the daemon serves either model unchanged.
    """

    causal = False
    extra_tokens = 1

    @property
    def mask_token(self) -> int:
        return self.num_items + 1

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        """[B l] int64 tokens (left-padded) -> [B D]: the hidden state of a [MASK] appended after the context
        (the window keeps the last max_len tokens, [MASK] included)."""
        mask = torch.full_like(item_seq[:, :1], self.mask_token)
        seq = torch.cat([item_seq, mask], dim=1)[:, -self.max_len:]
        return self.encode(seq)[:, -1, :]

    def mask_items(self, item_seq: torch.Tensor, prob: float, generator: torch.Generator | None = None):
        """Cloze training pairs: (inputs with ~``prob`` of the real items replaced by [MASK], targets = the replaced
        items, 0 elsewhere). Every sequence gets at least one masked item (its last, if the draw masked none)."""
        real = item_seq > 0
        draw = torch.rand(item_seq.shape, generator=generator, device=item_seq.device) < prob
        masked = draw & real
        none = ~masked.any(dim=1)
        masked[none, -1] = real[none, -1]
        inputs = torch.where(masked, torch.full_like(item_seq, self.mask_token), item_seq)
        targets = torch.where(masked, item_seq, torch.zeros_like(item_seq))
        return inputs, targets


class ServingEncoder(nn.Module):
    """The exported form of a trained SASRec / BERT4Rec: ``item_seq`` int64 [B, l] (1 <= l <= max_len, left-padded
    with 0) -> float32 [B, d], equal to ``model(item_seq)`` up to float rounding (tested, rows of padding only
    included), and batch-exact in ONNX Runtime: a left-padded batch gives every row, bit for bit, the vector of its
    lone call.

    Only the user vector is served, the hidden state of the last position, so the last block computes only that
    position: its query, its attention over every real key (causal or not, the last position sees them all), its
    output projection and feed-forward network, on [B, d] instead of [B, l, d]. Earlier blocks run as in training
    (eval mode). The export also gets fewer graph nodes: positions as a slice of the table, the item table already
    scaled (and with side information folded in), the query's 1/sqrt(d_h) in its weights, the column of ones of the
    padding-exact attention (``_attend_last_exact``) in the value projection, no reshapes for one head. Measured
    (Beauty, d = 64, 1 block, 1 head, int8 table, 2-core Xeon, onnxruntime 1.32, µs per session, two runs): 65 -> 46
    nodes after ONNX Runtime's optimizer; a lone call of 8 items 42-46 -> 28-29 µs, of 50 items 97-104 -> 42-47 µs;
    4 sessions of 8 items in one call 17-18 -> 10 µs each, 8 sessions 12-13 -> 7 µs each.

    Args:
        model: the trained model (eval mode is not required; the copy is put in eval mode, the model is unchanged).
    """

    def __init__(self, model: SASRec):
        super().__init__()
        model = copy.deepcopy(model).eval()
        self.max_len, self.hidden, self.causal = model.max_len, model.hidden, model.causal
        self.mask_token = model.mask_token if model.extra_tokens else None
        with torch.no_grad():
            table = model.item_table().detach() * model.emb_scale
        # named item_emb (initializer "item_emb.weight"): trainer.export.int8_embedding_rows rewrites that lookup
        self.item_emb = nn.Embedding.from_pretrained(table, freeze=True, padding_idx=0)
        self.pos_emb = model.pos_emb
        self.blocks = nn.ModuleList(model.blocks[:-1])
        self.last = model.blocks[-1]
        self.ln_out = model.ln_out
        d, heads = model.hidden, self.last.heads
        dh = d // heads
        with torch.no_grad():
            w, bias = self.last.qkv.weight.detach(), self.last.qkv.bias.detach()
            scale = 1.0 / math.sqrt(dh)
            w_v = torch.zeros(heads * (dh + 1), d)
            b_v = torch.zeros(heads * (dh + 1))
            for h in range(heads):   # per head: its dh value columns, then a column that is exactly 1
                w_v[h * (dh + 1):h * (dh + 1) + dh] = w[2 * d + h * dh:2 * d + (h + 1) * dh]
                b_v[h * (dh + 1):h * (dh + 1) + dh] = bias[2 * d + h * dh:2 * d + (h + 1) * dh]
                b_v[h * (dh + 1) + dh] = 1.0
            self.register_buffer("w_q", (w[:d] * scale).t().contiguous())                         # [d, d]
            self.register_buffer("b_q", bias[:d] * scale)
            self.register_buffer("w_kv", torch.cat([w[d:2 * d], w_v]).t().contiguous())           # [d, d + H(dh+1)]
            self.register_buffer("b_kv", torch.cat([bias[d:2 * d], b_v]))
        self.requires_grad_(False)

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        if self.mask_token is not None:   # BERT4Rec: the user vector is a [MASK] appended after the context
            mask = torch.full_like(item_seq[:, :1], self.mask_token)
            item_seq = torch.cat([item_seq, mask], dim=1)[:, -self.max_len:]
        b, length = item_seq.shape
        d, blk = self.hidden, self.last
        heads = blk.heads
        dh = d // heads
        real = item_seq > 0
        pad = real.unsqueeze(-1).to(torch.float32)                                                 # [B L 1]
        x = (self.item_emb(item_seq) + self.pos_emb.weight[self.max_len - length:]) * pad          # [B L D]
        if len(self.blocks):
            allowed = _attention_mask(item_seq, self.causal)
            for block in self.blocks:
                x = block(x, allowed) * pad
        h = blk.ln_attn(x)
        h_last = h[:, -1]                                                                           # [B D]
        kv = (x if blk.style == "sasrec" else h) @ self.w_kv + self.b_kv                          # [B L D + H(dh+1)]
        k = _split_heads(kv[..., :d], heads, dh)                                                    # [B H L dh]
        v_one = _split_heads(kv[..., d:], heads, dh + 1)                                            # [B H L dh+1]
        q = h_last @ self.w_q + self.b_q                                                            # [B D]
        # [B H 1 dh]; for several heads a Reshape, not _split_heads' Reshape + Transpose (one graph node fewer)
        q = (q.unsqueeze(1) if heads == 1 else q.reshape(b, heads, dh)).unsqueeze(2)
        scores = torch.cat([q, q], dim=2) @ k.transpose(-1, -2)                                     # [B H 2 L]
        # masked keys get the lowest finite float, not -inf: exp(lowest - max) is still exactly 0 next to a real
        # key (padding-exact as before), and a row of padding only (last token 0; the daemon never sends one)
        # gets finite weights instead of exp(-inf + inf) = NaN, so the pad multiplication below makes it the
        # model's ln_out(0)
        scores = scores.masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min)
        y = blk.out(_attend_last_exact(scores, v_one).reshape(b, d))                              # [B D]
        if blk.style == "sasrec":
            f = blk.ln_ffn(h_last + y)
            out = f + blk.ffn(f)
        else:
            x_last = x[:, -1] + y
            out = x_last + blk.ffn(blk.ln_ffn(x_last))
        return self.ln_out(out * pad[:, -1])


def build_model(kind: str, num_items: int, max_len: int, hidden: int, blocks: int, heads: int,
                dropout: float, block_style: str = "prenorm", init: str = "normal",
                item_attributes: tuple[np.ndarray, np.ndarray, int] | None = None) -> SASRec:
    """'sasrec' or 'bert4rec' -> the model.

    Raises:
        ValueError: unknown kind.
    """
    models = {"sasrec": SASRec, "bert4rec": BERT4Rec}
    if kind not in models:
        raise ValueError(f"unknown model {kind!r}; choose one of {sorted(models)}")
    return models[kind](num_items, max_len, hidden, blocks, heads, dropout, block_style, init, item_attributes)
