"""The scoring suite once per SIMD level this CPU has and once per fallback, each in its own process (the level
is chosen once per process, as faiss tests/test_simd_dispatch.py does)."""
from __future__ import annotations

from edgerec.process import PACKAGE_ROOT

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime import scoring

HERE = Path(__file__).resolve().parent


def levels() -> list[str]:
    if "native" not in scoring.available_backends():
        return []
    from edge_runtime.scoring import _native
    return list(_native.available_levels())


def run_suite(env_extra: dict, expect: str) -> None:
    env = dict(os.environ, **env_extra)
    code = "from edge_runtime import scoring; print(scoring.IMPLEMENTATION)"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=PACKAGE_ROOT)
    assert got.stdout.strip() == expect
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          str(HERE / "test_scoring.py"), "-k", "not releases_the_gil"],
                         env=env, capture_output=True, text=True, timeout=900, cwd=PACKAGE_ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


@pytest.mark.parametrize("level", levels() or [pytest.param("none", marks=pytest.mark.skip("native not built"))])
def test_suite_at_simd_level(level):
    run_suite({"EDGEREC_SIMD": level}, f"native-{level}")


def test_suite_without_native_uses_numba():
    pytest.importorskip("numba")
    run_suite({"EDGEREC_NO_NATIVE": "1"}, "numba")


def test_suite_on_numpy_only():
    run_suite({"EDGEREC_SCORING": "numpy"}, "numpy")


def test_unsupported_level_falls_back_with_a_note():
    if not levels():
        pytest.skip("native kernel not built")
    code = "from edge_runtime.scoring import _native as n; print(n.simd_level(), '|', n.simd_note())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, EDGEREC_SIMD="sse9"),
                         capture_output=True, text=True, check=True, cwd=PACKAGE_ROOT).stdout
    level, note = [s.strip() for s in out.split("|")]
    assert level == levels()[0] and "sse9" in note


def test_settings_that_are_not_utf8_are_reported_escaped():
    """Environment values are bytes: one that is not UTF-8 (or holds a newline) is shown escaped in the notes, so
    reading them (as the daemon does at start) never raises."""
    if not levels():
        pytest.skip("native kernel not built")
    code = ("from edge_runtime.scoring import _native as n; import json; "
            "print(json.dumps([n.simd_level(), n.simd_note(), n.scan_plan()]))")
    import json
    env = dict(os.environ, EDGEREC_SIMD="\udcffavx\n", EDGEREC_SCAN_STREAMS="\udcfe4", EDGEREC_PREFETCH="1" * 80)
    level, simd, plan = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                                  text=True, check=True, cwd=PACKAGE_ROOT).stdout)
    assert level == levels()[0] and simd == "EDGEREC_SIMD=\\xffavx\\x0a is not a level of this build"
    assert "EDGEREC_SCAN_STREAMS='\\xfe4' ignored (expected an integer 1..8)" in plan["note"], plan
    assert f"EDGEREC_PREFETCH='{'1' * 64}...' ignored (expected an integer 0..1)" in plan["note"], plan


def test_old_environment_names_still_work_with_a_deprecation_line():
    if not levels():
        pytest.skip("native kernel not built")
    code = "from edge_runtime import scoring; print(scoring.IMPLEMENTATION)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEREC_", "EDGE_RUNTIME_"))}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, EDGE_RUNTIME_SCORING="numpy",
                                                                EDGE_RUNTIME_SIMD="scalar"),
                         capture_output=True, text=True, check=True, cwd=PACKAGE_ROOT)
    assert out.stdout.strip() == "numpy"
    assert out.stderr.count("EDGE_RUNTIME_SCORING is deprecated; set EDGEREC_SCORING") == 1
    assert "EDGE_RUNTIME_SIMD is deprecated" in out.stderr
    native = subprocess.run([sys.executable, "-c", code], env=dict(env, EDGE_RUNTIME_SIMD="scalar"),
                            capture_output=True, text=True, check=True, cwd=PACKAGE_ROOT)
    assert native.stdout.strip() == "native-scalar"    # the kernel reads the old name too
    both = subprocess.run([sys.executable, "-c", code], env=dict(env, EDGEREC_SIMD=levels()[0],
                                                                 EDGE_RUNTIME_SIMD="scalar"),
                          capture_output=True, text=True, check=True, cwd=PACKAGE_ROOT)
    assert both.stdout.strip() == f"native-{levels()[0]}" and "deprecated" not in both.stderr


def test_a_fallback_says_why_and_the_daemon_warns(tiny_bundle, tmp_path):
    """Scoring off the native kernel without being asked to (pip hides a failed kernel build) is named in
    scoring.FALLBACK_NOTE, and the daemon logs it as a warning at start; on the native kernel, or on a backend the
    environment forced, there is nothing to say."""
    from edgerec.process import free_port, start_daemon, stop_daemon
    code = "from edge_runtime import scoring; print(scoring.BACKEND, '|', scoring.FALLBACK_NOTE)"

    def note(**env) -> tuple[str, str]:
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True,
                             text=True, check=True, cwd=PACKAGE_ROOT).stdout
        backend, text = (part.strip() for part in out.split("|", 1))
        return backend, text

    backend, text = note(EDGEREC_NO_NATIVE="1")
    assert backend in ("numba", "numpy") and text.startswith(f"EDGEREC_NO_NATIVE=1: scoring through {backend}")
    assert note(EDGEREC_SCORING="numpy") == ("numpy", "")   # asked for: not a fallback
    if levels():
        assert note() == ("native", "")
    port = free_port()
    proc = start_daemon(tiny_bundle, port, ["--no-discovery"], log_path=tmp_path / "d.log",
                        env=dict(os.environ, EDGEREC_NO_NATIVE="1"))
    assert stop_daemon(proc) == 0
    warned = [line for line in (tmp_path / "d.log").read_text().splitlines() if "EDGEREC_NO_NATIVE=1" in line]
    assert len(warned) == 1 and "WARNING" in warned[0], warned


