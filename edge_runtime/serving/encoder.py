"""The session encoder: an ONNX Runtime session over a bundle's ``encoder.onnx`` / ``encoder.int8.onnx``."""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from ..errors import BundleError

ort.disable_telemetry_events()   # and ORT_DISABLE_TELEMETRY=1 before the import (edge_runtime/__init__.py)


class Encoder:
    """ONNX Runtime session encoder: ``item_seq`` int64 [B, L] -> ``user_vec`` float32 [B, d].

    Args:
        path: ONNX file.
        threads: intra-op threads per call (1 suits a daemon that runs calls in parallel threads).
    Raises:
        BundleError: the file cannot be loaded by ONNX Runtime.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # No memory arena: the encoder is small, an arena costs ~1 MiB more per loaded model (two are loaded during
        # a hot swap) and measured no faster.
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
            raise BundleError(f"{path}: ONNX Runtime cannot load the encoder: {exc}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, item_seq: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: item_seq})[0]
