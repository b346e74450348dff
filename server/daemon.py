"""Assemble the daemon: model manager, service, gRPC server with health and reflection, optional HTTP server.

``Daemon.start()`` binds the port (0 picks a free one, as tests do) and
returns once every model in the repository has been tried.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.core.config import DEFAULT_BUDGET_S, AutotuneDefaults
from server.core.errors import ModelNotFound
from server.core.types import RequestReport
from server.edges.common.auth import TokenChecker, check_tls_files, read_tokens
from server.edges.grpc import oip as oip_api
from server.edges.grpc.classifier import ClassifierServicer, ErrorInterceptor, HealthReporter
from server.edges.grpc.security import AuthInterceptor, server_credentials
from server.edges.http.classify import HttpContext
from server.edges.http.security import http_ssl_context, token_middleware
from server.edges.http.server import HttpServer, build_app
from server.inference.preprocess import MAX_PIXELS
from server.inference.runtime import InferenceThread, pick_device
from server.models.manager import ManagerSettings, ModelManager
from server.models.source.watcher import RepositoryWatcher
from server.ops.host import apply_torch_threads
from server.ops.logs import log_request
from server.ops.metrics import Metrics
from server.ops.stats import EventLog, StatsCollector
from server.service import ClassifierService

log = logging.getLogger("classifyd")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Everything the daemon is started with (the CLI's flags)."""

    models_dir: Path
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    max_batch_size: int = 32
    max_delay_ms: float = 0.0
    max_queue: int = 1024
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_pixels: int = MAX_PIXELS
    watch: bool = True
    poll: bool = False
    settle_s: float = 1.0
    rescan_s: float = 30.0
    http_port: int | None = None  # None: no HTTP listener; 0: any free port
    reuse_port: bool = False  # SO_REUSEPORT: several processes share the port (--workers)
    max_connection_age_s: float = 0.0  # > 0: clients reconnect, re-resolving DNS, so they find new replicas
    autotune: bool = True
    autotune_budget_s: float = DEFAULT_BUDGET_S
    autotune_max_batch_size: int | None = None
    torch_threads: int | None = None
    trust_code: bool = False
    # production: metrics, TLS / mTLS, bearer tokens (docs/production.md, docs/security.md)
    metrics_port: int | None = None
    metrics_host: str | None = None  # None: the same as host
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None


