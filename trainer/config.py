"""Training configuration: one frozen dataclass, loadable from TOML (``edgerec train --config FILE``).

Unknown keys are rejected with a message naming them, so a typo in a config never trains the wrong model.
"""
from __future__ import annotations

import dataclasses
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (Jetson L4T / Ubuntu 22.04): the same parser as a package
    import tomli as tomllib
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # data
    data: str | None = None          # interaction log; None = embedded Amazon Beauty (S3-Rec files)
    columns: str | None = None       # table column roles, see trainer.data.load
    attributes: str | None = None    # item-attribute JSON; default: <stem>_item2attributes.json beside the data
    # model
    model: str = "sasrec"            # "sasrec" (causal, next item) | "bert4rec" (bidirectional, masked items)
    mask_prob: float = 0.2           # bert4rec: share of items replaced by [MASK] in training
    max_len: int = 50                # L: most recent items the encoder reads (protocol of ANCHORS.md)
    hidden: int = 64                 # d: embedding size (the benchmark config uses 256: +5 % NDCG@10, 2x latency)
    blocks: int = 1                  # 1 block, dropout 0.4: best at d = 64 (sweep: bench/configs/beauty_s3rec.toml)
    heads: int = 1
    dropout: float = 0.4
    block_style: str = "prenorm"     # "prenorm" | "sasrec" (the SASRec reference block), see trainer.model._Block
    init: str = "normal"             # "normal" (N(0, 0.02), sqrt(d) input scale) | "xavier" (RecTools)
    # "auto" (attributes when the data has them) | "attributes" | "none": item embedding += mean of its attribute
    # embeddings (on Beauty: test NDCG@10 0.0480 -> 0.0516)
    side_info: str = "auto"
    # optimisation
    loss: str = "sampled_ce"         # "sampled_ce" (SASRec+, num_negatives shared uniform negatives) | "ce" (full)
    negatives: str = "shared"        # sampled_ce: "shared" by the batch | "per_position" (each target its own)
    num_negatives: int = 8192        # for sampled_ce (on Beauty: 256 < 1024 < 4096 < 8192 ~ full softmax)
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.995         # > 0: evaluate and export an exponential moving average of the weights
    batch_size: int = 128
    # "random" (plain shuffle: every target weighs the same in the loss) | "bucketed" (similar lengths per batch:
    # faster epochs, but short sequences' targets weigh more; S3 Beauty with these defaults, test NDCG@10 / HR@10:
    # bucketed 0.0530 / 0.0876, random 0.0601 / 0.0988), see trainer.train.training_batches
    batching: str = "random"
    epochs: int = 200                # upper bound; early stopping usually ends sooner
    patience: int = 15               # epochs without a better validation NDCG@10 before stopping
    min_epochs: int = 1
    time_budget_s: float | None = None  # stop after this many seconds of training (demo)
    seed: int = 42
    threads: int | None = None       # torch intra-op threads; None = all cores
    device: str = "cpu"
    # export
    int8_check_users: int = 2000     # held-out users for the fp32 vs int8 top-10 agreement check
    # the int8 encoder's Transformer MatMuls (its item-embedding table is int8 either way): "float" (batch-exact,
    # the daemon encodes concurrent requests in one call) | "dynamic" (int8 dynamic quantization; one call per
    # request), see trainer.export.quantize_int8
    int8_matmuls: str = "float"

    def __post_init__(self):
        checks = [
            (self.loss in ("ce", "sampled_ce"), "loss", "'ce' or 'sampled_ce'"),
            (self.model in ("sasrec", "bert4rec"), "model", "'sasrec' or 'bert4rec'"),
            (self.block_style in ("prenorm", "sasrec"), "block_style", "'prenorm' or 'sasrec'"),
            (self.init in ("normal", "xavier"), "init", "'normal' or 'xavier'"),
            (self.batching in ("bucketed", "random"), "batching", "'bucketed' or 'random'"),
            (self.side_info in ("auto", "none", "attributes"), "side_info",
             "'auto', 'none' or 'attributes'"),
            (self.negatives in ("shared", "per_position"), "negatives", "'shared' or 'per_position'"),
            (self.int8_matmuls in ("float", "dynamic"), "int8_matmuls", "'float' or 'dynamic'"),
            (0.0 < self.mask_prob < 1.0, "mask_prob", "in (0, 1)"),
            (self.max_len >= 1, "max_len", ">= 1"), (self.hidden >= 1, "hidden", ">= 1"),
            (self.blocks >= 1, "blocks", ">= 1"), (self.heads >= 1 and self.hidden % self.heads == 0, "heads",
                                                   "a divisor of hidden"),
            (0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)"), (self.lr > 0, "lr", "> 0"),
            (self.batch_size >= 1, "batch_size", ">= 1"), (self.epochs >= 1, "epochs", ">= 1"),
            (self.patience >= 1, "patience", ">= 1"), (0.0 <= self.ema_decay < 1.0, "ema_decay", "in [0, 1)"),
            (self.num_negatives >= 1, "num_negatives", ">= 1"),
        ]
        for ok, key, allowed in checks:
            if not ok:
                raise ValueError(f"config key {key!r} = {getattr(self, key)!r}: must be {allowed}")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "TrainConfig":
        """Read ``[train]`` (or top-level) keys from a TOML file, then apply ``overrides`` (None values skipped).

        Raises:
            ValueError: unknown key or invalid value (the message names the key).
        """
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        raw = dict(raw["train"]) if "train" in raw else {k: v for k, v in raw.items() if not isinstance(v, dict)}
        for key in ("data", "attributes"):  # relative paths are relative to the config file
            if isinstance(raw.get(key), str) and not Path(raw[key]).is_absolute():
                raw[key] = str((Path(path).resolve().parent / raw[key]).resolve())
        return cls.from_dict(raw, **overrides)

    @classmethod
    def from_dict(cls, raw: dict, **overrides) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(names)}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
