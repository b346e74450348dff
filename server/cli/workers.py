"""``--workers N``: N daemon processes serving one port, for hosts with many cores.

Each worker is a whole classifyd (its own model manager watching the same
directory, its own batchers, health service and inference thread) that listens
with SO_REUSEPORT; the kernel spreads incoming *connections* over the workers.
This parent process only supervises: it reserves a concrete port when asked
for port 0 (so every worker binds the same one), starts the workers with the
spawn method (no forked torch state), writes ``--port-file`` once all of them
serve, restarts a worker that dies, and passes SIGTERM/SIGINT on for a
graceful stop. Everything here blocks; it runs in the parent's main thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing.process import BaseProcess
from pathlib import Path

from server.cli.serve import serve, write_port_file
from server.cli.worker_metrics import WorkerMetricsServer
from server.core.config import ServerConfig
from server.ops.host import default_decode_bytes, default_pool_threads, default_torch_threads
from server.ops.logs import configure_logging

log = logging.getLogger("classifyd.workers")
RESTART_DELAY_S = 1.0
_STARTUP_POLL_S = 0.1


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A bound (not listening) SO_REUSEPORT socket holding ``port`` (0 = a free one) while the workers bind it."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    holder = socket.socket(family, kind, proto)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind(address)
    except OSError as exc:
        holder.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return holder, holder.getsockname()[1]


def worker_config(config: ServerConfig, index: int, port: int, ready_file: Path) -> ServerConfig:
    """Worker ``index``'s settings: the shared port with SO_REUSEPORT, its share of the cores and of the decode
    memory, its ready file, and with ``--metrics-port`` a private loopback metrics port written beside the ready
    file, which the parent's ``/metrics`` merges (:mod:`server.cli.worker_metrics`)."""
    # N processes with all cores (or a quarter of the memory) each would oversubscribe them.
    workers = config.process.workers
    threads = config.models.torch_threads or default_torch_threads(workers)
    pool = config.process.preprocess_threads or default_pool_threads(workers)
    decode_bytes = config.limits.max_decode_bytes or default_decode_bytes(workers)
    observability = config.observability
    if observability.metrics_port is not None:
        observability = replace(observability, metrics_port=0, metrics_host="127.0.0.1",
                                metrics_port_file=ready_file.with_suffix(".metrics"))
    return replace(config, listen=replace(config.listen, port=port, reuse_port=True),
                   models=replace(config.models, torch_threads=threads),
                   limits=replace(config.limits, max_decode_bytes=decode_bytes), observability=observability,
                   process=replace(config.process, workers=1, port_file=ready_file, preprocess_threads=pool,
                                   status_file=ready_file.with_suffix(".status.json")))


def worker_main(config: ServerConfig, index: int) -> None:
    """Entry point of one worker process: a whole daemon on the shared port."""
    level = config.observability.log_level
    if config.observability.log_format == "json":
        configure_logging(level, "json")  # every JSON record carries its "pid"
    else:
        logging.basicConfig(level=level.upper(),
                            format=f"%(asctime)s %(levelname)s worker {index} (pid %(process)d) %(name)s: %(message)s")
    try:
        asyncio.run(serve(config))
    except (FileNotFoundError, OSError, ValueError) as exc:
        logging.getLogger("classifyd").error("%s", exc)
        raise SystemExit(2) from None


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(self, config: ServerConfig, port: int, ready_dir: Path) -> None:
        self._config = config
        self._port = port
        self._ready_dir = ready_dir
        self._context = multiprocessing.get_context("spawn")
        self.workers: list[BaseProcess | None] = [None] * config.process.workers
        self.stopping = threading.Event()

    def _ready_file(self, index: int) -> Path:
        return self._ready_dir / f"worker-{index}.port"

    def start(self, index: int) -> None:
        self._ready_file(index).unlink(missing_ok=True)
        self._ready_file(index).with_suffix(".metrics").unlink(missing_ok=True)  # a dead worker's port
        child = worker_config(self._config, index, self._port, self._ready_file(index))
        process = self._context.Process(target=worker_main, args=(child, index), name=f"classifyd-worker-{index}")
        process.start()
        self.workers[index] = process
        log.info("worker %d started (pid %s)", index, process.pid)

    def wait_ready(self) -> bool:
        """Block until every worker serves (True), or one exits or a stop is asked for first (False)."""
        while not self.stopping.is_set():
            if any(p is not None and not p.is_alive() for p in self.workers):
                return False
            if all(self._ready_file(i).exists() for i in range(len(self.workers))):
                return True
            self.stopping.wait(_STARTUP_POLL_S)
        return False

    def watch(self) -> None:
        """Until a stop is asked for: restart any worker that exits."""
        while not self.stopping.wait(RESTART_DELAY_S):
            for index, process in enumerate(self.workers):
                if process is not None and not process.is_alive():
                    log.error("worker %d (pid %s) exited with code %s; restarting it", index, process.pid,
                              process.exitcode)
                    self.start(index)

    def stop(self, grace_s: float) -> int:
        """SIGTERM every worker, wait for them (``grace_s``: their own drain and grace periods; plus a margin), kill
        stragglers.

        Returns the worst exit code.
        """
        for process in self.workers:
            if process is not None and process.is_alive():
                process.terminate()  # SIGTERM: the worker finishes its in-flight requests
        deadline = time.monotonic() + grace_s + 30.0
        codes = []
        for process in self.workers:
            if process is None:
                continue
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker pid %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join()
            codes.append(process.exitcode or 0)
        return max(codes, default=0)


def run_workers(config: ServerConfig) -> int:
    """Serve with ``config.process.workers`` processes until SIGTERM/SIGINT. Returns the exit status (2: a worker
    failed to start). Raises OSError if the port cannot be reserved."""
    host, workers, grace_s = config.listen.host, config.process.workers, config.process.grace_s
    holder, port = reserve_port(host, config.listen.port)
    with holder, tempfile.TemporaryDirectory(prefix="classifyd-workers-") as ready_dir, \
            _parent_metrics(config, Path(ready_dir)):
        supervisor = Supervisor(config, port, Path(ready_dir))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: supervisor.stopping.set())
        for index in range(workers):
            supervisor.start(index)
        started = supervisor.wait_ready()
        if started:
            if config.process.port_file:
                write_port_file(config.process.port_file, port)
            log.info("%d workers serving on %s:%d", workers, host, port)
            supervisor.watch()
            log.info("stopping %d workers (grace %.1f s)", workers, grace_s)
        failed = not started and not supervisor.stopping.is_set()
        code = supervisor.stop(config.process.drain_s + grace_s)
    return 2 if failed else code


@contextlib.contextmanager
def _parent_metrics(config: ServerConfig, ready_dir: Path) -> Iterator[None]:
    """With ``--metrics-port``: the daemon's one ``/metrics``, merged from the workers', for as long as they run.
    Raises OSError when the port cannot be bound."""
    observability = config.observability
    if observability.metrics_port is None:
        yield
        return
    exporter = WorkerMetricsServer(ready_dir, config.process.workers)
    host = observability.metrics_host or config.listen.host
    bound = exporter.serve(host, observability.metrics_port)
    log.info("metrics of all %d workers on http://%s:%d/metrics", config.process.workers, host, bound)
    if observability.metrics_port_file:
        write_port_file(observability.metrics_port_file, bound)
    try:
        yield
    finally:
        exporter.close()
