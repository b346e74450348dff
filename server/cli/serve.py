"""Run one daemon process until SIGTERM or SIGINT; shared by ``python -m server`` and each ``--workers`` process."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from server.core.config import ServerConfig
from server.ops import tracing
from server.ops.heap import settle_heap

log = logging.getLogger("classifyd")


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully. Raises what :class:`Daemon` raises on start."""
    from server.daemon import Daemon  # here: the parent of --workers never needs torch

    if tracing.configure(config.observability.otlp_endpoint):  # before the daemon: its edges open spans
        log.info("tracing: OpenTelemetry spans exported as the OTEL_* variables and --otlp-endpoint say")
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before loading: a signal during start-up stops it cleanly
        loop.add_signal_handler(sig, stop.set)
    # The ports answer at once (health NOT_SERVING while loading); the port file says the initial load is done.
    # Batch curves are measured afterwards, in the background, while the models already serve.
    port = await daemon.start(wait_for_curves=False)
    frozen = await asyncio.to_thread(settle_heap)  # before the port file: a client's first calls find it done
    log.info("python heap: %d objects of the initial load frozen out of the garbage collector's full passes "
             "(docs/production.md#the-python-heap)", frozen)
    if config.observability.metrics_port_file and daemon.metrics_port is not None:
        write_port_file(config.observability.metrics_port_file, daemon.metrics_port)
    if config.process.port_file:
        write_port_file(config.process.port_file, port)
    await stop.wait()
    process = config.process
    log.info("stopping: NOT_SERVING; draining %.1f s, then finishing in-flight requests (grace %.1f s)",
             process.drain_s, process.grace_s)
    await daemon.stop(process.grace_s, process.drain_s)
    await asyncio.to_thread(tracing.shutdown)  # exports the spans still buffered


def write_port_file(path: Path, port: int) -> None:
    """Write the port atomically, so a reader never sees a half-written number."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(f"{port}\n", encoding="ascii")
    partial.replace(path)