_PLAN_PROBE = r"""
import hashlib, json
import numpy as np
from edge_runtime import scoring
from edge_runtime.scoring import _native
rng = np.random.default_rng(7)
h = hashlib.sha256()
for n, d in ((5000, 64), (1999, 37), (130, 8)):
    xf = rng.standard_normal((n, d), dtype=np.float32)
    x8 = rng.integers(-128, 128, (n, d)).astype(np.int8)
    scales = rng.uniform(0.01, 0.03, n).astype(np.float32)
    packed = scoring.pack_int8(x8, scales)
    mask = rng.random(n) < 0.7
    mask[64:192] = False                           # two whole blocks: rounds with fewer blocks than streams
    allow = scoring.pack_mask(mask)
    excl = np.unique(rng.integers(0, n, 40))
    for nq in (1, 3):
        qf = rng.standard_normal((nq, d), dtype=np.float32)
        q8 = rng.integers(-128, 128, (nq, d)).astype(np.int8)
        qs = rng.uniform(0.01, 0.03, nq).astype(np.float32)
        calls = [scoring.topk(qf, xf, 50, allow=allow, exclude=excl),
                 scoring.topk(qf, x8, 50, item_scales=scales, exclude=excl),
                 scoring.topk(q8, x8, 50, item_scales=scales, query_scales=qs, allow=allow),
                 scoring.topk(q8, packed, 50, query_scales=qs, allow=allow, exclude=excl)]
        for ids, sc in calls:
            h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(sc, dtype=np.float32).tobytes())
print(json.dumps({"plan": _native.scan_plan(), "digest": h.hexdigest()}))
"""


def test_every_scan_plan_gives_the_same_bits():
    """The scan plan (software prefetch, blocks read side by side) changes how memory is read, never a result: real-
    valued float32 and int8 scans with allow bitsets and exclusions return the same ids and score bits under each."""
    if not levels():
        pytest.skip("native kernel not built")
    import json
    plans = [{}, {"EDGEREC_SCAN_STREAMS": "1", "EDGEREC_PREFETCH": "1"},
             {"EDGEREC_SCAN_STREAMS": "8", "EDGEREC_PREFETCH": "0"}, {"EDGEREC_SCAN_STREAMS": "3"}]
    got = []
    for extra in plans:
        out = subprocess.run([sys.executable, "-c", _PLAN_PROBE], env=dict(os.environ, **extra), capture_output=True,
                             text=True, timeout=300, cwd=PACKAGE_ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        got.append(json.loads(out.stdout))
    assert got[1]["plan"]["streams"] == 1 and got[1]["plan"]["prefetch_f32"] and got[1]["plan"]["prefetch_i8"]
    assert got[2]["plan"]["streams"] == 8 and got[2]["plan"]["row_streams"] == 8
    assert not got[2]["plan"]["prefetch_f32"] and "EDGEREC_SCAN_STREAMS=8" in got[2]["plan"]["why"]
    assert got[3]["plan"]["streams"] == 3 and got[3]["plan"]["row_streams"] == 2, got[3]["plan"]
    assert "(2 for float-query rows)" in got[3]["plan"]["why"] and got[3]["plan"]["note"] == ""
    assert len({g["digest"] for g in got}) == 1, [(p, g["digest"]) for p, g in zip(plans, got)]


def test_an_invalid_scan_plan_setting_is_ignored_and_said():
    """A mistyped EDGEREC_SCAN_STREAMS / EDGEREC_PREFETCH leaves the CPU's own plan in place and is named in the
    plan's note (which the daemon logs at start); an empty one counts as unset."""
    if not levels():
        pytest.skip("native kernel not built")
    code = "from edge_runtime.scoring import _native as n; import json; print(json.dumps(n.scan_plan()))"
    import json
    default = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                        cwd=PACKAGE_ROOT, env={k: v for k, v in os.environ.items()
                                                               if k not in ("EDGEREC_SCAN_STREAMS",
                                                                            "EDGEREC_PREFETCH")}).stdout)
    assert default["note"] == ""
    for streams, prefetch in (("0", "2"), ("9", "yes"), ("four", "-1"), ("-1", ""), ("", "01x")):
        plan = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                         cwd=PACKAGE_ROOT, env=dict(os.environ, EDGEREC_SCAN_STREAMS=streams,
                                                                    EDGEREC_PREFETCH=prefetch)).stdout)
        note = plan.pop("note")
        assert plan == {k: v for k, v in default.items() if k != "note"}, (streams, prefetch)
        for name, value, lo, hi in (("EDGEREC_SCAN_STREAMS", streams, 1, 8), ("EDGEREC_PREFETCH", prefetch, 0, 1)):
            said = f"{name}='{value}' ignored (expected an integer {lo}..{hi})"
            assert (said in note) == (value != ""), (streams, prefetch, note)
