"""``edgerec demo``: train a small model on the embedded Amazon Beauty data, serve it on loopback, replay real
shoppers' events through ``track`` and show their recommendations before and after, measure the model beside the
popularity list on held-out shoppers through the daemon, then shut the daemon down."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_runtime.rpc.client import Client
from trainer import data as data_mod
from trainer.config import TrainConfig
from trainer.evaluate import metrics_from_ranks
from trainer.pipeline import run

from .process import free_port, start_ready, stop_daemon


def _timed(c: Client, **params) -> tuple[dict, float]:
    """``recommend`` with ``params``: (the reply, the call's time in ms)."""
    t0 = time.perf_counter()
    res = c.call("recommend", **params)
    return res, (time.perf_counter() - t0) * 1e3


def _rank(c: Client, user: str, held_out: str) -> int | None:
    """The rank (1-based) of ``held_out`` in ``user``'s top 1000, None if absent."""
    deep = c.call("recommend", user=user, k=1000)["items"]
    return deep.index(held_out) + 1 if held_out in deep else None


def _show(title: str, res: dict, rank: int | None, ms: float, held_out: str) -> None:
    marks = [f"{it}{'*' if it == held_out else ''}" for it in res["items"]]
    where = f"#{rank}" if rank else "not in top 1000"
    print(f"    {title:<7}({ms:4.1f} ms) {' '.join(marks)}   real next item: {where}")


def held_out_quality(c: Client, data: data_mod.Interactions, users: Sequence[int], k: int = 10) -> dict:
    """Leave-one-out HR@k / NDCG@k of the served model beside the popularity list, through the daemon, on ``users``
    (indices into ``data.sequences``, each with at least 3 interactions: the trainer held their last item out as
    its test target and never trained on it), as ``trainer.evaluate`` measures it.

    Per shopper: history = every item but the last (oldest first), target = the last. The model's list is
    ``recommend {history, k, exclude_seen: true}`` (the history masked, as the evaluator masks the context); the
    popularity list is ``recommend {k, filters: {exclude: history}}`` without context, which the daemon answers
    from its popularity list (the bundle's ``popularity.npy``: training interaction counts) with the same items
    masked. A target's rank is its 0-based place in the list, a miss when absent.

    Returns:
        {"model": {f"HR@{k}", f"NDCG@{k}", "users"}, "popularity": {the same}, "ms": [the model calls' times]}.
    Raises:
        ValueError: a user has fewer than 3 interactions.
    """
    ranks: dict[str, list[int]] = {"model": [], "popularity": []}
    ms: list[float] = []
    for u in users:
        seq = data.sequences[u]
        if len(seq) < 3:
            raise ValueError(f"user {u} has {len(seq)} interactions; leave-one-out needs at least 3")
        history = [data.item_ids[t - 1] for t in seq[:-1]]
        target = data.item_ids[seq[-1] - 1]
        res, t = _timed(c, history=history, k=k, exclude_seen=True)
        pop = c.call("recommend", k=k, filters={"exclude": history})
        ms.append(t)
        for name, items in (("model", res["items"]), ("popularity", pop["items"])):
            ranks[name].append(items.index(target) if target in items else k)
    out = {name: metrics_from_ranks(np.asarray(r, dtype=np.int64), ks=(k,)) for name, r in ranks.items()}
    return dict(out, ms=ms)


def run_demo(workdir: str | os.PathLike, time_budget_s: float = 150.0, epochs: int = 40, shoppers: int = 3,
             eval_users: int = 300, seed: int = 0) -> int:
    """The demo (see the module docstring); returns the exit status (0: the daemon stopped cleanly).

    Args:
        workdir: where the bundle (``bundle/``) and the daemon's log (``daemon.log``) go.
        time_budget_s / epochs: training ends at whichever comes first (or by early stopping).
        shoppers: example shoppers replayed (10 to 20 interactions each), drawn at random with ``seed``.
        eval_users: held-out shoppers scored through the daemon (``held_out_quality``), drawn with ``seed``.
    """
    workdir = Path(workdir)
    bundle = workdir / "bundle"
    print(f"== 1/4 train SASRec on the embedded Amazon Beauty data (until {time_budget_s:.0f} s of training or "
          f"{epochs} epochs, whichever comes first; early stopping may end it sooner)")
    cfg = TrainConfig(epochs=epochs, time_budget_s=time_budget_s, patience=5)
    manifest = run(cfg, bundle, progress=True)
    version = manifest["model_version"]

    port = free_port()
    print(f"\n== 2/4 serve bundle {version} on 127.0.0.1:{port} (int8 encoder, int8 item matrix; log: "
          f"{workdir / 'daemon.log'})")
    proc = start_ready(bundle, port, log_path=workdir / "daemon.log")
    try:
        data = data_mod.load(None)
        rng = np.random.default_rng(seed)
        candidates = [u for u, s in enumerate(data.sequences) if 10 <= len(s) <= 20]
        picked = [candidates[i] for i in rng.choice(len(candidates), min(shoppers, len(candidates)), replace=False)]
        with Client("127.0.0.1", port) as c:
            print(f"\n== 3/4 replay {len(picked)} real shoppers drawn at random (seed {seed}): history via "
                  "track_batch, then two more events via track")
            print("   (* = the shopper's real next item, held out: never sent to the daemon; its rank among all "
                  f"{manifest['model']['num_items']} items is shown)")
            plan = []
            for u in picked:
                seq = [data.item_ids[t - 1] for t in data.sequences[u]]
                user = f"beauty-{data.user_ids[u]}"
                plan.append((user, seq[:-3], seq[-3:-1], seq[-1]))
                c.call("track_batch", events=[{"user": user, "item": it, "event": "view"} for it in seq[:-3]])
            # the first recommend calls after READY are these, one per shopper, all alike (k = 10, a fresh session)
            before = [_timed(c, user=user, k=10) for user, *_ in plan]
            ranks_before = [_rank(c, user, held_out) for user, _, _, held_out in plan]
            after = []
            for user, _, recent, held_out in plan:
                for it in recent:
                    c.call("track", user=user, item=it, event="view")
                after.append((*_timed(c, user=user, k=10), _rank(c, user, held_out)))
            for (user, history, recent, held_out), (res_b, ms_b), rank_b, (res_a, ms_a, rank_a) in zip(
                    plan, before, ranks_before, after):
                print(f"\n  shopper {user}: {len(history)} past items, then views {recent[0]} and {recent[1]}; "
                      f"held-out next item {held_out}")
                _show("before", res_b, rank_b, ms_b, held_out)
                _show("after", res_a, rank_a, ms_a, held_out)
                left = [it for it in recent if it in res_b["items"] and it not in res_a["items"]]
                if left:
                    print(f"    (tracked item(s) {', '.join(left)} left the list: already seen)")
            calls = [ms for _, ms in before] + [ms for _, ms, _ in after]
            if len(calls) >= 2:
                print(f"\n  first recommend after READY: {calls[0]:.2f} ms, second: {calls[1]:.2f} ms "
                      f"({calls[0] / calls[1]:.1f}x)")

            evaluable = sorted(set(u for u, s in enumerate(data.sequences) if len(s) >= 3) - set(picked))
            users = rng.choice(evaluable, min(eval_users, len(evaluable)), replace=False)
            print(f"\n== 4/4 {len(users)} held-out shoppers drawn at random (seed {seed}), through the daemon: history "
                  "= all but the last item,\n   target = the last item (never trained on), ranked among all "
                  f"{manifest['model']['num_items']} items with the history masked (the trainer's leave-one-out)")
            q = held_out_quality(c, data, users, k=10)
            print(f"  {'':<44} {'HR@10':>7} {'NDCG@10':>8} {'hits':>5}")
            for name, label in (("model", "model (recommend {history})"),
                                ("popularity", "popularity list (recommend without context)")):
                m = q[name]
                print(f"  {label:<44} {m['HR@10']:7.4f} {m['NDCG@10']:8.4f} {round(m['HR@10'] * m['users']):5d}")
            above = all(q["model"][m] > q["popularity"][m] for m in ("HR@10", "NDCG@10"))
            print(f"  the model is {'above' if above else 'NOT above'} popularity on both, measured in this run "
                  f"(the popularity list: the bundle's training interaction counts)")
            print(f"  recommend {{history}} latency over these {len(q['ms'])} calls: median "
                  f"{statistics.median(q['ms']):.2f} ms, max {max(q['ms']):.2f} ms")

            cold = c.call("recommend", user="someone-new", k=5)
            print(f"\n  a shopper with no history gets the popularity list: {' '.join(cold['items'])}")
            odd = c.call("recommend", history=["not-in-catalog", seq[0]], k=5)
            print(f"  an item unknown to the model is ignored, not an error: ignored={odd['ignored']}")
            health = c.call("health")
            print(f"  health: {health['status']}, model {health['model_version']}, {health['sessions']} sessions, "
                  f"encoder: {health['encoder']} ({health['provider']}), scan: {health['scoring']}")
    finally:
        code = stop_daemon(proc)
    print(f"\ndaemon stopped (exit status {code}). Serve it yourself with:\n"
          f"  edgerec serve --bundle {bundle}\n  edgerec recommend --history {','.join(seq[:3])}")
    return 0 if code == 0 else 1
