"""Training step cost of the full-softmax loss: trainer.losses.full_softmax_ce against what a user would write.

    python bench/bench_loss.py [--items 12101,54542] [--positions 740] [--dim 64] [--threads 2] [--repeats 20]
                               [--out bench/results/loss.json]

For each catalog size N (default: the two Beauty files, 12,101 and 54,542 items) it times forward + backward of the
cross-entropy of P target positions (P = 740: a batch of 128 Beauty sequences has about that many) against all N
items, in the same run:

* ``plain``: ``F.cross_entropy(h @ E.T, y)`` (PyTorch eager; materializes the [P, N] logits and their gradient);
* ``bf16``: the same under ``torch.autocast(bfloat16)`` (mixed precision, what a GPU user would reach for);
* ``chunked``: ``trainer.losses.full_softmax_ce`` (item chunks, running-max logsumexp, recomputed backward).

It reports the median ms per step, the ratio to ``plain`` and the largest difference of the loss and gradients from
``plain`` (the chunked loss is exact up to float32 rounding). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer.losses import full_softmax_ce  # noqa: E402


def _step(kind: str, h0: torch.Tensor, e0: torch.Tensor, y: torch.Tensor):
    h, e = h0.clone().requires_grad_(), e0.clone().requires_grad_()
    if kind == "plain":
        loss = F.cross_entropy(h @ e.T, y)
    elif kind == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(h @ e.T, y)
    else:
        loss = full_softmax_ce(h, e, y)
    loss.backward()
    return loss.detach().float(), h.grad, e.grad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", default="12101,54542")
    ap.add_argument("--positions", type=int, default=740)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="bench/results/loss.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for n in (int(x) for x in args.items.split(",")):
        g = torch.Generator().manual_seed(0)
        h0 = torch.randn(args.positions, args.dim, generator=g)
        e0 = torch.randn(n, args.dim, generator=g) * 0.1
        y = torch.randint(0, n, (args.positions,), generator=g)
        ref = _step("plain", h0, e0, y)
        result = {}
        for kind in ("plain", "bf16", "chunked"):
            out = _step(kind, h0, e0, y)
            diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(out, ref))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                _step(kind, h0, e0, y)
                times.append(time.perf_counter() - t0)
            times.sort()
            result[kind] = {"ms": 1e3 * times[len(times) // 2], "max_abs_diff": diff}
        for kind in result:
            result[kind]["speedup_vs_plain"] = result["plain"]["ms"] / result[kind]["ms"]
        rows.append({"items": n, **result})
    print(f"full-softmax cross-entropy, forward + backward, P = {args.positions}, d = {args.dim}, "
          f"{args.threads} threads (median of {args.repeats})")
    print(f"  {'items':>7} {'kind':<8} {'ms':>8} {'x plain':>8} {'max |diff|':>11}")
    for r in rows:
        for kind in ("plain", "bf16", "chunked"):
            k = r[kind]
            print(f"  {r['items']:>7} {kind:<8} {k['ms']:>8.1f} {k['speedup_vs_plain']:>8.2f} "
                  f"{k['max_abs_diff']:>11.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                               "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
