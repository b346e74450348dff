"""Run one daemon process until SIGTERM or SIGINT; shared by ``python -m server`` and each ``--workers`` process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("classifyd")


def _production_config(args: argparse.Namespace) -> dict[str, object]:
    limits = {"max_message_bytes": args.max_message_bytes, "max_pixels": args.max_pixels}
    return {**{k: v for k, v in limits.items() if v is not None}, "metrics_port": args.metrics_port,
            "metrics_host": args.metrics_host, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
            "tls_client_ca": args.tls_client_ca, "auth_token_file": args.auth_token_file}


async def serve(args: argparse.Namespace) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    from server.daemon import Daemon, ServerConfig  # here: the parent of --workers never needs torch

    config = ServerConfig(models_dir=args.models_dir, host=args.host, port=args.port, device=args.device,
                          max_batch_size=args.max_batch_size or 32, max_delay_ms=args.max_delay_ms,
                          max_queue=args.max_queue,
                          watch=args.watch,
                          poll=args.poll, settle_s=args.settle_seconds, http_port=args.http_port,
                          reuse_port=args.reuse_port, max_connection_age_s=args.max_connection_age_seconds,
                          autotune=args.autotune and args.max_batch_size is None,
                          autotune_budget_s=args.autotune_budget_s,
                          autotune_max_batch_size=args.autotune_max_batch_size, torch_threads=args.torch_threads,
                          trust_code=args.trust_code, **_production_config(args))
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before loading: a signal during start-up stops it cleanly
        loop.add_signal_handler(sig, stop.set)
    port = await daemon.start()
    if args.port_file:
        write_port_file(args.port_file, port)
    await stop.wait()
    log.info("stopping: finishing in-flight requests (grace %.1f s)", args.grace_seconds)
    await daemon.stop(args.grace_seconds)


def write_port_file(path: Path, port: int) -> None:
    """Write the port atomically, so a reader never sees a half-written number."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(f"{port}\n", encoding="ascii")
    partial.replace(path)
