"""``python -m server``: run the classifyd daemon; ``python -m server check <model dir>``: check a model offline;
``python -m server publish <model dir> <weights>``: add its next version atomically (server/cli/publish.py).

The flags come in groups that match the sections of :class:`~server.core.config.ServerConfig`; their
defaults are the constants of :mod:`server.core.config`, and :func:`config_from_args` turns the parsed
flags into a ``ServerConfig``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from server.cli.serve import serve
from server.cli.workers import run_workers
from server.core.config import (
    CPU_CEILING,
    DEFAULT_BUDGET_S,
    DEFAULT_CACHE_BYTES,
    DEFAULT_CACHE_DIR,
    DEFAULT_DEVICE,
    DEFAULT_DRAIN_S,
    DEFAULT_GRACE_S,
    DEFAULT_HOST,
    DEFAULT_LOG_FORMAT,
    DEFAULT_LOG_LEVEL,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_DELAY_MS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MODEL_CONTROL,
    DEFAULT_MODELS_DIR,
    DEFAULT_PORT,
    DEFAULT_PREPROCESS_NICE,
    DEFAULT_RELOAD_MIN_INTERVAL_S,
    DEFAULT_RUNTIME,
    DEFAULT_SETTLE_S,
    GPU_CEILING,
    MAX_IMAGES_PER_REQUEST,
    MAX_JSON_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_PIXELS,
    MAX_STREAM_IN_FLIGHT,
    MIN_DECODE_BYTES,
    MODEL_CONTROL_MODES,
    AutotuneDefaults,
    BatchingDefaults,
    LimitsConfig,
    ListenConfig,
    ModelsConfig,
    ObservabilityConfig,
    ProcessConfig,
    SecurityConfig,
    ServerConfig,
)
from server.core.manifest import RUNTIMES
from server.ops.host import default_workers, keep_freed_memory
from server.ops.logs import LOG_FORMATS, configure_logging

log = logging.getLogger("classifyd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The daemon's flags, checked; ``--workers auto`` resolved. Exits 2 (argparse's usage error) on a bad one."""
    parser = argparse.ArgumentParser(prog="python -m server", description="Serve image classifiers over gRPC.")
    for add_group, _ in _GROUPS:
        add_group(parser)
    args = parser.parse_args(argv)
    for _, check_group in _GROUPS:
        check_group(parser, args)
    return args


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` the parsed flags describe."""
    tuned = args.autotune and args.max_batch_size is None  # an explicit --max-batch-size turns autotune off
    return ServerConfig(
        listen=ListenConfig(host=args.host, port=args.port, http_port=args.http_port, reuse_port=args.reuse_port,
                            max_connection_age_s=args.max_connection_age_seconds),
        batching=BatchingDefaults(
            max_batch_size=args.max_batch_size or DEFAULT_MAX_BATCH_SIZE, max_delay_ms=args.max_delay_ms,
            max_queue=args.max_queue,
            autotune=AutotuneDefaults(tuned, args.autotune_budget_s, args.autotune_max_batch_size)),
        models=ModelsConfig(models_dir=args.models_dir, device=args.device, watch=args.watch, poll=args.poll,
                            settle_s=args.settle_seconds, trust_code=args.trust_code, torch_threads=args.torch_threads,
                            reload_min_interval_s=args.reload_min_interval_seconds, cache_dir=args.cache_dir,
                            default_runtime=args.default_runtime,
                            model_control=args.model_control, max_loaded_bytes=args.max_loaded_bytes,
                            lazy_load=args.lazy_load),
        limits=LimitsConfig(max_message_bytes=args.max_message_bytes, max_pixels=args.max_pixels,
                            max_images_per_request=args.max_images_per_request,
                            max_json_bytes=args.max_json_bytes, max_stream_in_flight=args.max_stream_in_flight,
                            max_decode_bytes=args.max_decode_bytes, cache_bytes=args.cache_bytes),
        security=SecurityConfig(tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                                auth_token_file=args.auth_token_file, admin_token_file=args.admin_token_file,
                                allow_remote_admin=args.allow_remote_admin),
        observability=ObservabilityConfig(metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                                          metrics_port_file=args.metrics_port_file,
                                          log_level=args.log_level, log_format=args.log_format,
                                          otlp_endpoint=args.otlp_endpoint),
        process=ProcessConfig(workers=args.workers, drain_s=args.drain_seconds, grace_s=args.grace_seconds,
                              port_file=args.port_file, preprocess_nice=args.preprocess_nice),
    )


# ----- listen (ListenConfig)


def _add_listen(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("listen")
    group.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    group.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"port (0 = any free port; default: {DEFAULT_PORT})")
    group.add_argument("--http-port", type=int, default=None,
                       help="also serve HTTP (curl-friendly /v1, Open Inference Protocol /v2, status page /) on "
                            "this port, same host (0 = any free port; default: no HTTP)")
    group.add_argument("--reuse-port", action="store_true",
                       help="listen with SO_REUSEPORT so other processes may serve the same port (implied by "
                            "--workers)")
    group.add_argument("--max-connection-age-seconds", type=float, default=0.0,
                       help="close client connections after this long (gracefully), so clients balancing over "
                            "replicas re-resolve their addresses and find new ones (default: 0 = never)")


def _check_listen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        parser.error("--http-port must be from 0 to 65535")
    if args.max_connection_age_seconds < 0:
        parser.error("--max-connection-age-seconds must be >= 0")


# ----- models (ModelsConfig)


def _add_models(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                       help=f"model repository (default: {DEFAULT_MODELS_DIR})")
    group.add_argument("--device", default=DEFAULT_DEVICE,
                       help=f"auto (the GPU with the most free memory, else the CPU), cpu, cuda or cuda:N; a "
                            f"model's manifest device overrides it (default: {DEFAULT_DEVICE})")
    group.add_argument("--no-watch", dest="watch", action="store_false",
                       help="load the repository once at startup; do not watch it for changes")
    group.add_argument("--poll", action="store_true",
                       help="watch by polling instead of inotify (for NFS and other network filesystems)")
    group.add_argument("--model-control", choices=MODEL_CONTROL_MODES, default=DEFAULT_MODEL_CONTROL,
                       help="poll: the watched directory decides what is loaded; explicit: the directory is the "
                            "catalogue and models load only when asked (RepositoryModelLoad, LoadModel), loaded "
                            "ones still hot-swap new versions; none: load at start-up, never reload "
                            f"(default: {DEFAULT_MODEL_CONTROL})"),
    group.add_argument("--settle-seconds", type=float, default=DEFAULT_SETTLE_S,
                       help=f"a version's files must be unchanged this long before it is loaded "
                            f"(default: {DEFAULT_SETTLE_S:g})")
    group.add_argument("--trust-code", action="store_true",
                       help="allow architecture = \"python:<file>:<name>\", which runs Python files of the model "
                            "repository (default: such versions are FAILED)")
    group.add_argument("--torch-threads", type=int, default=None,
                       help="torch intra-op threads (default: usable cores // worker processes)")
    group.add_argument("--reload-min-interval-seconds", type=float, default=DEFAULT_RELOAD_MIN_INTERVAL_S,
                       help=f"ReloadModel reloads a model at most once per this long (each reload warms up and "
                            f"autotunes on the inference thread); sooner is RESOURCE_EXHAUSTED "
                            f"(default: {DEFAULT_RELOAD_MIN_INTERVAL_S:g})")
    group.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                       help=f"where ONNX exports of runtime = \"onnxruntime\" versions are kept; keep it outside "
                            f"--models-dir (default: {DEFAULT_CACHE_DIR})")
    group.add_argument("--default-runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                       help=f"what runs versions whose manifest sets no runtime: auto (PyTorch first, then ONNX "
                            f"Runtime once it is verified and measured faster; torch on CUDA), torch or onnxruntime "
                            f"(default: {DEFAULT_RUNTIME})")
    group.add_argument("--max-loaded-bytes", type=int, default=None,
                       help="memory budget of this process's loaded versions (host memory on CPU, device memory on "
                            "GPU, measured per version after warm-up): a load that would exceed it first unloads "
                            "the least recently used idle model (default: no budget)")
    group.add_argument("--lazy-load", action="store_true",
                       help="a request for a model of the catalogue that is not loaded (never asked for, or "
                            "evicted by --max-loaded-bytes) loads it within its deadline: a cold start")


def _check_models(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.settle_seconds < 0:
        parser.error("--settle-seconds must be >= 0")
    if args.reload_min_interval_seconds < 0:
        parser.error("--reload-min-interval-seconds must be >= 0")
    if args.torch_threads is not None and args.torch_threads < 1:
        parser.error("--torch-threads must be at least 1")
    if args.max_loaded_bytes is not None and args.max_loaded_bytes < 1:
        parser.error("--max-loaded-bytes must be at least 1")
    if args.max_loaded_bytes is not None and not args.lazy_load and args.model_control != "explicit":
        parser.error(f"--max-loaded-bytes with --model-control {args.model_control} needs --lazy-load: a model it "
                     "evicts comes back only when a request loads it (LoadModel is for --model-control explicit)")


# ----- batching (BatchingDefaults, AutotuneDefaults)


def _add_batching(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("batching defaults (docs/batching.md)")
    group.add_argument("--max-batch-size", type=int, default=None,
                       help=f"batch cap for models whose manifest sets none; giving it turns their autotune off "
                            f"(default: autotuned, {DEFAULT_MAX_BATCH_SIZE} when autotune is off)")
    group.add_argument("--no-autotune", dest="autotune", action="store_false",
                       help="do not measure batch sizes at load time; models whose manifest sets no "
                            "max_batch_size get --max-batch-size (see docs/batching.md)")
    group.add_argument("--autotune-budget-s", type=float, default=DEFAULT_BUDGET_S,
                       help=f"time each version may spend measuring batch sizes (default: {DEFAULT_BUDGET_S:g})")
    group.add_argument("--autotune-max-batch-size", type=int, default=None,
                       help=f"largest batch size autotune tries (default: {GPU_CEILING} on a GPU, {CPU_CEILING} "
                            f"on a CPU)")
    group.add_argument("--max-delay-ms", type=float, default=DEFAULT_MAX_DELAY_MS,
                       help=f"how long a partial batch may wait, for models whose manifest sets none "
                            f"(default: {DEFAULT_MAX_DELAY_MS:g})")
    group.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                       help=f"requests that may wait per model before RESOURCE_EXHAUSTED, for models whose "
                            f"manifest sets none (default: {DEFAULT_MAX_QUEUE})")


def _check_batching(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_batch_size is not None and args.max_batch_size < 1:
        parser.error("--max-batch-size must be at least 1")
    if not args.autotune_budget_s > 0:
        parser.error("--autotune-budget-s must be > 0")
    if args.autotune_max_batch_size is not None and args.autotune_max_batch_size < 1:
        parser.error("--autotune-max-batch-size must be at least 1")
    if args.max_queue < 1:
        parser.error("--max-queue must be at least 1")
    if args.max_delay_ms < 0:
        parser.error("--max-delay-ms must be >= 0")


# ----- limits (LimitsConfig)


def _add_limits(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits (docs/production.md)")
    group.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES,
                       help=f"largest request or response; larger is RESOURCE_EXHAUSTED "
                            f"(default: {MAX_MESSAGE_BYTES // 2**20} MiB)")
    group.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                       help=f"largest image or tensor, in pixels; more is INVALID_ARGUMENT (default: {MAX_PIXELS})")
    group.add_argument("--max-images-per-request", type=int, default=MAX_IMAGES_PER_REQUEST,
                       help=f"images (tiles of pixel tensors included) one request may hold; more is "
                            f"INVALID_ARGUMENT (default: {MAX_IMAGES_PER_REQUEST})")
    group.add_argument("--max-json-bytes", type=int, default=MAX_JSON_BYTES,
                       help=f"largest JSON body over HTTP (or JSON header of an OIP binary request); larger is 413 "
                            f"(default: {MAX_JSON_BYTES // 2**20} MiB)")
    group.add_argument("--max-stream-in-flight", type=int, default=MAX_STREAM_IN_FLIGHT,
                       help=f"requests of one ClassifyStream / ModelStreamInfer being answered or waiting for the "
                            f"client to read; the stream is not read further until one is (default: "
                            f"{MAX_STREAM_IN_FLIGHT})")
    group.add_argument("--max-decode-bytes", type=int, default=None,
                       help="memory this process's images and tensors may take while they are decoded at once, in "
                            "bytes; a request that does not fit waits within its deadline, then RESOURCE_EXHAUSTED "
                            "(default: a quarter of the machine's memory, or of its cgroup limit, // --workers)")
    group.add_argument("--cache-bytes", type=int, default=DEFAULT_CACHE_BYTES,
                       help=f"memory of the response cache of this process, for models whose manifest sets [cache] "
                            f"enabled = true; least recently used answers go first (0 = off; default: "
                            f"{DEFAULT_CACHE_BYTES // 2**20} MiB)")


def _check_limits(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_message_bytes < 1024:
        parser.error("--max-message-bytes must be at least 1024")
    if args.max_pixels < 1:
        parser.error("--max-pixels must be at least 1")
    for flag in ("max_images_per_request", "max_stream_in_flight"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_json_bytes < 1024:
        parser.error("--max-json-bytes must be at least 1024")
    if args.max_decode_bytes is not None and args.max_decode_bytes < MIN_DECODE_BYTES:
        parser.error(f"--max-decode-bytes must be at least {MIN_DECODE_BYTES} (1 MiB)")
    if args.cache_bytes < 0:
        parser.error("--cache-bytes must be >= 0 (0 turns the response cache off)")


# ----- security (SecurityConfig)


def _add_security(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security (docs/security.md)")
    group.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS instead of plaintext")
    group.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    group.add_argument("--tls-client-ca", type=Path,
                       help="PEM CA certificate(s): require client certificates signed by it (mutual TLS)")
    group.add_argument("--auth-token-file", type=Path,
                       help="require 'authorization: Bearer <token>' with a token from this file, one per line "
                            "(health checks are exempt)")
    group.add_argument("--admin-token-file", type=Path,
                       help="model-control calls (ReloadModel) require a token from this file, one per line; "
                            "tokens of --auth-token-file do not suffice (default: model control from loopback only)")
    group.add_argument("--allow-remote-admin", action="store_true",
                       help="without --admin-token-file, accept model-control calls from any address, not only "
                            "from loopback (every client may then reload models)")


def _check_security(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")


# ----- logs and metrics (ObservabilityConfig)


def _add_observability(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logs, metrics and traces (docs/metrics.md, docs/operations.md)")
    group.add_argument("--log-level", default=DEFAULT_LOG_LEVEL,
                       help=f"DEBUG, INFO, WARNING or ERROR (default: {DEFAULT_LOG_LEVEL})")
    group.add_argument("--log-format", choices=LOG_FORMATS, default=DEFAULT_LOG_FORMAT,
                       help=f"text, or json: one JSON object per line (default: {DEFAULT_LOG_FORMAT})")
    group.add_argument("--metrics-port", type=int,
                       help="serve Prometheus metrics on http://HOST:PORT/metrics (0 = any free port; default: off)")
    group.add_argument("--metrics-host", help="address of the metrics endpoint (default: the same as --host)")
    group.add_argument("--otlp-endpoint",
                       help="send OpenTelemetry traces to this OTLP/gRPC collector, e.g. http://127.0.0.1:4317 "
                            "(default: as the standard OTEL_* variables say; off without them; docs/operations.md)")
    group.add_argument("--metrics-port-file", type=Path,
                       help="once the metrics endpoint serves, write its port to this file (with --metrics-port 0)")


def _check_observability(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error("--metrics-port must be between 0 and 65535")


# ----- processes (ProcessConfig)


def _add_process(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("processes (docs/scaling.md)")
    group.add_argument("--workers", type=_workers, default=1,
                       help="server processes sharing the port, each with its own batchers and models; 'auto' = "
                            "the host rule of docs/batching.md (one per core on a CPU, cores // 4 on a GPU) "
                            "(default: 1)")
    group.add_argument("--drain-seconds", type=float, default=DEFAULT_DRAIN_S,
                       help=f"on SIGTERM/SIGINT, report NOT_SERVING at once but keep serving this long, while load "
                            f"balancers take the replica out (default: {DEFAULT_DRAIN_S:g}; docs/production.md)")
    group.add_argument("--grace-seconds", type=float, default=DEFAULT_GRACE_S,
                       help=f"then stop accepting (new calls: UNAVAILABLE) and give in-flight requests this long "
                            f"to finish; queued ones that would not are UNAVAILABLE early (default: "
                            f"{DEFAULT_GRACE_S:g})")
    group.add_argument("--preprocess-nice", type=int, default=DEFAULT_PREPROCESS_NICE, metavar="N",
                       help="prepare the inputs of PyTorch forward passes on the CPU on threads N nice levels lower "
                            "(0-19), so that on contended cores the forward pass runs first (default: "
                            f"{DEFAULT_PREPROCESS_NICE}: off; docs/batching.md#the-forward-pass-goes-first)")
    group.add_argument("--port-file", type=Path,
                       help="write the bound port (useful with --port 0) to this file once the initial load is done "
                            "(every model tried); the ports answer earlier, with health NOT_SERVING")


def _check_process(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.workers == "auto":
        args.workers = default_workers(_device_type(args.device))
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 0 <= args.preprocess_nice <= 19:
        parser.error(f"--preprocess-nice must be 0-19 (nice levels), got {args.preprocess_nice}")
    for flag in ("drain_seconds", "grace_seconds"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0")
    if args.workers > 1 and args.http_port == 0:
        parser.error("--http-port 0 cannot be shared by several --workers: give a port number")
    if args.workers > 1 and args.model_control == "explicit":
        parser.error("--model-control explicit needs one worker process (--workers 1): each worker keeps its own "
                     "set of loaded models, and a load or unload call reaches only one of them")


def _workers(text: str) -> int | str:
    return "auto" if text == "auto" else int(text)


def _device_type(device: str) -> str:
    """cuda or cpu, without importing torch (the parent of --workers never loads it)."""
    if device.startswith("cuda") or (device == "auto" and Path("/dev/nvidia0").exists()):
        return "cuda"
    return "cpu"


_GROUPS = (
    (_add_listen, _check_listen),
    (_add_models, _check_models),
    (_add_batching, _check_batching),
    (_add_limits, _check_limits),
    (_add_security, _check_security),
    (_add_observability, _check_observability),
    (_add_process, _check_process),
)
"""Each flag group, in ``--help`` order, with the checks of its values."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    allocator = keep_freed_memory()  # first: before anything allocates what a forward pass will reuse
    if argv[:1] == ["check"]:
        from server.cli.check import main as check_main  # here: check loads torch, the --workers parent must not

        return check_main(argv[1:])
    if argv[:1] == ["publish"]:
        from server.cli.publish import main as publish_main  # loads torch too (it checks what it publishes)

        return publish_main(argv[1:])
    config = config_from_args(parse_args(argv))
    configure_logging(config.observability.log_level, config.observability.log_format)
    log.info("%s", allocator)
    try:
        if config.process.workers > 1:
            return run_workers(config)
        asyncio.run(serve(config))
    except (FileNotFoundError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0
