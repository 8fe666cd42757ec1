"""Exact top-k kernel against what a user would pick instead, in one run, after checking they agree.

    python bench/bench_topk.py [--quick | --targets] [--n 100000,1000000] [--d 64] [--kind int8] [--k 10]
                               [--batch 1] [--exclude 0] [--threads 1] [--faiss-simd match|native]
                               [--out bench/results/topk.json]                        (make bench-topk)

``EDGEREC_SIMD=avx2`` (etc.) benchmarks a lower level on a CPU that has more, e.g. an AVX2-only box emulated on an
AVX-512 one; FAISS is then held to the same instruction set (``--faiss-simd match``, the default: AVX2 for avx2,
no SIMD for scalar) so the ratio is the one that box would see. The header names the CPU model, the kernel's SIMD
level and FAISS's; the closing table holds the issue's targets for that SIMD level, each with the measured ratio
and PASS / FAIL (or "not measured" when the grid was cut so that the case did not run).

Grid: N in {10k, 100k, 1M}, d in {64, 128}, float32 and int8 items, k in {10, 100}, a single query and a batch of
32, with and without a 1% exclusion set, 1 and 2 threads (``--quick``: N = 10k and 100k only; ``--targets``: only
the cases the targets read, d = 64 and k = 10; ``--n``, ``--d``, ... cut any axis to the listed values). Methods:

* ``edgerec``: edge_runtime.scoring.topk (the native kernel at this CPU's SIMD level). int8: items packed once
  with ``scoring.pack_int8`` (VNNI tile layout; like FAISS's own index storage, built outside the timing) and an
  int8 query; ``edgerec-rowmajor`` = the same on the row-major int8 matrix; ``edgerec-f32q`` = row-major int8
  items with a float32 query (what the daemon serves);
* ``numpy``: matmul + argpartition (the exclusion set as -inf);
* ``faiss``: IndexFlatIP (float32) and IndexScalarQuantizer QT_8bit_direct_signed (int8); exclusion through an
  IDSelectorNot(IDSelectorBatch);
* ``usearch``: exact search (``usearch.index.search(..., exact=True)``); it has no exclusion filter.

Every method is first checked to return the same ids (int8 cases use integer-valued queries and unit scales so all
methods compute identical scores; float32 cases compare scores within 1e-4 and ids up to near-ties). Then each is
timed: median over repeats (>= 3, ~0.3 s per method and case); the edgerec variants and FAISS, whose ratios the
targets read, in interleaved rounds (one call of each per round, the order rotating), so that a slow spell of a
shared VM lands on both sides of a ratio instead of on whichever ran in it. The machine's memory read bandwidth is
measured in the same run (one thread streaming a 512 MiB float32 array through the kernel's own SIMD sum), and each case
reports the latency, the speedup over FAISS (FAISS time / our time), and our scan rate (item-matrix bytes / time)
as a fraction of that bandwidth. Results go to JSON and a PNG of latency against N per method.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from edge_runtime import scoring


def timeit(fn, budget_s: float = 0.3, min_reps: int = 3, max_reps: int = 200, warm: bool = False) -> float:
    """Median seconds of fn() (after one warm-up call unless ``warm``); calls over 0.3 s get 2 repeats."""
    if not warm:
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if times[0] > 0.3:
            min_reps = 2
    return float(np.median(times))


def timeit_rounds(fns: dict, budget_s: float = 0.3, min_reps: int = 3, max_reps: int = 200) -> dict:
    """Median seconds of each fn() (already warm), timed in rounds: one call of each per round, the order rotated
    each round, until every one has ``min_reps`` and the rounds have run ``budget_s`` per function (or
    ``max_reps``; 2 repeats when a round takes over 0.3 s per function)."""
    names = list(fns)
    times: dict = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while True:
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
        elapsed = time.perf_counter() - start
        need = 2 if elapsed / rounds > 0.3 * len(names) else min_reps
        if rounds >= max_reps or (rounds >= need and elapsed >= budget_s * len(names)):
            break
    return {name: float(np.median(t)) for name, t in times.items()}


def bandwidth_gbs(threads: int = 1) -> float:
    """Memory read bandwidth: a 512 MiB float32 array summed by the native kernel's SIMD loop, split over
    ``threads`` threads (the GIL is released while summing)."""
    import threading

    from edge_runtime.scoring import _native

    a = np.ones(128 * 1024 * 1024, dtype=np.float32)
    parts = np.array_split(a, threads)

    def run():
        workers = [threading.Thread(target=_native.stream_sum, args=(p,)) for p in parts[1:]]
        for w in workers:
            w.start()
        _native.stream_sum(parts[0])
        for w in workers:
            w.join()

    return a.nbytes / timeit(run, budget_s=1.0, min_reps=5) / 1e9


class Case:
    def __init__(self, n, d, kind, k, batch, excl, threads, rng):
        self.n, self.d, self.kind, self.k, self.batch, self.excl_frac, self.threads = n, d, kind, k, batch, excl, threads
        self.key = f"N={n} d={d} {kind} k={k} B={batch} excl={int(excl * 100)}% T={threads}"


def make_data(n, d, kind, rng):
    if kind == "f32":
        return {"items": rng.standard_normal((n, d), dtype=np.float32)}
    x8 = rng.integers(-127, 128, (n, d)).astype(np.int8)
    scales = np.ones(n, dtype=np.float32)
    return {"items": x8, "scales": scales, "items_f": x8.astype(np.float32), "packed": scoring.pack_int8(x8, scales)}


def make_queries(batch, d, kind, rng):
    if kind == "f32":
        return {"q": rng.standard_normal((batch, d), dtype=np.float32)}
    q8 = rng.integers(-127, 128, (batch, d)).astype(np.int8)
    return {"q": q8.astype(np.float32), "q8": q8, "qs": np.ones(batch, dtype=np.float32)}


def build_faiss(data, kind, d):
    import faiss

    if kind == "f32":
        index = faiss.IndexFlatIP(d)
        index.add(data["items"])
    else:
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit_direct_signed, faiss.METRIC_INNER_PRODUCT)
        index.train(data["items_f"])
        index.add(data["items_f"])
    return index


def methods(case, data, qs, excl, faiss_index):
    """name -> callable returning (ids [B, k], scores [B, k]) as float64 scores for the cross-check."""
    import faiss
    from usearch.index import MetricKind, search

    k, threads = case.k, case.threads
    out = {}
    if case.kind == "f32":
        out["edgerec"] = lambda: scoring.topk(qs["q"], data["items"], k, exclude=excl, num_threads=threads)
    else:
        out["edgerec"] = lambda: scoring.topk(qs["q8"], data["packed"], k, query_scales=qs["qs"], exclude=excl,
                                              num_threads=threads)
        out["edgerec-rowmajor"] = lambda: scoring.topk(qs["q8"], data["items"], k, item_scales=data["scales"],
                                                       query_scales=qs["qs"], exclude=excl, num_threads=threads)
        out["edgerec-f32q"] = lambda: scoring.topk(qs["q"], data["items"], k, item_scales=data["scales"],
                                                   exclude=excl, num_threads=threads)

    def numpy_topk():
        with threadpool_limits(limits=threads, user_api="blas"):
            items = data["items"]
            s = qs["q"] @ items.T if case.kind == "f32" else (qs["q"] @ items.T.astype(np.float32)) * data["scales"]
        if excl is not None:
            s[:, excl] = -np.inf
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
        ids = np.take_along_axis(part, order, axis=1)
        return ids, np.take_along_axis(s, ids, axis=1)

    out["numpy"] = numpy_topk
    params = None
    if excl is not None:
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(excl))
        params = faiss.SearchParameters(sel=sel)

    def faiss_topk():
        faiss.omp_set_num_threads(threads)
        scores, ids = faiss_index.search(qs["q"], k, params=params)
        return ids, scores

    out["faiss"] = faiss_topk
    if excl is None:
        items_u = data["items"] if case.kind == "f32" else data["items"]
        q_u = qs["q"] if case.kind == "f32" else qs["q8"]

        def usearch_topk():
            m = search(items_u, q_u, k, MetricKind.IP, exact=True, threads=threads)
            keys = np.asarray(m.keys).reshape(len(q_u), -1)
            return keys, 1.0 - np.asarray(m.distances, dtype=np.float64).reshape(len(q_u), -1)

        out["usearch"] = usearch_topk
    return out


def cross_check(case, results) -> dict:
    """Every method must agree with edgerec: scores within tolerance, ids equal except near-ties."""
    ref_ids, ref_sc = (np.asarray(x) for x in results["edgerec"])
    report = {}
    for name, (ids, sc) in results.items():
        ids, sc = np.asarray(ids), np.asarray(sc, dtype=np.float64)
        if ids.shape != ref_ids.shape:
            raise AssertionError(f"{case.key}: {name} returned shape {ids.shape}, edgerec {ref_ids.shape}")
        tol = 1e-3 * max(1.0, float(np.abs(ref_sc).max()))
        if not np.allclose(np.sort(sc, axis=1), np.sort(ref_sc.astype(np.float64), axis=1), atol=tol, rtol=1e-4):
            raise AssertionError(f"{case.key}: {name} scores differ from edgerec's")
        same = float((ids == ref_ids).mean())
        if same < 0.95:
            raise AssertionError(f"{case.key}: {name} ids agree with edgerec's on only {same:.1%}")
        report[name] = same
    return report


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo (x86 'model name'; AArch64 kernels often give only 'CPU part', then
    lscpu's 'Model name'), sysctl on macOS, else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model name", "Processor", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    import subprocess

    for cmd in (["lscpu"], ["sysctl", "-n", "machdep.cpu.brand_string"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if cmd[0] == "sysctl" and line.strip():
                return line.strip()
            if sep and key.strip() == "Model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine()


# FAISS instruction set that matches each kernel level: forcing EDGEREC_SIMD=avx2 on an AVX-512 CPU emulates an
# AVX2-only machine, where FAISS would run its AVX2 code too (avx512: a Skylake-X class CPU, FAISS's plain AVX512
# code). Levels not listed leave FAISS at its own choice (the best it has for this CPU).
FAISS_MATCH = {"avx2": "AVX2", "avx512": "AVX512", "scalar": "NONE"}


def faiss_simd(mode: str, level: str) -> str:
    """Set FAISS's SIMD level for this run (``mode`` 'match' or 'native'); returns the level FAISS uses."""
    import faiss

    cfg = getattr(faiss, "SIMDConfig", None)
    if cfg is None:  # FAISS builds before dynamic dispatch: one instruction set, chosen by the loader
        return "unknown (no faiss.SIMDConfig)"
    want = FAISS_MATCH.get(level) if mode == "match" and not os.environ.get("FAISS_SIMD_LEVEL") else None
    if want is not None:
        try:
            cfg.set_level(getattr(faiss, f"SIMDLevel_{want}"))
        except Exception as exc:  # noqa: BLE001 - report and go on at FAISS's own level
            print(f"could not set FAISS to {want}: {exc}", file=sys.stderr)
    return cfg.get_level_name()


