"""Shared fixtures: a small real bundle (SASRec trained briefly on the first 3,000 Amazon Beauty users of the
embedded data) and a daemon subprocess serving it on a free loopback port."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer.data import EMBEDDED_DIR

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
TINY_USERS = 3000


def shared_dataset(*parts: str) -> Path:
    """A file under ../shared/datasets, or skip (a fresh clone has no ../shared)."""
    p = SHARED.joinpath(*parts)
    if not p.is_file():
        pytest.skip(f"{p} not present (../shared is not part of a clone)")
    return p


@pytest.fixture(scope="session")
def beauty_subset(tmp_path_factory) -> Path:
    """The first TINY_USERS lines of the embedded Beauty.txt, with its item attributes beside it."""
    d = tmp_path_factory.mktemp("beauty")
    with open(EMBEDDED_DIR / "Beauty.txt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(TINY_USERS)]
    (d / "Beauty.txt").write_text("".join(lines), encoding="utf-8")
    shutil.copy(EMBEDDED_DIR / "Beauty_item2attributes.json", d / "Beauty_item2attributes.json")
    return d / "Beauty.txt"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, beauty_subset) -> Path:
    """A real bundle: 8 epochs of SASRec (d=32, full cross-entropy) on the Beauty subset, exported, int8-quantized,
    evaluated."""
    from trainer.config import TrainConfig
    from trainer.pipeline import run

    out = tmp_path_factory.mktemp("bundle") / "b"
    cfg = TrainConfig(data=str(beauty_subset), hidden=32, blocks=1, epochs=8, patience=8, batch_size=256,
                      loss="ce", lr=3e-3, dropout=0.3, ema_decay=0.0, int8_check_users=500)
    run(cfg, out, progress=False, printer=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def tiny_manifest(tiny_bundle) -> dict:
    return json.loads((tiny_bundle / "manifest.json").read_text())


@pytest.fixture(scope="module")
def daemon(tiny_bundle):
    """(process, port) of `edgerec serve` on the tiny bundle; stopped with SIGTERM after the module."""
    from edgerec.process import free_port, start_daemon, stop_daemon

    port = free_port()
    proc = start_daemon(tiny_bundle, port)
    yield proc, port
    if proc.poll() is None:
        stop_daemon(proc)


@pytest.fixture(scope="module")
def beauty_data(beauty_subset):
    from trainer import data
    return data.load(beauty_subset)


def attr_values(bundle_dir: Path) -> list[str]:
    """The CSR values of a bundle's item attributes as strings (names[codes])."""
    import numpy as np

    names = json.loads((bundle_dir / "item_attr_names.json").read_text())
    return [names[c] for c in np.load(bundle_dir / "item_attr_codes.npy").tolist()]
