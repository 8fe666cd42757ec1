"""Execution providers from the configuration (``[model] providers``): the encoder runs on the first one this
onnxruntime build has, falls back to CPU with one warning when none is there, and the daemon names the provider in
``health``, ``model_info``, the start-up log and the metrics."""
from __future__ import annotations

import json
import logging
import os
import signal
import time
import urllib.request

import onnxruntime as ort
import pytest

from edge_runtime import config as config_mod
from edge_runtime import scoring
from edge_runtime.client import Client
from edge_runtime.serving import encoder as encoder_mod
from edge_runtime.serving.model import Model
from edgerec.process import free_port, start_daemon, stop_daemon

ABSENT = ["TensorrtExecutionProvider", "NoSuchExecutionProvider"]   # not in the CPU build the tests run on


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGEREC_")}


def test_config_validates_the_provider_list(tmp_path):
    dflt = config_mod.load(os.devnull, env={})["model"]["providers"]
    assert dflt == ["CPUExecutionProvider"]
    got = config_mod.load(os.devnull, env={"EDGEREC_MODEL_PROVIDERS": "CUDAExecutionProvider, CPUExecutionProvider"})
    assert got["model"]["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    f = tmp_path / "c.toml"
    f.write_text('[model]\nproviders = ["NoSuchExecutionProvider"]\n')   # an unknown name is not an error
    assert config_mod.load(f, env={})["model"]["providers"] == ["NoSuchExecutionProvider"]
    for text, env in (('[model]\nproviders = []\n', {}), ('[model]\nproviders = [1]\n', {}),
                      ('[model]\nproviders = ["", "CPUExecutionProvider"]\n', {}), ("", {"EDGEREC_MODEL_PROVIDERS": ""})):
        f.write_text(text)
        with pytest.raises(config_mod.ConfigError, match=r"model\.providers = .*list of 1 to 16"):
            config_mod.load(f, env=env)
    f.write_text("[model]\nproviders = [" + ", ".join(['"P%d"' % i for i in range(17)]) + "]\n")   # over the bound
    with pytest.raises(config_mod.ConfigError, match="list of 1 to 16"):
        config_mod.load(f, env={})
    for bad in ([], [""], "CPUExecutionProvider", [3], ["X"] * 17, ["X" * 65]):
        with pytest.raises(ValueError, match="execution providers"):
            encoder_mod.configure_providers(bad)


def test_a_provider_that_computes_nothing_here_is_skipped(caplog):
    """AzureExecutionProvider is in the PyPI build's list but forwards to a cloud endpoint: skipped, with a warning."""
    with caplog.at_level(logging.WARNING, logger="edge_runtime.serving.encoder"):
        assert encoder_mod.pick_provider(["AzureExecutionProvider", "CPUExecutionProvider"]) == "CPUExecutionProvider"
    assert any("AzureExecutionProvider" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records) \
        or ("remote", "AzureExecutionProvider") in encoder_mod._warned   # warned once per process already


def test_first_available_provider_wins_and_absent_ones_warn_once(tiny_bundle, caplog, monkeypatch):
    """ONNX Runtime's providers (EDGEREC_ENCODER=onnx: the native encoder, the default where the bundle has its
    weights, would otherwise serve, as the last lines check)."""
    monkeypatch.setenv("EDGEREC_ENCODER", "onnx")
    available = ort.get_available_providers()
    assert "CPUExecutionProvider" in available
    assert encoder_mod.pick_provider(["NoSuchExecutionProvider", "CPUExecutionProvider"]) == "CPUExecutionProvider"
    wanted = ["NoSuchExecutionProvider", f"AlsoMissing{time.monotonic_ns()}ExecutionProvider"]   # unseen in-process
    with caplog.at_level(logging.WARNING, logger="edge_runtime.serving.encoder"):
        models = [Model(tiny_bundle, verify=False, providers=wanted) for _ in range(3)]
    assert {m.provider for m in models} == {"CPUExecutionProvider"}
    assert all(m.encoder.providers_requested == tuple(wanted) for m in models)
    assert all(m.summary()["provider"] == "CPUExecutionProvider" for m in models)
    lines = [r.getMessage() for r in caplog.records if wanted[1] in r.getMessage()]
    assert len(lines) == 1 and "runs on CPUExecutionProvider" in lines[0], lines
    # by default: ONNX Runtime fell back to the CPU, so the native encoder serves, and keeps the list asked for
    monkeypatch.delenv("EDGEREC_ENCODER")
    native = Model(tiny_bundle, verify=False, providers=wanted)
    if scoring.native_kernel() is not None:
        assert native.provider == f"native-{scoring.simd_level()}"
    else:
        assert native.provider == "CPUExecutionProvider"
    assert native.encoder.providers_requested == tuple(wanted)


def test_daemon_with_absent_providers_serves_on_cpu_with_one_warning(tmp_path, tiny_bundle):
    port, mport = free_port(), free_port()
    cfg = tmp_path / "edgerec.toml"
    cfg.write_text(f'[model]\nbundle = "{tiny_bundle}"\nproviders = {json.dumps(ABSENT)}\n[server]\nport = {port}\n'
                   f'[sync]\ndiscovery = false\n[metrics]\nport = {mport}\n[log]\nformat = "json"\n')
    log_path = tmp_path / "d.log"
    # ONNX Runtime's providers: the native encoder off (EDGEREC_ENCODER=onnx)
    proc = start_daemon(None, port, ["--config", str(cfg)], log_path=log_path, env=dict(_env(), EDGEREC_ENCODER="onnx"))
    try:
        for n in (1, 2):   # SIGHUP loads the bundle again (a second and a third encoder), same provider list
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while log_path.read_text().count("holds the model served") < n and time.monotonic() < deadline:
                time.sleep(0.05)
        with Client("127.0.0.1", port) as c:
            health = c.call("health")
            info = c.call("model_info")
            assert c.call("recommend", history=["1"], k=3)["items"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    finally:
        assert stop_daemon(proc) == 0
    assert health["status"] == "ok" and health["provider"] == "CPUExecutionProvider"
    assert health["providers_requested"] == ABSENT and info["provider"] == "CPUExecutionProvider"
    assert 'edgerec_model_provider_info{provider="CPUExecutionProvider"} 1.0' in metrics
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    messages = [r["message"] for r in records]
    assert sum("holds the model served" in m for m in messages) == 2           # three loads in all
    warned = [r for r in records if "NoSuchExecutionProvider" in r["message"]]
    assert len(warned) == 1 and warned[0]["level"] == "WARNING", warned       # once, whatever the loads
    assert "none of the execution providers" in warned[0]["message"]
    assert any("encoder: ONNX Runtime (CPUExecutionProvider)" in m and m.startswith("serving model") for m in messages)