# The issue's targets (k = 10, d = 64). Every SIMD build is held to the same ratios against FAISS at the same
# instruction set; the scalar build is the reference code and has none (its ratios are printed for information).
COMMON_TARGETS = ["f32_1m", "f32_bw", "int8_1m", "int8_100k", "excl", "int8_100k_excl", "batch32", "threads2"]
TARGETS = {"avx2": COMMON_TARGETS, "avx512": COMMON_TARGETS, "avx512_vnni": COMMON_TARGETS,
           "neon": COMMON_TARGETS, "neon_dotprod": COMMON_TARGETS, "scalar": []}

GRID = {"n": [10_000, 100_000, 1_000_000], "d": [64, 128], "kind": ["f32", "int8"], "k": [10, 100],
        "batch": [1, 32], "exclude": [0.0, 0.01], "threads": [1, 2]}
# The cases the targets read: d = 64, k = 10, N = 100k and 1M (the other axes as in the grid).
TARGET_GRID = dict(GRID, n=[100_000, 1_000_000], d=[64], k=[10])


def _values(text: str, cast):
    return [cast(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 10k and 100k only")
    ap.add_argument("--targets", action="store_true", help="only the cases the targets read (d = 64, k = 10)")
    for axis, cast in (("n", int), ("d", int), ("kind", str), ("k", int), ("batch", int), ("exclude", float),
                       ("threads", int)):
        ap.add_argument(f"--{axis}", type=lambda t, c=cast: _values(t, c), default=None,
                        help=f"comma-separated values of {axis} (default: {','.join(map(str, GRID[axis]))})")
    ap.add_argument("--faiss-simd", choices=["match", "native"], default="match",
                    help="match: hold FAISS to the kernel's instruction set (AVX2 when EDGEREC_SIMD=avx2); "
                         "native: FAISS's own best level")
    ap.add_argument("--out", default="bench/results/topk.json")
    args = ap.parse_args(argv)
    if scoring.BACKEND != "native":
        print("the native kernel is not built: nothing to benchmark", file=sys.stderr)
        return 2
    grid = dict(TARGET_GRID if args.targets else GRID)
    if args.quick:
        grid["n"] = [n for n in grid["n"] if n < 1_000_000]
    for axis in GRID:
        if getattr(args, axis) is not None:
            grid[axis] = getattr(args, axis)
    level = scoring.simd_level()
    faiss_level = faiss_simd(args.faiss_simd, level)
    rng = np.random.default_rng(0)
    bw = bandwidth_gbs()
    bw2 = bandwidth_gbs(2)
    cpu = cpu_model()
    from edge_runtime.scoring import _native
    plan = _native.scan_plan()
    meta = {"machine": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(), "simd_level": level,
            "scan_plan": plan,
            "simd_note": scoring.simd_note(), "implementation": scoring.IMPLEMENTATION, "faiss_simd": faiss_level,
            "read_bandwidth_GBps": bw, "read_bandwidth_2threads_GBps": bw2, "python": platform.python_version(),
            "grid": grid}
    print(f"CPU: {cpu} ({platform.machine()}, {os.cpu_count()} CPUs)")
    forced = os.environ.get("EDGEREC_SIMD") or os.environ.get("EDGE_RUNTIME_SIMD")
    print(f"SIMD level: {level}" + (f" (forced by EDGEREC_SIMD={forced})" if forced else " (best this CPU has)")
          + (f"; note: {scoring.simd_note()}" if scoring.simd_note() else "")
          + f"; FAISS at {faiss_level} (--faiss-simd {args.faiss_simd})")
    print(f"edgerec {scoring.IMPLEMENTATION}; read bandwidth {bw:.1f} GB/s with 1 thread, "
          f"{bw2:.1f} GB/s with 2 ({bw2 / bw:.2f}x: the most 2 threads can gain on a memory-bound scan); "
          f"scan plan: software prefetch {'on' if plan['prefetch_f32'] else 'off'} (float32) / "
          f"{'on' if plan['prefetch_i8'] else 'off'} (int8), {plan['streams']} streams side by side "
          f"({plan['row_streams']} for float-query rows): {plan['why']}"
          + (f"; note: {plan['note']}" if plan['note'] else ""))
    rows = []
    header = f"{'case':<46}{'edgerec ms':>11}{'numpy':>9}{'faiss':>9}{'usearch':>9}{'x faiss':>9}{'of BW':>7}"
    print(header)
    for n, d, kind in itertools.product(grid["n"], grid["d"], grid["kind"]):
        data = make_data(n, d, kind, rng)
        faiss_index = build_faiss(data, kind, d)
        item_bytes = data["items"].nbytes
        for k, batch, excl_frac, threads in itertools.product(grid["k"], grid["batch"], grid["exclude"],
                                                              grid["threads"]):
            case = Case(n, d, kind, k, batch, excl_frac, threads, rng)
            qs = make_queries(batch, d, kind, rng)
            excl = np.sort(rng.choice(n, int(n * excl_frac), replace=False)).astype(np.int64) if excl_frac else None
            fns = methods(case, data, qs, excl, faiss_index)
            agree = cross_check(case, {name: fn() for name, fn in fns.items()})
            # the cross-check warmed them up; the ratios' two sides in the same rounds (timeit_rounds)
            paired = {name: fn for name, fn in fns.items() if name.startswith("edgerec") or name == "faiss"}
            times = timeit_rounds(paired)
            times.update({name: timeit(fn, warm=True) for name, fn in fns.items() if name not in paired})
            ours = times["edgerec"]
            row = {"n": n, "d": d, "kind": kind, "k": k, "batch": batch, "exclude": excl_frac, "threads": threads,
                   "ms": {m: t * 1e3 for m, t in times.items()},
                   "ms_per_query": {m: t * 1e3 / batch for m, t in times.items()},
                   "speedup_vs_faiss": times["faiss"] / ours,
                   "speedup_vs_faiss_by_method": {m: times["faiss"] / t for m, t in times.items()
                                                  if m.startswith("edgerec")},
                   "bandwidth_fraction": item_bytes / ours / 1e9 / bw, "id_agreement": agree}
            rows.append(row)
            us = f"{times['usearch'] * 1e3:9.3f}" if "usearch" in times else f"{'-':>9}"
            extra = "".join(f"  {m[8:]} {times[m] * 1e3:.3f} ({times['faiss'] / times[m]:.2f}x)"
                            for m in times if m.startswith("edgerec-"))
            print(f"{case.key:<46}{ours * 1e3:11.3f}{times['numpy'] * 1e3:9.3f}{times['faiss'] * 1e3:9.3f}{us}"
                  f"{row['speedup_vs_faiss']:9.2f}{row['bandwidth_fraction']:7.0%}{extra}", flush=True)
        del data, faiss_index
    checks = acceptance(rows, grid["n"], bw2 / bw, level)
    print(f"\ntargets for SIMD level {level} on {cpu} (k = 10, d = 64; FAISS at {faiss_level}):")
    if not TARGETS.get(level, COMMON_TARGETS):
        print(f"  none: {level} is the reference build (ratios above are for information)")
    for name, ok, detail in checks:
        mark = "PASS" if ok is True else "FAIL" if ok is False else "----"
        print(f"  [{mark}] {name}: {detail}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows,
                               "acceptance": [{"name": n, "pass": ok, "detail": d} for n, ok, d in checks]},
                              indent=1))
    if any(r["d"] == 64 and r["k"] == 10 and r["batch"] == 1 and r["exclude"] == 0.0 and r["threads"] == 1
           for r in rows):
        plot(rows, out.with_suffix(".png"))
        print(f"saved {out} and {out.with_suffix('.png')}")
    else:
        print(f"saved {out}")
    return 0


