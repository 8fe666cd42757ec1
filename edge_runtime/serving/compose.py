"""Embeddings for items the model has never seen, composed from their attributes: the one rule the node
(``add_items``) and the trainer (new rows at fine-tuning) share.

A trained item's embedding with side information is ``id_emb[i] + mean(attr_emb[v] for v in attrs(i))``
(``trainer/model.py`` ``SASRec.item_table``, the RecTools ``CatFeaturesItemNet`` sum). An item that appears after
training has no id embedding yet, so it gets the mean id-embedding row of the trained items plus the mean of the
embeddings of its attribute values that the model knows; attribute values the model has never seen are ignored.
An item with no known attribute value gets the mean item embedding (the centroid of the item matrix).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def compose_items(attributes: Sequence[Sequence[str]], index: Mapping[str, int], attr_emb: np.ndarray | None,
                  id_mean: np.ndarray | None, item_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings for new items.

    Args:
        attributes: M lists of attribute values (str), one per new item.
        index: attribute value -> row of ``attr_emb`` (the bundle's ``item_attr_names`` order).
        attr_emb: float32 [V, d] attribute-value embeddings, or None (the bundle has none: every item gets
            ``item_mean``).
        id_mean: float32 [d] mean id-embedding row, or None with ``attr_emb`` None.
        item_mean: float32 [d] mean item embedding.

    Returns:
        (float32 [M, d] embeddings, int64 [M] number of known attribute values each was built from; 0 = the mean
        item embedding).
    """
    d = item_mean.shape[0]
    out = np.empty((len(attributes), d), dtype=np.float32)
    known = np.zeros(len(attributes), dtype=np.int64)
    for i, values in enumerate(attributes):
        rows = [index[v] for v in dict.fromkeys(values) if v in index] if attr_emb is not None else []
        if rows:
            out[i] = id_mean + attr_emb[rows].mean(axis=0)
            known[i] = len(rows)
        else:
            out[i] = item_mean
    return out, known
