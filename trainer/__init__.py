"""The trainer: PyTorch, never imported by the daemon."""
import edge_runtime as _edge_runtime  # noqa: F401  (sets ORT_DISABLE_TELEMETRY before optimum loads onnxruntime)
