"""``python -m server``: run the classifyd daemon; ``python -m server check <model dir>``: check a model offline."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from server.app import Daemon, ServerConfig

log = logging.getLogger("classifyd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server", description="Serve image classifiers over gRPC.")
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="model repository (default: models)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="port (0 = any free port; default: 50051)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--max-batch-size", type=int, default=32,
                        help="batch cap for models whose manifest sets none (default: 32)")
    parser.add_argument("--max-delay-ms", type=float, default=0.0,
                        help="how long a partial batch may wait, for models whose manifest sets none (default: 0)")
    parser.add_argument("--max-queue", type=int, default=1024,
                        help="requests that may wait per model before RESOURCE_EXHAUSTED, for models whose "
                             "manifest sets none (default: 1024)")
    parser.add_argument("--grace-seconds", type=float, default=10.0,
                        help="on SIGTERM/SIGINT, time in-flight requests get to finish (default: 10)")
    parser.add_argument("--no-watch", dest="watch", action="store_false",
                        help="load the repository once at startup; do not watch it for changes")
    parser.add_argument("--poll", action="store_true",
                        help="watch by polling instead of inotify (for NFS and other network filesystems)")
    parser.add_argument("--settle-seconds", type=float, default=1.0,
                        help="a version's files must be unchanged this long before it is loaded (default: 1)")
    parser.add_argument("--trust-code", action="store_true",
                        help="allow architecture = \"python:<file>:<name>\", which runs Python files of the model "
                             "repository (default: such versions are FAILED)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.max_batch_size < 1:
        parser.error("--max-batch-size must be at least 1")
    if args.max_queue < 1:
        parser.error("--max-queue must be at least 1")
    if args.max_delay_ms < 0:
        parser.error("--max-delay-ms must be >= 0")
    if args.settle_seconds < 0:
        parser.error("--settle-seconds must be >= 0")
    return args


async def serve(args: argparse.Namespace) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    config = ServerConfig(models_dir=args.models_dir, host=args.host, port=args.port, device=args.device,
                          max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms, max_queue=args.max_queue,
                          watch=args.watch,
                          poll=args.poll, settle_s=args.settle_seconds, trust_code=args.trust_code)
    daemon = Daemon(config)
    await daemon.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing in-flight requests (grace %.1f s)", args.grace_seconds)
    await daemon.stop(args.grace_seconds)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        from server.check import main as check_main

        return check_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except (FileNotFoundError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
