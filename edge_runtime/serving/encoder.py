"""The session encoder: an ONNX Runtime session over a bundle's ``encoder.onnx`` / ``encoder.int8.onnx``, on the
first execution provider of the configured preference list (``[model] providers``) that this onnxruntime build has.

The list is the process's (``configure_providers``, set once at start-up by ``ops/node.py``): every encoder the
process loads (boot, sync, SIGHUP, rollback) resolves it the same way. When none of the listed providers is in the
build, the encoder runs on ``CPUExecutionProvider`` and one warning says so, once per process however many models
are loaded.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import onnxruntime as ort

from .. import const
from ..errors import BundleError

ort.disable_telemetry_events()   # and ORT_DISABLE_TELEMETRY=1 before the import (edge_runtime/__init__.py)

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
# in onnxruntime's list of every build but computes nothing locally (it forwards to an Azure endpoint)
REMOTE = frozenset({"AzureExecutionProvider"})
_configured: tuple[str, ...] = (CPU,)
_warned: set[tuple[str, ...]] = set()


def configure_providers(providers: Sequence[str]) -> None:
    """Set the process's execution-provider preference (ONNX Runtime names, most preferred first), used by every
    ``Encoder`` built without ``providers``. Names this build lacks are allowed (they are skipped).

    Raises:
        ValueError: ``providers`` is empty or holds something other than non-empty strings.
    """
    global _configured
    _configured = _checked(providers)


def _checked(providers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(providers, str) or not isinstance(providers, (list, tuple)):
        raise ValueError(f"execution providers must be a list of ONNX Runtime provider names, got "
                         f"{type(providers).__name__}")
    if not providers:
        raise ValueError("execution providers: the list is empty; name at least one (e.g. CPUExecutionProvider)")
    if len(providers) > const.MAX_PROVIDERS:
        raise ValueError(f"execution providers: {len(providers)} names; at most {const.MAX_PROVIDERS}")
    if not all(isinstance(p, str) and p.strip() and len(p) <= const.MAX_PROVIDER_CHARS for p in providers):
        raise ValueError(f"execution providers must be ONNX Runtime provider names (non-empty strings of at most "
                         f"{const.MAX_PROVIDER_CHARS} characters), got {str(list(providers))[:200]}")
    return tuple(p.strip() for p in providers)


def pick_provider(providers: Sequence[str] | None = None) -> str:
    """The provider an encoder runs on: the first of ``providers`` (None: the process's, ``configure_providers``) that
    ``onnxruntime.get_available_providers()`` lists, else ``CPUExecutionProvider`` with one warning per process and
    preference list.

    Raises:
        ValueError: as ``configure_providers``.
    """
    wanted = _configured if providers is None else _checked(providers)
    available = ort.get_available_providers()
    for p in wanted:
        if p in REMOTE:
            if ("remote", p) not in _warned:
                _warned.add(("remote", p))
                log.warning("execution provider %s runs nothing on this machine (it calls a cloud endpoint); "
                            "skipped", p)
            continue
        if p in available:
            return p
    if wanted not in _warned:
        _warned.add(wanted)
        log.warning("none of the execution providers %s is in this onnxruntime build (it has %s); the encoder runs "
                    "on %s", list(wanted), list(available), CPU)
    return CPU


class Encoder:
    """ONNX Runtime session encoder: ``item_seq`` int64 [B, L] -> ``user_vec`` float32 [B, d].

    Args:
        path: ONNX file.
        threads: intra-op threads per call (1 suits a daemon that runs calls in parallel threads).
        providers: execution-provider preference (``pick_provider``); None: the process's (``configure_providers``).
    Attributes:
        provider: the execution provider the session runs on, as ONNX Runtime reports it (a GPU provider that
            fails to start makes ONNX Runtime fall back to CPU; that is logged as a warning and shown here).
        providers_requested: the preference list it was chosen from.
    Raises:
        BundleError: the file cannot be loaded by ONNX Runtime.
        ValueError: ``providers`` is empty or not a list of names.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1, providers: Sequence[str] | None = None):
        self.providers_requested = _configured if providers is None else _checked(providers)
        chosen = pick_provider(self.providers_requested)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # No memory arena: the encoder is small, an arena costs ~1 MiB more per loaded model (two are loaded during
        # a hot swap) and measured no faster.
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 3
        try:
            # CPU last: nodes the chosen provider has no kernel for run there (ONNX Runtime's own fallback)
            self.session = ort.InferenceSession(str(path), opts, providers=list(dict.fromkeys([chosen, CPU])))
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
            raise BundleError(f"{path}: ONNX Runtime cannot load the encoder on {chosen}: {exc}") from None
        self.provider = self.session.get_providers()[0]
        if self.provider != chosen and ("fell back", chosen, self.provider) not in _warned:
            _warned.add(("fell back", chosen, self.provider))
            log.warning("ONNX Runtime did not start %s (its error is logged above); the encoder runs on %s", chosen,
                        self.provider)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, item_seq: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: item_seq})[0]
