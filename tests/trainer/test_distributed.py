"""Data-parallel training: the trainer under torchrun with 2 gloo processes on loopback gets the metrics of one
process (the loss is normalized so the ranks' mean gradient is the single-process batch gradient)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgerec.process import PACKAGE_ROOT, free_port


def train(tmp_path, name, beauty_subset, nproc):
    out = tmp_path / name
    args = ["-m", "edgerec", "train", "--data", str(beauty_subset), "--out", str(out), "--epochs", "3",
            "--hidden", "16", "--blocks", "1", "--dropout", "0", "--loss", "ce", "--batch-size", "256", "--ema-decay", "0.9", "--quiet"]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", EDGEREC_DDP_BACKEND="gloo", OMP_NUM_THREADS="1")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port())] + args
    else:
        cmd = [sys.executable] + args
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=PACKAGE_ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "manifest.json").read_text())


def test_two_gloo_processes_match_one(tmp_path, beauty_subset):
    one = train(tmp_path, "one", beauty_subset, 1)
    two = train(tmp_path, "two", beauty_subset, 2)
    m1, m2 = one["metrics"]["test"]["pytorch_fp32"], two["metrics"]["test"]["pytorch_fp32"]
    assert m1["users"] == m2["users"]
    for key in ("HR@10", "NDCG@10"):
        assert m2[key] == pytest.approx(m1[key], rel=0.05, abs=2e-3), (key, m1, m2)
    assert two["metrics"]["epochs"] == one["metrics"]["epochs"]
