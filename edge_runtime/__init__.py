"""edgerec's edge runtime: a torch-free daemon that serves sequential recommendations from a model bundle."""
import os as _os

__version__ = "0.1.0"

# ONNX Runtime (1.32) starts its telemetry when the library loads: a device id and a queue of events (OS, CPU,
# Python path) under ~/.cache/Microsoft/DeveloperTools. This variable, read at load time, is the only switch that
# stops it before anything is written (``onnxruntime.disable_telemetry_events()``, called as well where the
# encoder imports it, comes too late for the files); set here so that every process importing the node's code
# (daemon, registry, trainer, loop, benchmarks) has it before any import of onnxruntime. A user's own setting wins.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
