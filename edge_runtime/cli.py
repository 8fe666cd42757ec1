"""The ``edgerec`` command: train, serve, recommend, track, demo.

``train`` and ``demo`` import the trainer (PyTorch, the ``[trainer]`` extra) only when they run; ``serve``,
``recommend`` and ``track`` need the daemon's dependencies only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from . import __version__, const


def _add_conn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=const.DEFAULT_HOST, help="daemon host (default %(default)s)")
    p.add_argument("--port", type=int, default=const.DEFAULT_PORT, help="daemon TCP port (default %(default)s)")
    p.add_argument("--unix", default=None, help="connect to this Unix socket instead of TCP")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgerec", description="Real-time sequential recommendations on the edge.")
    ap.add_argument("--version", action="version", version=f"edgerec {__version__}")
    ap.add_argument("--log-level", default=os.environ.get("EDGEREC_LOG_LEVEL", "INFO"),
                    choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train SASRec, export + int8-quantize it, write a bundle")
    t.add_argument("--data", default=None, help="interaction log (default: embedded Amazon Beauty, S3-Rec files)")
    t.add_argument("--columns", default=None,
                   help="table column roles, e.g. 'user,item,category,event,time' or 'user=session_id,item=item_id'")
    t.add_argument("--attributes", default=None, help="item attributes JSON {item: [attr, ...]}")
    t.add_argument("--config", default=None, help="TOML file of training settings ([train] table)")
    t.add_argument("--out", required=True, help="bundle directory to write (replaced if it holds a bundle)")
    t.add_argument("--epochs", type=int, default=None, help="maximum epochs (early stopping may end sooner)")
    t.add_argument("--patience", type=int, default=None)
    t.add_argument("--model", choices=["sasrec", "bert4rec"], default=None)
    t.add_argument("--loss", choices=["ce", "sampled_ce"], default=None)
    t.add_argument("--hidden", type=int, default=None)
    t.add_argument("--blocks", type=int, default=None)
    t.add_argument("--dropout", type=float, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")
    t.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("serve", help="run the daemon on a bundle")
    s.add_argument("--bundle", required=True, help="bundle directory (written by 'edgerec train')")
    s.add_argument("--host", default=const.DEFAULT_HOST, help="TCP address (default %(default)s, loopback)")
    s.add_argument("--port", type=int, default=const.DEFAULT_PORT,
                   help="TCP port (default %(default)s; 0 picks a free one; -1 disables TCP)")
    s.add_argument("--unix", default=None, help="also listen on this Unix socket path")
    s.add_argument("--precision", choices=["int8", "fp32"], default="int8",
                   help="encoder and item matrix to serve (default %(default)s)")
    s.add_argument("--threads", type=int, default=const.SCORING_THREADS, help="scoring threads")
    s.add_argument("--max-sessions", type=int, default=const.MAX_SESSIONS)
    s.add_argument("--session-events", type=int, default=const.SESSION_EVENTS)
    s.add_argument("--cache-entries", type=int, default=const.CACHE_ENTRIES)
    s.add_argument("--stalled-frame-seconds", type=float, default=const.STALLED_FRAME_SECONDS,
                   help="close a connection whose frame is unfinished this long after its first byte")
    s.add_argument("--idle-seconds", type=float, default=const.IDLE_SECONDS,
                   help="close a connection without traffic for this long")

    r = sub.add_parser("recommend", help="ask a running daemon for recommendations")
    _add_conn(r)
    r.add_argument("--user", default=None)
    r.add_argument("--history", default=None, help="comma-separated item ids, oldest first")
    r.add_argument("-k", "--k", type=int, default=10)
    r.add_argument("--include-seen", action="store_true", help="do not exclude the context's items")
    r.add_argument("--category", action="append", default=None, help="keep items with this attribute (repeatable)")
    r.add_argument("--json", action="store_true", help="print the raw reply as JSON")

    k = sub.add_parser("track", help="send one event to a running daemon")
    _add_conn(k)
    k.add_argument("--user", required=True)
    k.add_argument("--item", required=True)
    k.add_argument("--event", choices=["view", "cart", "purchase"], default="view")

    d = sub.add_parser("demo", help="train a small model on the embedded data, serve it, replay real shoppers")
    d.add_argument("--workdir", default="edgerec-demo", help="where the demo bundle goes (default %(default)s)")
    d.add_argument("--time-budget", type=float, default=150.0, help="training seconds (default %(default)s)")
    d.add_argument("--epochs", type=int, default=40)
    d.add_argument("--shoppers", type=int, default=3)
    return ap


def _train(args) -> int:
    from trainer.config import TrainConfig
    from trainer.data import DataError
    from trainer.train import run

    from .errors import BundleError

    overrides = dict(data=args.data, columns=args.columns, attributes=args.attributes, epochs=args.epochs,
                     patience=args.patience, model=args.model, loss=args.loss, hidden=args.hidden, blocks=args.blocks,
                     dropout=args.dropout, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                     threads=args.threads, device=args.device, time_budget_s=args.time_budget)
    try:
        cfg = (TrainConfig.from_toml(args.config, **overrides) if args.config
               else TrainConfig.from_dict({}, **overrides))
        run(cfg, args.out, progress=not args.quiet)
    except (DataError, BundleError, ValueError, OSError) as exc:
        print(f"edgerec train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve(args) -> int:
    from .errors import BundleError
    from .model import Model, limit_blas_threads
    from .service import Service
    from .server import serve
    import concurrent.futures

    log = logging.getLogger("edgerec")
    limit_blas_threads(1)
    try:
        model = Model(args.bundle, precision=args.precision)
    except (BundleError, ValueError) as exc:
        log.error("cannot serve: %s", exc)
        return 2
    log.info("loaded bundle %s: model %s, %d items, d=%d, load %.2f s", args.bundle, model.version, model.num_items,
             model.dim, model.load_seconds)
    executor = concurrent.futures.ThreadPoolExecutor(max(1, args.threads), thread_name_prefix="score")
    service = Service(model, executor, max_sessions=args.max_sessions, session_events=args.session_events,
                      cache_entries=args.cache_entries)
    port = None if args.port is not None and args.port < 0 else args.port
    if port is None and args.unix is None:
        log.error("nothing to listen on: give --port >= 0 or --unix PATH")
        return 2
    try:
        asyncio.run(serve(service, args.host, port, args.unix, stalled_frame_seconds=args.stalled_frame_seconds,
                          idle_seconds=args.idle_seconds))
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 2
    return 0


def _client(args):
    from .client import Client
    where = f"unix socket {args.unix}" if args.unix else f"{args.host}:{args.port}"
    try:
        return Client(args.host, args.port, unix=args.unix)
    except OSError as exc:
        raise OSError(f"cannot reach the daemon at {where}: {exc.strerror or exc}") from None


def _recommend(args) -> int:
    from .client import RpcError

    params = {"k": args.k, "exclude_seen": not args.include_seen}
    if args.user is not None:
        params["user"] = args.user
    if args.history:
        params["history"] = [h.strip() for h in args.history.split(",") if h.strip()]
    if args.category:
        params["filters"] = {"category": args.category}
    try:
        with _client(args) as c:
            res = c.call("recommend", **params)
    except (OSError, RpcError) as exc:
        print(f"edgerec recommend: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"model {res['model_version']} ({res['source']}):")
        for rank, (item, score) in enumerate(zip(res["items"], res["scores"]), 1):
            print(f"  {rank:3d}. {item:<20} {score:9.4f}")
        if res["ignored"]:
            print(f"  ignored (unknown to this model): {', '.join(res['ignored'])}")
    return 0


def _track(args) -> int:
    from .client import RpcError

    try:
        with _client(args) as c:
            c.call("track", user=args.user, item=args.item, event=args.event)
    except (OSError, RpcError) as exc:
        print(f"edgerec track: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {args.event} of {args.item} by {args.user}")
    return 0


def _demo(args) -> int:
    from trainer.demo import run_demo
    return run_demo(args.workdir, time_budget_s=args.time_budget, epochs=args.epochs, shoppers=args.shoppers)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # Export / quantization libraries log per-tensor INFO and irrelevant warnings (torchvision ops, HF configs).
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "optimum"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    handler = {"train": _train, "serve": _serve, "recommend": _recommend, "track": _track, "demo": _demo}
    return handler[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
