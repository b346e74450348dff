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

import argparse
import asyncio
import logging
import multiprocessing
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from server.cli.serve import serve, write_port_file
from server.ops.host import default_torch_threads
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


def _metrics_port(args: argparse.Namespace, index: int) -> int | None:
    """Each worker has its own metrics registry, so its own port: ``--metrics-port`` + the worker's index."""
    port = getattr(args, "metrics_port", None)
    return port + index if port else port


def worker_main(args: argparse.Namespace, index: int) -> None:
    """Entry point of one worker process: a whole daemon on the shared port."""
    if getattr(args, "log_format", "text") == "json":
        configure_logging(args.log_level, "json")  # every JSON record carries its "pid"
    else:
        logging.basicConfig(level=args.log_level.upper(),
                            format=f"%(asctime)s %(levelname)s worker {index} (pid %(process)d) %(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except (FileNotFoundError, OSError, ValueError) as exc:
        logging.getLogger("classifyd").error("%s", exc)
        raise SystemExit(2) from None


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(self, args: argparse.Namespace, port: int, ready_dir: Path) -> None:
        self._args = args
        self._port = port
        self._ready_dir = ready_dir
        self._context = multiprocessing.get_context("spawn")
        self.workers: list[BaseProcess | None] = [None] * args.workers
        self.stopping = threading.Event()

    def _ready_file(self, index: int) -> Path:
        return self._ready_dir / f"worker-{index}.port"

    def start(self, index: int) -> None:
        self._ready_file(index).unlink(missing_ok=True)
        # Each worker gets its share of the cores: N processes with all cores each would oversubscribe them.
        threads = getattr(self._args, "torch_threads", None) or default_torch_threads(self._args.workers)
        child_args = argparse.Namespace(**{**vars(self._args), "workers": 1, "port": self._port, "reuse_port": True,
                                           "port_file": self._ready_file(index), "torch_threads": threads,
                                           "metrics_port": _metrics_port(self._args, index)})
        process = self._context.Process(target=worker_main, args=(child_args, index), name=f"classifyd-worker-{index}")
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
        """SIGTERM every worker, wait for them (their own grace period plus a margin), kill stragglers.

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


def run_workers(args: argparse.Namespace) -> int:
    """Serve with ``args.workers`` processes until SIGTERM/SIGINT. Returns the exit status (2: a worker failed to
    start)."""
    holder, port = reserve_port(args.host, args.port)
    with holder, tempfile.TemporaryDirectory(prefix="classifyd-workers-") as ready_dir:
        supervisor = Supervisor(args, port, Path(ready_dir))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: supervisor.stopping.set())
        for index in range(args.workers):
            supervisor.start(index)
        started = supervisor.wait_ready()
        if started:
            if args.port_file:
                write_port_file(args.port_file, port)
            log.info("%d workers serving on %s:%d", args.workers, args.host, port)
            supervisor.watch()
            log.info("stopping %d workers (grace %.1f s)", args.workers, args.grace_seconds)
        failed = not started and not supervisor.stopping.is_set()
        code = supervisor.stop(args.grace_seconds)
    return 2 if failed else code
