"""`abrec model-server`: run the shared model server (one process per device) over HTTP."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "model-server",
        help="serve every active model arm from one process (dynamic batching, hot swap)",
        description="Serve registry models over HTTP. Serves the aliases named with --aliases plus, "
        "unless --no-discover, every alias bound to an arm that serves traffic (running experiments, "
        "the control of paused/stopped ones, the shipped arm), and follows alias moves.",
    )
    p.add_argument("--db", help="database URL (default: ABREC_DATABASE_URL or sqlite:///abrec.db)")
    p.add_argument("--store", help="artifact store: directory or fsspec URL (default: ABREC_REGISTRY_STORE)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8601)
    p.add_argument("--aliases", default="", help="comma-separated refs: tron@champion,sasrec:2")
    p.add_argument("--no-discover", action="store_true", help="serve only --aliases, not experiments' arms")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch of one forward pass")
    p.add_argument("--max-delay-ms", type=float, default=0.0,
                   help="longest wait for a batch to fill (0: take what is queued when the device frees)")
    p.add_argument("--poll-s", type=float, default=1.0, help="seconds between alias checks")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"),
                   help="scoring precision; bf16 or int8 shortlists, fp32 re-scores the shortlist (default: "
                   "bf16 where the device multiplies bf16 natively, else int8 on a CPU, else fp32)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default on CPU: one per core but one)")
    p.add_argument("--concurrent-batches", type=int,
                   help="batches (of different models) computing at once (default: 1 on a GPU; on a CPU "
                   "as many as the cores hold at --threads each)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    import os
    import signal
    import sys

    import torch
    from abrec.models.registry import RegistryError
    from abrec.models.server import ModelServer, default_device
    from abrec.models.server_http import HttpServer
    from abrec.models.store import open_store

    from abrec.cli import UsageError
    from abrec.config import get_settings
    from abrec.db import init_db, make_engine, session_factory

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = get_settings()
    aliases = [a.strip() for a in args.aliases.split(",") if a.strip()]
    if args.no_discover and not aliases:
        raise UsageError("--no-discover needs --aliases: there would be nothing to serve")
    if args.max_batch < 1 or any(n is not None and n < 1 for n in (args.threads, args.concurrent_batches)):
        raise UsageError("--max-batch, --threads and --concurrent-batches must be at least 1")
    if args.max_delay_ms < 0 or args.poll_s <= 0:
        raise UsageError("--max-delay-ms must be >= 0 and --poll-s > 0")
    device = args.device or default_device()
    if args.threads or device == "cpu":
        # On a CPU, one core is left to the HTTP event loop and the batchers: measured on 2 cores,
        # one torch thread served ~2.5x the requests of two (whose OpenMP barriers then stall on
        # the event loop) at a lower CPU cost per request.
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - 1))
    engine = make_engine(args.db or settings.database_url)
    init_db(engine)
    try:
        server = ModelServer(
            session_factory(engine),
            open_store(args.store or settings.registry_store),
            aliases=aliases,
            discover=not args.no_discover,
            device=device,
            max_batch=args.max_batch,
            max_delay_s=args.max_delay_ms / 1000,
            poll_s=args.poll_s,
            precision=args.precision,
            concurrent_batches=args.concurrent_batches,
        )
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    try:
        http = HttpServer(server, args.host, args.port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    # SIGTERM (a service manager stopping us) is a clean exit, as Ctrl-C is.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.start()
    logging.getLogger("abrec.model_server").info("listening on %s (device %s)", http.url, server.device)
    try:
        http.run()  # until SIGINT/SIGTERM
    finally:
        server.close()
    return 0
