"""Symmetric per-row int8 quantization of item embeddings and queries (scale = max |row| / 127)."""
from __future__ import annotations

import numpy as np


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantization.

    Args:
        x: float32 [N, d].
    Returns:
        (q, scales): int8 [N, d] in [-127, 127] and float32 [N] with ``x[r] ~= q[r] * scales[r]``
        (scale = max |x[r]| / 127; an all-zero row gets scale 1).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D float32 matrix [N, d], got shape {x.shape}")
    amax = np.abs(x).max(axis=1)
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales


def quantize_queries(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of queries: float32 [B, d] -> (int8 [B, d], float32 [B] scales); see
    ``quantize_rows``."""
    return quantize_rows(np.atleast_2d(queries))