class Daemon:
    """One running classifyd: create, ``await start()``, ``await stop(grace)``."""

    def __init__(self, config: ServerConfig) -> None:
        if not config.models_dir.is_dir():
            raise FileNotFoundError(f"models directory {config.models_dir} does not exist")
        check_tls_files(config.tls_cert, config.tls_key, config.tls_client_ca)
        self.config = config
        apply_torch_threads(config.torch_threads)
        self.inference = InferenceThread()
        settings = ManagerSettings(
            models_dir=config.models_dir,
            device=pick_device(config.device),
            default_max_batch_size=config.max_batch_size,
            default_max_delay_ms=config.max_delay_ms,
            default_max_queue=config.max_queue,
            autotune=AutotuneDefaults(config.autotune, config.autotune_budget_s, config.autotune_max_batch_size),
            trust_code=config.trust_code,
        )
        self.manager = ModelManager(settings, self.inference)
        self.stats = StatsCollector()
        self.events = EventLog()
        self.manager.add_listener(self.events.record)
        self.service = ClassifierService(self.manager, self.inference, max_pixels=config.max_pixels,
                                         observer=self.stats.observe)
        self.health = health.aio.HealthServicer()
        self.health_reporter = HealthReporter(self.health, self.manager)
        self.manager.add_listener(self.health_reporter.model_changed)
        self.metrics = Metrics(self._model_lookup, self.service.queue_depths)
        self.manager.add_listener(self.metrics.model_event)
        self.service.add_batch_listener(self.metrics.batch_done)
        self._tokens = read_tokens(config.auth_token_file) if config.auth_token_file else []
        self.server = self._build_server()
        self.watcher: RepositoryWatcher | None = None
        self.port = 0
        self.http_port = 0
        self.http = self._build_http() if config.http_port is not None else None
        self._started = time.time()
        self.ready = False  # accepting requests: between start() and stop()
        self.metrics_port: int | None = None

    def _build_http(self) -> HttpServer:
        context = HttpContext(self.service, self.manager, self.config.max_message_bytes, self.stats, self.events,
                              self.server_info)
        auth = [token_middleware(TokenChecker(self._tokens))] if self._tokens else []
        tls = (http_ssl_context(self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca)
               if self.config.tls_cert and self.config.tls_key else None)
        return HttpServer(build_app(context, auth), reuse_port=self.config.reuse_port, ssl_context=tls)

    def _model_lookup(self, name: str) -> tuple[str, frozenset[int]] | None:
        try:
            record = self.manager.get(name)
        except ModelNotFound:
            return None
        return record.name, frozenset(record.versions)

    def _request_done(self, report: RequestReport) -> None:
        log_request(report)
        self.metrics.request_done(report)

    def _build_server(self) -> grpc.aio.Server:
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            ("grpc.so_reuseport", int(self.config.reuse_port)),
        ]
        if self.config.max_connection_age_s > 0:
            options.append(("grpc.max_connection_age_ms", round(self.config.max_connection_age_s * 1000)))
        auth = [AuthInterceptor(self._tokens)] if self._tokens else []
        server = grpc.aio.server(interceptors=[*auth, ErrorInterceptor()], options=options)
        servicer = ClassifierServicer(self.service, self.manager, self._request_done)
        pb_grpc.add_ClassifierServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        oip_name = oip_api.add_to_server(oip_api.OipServicer(self.service, self.manager, lambda: self.ready), server)
        names = (pb.DESCRIPTOR.services_by_name["Classifier"].full_name, oip_name, health.SERVICE_NAME,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        return server

    async def start(self) -> int:
        """Load the repository, bind and start serving. Returns the bound port. Raises OSError if it cannot bind."""
        await self.manager.load_repository()
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.config.tls_cert and self.config.tls_key:
                credentials = server_credentials(self.config.tls_cert, self.config.tls_key,
                                                 self.config.tls_client_ca)
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpcio reports a port in use this way
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        if self.config.metrics_port is not None:
            host = self.config.metrics_host or self.config.host
            self.metrics_port = self.metrics.serve(host, self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)
        await self.server.start()
        if self.http:
            try:
                self.http_port = await self.http.start(self.config.host, self.config.http_port or 0)
            except OSError:
                await self.server.stop(0)
                raise
        if self.config.watch:
            self.watcher = RepositoryWatcher(self.manager, self.config.models_dir, settle_s=self.config.settle_s,
                                             poll=self.config.poll, rescan_s=self.config.rescan_s)
            await self.watcher.start()
        await self.health_reporter.set_overall(True)
        self.ready = True
        for record in self.manager.models():
            await self.health_reporter.update(record.name)
        http = f", HTTP on http://{self.config.host}:{self.http_port}/" if self.http else ""
        log.info("classifyd serving on %s:%d%s (device %s); models: %s", self.config.host, self.port, http,
                 self.manager.settings.device, self.describe_models())
        return self.port

    def server_info(self) -> dict[str, object]:
        """What the status page and the OIP server metadata say about this daemon."""
        return {"version": _package_version(), "device": str(self.manager.settings.device), "host": self.config.host,
                "grpc_port": self.port, "http_port": self.http_port, "default_model": self.manager.default_model,
                "started_unix_ms": round(self._started * 1000), "uptime_s": round(time.time() - self._started, 1)}

    def describe_models(self) -> str:
        """One line: each model with its serving version, or why it does not serve."""
        parts = []
        for record in self.manager.models():
            serving = record.serving()
            mark = "*" if record.name == self.manager.default_model else ""
            state = f"v{serving.version}" if serving else "not serving"
            parts.append(f"{record.name}{mark} {state}")
        return ", ".join(parts) or "none"

    async def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new requests, report NOT_SERVING, finish accepted ones within ``grace`` seconds, release all."""
        self.ready = False
        self.service.stop_accepting()
        await self.health_reporter.set_overall(False)
        if self.watcher:
            await self.watcher.aclose()
        await asyncio.gather(self.server.stop(grace), *([self.http.stop(grace or 0.0)] if self.http else []))
        await self.service.aclose(drain=False)
        await self.manager.aclose()
        self.inference.shutdown()
        await asyncio.to_thread(self.metrics.close)

    async def wait(self) -> None:
        """Block until the server stops."""
        await self.server.wait_for_termination()


def _package_version() -> str:
    try:
        return importlib.metadata.version("classifyd")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was not pip-installed
        return "unknown"
