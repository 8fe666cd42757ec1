"""``edgerec demo``: train a small model on the embedded Amazon Beauty data, serve it on loopback, replay real
shoppers' events through ``track`` and show their recommendations before and after, then shut the daemon down."""
from __future__ import annotations

import os
import time
from pathlib import Path

from edge_runtime.rpc.client import Client
from trainer import data as data_mod
from trainer.config import TrainConfig
from trainer.pipeline import run

from .process import free_port, start_daemon, stop_daemon


def _recommend(c: Client, user: str, held_out: str) -> tuple[dict, int | None, float]:
    """Top-10 for ``user``, the rank of ``held_out`` in the top 1000 (None if absent), and the call's time in ms."""
    t0 = time.perf_counter()
    res = c.call("recommend", user=user, k=10)
    ms = (time.perf_counter() - t0) * 1e3
    deep = c.call("recommend", user=user, k=1000)["items"]
    return res, (deep.index(held_out) + 1 if held_out in deep else None), ms


def _show(title: str, res: dict, rank: int | None, ms: float, held_out: str) -> None:
    marks = [f"{it}{'*' if it == held_out else ''}" for it in res["items"]]
    where = f"#{rank}" if rank else "not in top 1000"
    print(f"    {title:<7}({ms:4.1f} ms) {' '.join(marks)}   real next item: {where}")


def run_demo(workdir: str | os.PathLike, time_budget_s: float = 150.0, epochs: int = 40, shoppers: int = 3) -> int:
    workdir = Path(workdir)
    bundle = workdir / "bundle"
    print(f"== 1/3 train SASRec on the embedded Amazon Beauty data (<= {time_budget_s:.0f} s of training)")
    cfg = TrainConfig(epochs=epochs, time_budget_s=time_budget_s, patience=5)
    manifest = run(cfg, bundle, progress=True)
    version = manifest["model_version"]

    port = free_port()
    print(f"\n== 2/3 serve bundle {version} on 127.0.0.1:{port} (int8 encoder, int8 item matrix)")
    proc = start_daemon(bundle, port)
    try:
        data = data_mod.load(None)
        picked = [u for u, s in enumerate(data.sequences) if 10 <= len(s) <= 20][:shoppers]
        with Client("127.0.0.1", port) as c:
            print("\n== 3/3 replay real shoppers: history via track_batch, then two more events via track")
            print("   (* = the shopper's real next item, held out: never sent to the daemon; its rank among all "
                  f"{manifest['model']['num_items']} items is shown)")
            for u in picked:
                seq = [data.item_ids[t - 1] for t in data.sequences[u]]
                user = f"beauty-{data.user_ids[u]}"
                history, recent, held_out = seq[:-3], seq[-3:-1], seq[-1]
                c.call("track_batch", events=[{"user": user, "item": it, "event": "view"} for it in history])
                before, rank_before, ms_before = _recommend(c, user, held_out)
                for it in recent:
                    c.call("track", user=user, item=it, event="view")
                after, rank_after, ms_after = _recommend(c, user, held_out)
                print(f"\n  shopper {user}: {len(history)} past items, then views {recent[0]} and {recent[1]}; "
                      f"held-out next item {held_out}")
                _show("before", before, rank_before, ms_before, held_out)
                _show("after", after, rank_after, ms_after, held_out)
                left = [it for it in recent if it in before["items"] and it not in after["items"]]
                if left:
                    print(f"    (tracked item(s) {', '.join(left)} left the list: already seen)")
            cold = c.call("recommend", user="someone-new", k=5)
            print(f"\n  a shopper with no history gets the popularity list: {' '.join(cold['items'])}")
            odd = c.call("recommend", history=["not-in-catalog", seq[0]], k=5)
            print(f"  an item unknown to the model is ignored, not an error: ignored={odd['ignored']}")
            health = c.call("health")
            print(f"  health: {health['status']}, model {health['model_version']}, {health['sessions']} sessions")
    finally:
        code = stop_daemon(proc)
    print(f"\ndaemon stopped (exit status {code}). Serve it yourself with:\n"
          f"  edgerec serve --bundle {bundle}\n  edgerec recommend --history {','.join(seq[:3])}")
    return 0 if code == 0 else 1
