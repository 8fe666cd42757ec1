"""The session encoder: an ONNX Runtime session over a bundle's ``encoder.onnx`` / ``encoder.int8.onnx``, on the
first execution provider of the configured preference list (``[model] providers``) that this onnxruntime build has;
or, for an int8 bundle that carries ``encoder.int8.native.npz``, the native encoder (``NativeEncoder``: the same
SASRec / BERT4Rec computed by the node's C++ kernel, checked against ONNX Runtime at load; ``load_encoder`` picks).

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

from .. import const, scoring
from ..config import env_value
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


NATIVE_FORM = 1          # the weights file layout this node reads (trainer.export.NATIVE_FORM)
MAX_NATIVE_DIM = 4096    # d beyond this is not a model this encoder serves (a corrupt config, not a big model)
ENCODER_CHOICES = ("auto", "native", "onnx")


class NativeEncoder:
    """The native session encoder: ``item_seq`` int64 [B, W] -> ``user_vec`` float32 [B, d], the function of the
    bundle's int8 ONNX encoder (SASRec / BERT4Rec serving form, ``trainer.model.ServingEncoder``) computed by the
    native kernel (native/src/encoder-inl.h, the scan's SIMD level) instead of an ONNX Runtime call: no per-node
    dispatch, each session alone (batch-exact by construction), the GIL released. Values equal ONNX Runtime's up to
    float rounding (``load_encoder`` checks that at load).

    Args:
        path: the bundle's ``encoder.int8.native.npz`` (``trainer.export.export_native``).
        level: a SIMD level of this build to run (tests); None: the scan's.
    Attributes:
        provider: ``"native-<level>"`` (where ``Encoder.provider`` names an ONNX Runtime provider).
        providers_requested: the execution-provider list it was chosen over (``load_encoder``; () otherwise).
        level, dim, max_len, rows (token table rows: tokens are 0 .. rows - 1).
    Raises:
        BundleError: no native kernel in this process, or a file that is not a valid weights file (named).
    """

    def __init__(self, path: str | os.PathLike, level: str | None = None):
        native = scoring.native_kernel()
        if native is None:
            raise BundleError(f"{path}: the native encoder needs the native kernel (scoring runs on "
                              f"{scoring.BACKEND})")
        try:
            with np.load(path, allow_pickle=False) as z:   # a lone .npy array has no `with`: a TypeError
                arrays = {k: np.ascontiguousarray(z[k]) for k in z.files}
            cfg, eps = arrays.pop("config"), arrays.pop("eps")
            if cfg.dtype != np.int64 or cfg.shape != (8,) or int(cfg[0]) != NATIVE_FORM:
                raise ValueError(f"config must be int64 [8] of form {NATIVE_FORM}")
            if eps.dtype.kind != "f" or eps.shape != (1,):
                raise ValueError("eps must be a float array [1]")
            _, d, heads, max_len, blocks, causal, sasrec, mask = (int(x) for x in cfg)
            if not (0 < d <= MAX_NATIVE_DIM and 0 < heads <= d and 0 < blocks <= 64 and 0 < max_len <= 4096):
                raise ValueError(f"config d={d}, heads={heads}, blocks={blocks}, max_len={max_len} out of range")
            self._enc = native.SessionEncoder(arrays, d, heads, max_len, blocks, bool(causal), bool(sasrec), mask,
                                              float(eps[0]), level or "")
        except Exception as exc:  # noqa: BLE001 - zip, npy, pybind and memory errors alike: a bad file, named
            raise BundleError(f"{path}: not a native encoder weights file: {type(exc).__name__}: "
                              f"{str(exc)[:300]}") from None
        self.level, self.dim, self.max_len, self.rows = self._enc.level, d, max_len, self._enc.rows
        self.provider = f"native-{self.level}"
        self.providers_requested: tuple[str, ...] = ()

    @property
    def session_encoder(self):
        """The ``_native.SessionEncoder`` itself (the recommend fast path, ``fastpath.py``, calls it from C++)."""
        return self._enc

    def __call__(self, item_seq: np.ndarray) -> np.ndarray:
        """``item_seq`` int64 [B, W] (1 <= W <= max_len, left-padded with 0) -> float32 [B, d].

        Raises:
            ValueError: wrong dtype / shape, or a token outside 0 .. rows - 1.
        """
        return self._enc.encode_padded(item_seq)

    def encode_sessions(self, tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Sessions without padding: session b is ``tokens[offsets[b]:offsets[b + 1]]`` (int64, oldest first; the
        last ``max_len`` are read) -> float32 [B, d], each row its lone call's bits.

        Raises:
            ValueError: wrong dtypes, offsets not 0 .. len(tokens) non-decreasing, or a token out of range.
        """
        return self._enc.encode(tokens, offsets)


def native_agreement(native: NativeEncoder, reference: "Encoder", sessions: int = 24, seed: int = 0,
                     max_rows: int = const.NATIVE_CHECK_ROWS) -> float:
    """The largest difference between ``native`` and the ONNX ``reference``, relative to the largest value (float
    rounding gives about 1e-6; inf when either gives a non-finite value): every token of the table as a session of
    one item (so every row of the table and its scale is compared; above ``max_rows`` rows, that many drawn at
    random), and ``sessions`` pseudo-random sessions of lengths spread over 1 .. max_len, each call alone and all
    as one padded batch.

    Raises:
        whatever the reference raises for a token it does not have (a table larger than the ONNX file's).
    """
    rng = np.random.default_rng(seed)
    worst, scale = 0.0, 1.0

    def compare(seq: np.ndarray) -> None:
        nonlocal worst, scale
        got, want = native(seq), reference(seq)
        if not (np.all(np.isfinite(got)) and np.all(np.isfinite(want))):
            worst = float("inf")
            return
        worst = max(worst, float(np.max(np.abs(got - want))) if got.size else 0.0)
        scale = max(scale, float(np.max(np.abs(want))) if want.size else 0.0)

    rows = np.arange(1, native.rows, dtype=np.int64)
    if len(rows) > max_rows:
        rows = np.sort(rng.choice(rows, max_rows, replace=False))
    for start in range(0, len(rows), 4096):
        compare(rows[start:start + 4096].reshape(-1, 1))
    lengths = np.linspace(1, native.max_len, sessions).round().astype(int)
    for length in lengths:
        compare(rng.integers(1, native.rows, (1, int(length)), dtype=np.int64))
    batch = np.zeros((sessions, native.max_len), dtype=np.int64)
    for b, length in enumerate(lengths):
        batch[b, native.max_len - int(length):] = rng.integers(1, native.rows, int(length))
    compare(batch)
    return worst / scale


def load_encoder(path: str | os.PathLike, native_path: str | os.PathLike | None = None, threads: int = 1,
                 providers: Sequence[str] | None = None, mode: str | None = None,
                 expect: tuple[int, int, int] | None = None) -> "Encoder | NativeEncoder":
    """The encoder a node serves: the native encoder when the bundle has its weights (``native_path``), the native
    kernel is in use, ONNX Runtime runs on the CPU, the weights' shape is the bundle's (``expect``) and the two
    agree (``native_agreement`` at most ``const.NATIVE_ENCODER_TOLERANCE``); else the ONNX Runtime ``Encoder`` of
    ``path`` (a warning says why, unless the bundle simply has no native weights).

    Args:
        mode: ``auto`` (the above), ``onnx`` (always ONNX Runtime) or ``native`` (the native encoder or an error);
            None: ``EDGEREC_ENCODER``, default ``auto``.
        expect: (d, max_len, items) of the bundle's manifest: the native weights must have that d and max_len and
            a table of items + 1 rows (+ 1 for BERT4Rec's [MASK]).
    Raises:
        ValueError: an unknown ``mode``.
        BundleError: as ``Encoder``; with ``mode="native"``, no usable native encoder.
    """
    mode = (mode or env_value("ENCODER") or "auto").strip().lower()
    if mode not in ENCODER_CHOICES:
        raise ValueError(f"EDGEREC_ENCODER={mode!r}: use one of {list(ENCODER_CHOICES)}")
    onnx_encoder = Encoder(path, threads, providers)
    if mode == "onnx" or (native_path is None and mode == "auto"):
        return onnx_encoder
    if native_path is None:
        raise BundleError(f"{path}: EDGEREC_ENCODER=native but the bundle has no native encoder weights "
                          f"(bundles from this version's trainer, int8 with float MatMuls, have them)")
    if mode == "auto" and onnx_encoder.provider != CPU:
        return onnx_encoder   # an accelerator the operator asked for runs the ONNX encoder
    try:
        native = NativeEncoder(native_path)
        if expect is not None:
            d, max_len, items = expect
            if native.dim != d or native.max_len != max_len or native.rows - 1 - items not in (0, 1):
                raise BundleError(f"its d = {native.dim}, max_len = {native.max_len} and {native.rows} table rows do "
                                  f"not fit the bundle's d = {d}, max_len = {max_len} and {items} items")
        diff = native_agreement(native, onnx_encoder)
        if not diff <= const.NATIVE_ENCODER_TOLERANCE:
            raise BundleError(f"the native encoder differs from ONNX Runtime by {diff:.2g} (relative) on probe "
                              f"sessions, more than {const.NATIVE_ENCODER_TOLERANCE:g}")
    except Exception as exc:  # noqa: BLE001 - whatever the file or ONNX Runtime's check raised: not served
        if mode == "native":
            raise BundleError(f"{native_path}: the native encoder cannot serve this bundle: {exc}") from None
        log.warning("the native encoder cannot serve %s (%s); the encoder runs on ONNX Runtime", native_path, exc)
        return onnx_encoder
    native.providers_requested = onnx_encoder.providers_requested
    return native
