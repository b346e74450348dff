"""``python -m server``: run the classifyd daemon; ``python -m server check <model dir>``: check a model offline."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from server.cli.serve import serve
from server.cli.workers import run_workers
from server.core.config import DEFAULT_BUDGET_S
from server.ops.host import default_workers
from server.ops.logs import LOG_FORMATS, configure_logging

log = logging.getLogger("classifyd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server", description="Serve image classifiers over gRPC.")
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="model repository (default: models)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="port (0 = any free port; default: 50051)")
    parser.add_argument("--http-port", type=int, default=None,
                        help="also serve HTTP (curl-friendly /v1, Open Inference Protocol /v2, status page /) on "
                             "this port, same host (0 = any free port; default: no HTTP)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="batch cap for models whose manifest sets none; giving it turns their autotune off "
                             "(default: autotuned, 32 when autotune is off)")
    parser.add_argument("--no-autotune", dest="autotune", action="store_false",
                        help="do not measure batch sizes at load time; models whose manifest sets no "
                             "max_batch_size get --max-batch-size (see docs/batching.md)")
    parser.add_argument("--autotune-budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"time each version may spend measuring batch sizes (default: {DEFAULT_BUDGET_S:g})")
    parser.add_argument("--autotune-max-batch-size", type=int, default=None,
                        help="largest batch size autotune tries (default: 256 on a GPU, 64 on a CPU)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: usable cores // worker processes)")
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
    parser.add_argument("--port-file", type=Path,
                        help="once serving, write the bound port (useful with --port 0) to this file")
    parser.add_argument("--workers", type=_workers, default=1,
                        help="server processes sharing the port, each with its own batchers and models; 'auto' = "
                             "the host rule of docs/batching.md (one per core on a CPU, cores // 4 on a GPU) "
                             "(default: 1)")
    parser.add_argument("--reuse-port", action="store_true",
                        help="listen with SO_REUSEPORT so other processes may serve the same port (implied by "
                             "--workers)")
    parser.add_argument("--max-connection-age-seconds", type=float, default=0.0,
                        help="close client connections after this long (gracefully), so clients balancing over "
                             "replicas re-resolve their addresses and find new ones (default: 0 = never)")
    _add_production_flags(parser)
    args = parser.parse_args(argv)
    _check_production_flags(parser, args)
    if args.max_batch_size is not None and args.max_batch_size < 1:
        parser.error("--max-batch-size must be at least 1")
    if not args.autotune_budget_s > 0:
        parser.error("--autotune-budget-s must be > 0")
    for flag in ("autotune_max_batch_size", "torch_threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_queue < 1:
        parser.error("--max-queue must be at least 1")
    if args.max_delay_ms < 0:
        parser.error("--max-delay-ms must be >= 0")
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        parser.error("--http-port must be from 0 to 65535")
    if args.settle_seconds < 0:
        parser.error("--settle-seconds must be >= 0")
    if args.workers == "auto":
        args.workers = default_workers(_device_type(args.device))
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1 and args.http_port == 0:
        parser.error("--http-port 0 cannot be shared by several --workers: give a port number")
    if args.max_connection_age_seconds < 0:
        parser.error("--max-connection-age-seconds must be >= 0")
    return args


def _workers(text: str) -> int | str:
    return "auto" if text == "auto" else int(text)


def _device_type(device: str) -> str:
    """cuda or cpu, without importing torch (the parent of --workers never loads it)."""
    if device.startswith("cuda") or (device == "auto" and Path("/dev/nvidia0").exists()):
        return "cuda"
    return "cpu"


def _add_production_flags(parser: argparse.ArgumentParser) -> None:
    """Limits, logs, metrics and security (docs/production.md, docs/metrics.md, docs/security.md)."""
    group = parser.add_argument_group("limits, logs, metrics and security")
    # Defaults live in ServerConfig: importing server.daemon here would load torch in the parent of --workers.
    group.add_argument("--max-message-bytes", type=int,
                       help="largest request or response; larger is RESOURCE_EXHAUSTED (default: 64 MiB)")
    group.add_argument("--max-pixels", type=int,
                       help="largest image or tensor, in pixels; more is INVALID_ARGUMENT (default: 100000000)")
    group.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                       help="text, or json: one JSON object per line (default: text)")
    group.add_argument("--metrics-port", type=int,
                       help="serve Prometheus metrics on http://HOST:PORT/metrics (0 = any free port; default: off)")
    group.add_argument("--metrics-host", help="address of the metrics endpoint (default: the same as --host)")
    group.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS instead of plaintext")
    group.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    group.add_argument("--tls-client-ca", type=Path,
                       help="PEM CA certificate(s): require client certificates signed by it (mutual TLS)")
    group.add_argument("--auth-token-file", type=Path,
                       help="require 'authorization: Bearer <token>' with a token from this file, one per line "
                            "(health checks are exempt)")


def _check_production_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_message_bytes is not None and args.max_message_bytes < 1024:
        parser.error("--max-message-bytes must be at least 1024")
    if args.max_pixels is not None and args.max_pixels < 1:
        parser.error("--max-pixels must be at least 1")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error("--metrics-port must be between 0 and 65535")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        from server.cli.check import main as check_main

        return check_main(argv[1:])
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        if args.workers > 1:
            return run_workers(args)
        asyncio.run(serve(args))
    except (FileNotFoundError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0