def _find(rows, **kw):
    for r in rows:
        if all(r[key] == v for key, v in kw.items()):
            return r
    return None


def acceptance(rows, ns, bw_scaling: float = float("nan"), level: str | None = None):
    """[(name, True | False | None, detail)] for the targets of ``level`` (None = not measured in this grid)."""
    base = dict(d=64, k=10)
    checks = []
    big = 1_000_000 if 1_000_000 in ns else max([n for n in ns if n >= 100_000] or [100_000])
    wanted = set(TARGETS.get(level, COMMON_TARGETS)) if level is not None else set(COMMON_TARGETS)

    def add(key, name, *found, detail):
        if key not in wanted:
            return
        if any(f is None for f in found):
            checks.append((name, None, "not measured (the grid did not run this case)"))
            return
        ok, text = detail(*found)
        checks.append((name, bool(ok), text))

    def vs_faiss(need, digits=2):
        def f(r):
            by = r.get("speedup_vs_faiss_by_method", {})
            others = ", ".join(f"{m[8:]} {x:.2f}x" for m, x in by.items() if m != "edgerec")
            return (r["speedup_vs_faiss"] >= need,
                    f"{r['ms']['edgerec']:.{digits}f} ms vs {r['ms']['faiss']:.{digits}f} ms "
                    f"({r['speedup_vs_faiss']:.2f}x, need {need}x)" + (f"; {others}" if others else ""))
        return f

    one = lambda n, kind, **kw: _find(rows, n=n, kind=kind, **dict(dict(batch=1, exclude=0.0, threads=1), **kw),
                                      **base)
    add("f32_1m", f"float32 single query N={big} >= FAISS IndexFlatIP", one(big, "f32"),
        detail=vs_faiss(1.0))
    add("f32_bw", f"float32 single query N={big} >= 85% of read bandwidth", one(big, "f32"),
        detail=lambda r: (r["bandwidth_fraction"] >= 0.85, f"{r['bandwidth_fraction']:.0%}"))
    add("int8_1m", f"int8 single query N={big} >= 1.5x FAISS SQ8 direct signed", one(big, "int8"),
        detail=vs_faiss(1.5))
    add("int8_100k", "int8 single query N=100k >= 2x FAISS SQ8 direct signed", one(100_000, "int8"),
        detail=vs_faiss(2.0, 3))
    for kind in ("f32", "int8"):
        add("excl", f"{kind} N={big}: 1% exclusion costs <= 10% more", one(big, kind),
            one(big, kind, exclude=0.01),
            detail=lambda a, b: (b["ms"]["edgerec"] / a["ms"]["edgerec"] - 1 <= 0.10,
                                 f"{b['ms']['edgerec'] / a['ms']['edgerec'] - 1:+.1%}"))
    add("int8_100k_excl", "int8 N=100k with 1% exclusion >= 1.5x FAISS with an IDSelector",
        one(100_000, "int8", exclude=0.01), detail=vs_faiss(1.5, 3))
    add("batch32", f"float32 batch 32 N={big} per query >= 4x FAISS IndexFlatIP", one(big, "f32", batch=32),
        detail=lambda r: (r["speedup_vs_faiss"] >= 4.0,
                          f"{r['ms_per_query']['edgerec']:.3f} vs {r['ms_per_query']['faiss']:.3f} ms/query "
                          f"({r['speedup_vs_faiss']:.2f}x, need 4x)"))
    for kind in ("f32", "int8"):
        add("threads2", f"{kind} single query N={big}: 2 threads >= 1.5x 1 thread", one(big, kind),
            one(big, kind, threads=2),
            detail=lambda a, b: (a["ms"]["edgerec"] / b["ms"]["edgerec"] >= 1.5,
                                 f"{a['ms']['edgerec'] / b['ms']['edgerec']:.2f}x (this machine's read bandwidth "
                                 f"grows {bw_scaling:.2f}x from 1 to 2 threads; the scan runs at "
                                 f"{b['bandwidth_fraction']:.0%} of 1-thread bandwidth with 2 threads)"))
    return checks


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind in zip(axes, ("f32", "int8")):
        sel = [r for r in rows if r["kind"] == kind and r["d"] == 64 and r["k"] == 10 and r["batch"] == 1
               and r["exclude"] == 0.0 and r["threads"] == 1]
        sel.sort(key=lambda r: r["n"])
        if not sel:
            ax.set_visible(False)
            continue
        for m in sel[0]["ms"]:
            ax.loglog([r["n"] for r in sel], [r["ms"][m] for r in sel], marker="o", label=m)
        ax.set_title(f"{'float32' if kind == 'f32' else 'int8'} items, d=64, k=10, 1 query, 1 thread")
        ax.set_xlabel("items N")
        ax.set_ylabel("latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
