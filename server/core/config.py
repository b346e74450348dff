"""The daemon's settings: one frozen dataclass per concern, and every default written once, here.

The CLI's flags, ``python -m server check``, the model manager, the
preprocessing limits and the tests all read the constants below; nothing else
spells out 32, 1024 or 64 MiB. Standard library only, so the CLI (and the
parent process of ``--workers``) reads them without loading torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# listen
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
# batching, for models whose manifest leaves it out
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_DELAY_MS = 0.0
DEFAULT_MAX_QUEUE = 1024
DEFAULT_BUDGET_S = 3.0
CPU_CEILING = 64
GPU_CEILING = 256
# models
DEFAULT_MODELS_DIR = Path("models")
# ONNX exports (runtime = "onnxruntime"): outside the watched repository, so writing them triggers no reload
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "classifyd"
DEFAULT_DEVICE = "auto"
# what runs a version whose manifest sets no runtime: "auto" = PyTorch first, ONNX Runtime once verified and measured
# faster (on CUDA auto is torch); "torch" or "onnxruntime" as in a manifest
DEFAULT_RUNTIME = "auto"
DEFAULT_SETTLE_S = 1.0
DEFAULT_RESCAN_S = 30.0
MODEL_CONTROL_MODES = ("poll", "explicit", "none")  # Triton's names (docs/operations.md, model control)
DEFAULT_MODEL_CONTROL = "poll"  # the watched directory decides what is loaded
DEFAULT_RELOAD_MIN_INTERVAL_S = 5.0  # ReloadModel: one reload per model per this long (each warms up and autotunes)
# limits
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 100_000_000
MAX_IMAGES_PER_REQUEST = 256  # images (tiles included) one request may hold, each a queue place
MAX_JSON_BYTES = 16 * 1024 * 1024  # JSON bodies: parsing costs far more per byte than images do
MAX_STREAM_IN_FLIGHT = 256  # requests of one stream being answered or waiting to be read by the client
MIN_DECODE_BYTES = 1 << 20  # the smallest --max-decode-bytes (its default is the host rule, server/ops/host.py)
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024  # response cache per process, for models with [cache] enabled; 0 = off
# observability and the process
DEFAULT_LOG_LEVEL = "INFO"
DEFAULT_LOG_FORMAT = "text"
DEFAULT_GRACE_S = 10.0
DEFAULT_PREPROCESS_NICE = 0
"""How much lower the CPU priority of the threads that prepare inputs for a PyTorch forward pass on the CPU is (a
nice increment; 0: the same). Off by default: docs/batching.md#the-forward-pass-goes-first says why."""
DEFAULT_DRAIN_S = 0.0  # on SIGTERM, NOT_SERVING but still serving this long (load balancers move away meanwhile)


@dataclass(frozen=True)
class ListenConfig:
    """Where and how the daemon listens (gRPC, and HTTP on the same host)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0: any free port
    http_port: int | None = None  # None: no HTTP listener; 0: any free port
    reuse_port: bool = False  # SO_REUSEPORT: several processes share the port (--workers)
    max_connection_age_s: float = 0.0  # > 0: clients reconnect, re-resolving DNS, so they find new replicas


@dataclass(frozen=True)
class AutotuneDefaults:
    """The server's autotune settings, for manifests that leave them out."""

    enabled: bool = True
    budget_s: float = DEFAULT_BUDGET_S
    max_batch_size: int | None = None
    """Largest size of the ladder; None: 256 on a GPU, 64 on a CPU."""


@dataclass(frozen=True)
class BatchingDefaults:
    """Batching for models whose manifest sets none."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS
    max_queue: int = DEFAULT_MAX_QUEUE
    autotune: AutotuneDefaults = field(default_factory=AutotuneDefaults)


@dataclass(frozen=True)
class ModelsConfig:
    """The model repository, how it is watched, and where and how its models run."""

    models_dir: Path = DEFAULT_MODELS_DIR
    device: str = DEFAULT_DEVICE  # auto, cpu, cuda or cuda:N
    watch: bool = True
    poll: bool = False  # watch by polling instead of inotify
    settle_s: float = DEFAULT_SETTLE_S
    rescan_s: float = DEFAULT_RESCAN_S
    trust_code: bool = False  # allow python: architectures, which execute files of the repository
    torch_threads: int | None = None  # None: the host rule (server/ops/host.py), usable cores // workers
    reload_min_interval_s: float = DEFAULT_RELOAD_MIN_INTERVAL_S  # ReloadModel per model; sooner: RESOURCE_EXHAUSTED
    cache_dir: Path = DEFAULT_CACHE_DIR  # ONNX exports of runtime = "onnxruntime" versions
    default_runtime: str = DEFAULT_RUNTIME  # for manifests that set no runtime: auto, torch or onnxruntime
    model_control: str = DEFAULT_MODEL_CONTROL  # poll, explicit (load on request) or none (load at start, never again)
    max_loaded_bytes: int | None = None  # memory budget of loaded versions (server/models/memory_budget.py); None: none
    lazy_load: bool = False  # a request for a catalogued model that is not loaded loads it (a cold start)


@dataclass(frozen=True)
class LimitsConfig:
    """The largest request the daemon accepts."""

    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_pixels: int = MAX_PIXELS
    max_images_per_request: int = MAX_IMAGES_PER_REQUEST
    max_json_bytes: int = MAX_JSON_BYTES
    max_stream_in_flight: int = MAX_STREAM_IN_FLIGHT
    max_decode_bytes: int | None = None  # None: the host rule (server/ops/host.py), a quarter of memory // workers
    cache_bytes: int = DEFAULT_CACHE_BYTES  # the response cache's budget (models with [cache] enabled); 0: off


@dataclass(frozen=True)
class SecurityConfig:
    """TLS / mutual TLS and bearer tokens (docs/security.md); all None: plaintext, no tokens."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None
    admin_token_file: Path | None = None  # model-control calls (ReloadModel) need one of these tokens
    allow_remote_admin: bool = False  # without admin tokens, model-control calls from any peer, not only loopback


@dataclass(frozen=True)
class ObservabilityConfig:
    """Metrics endpoint and logs (docs/production.md, docs/metrics.md)."""

    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    metrics_host: str | None = None  # None: the listen host
    metrics_port_file: Path | None = None  # once serving, the metrics endpoint's bound port is written here
    log_level: str = DEFAULT_LOG_LEVEL
    log_format: str = DEFAULT_LOG_FORMAT  # text or json
    otlp_endpoint: str | None = None  # traces to this OTLP collector; None: as the OTEL_* variables say (off)


@dataclass(frozen=True)
class ProcessConfig:
    """How the server process runs around the daemon: worker processes, graceful stop, port file."""

    workers: int = 1
    drain_s: float = DEFAULT_DRAIN_S  # on SIGTERM/SIGINT, NOT_SERVING but still accepting for this long
    grace_s: float = DEFAULT_GRACE_S  # then, time in-flight requests get to finish
    port_file: Path | None = None  # once serving, the bound port is written here
    status_file: Path | None = None  # --workers: this worker shares its status page document here (set per worker)
    preprocess_threads: int | None = None  # None: the host rule (server/ops/host.py), usable cores // workers, >= 2
    preprocess_nice: int = DEFAULT_PREPROCESS_NICE  # the preprocessing threads' nice increment (0: none)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the daemon is started with: the CLI's flags, one section per concern."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    batching: BatchingDefaults = field(default_factory=BatchingDefaults)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
