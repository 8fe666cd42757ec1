"""The ``edgerec`` command: train, finetune, serve, recommend, track, demo; keygen, publish, registry, rollback.

argparse, then one short function per command that calls the room doing the work. Each command imports what it
runs when it runs: ``train`` and ``demo`` the trainer (PyTorch, the ``[trainer]`` extra), ``serve`` and
``registry`` the node (ONNX Runtime, zeroconf), ``recommend`` / ``track`` / ``rollback`` only the RPC client; so a
serving process never loads torch, and a client call never loads the model runtime.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import sys
from pathlib import Path

from edge_runtime import __version__, const
from edge_runtime.errors import BundleError, RpcError


def _add_conn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=const.DEFAULT_HOST, help="daemon host (default %(default)s)")
    p.add_argument("--port", type=int, default=const.DEFAULT_PORT, help="daemon TCP port (default %(default)s)")
    p.add_argument("--unix", default=None, help="connect to this Unix socket instead of TCP")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="authenticate with the first token of FILE (a daemon with roles: shop for recommend and "
                        "track, ops for rollback)")
    p.add_argument("--tls-ca", default=None, metavar="FILE", help="speak TLS; verify the daemon against this CA")


def _add_security(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (roles, tokens, TLS; README: Security)")
    g.add_argument("--token-file", action="append", default=None, metavar="ROLE=FILE",
                   help="accept the tokens in FILE for ROLE (shop, ops, peer; repeatable; auth.token_files)")
    g.add_argument("--client-token-file", default=None, metavar="FILE",
                   help="the token this process presents to registries, collectors and peers "
                        "(default: the first peer token)")
    g.add_argument("--tls-cert", default=None, metavar="FILE", help="serve TLS with this PEM certificate chain")
    g.add_argument("--tls-key", default=None, metavar="FILE", help="its PEM private key")
    g.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="CA certificates: verify the servers this process calls and the client certificates of "
                        "peers (mutual TLS)")
    g.add_argument("--insecure-listen", action="store_const", const=True, default=None,
                   help="allow a non-loopback address without TLS and tokens (a warning at every start)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgerec", description="Real-time sequential recommendations on the edge.")
    ap.add_argument("--version", action="version", version=f"edgerec {__version__}")
    ap.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
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
    t.add_argument("--side-info", choices=["auto", "none", "attributes"], default=None,
                   help="item embedding += mean of its attribute embeddings: auto (default) when the data has "
                        "item attributes")
    t.add_argument("--hidden", type=int, default=None)
    t.add_argument("--blocks", type=int, default=None)
    t.add_argument("--dropout", type=float, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--ema-decay", type=float, default=None,
                   help="weight moving average used for validation and export (default 0.995; 0 = off)")
    t.add_argument("--num-negatives", type=int, default=None, help="sampled_ce negatives (default 8192)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--batching", choices=["bucketed", "random"], default=None,
                   help="random: plain shuffled batches (default); bucketed: similar-length batches, faster "
                        "epochs, lower NDCG@10 on Beauty")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")
    t.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--checkpoint", default=None,
                   help="trainer checkpoint to write (default OUT.ckpt beside the bundle; what finetune starts from)")
    _add_finetune(sub)

    s = sub.add_parser("serve", help="run the daemon on a bundle",
                       description="Settings come from --config FILE (default /etc/edgerec/edgerec.toml when it "
                                   "exists), then EDGEREC_<SECTION>_<KEY> environment variables, then these flags "
                                   "(deploy/edgerec.toml documents every key).")
    s.add_argument("--config", default=None, help="TOML config file")
    s.add_argument("--bundle", default=None,
                   help="bundle directory (written by 'edgerec train'); optional with --state-dir")
    s.add_argument("--host", default=None, help=f"TCP address (default {const.DEFAULT_HOST}, loopback)")
    s.add_argument("--port", type=int, default=None,
                   help=f"TCP port (default {const.DEFAULT_PORT}; 0 picks a free one; -1 disables TCP)")
    s.add_argument("--unix", default=None, help="also listen on this Unix socket path")
    s.add_argument("--precision", choices=["int8", "fp32"], default=None,
                   help="encoder and item matrix to serve (default int8)")
    s.add_argument("--threads", type=int, default=None, help=f"scoring threads (default {const.SCORING_THREADS})")
    s.add_argument("--max-sessions", type=int, default=None)
    s.add_argument("--session-events", type=int, default=None)
    s.add_argument("--cache-entries", type=int, default=None)
    s.add_argument("--stalled-frame-seconds", type=float, default=None,
                   help="close a connection whose frame is unfinished this long after its first byte")
    s.add_argument("--idle-seconds", type=float, default=None,
                   help="close a connection without traffic for this long")
    s.add_argument("--drain-seconds", type=float, default=None,
                   help="on SIGTERM, wait at most this long for requests in flight (default 10)")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics on this loopback HTTP port (default 0: off)")
    s.add_argument("--log-format", choices=["auto", "json", "plain"], default=None,
                   help="auto (default): plain journald lines under systemd, JSON lines otherwise")
    g = s.add_argument_group("model sync (registry, signatures, peers)")
    g.add_argument("--state-dir", default=None,
                   help="keep verified bundles here and follow the registry (needs --trusted-key)")
    g.add_argument("--trusted-key", action="append", default=None,
                   help="Ed25519 public key (PEM) whose signatures are accepted (repeatable)")
    g.add_argument("--registry", default=None, help="registry HOST:PORT (default: discover it with zeroconf)")
    g.add_argument("--no-discovery", dest="discovery", action="store_const", const=False, default=None,
                   help="no zeroconf: neither announce this node nor discover registry and peers")
    g.add_argument("--node-id", default=None, help="name announced to peers (default HOSTNAME-PORT)")
    g.add_argument("--channel", default=None, help="registry channel to follow (default stable)")
    g.add_argument("--keep", type=int, default=None, help="bundle versions kept on disk (default 3)")
    g.add_argument("--poll-seconds", type=float, default=None,
                   help="registry poll interval (default 30); backs off up to --max-backoff while unreachable")
    g.add_argument("--max-backoff", type=float, default=None)
    g.add_argument("--upstream", default=None,
                   help="ship committed events to this collector: HOST:PORT, or 'registry' (events.upstream)")
    g.add_argument("--upstream-transport", choices=["rpc", "nats"], default=None,
                   help="rpc (the collector) or nats (JetStream; --nats-url)")
    g.add_argument("--nats-url", default=None, help="NATS server for --upstream-transport nats")
    _add_security(s)

    kg = sub.add_parser("keygen", help="create an Ed25519 key pair for signing bundles, a pseudonym key, or an "
                                       "access token")
    kg.add_argument("--out", required=True, help="writes OUT.key (private, 0600) and OUT.pub (public); with "
                                                 "--pseudonym or --token, the file OUT (0600)")
    kg.add_argument("--pseudonym", action="store_true",
                    help="an HMAC key that turns shopper ids into pseudonyms (events.pseudonym_key)")
    kg.add_argument("--token", default=None, choices=list(const.ROLES), metavar="ROLE",
                    help="a 256-bit access token for ROLE (shop, ops or peer): give it to servers with "
                         "--token-file ROLE=OUT and to their clients")

    pb = sub.add_parser("publish", help="sign a bundle and add it to a registry directory")
    pb.add_argument("bundle", help="bundle directory")
    pb.add_argument("--registry", required=True, help="the registry's bundle directory (edgerec registry --bundles)")
    pb.add_argument("--key", required=True, help="Ed25519 private key (edgerec keygen)")
    pb.add_argument("--channel", default=const.DEFAULT_CHANNEL)
    pb.add_argument("--version", dest="model_version", default=None,
                    help="publish under this version instead of the manifest's model_version")

    rg = sub.add_parser("registry", help="serve published bundles to edge nodes (MessagePack-RPC + zeroconf)")
    rg.add_argument("--bundles", required=True, help="directory of published versions (edgerec publish)")
    rg.add_argument("--host", default=const.DEFAULT_HOST)
    rg.add_argument("--port", type=int, default=const.REGISTRY_PORT, help="TCP port (default %(default)s; 0 picks one)")
    rg.add_argument("--no-discovery", action="store_true", help="do not announce over zeroconf")
    rg.add_argument("--name", default=None, help="zeroconf instance name (default registry-HOSTNAME-PORT)")
    rg.add_argument("--collect", default=None, metavar="DIR",
                    help="also collect the events nodes ship ([events] upstream) into DIR/collected.db")
    rg.add_argument("--node", action="append", default=None, dest="nodes", metavar="NODE_ID",
                    help="a node id allowed to ship events (repeatable; default: any node)")
    rg.add_argument("--config", default=None, help="TOML file whose [auth], [tls] and [server] connection "
                                                  "settings apply (default /etc/edgerec/edgerec.toml if it exists)")
    _add_security(rg)

    co = sub.add_parser("collect", help="store the events nodes publish to NATS JetStream (--upstream-transport "
                                        "nats) into DIR/collected.db; runs until SIGTERM")
    co.add_argument("--nats", required=True, metavar="URL", help="the NATS server, e.g. nats://127.0.0.1:4222")
    co.add_argument("--collect", required=True, metavar="DIR", help="the collector directory (DIR/collected.db)")
    co.add_argument("--node", action="append", default=None, dest="nodes", metavar="NODE_ID",
                    help="a node id allowed to ship events (repeatable; default: any node)")
    co.add_argument("--stream", default=const.NATS_STREAM, help="JetStream stream (default %(default)s)")
    co.add_argument("--durable", default="edgerec-collector", help="durable consumer name (default %(default)s)")
    co.add_argument("--replicas", type=int, default=1, help="the stream's replicas (3 in a cluster; default 1)")

    rb = sub.add_parser("rollback", help="make a running daemon serve its previous model version")
    _add_conn(rb)

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
    _add_loop(sub)
    return ap


def _add_loop(sub) -> None:
    lp = sub.add_parser("loop", help="keep fine-tuning on the events nodes ship and publish what passes the gate",
                        description="Every --interval seconds (or --min-events new events): edgerec finetune on the "
                                    "collector's events, quality gate, sign and publish to the registry directory.")
    lp.add_argument("--checkpoint", required=True, help="the first parent checkpoint (edgerec train writes OUT.ckpt)")
    lp.add_argument("--collect", required=True, metavar="DIR",
                    help="the collector's directory (edgerec registry --collect DIR)")
    lp.add_argument("--registry", required=True, help="the registry's bundle directory (edgerec registry --bundles)")
    lp.add_argument("--key", required=True, help="Ed25519 private key that signs the bundles (edgerec keygen)")
    lp.add_argument("--workdir", required=True, help="the loop's state and candidate bundles")
    lp.add_argument("--interval", type=float, default=300.0, help="seconds between rounds (default %(default)s)")
    lp.add_argument("--min-events", type=int, default=0,
                    help="start a round as soon as this many new events are collected (default: interval only)")
    lp.add_argument("--attributes", default=None, help="catalog item attributes JSON {item: [attr, ...]}")
    lp.add_argument("--channel", default=const.DEFAULT_CHANNEL)
    lp.add_argument("--time-budget", type=float, default=None, help="training seconds per round at most")
    lp.add_argument("--margin", type=float, default=None, help="quality gate margin (default 0.05)")
    lp.add_argument("--threads", type=int, default=None)
    lp.add_argument("--metrics-port", type=int, default=0, help="Prometheus port on 127.0.0.1 (0: none)")
    lp.add_argument("--once", action="store_true", help="one round; exit 0 if it published, 1 if not")


def _loop(args) -> int:
    import dataclasses

    from edgerec.loop import LoopConfig, run_loop
    from trainer.finetune import FinetuneConfig

    given = dict(time_budget_s=args.time_budget, margin=args.margin, threads=args.threads)
    try:
        ft = dataclasses.replace(FinetuneConfig(), **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        print(f"edgerec loop: error: {exc}", file=sys.stderr)
        return 2
    for what, path in (("checkpoint", args.checkpoint), ("key", args.key)):
        if not Path(path).is_file():
            print(f"edgerec loop: error: --{what} {path}: no such file", file=sys.stderr)
            return 2
    for what, path in (("workdir", args.workdir), ("registry", args.registry), ("collect", args.collect)):
        if Path(path).exists() and not Path(path).is_dir():
            print(f"edgerec loop: error: --{what} {path}: not a directory", file=sys.stderr)
            return 2
    from edge_runtime.bundle.signing import load_private_key
    try:   # before the first round trains for minutes
        load_private_key(args.key)
    except (BundleError, OSError, ValueError) as exc:
        print(f"edgerec loop: error: --key {args.key}: {exc}", file=sys.stderr)
        return 2
    cfg = LoopConfig(checkpoint=Path(args.checkpoint), events=Path(args.collect) / const.COLLECTOR_DB,
                     registry=Path(args.registry), key=Path(args.key), workdir=Path(args.workdir),
                     interval_s=args.interval, min_events=args.min_events,
                     item_attributes=Path(args.attributes) if args.attributes else None, channel=args.channel,
                     finetune=ft)
    return run_loop(cfg, metrics_port=args.metrics_port, once=args.once)


def _train(args) -> int:
    from trainer.config import TrainConfig
    from trainer.data import DataError
    from trainer.pipeline import run

    overrides = dict(data=args.data, columns=args.columns, attributes=args.attributes, epochs=args.epochs,
                     patience=args.patience, model=args.model, loss=args.loss, side_info=args.side_info,
                     hidden=args.hidden, blocks=args.blocks,
                     dropout=args.dropout, lr=args.lr, ema_decay=args.ema_decay,
                     num_negatives=args.num_negatives, batch_size=args.batch_size, batching=args.batching,
                     seed=args.seed,
                     threads=args.threads, device=args.device, time_budget_s=args.time_budget)
    try:
        cfg = (TrainConfig.from_toml(args.config, **overrides) if args.config
               else TrainConfig.from_dict({}, **overrides))
        run(cfg, args.out, progress=not args.quiet, checkpoint=args.checkpoint)
    except (DataError, BundleError, ValueError, OSError) as exc:
        print(f"edgerec train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_finetune(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune a trained model on new events; publish it only if it passes "
                                        "the quality gate",
                       description="Exit status: 0 published, 3 refused by the quality gate (or nothing to learn "
                                   "from), 2 bad input (corrupt checkpoint, unreadable events, bad settings).")
    f.add_argument("--from", dest="source", required=True, help="parent checkpoint (edgerec train writes OUT.ckpt)")
    f.add_argument("--events", required=True,
                   help="the collector's SQLite file, or a text file of 'user item ts [event]' rows")
    f.add_argument("--out", required=True, help="bundle directory to write when the gate passes")
    f.add_argument("--checkpoint", default=None, help="new checkpoint (default OUT.ckpt)")
    f.add_argument("--attributes", default=None, help="item attributes JSON {item: [attr, ...]} for new items")
    f.add_argument("--after-id", type=int, default=None,
                   help="read collector rows above this id (default: the checkpoint's event cursor)")
    f.add_argument("--time-budget", type=float, default=None, help="training seconds at most (default 120)")
    f.add_argument("--epochs", type=int, default=None, help="passes over the update at most (default 3)")
    f.add_argument("--lr", type=float, default=None, help="learning rate (default: 3 x the parent's)")
    f.add_argument("--margin", type=float, default=None,
                   help="refuse a candidate whose held-back NDCG@10 is more than this fraction below the serving "
                        "model's (default 0.05)")
    f.add_argument("--replay-ratio", type=float, default=None,
                   help="older shoppers' sequences replayed per updated sequence (default 1.0)")
    f.add_argument("--holdout", type=float, default=None,
                   help="newest share of the events (by time) held back for the gate (default 0.1)")
    f.add_argument("--threads", type=int, default=None)
    f.add_argument("--quiet", action="store_true", help="print only the verdict")


def _finetune(args) -> int:
    import dataclasses

    from trainer.checkpoint import CheckpointError
    from trainer.finetune import EventError, FinetuneConfig, finetune

    given = dict(time_budget_s=args.time_budget, epochs=args.epochs, lr=args.lr, margin=args.margin,
                 replay_ratio=args.replay_ratio, holdout=args.holdout, threads=args.threads)
    try:
        cfg = dataclasses.replace(FinetuneConfig(), **{k: v for k, v in given.items() if v is not None})
        res = finetune(args.source, args.events, args.out, cfg, item_attributes=args.attributes,
                       after_id=args.after_id, checkpoint_out=args.checkpoint,
                       printer=(lambda *a, **k: None) if args.quiet else print)
    except (CheckpointError, EventError, BundleError, ValueError, OSError) as exc:
        print(f"edgerec finetune: error: {exc}", file=sys.stderr)
        return 2
    if not res.published:
        print(f"edgerec finetune: not published: {res.gate['reason']}", file=sys.stderr)
        return 3
    if args.quiet:
        print(f"published {res.manifest['model_version']} to {args.out} ({res.events} events, {res.new_items} new "
              f"items, {res.seconds:.1f} s)")
    return 0


def _serve_flags(args) -> dict:
    flags = dict(vars(args))
    flags["log_level"] = args.log_level if args.log_level_given else None
    return flags


def _node_module(command: str):
    """``edge_runtime.ops.node``, imported after logging is set up (so that what its import logs, e.g. a
    deprecated environment name, comes out in the configured format); None (reported) when a scoring switch is
    wrong (``EDGEREC_SCORING=...`` naming a backend that is not there)."""
    try:
        from edge_runtime.ops import node
    except ImportError as exc:
        print(f"edgerec {command}: {exc}", file=sys.stderr)
        return None
    return node


def _serve(args) -> int:
    from edge_runtime import config as config_mod
    from edge_runtime.ops import logs

    try:
        cfg = config_mod.load(args.config, flags=_serve_flags(args))
    except config_mod.ConfigError as exc:
        print(f"edgerec serve: config error: {exc}", file=sys.stderr)
        return 2
    logs.setup(cfg["log"]["level"], cfg["log"]["format"])
    node = _node_module("serve")
    if node is None:
        return 2
    return node.run_node(cfg, reload_config=lambda: config_mod.load(args.config, flags=_serve_flags(args)))


def _keygen(args) -> int:
    from edge_runtime.bundle import signing
    from edge_runtime.events.pseudonym import create_key
    from edge_runtime.rpc.auth import write_token_file

    if args.token and args.pseudonym:
        print("edgerec keygen: --token and --pseudonym write different files; give one", file=sys.stderr)
        return 2
    if args.token or args.pseudonym:   # one secret file, mode 0600, never overwritten
        try:
            path = (write_token_file if args.token else create_key)(args.out)
        except OSError as exc:
            print(f"edgerec keygen: {args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"{args.token} token: {path} (mode 0600; servers: --token-file {args.token}={path}; clients: "
              f"--token-file {path})" if args.token else
              f"pseudonym key: {path} (mode 0600; give it to nodes: [events] pseudonym_key = \"{path}\")")
        return 0
    try:
        priv, pub = signing.keygen(args.out)
    except OSError as exc:
        print(f"edgerec keygen: {exc}", file=sys.stderr)
        return 2
    print(f"private key: {priv} (keep it on the trainer; mode 0600)\npublic key:  {pub} (give it to edge nodes: "
          f"--trusted-key {pub})")
    return 0


def _publish(args) -> int:
    from edge_runtime.bundle.store import publish

    try:
        version = publish(args.bundle, args.registry, args.key, channel=args.channel, version=args.model_version)
    except (BundleError, OSError) as exc:
        print(f"edgerec publish: {exc}", file=sys.stderr)
        return 2
    print(f"published {version} (channel {args.channel}) to {args.registry}")
    return 0


def _registry(args) -> int:
    from edge_runtime import config as config_mod

    flags = {k: v for k, v in vars(args).items()
             if k in ("token_file", "client_token_file", "tls_cert", "tls_key", "tls_ca", "insecure_listen")}
    try:
        cfg = config_mod.load(args.config, flags=flags)
    except config_mod.ConfigError as exc:
        print(f"edgerec registry: config error: {exc}", file=sys.stderr)
        return 2
    node = _node_module("registry")
    if node is None:
        return 2
    return node.run_registry(args.bundles, args.host, args.port, discovery=not args.no_discovery, name=args.name,
                             collect=args.collect, nodes=args.nodes, cfg=cfg,
                             reload_config=lambda: config_mod.load(args.config, flags=flags))


def _collect(args) -> int:
    node = _node_module("collect")
    if node is None:
        return 2
    if not args.nats.startswith(("nats://", "tls://")):
        print(f"edgerec collect: error: --nats {args.nats!r}: must be a nats:// or tls:// URL", file=sys.stderr)
        return 2
    return node.run_collector(args.nats, args.collect, nodes=args.nodes, stream=args.stream, durable=args.durable,
                              replicas=args.replicas)


def _rollback(args) -> int:
    try:
        with _client(args) as c:
            res = c.call("rollback")
    except (OSError, RpcError) as exc:
        print(f"edgerec rollback: {exc}", file=sys.stderr)
        return 1
    print(f"rolled back: {res['from']} -> {res['to']}")
    return 0


def _client(args):
    from edge_runtime.errors import ConfigError
    from edge_runtime.rpc.auth import read_token_file
    from edge_runtime.rpc.client import Client
    from edge_runtime.rpc.tls import client_context

    where = f"unix socket {args.unix}" if args.unix else f"{args.host}:{args.port}"
    try:
        token = read_token_file(args.token_file)[0] if args.token_file else None
        ctx = client_context(args.tls_ca) if args.tls_ca else None
    except ConfigError as exc:
        raise OSError(str(exc)) from None
    try:
        return Client(args.host, args.port, unix=args.unix, token=token, ssl=ctx)
    except OSError as exc:
        raise OSError(f"cannot reach the daemon at {where}: {exc.strerror or exc}") from None


def _recommend(args) -> int:
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
    try:
        with _client(args) as c:
            c.call("track", user=args.user, item=args.item, event=args.event)
    except (OSError, RpcError) as exc:
        print(f"edgerec track: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {args.event} of {args.item} by {args.user}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.workdir, time_budget_s=args.time_budget, epochs=args.epochs, shoppers=args.shoppers)


def main(argv: list[str] | None = None) -> int:
    # a crash in native code (ONNX Runtime, the kernel, SQLite) prints every thread's Python stack to stderr
    # (the journal under systemd) instead of only the exit status
    if not faulthandler.is_enabled():
        faulthandler.enable()
    args = _parser().parse_args(argv)
    args.log_level_given = args.log_level is not None
    args.log_level = args.log_level or os.environ.get("EDGEREC_LOG_LEVEL", "INFO").upper()
    if args.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        print(f"edgerec: EDGEREC_LOG_LEVEL={args.log_level!r}: must be DEBUG, INFO, WARNING or ERROR",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # Export / quantization libraries log per-tensor INFO and irrelevant warnings (torchvision ops, HF configs).
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "optimum"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    handler = {"train": _train, "finetune": _finetune, "serve": _serve, "recommend": _recommend, "track": _track, "demo": _demo,
               "keygen": _keygen, "publish": _publish, "registry": _registry, "rollback": _rollback, "collect": _collect, "loop": _loop}
    return handler[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
