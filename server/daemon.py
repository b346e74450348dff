"""Assemble the daemon: model manager, service, gRPC server with health and reflection, optional HTTP server.

``Daemon.start()`` binds the ports first (0 picks a free one, as tests do; health says NOT_SERVING, a model
still loading answers UNAVAILABLE "is loading"), then loads the repository, models concurrently, and returns
once every model has been tried (:meth:`Daemon.listen` and :meth:`Daemon.load` are its two halves); ``Daemon.stop()``
is the graceful stop of docs/production.md (drain, stop accepting, finish
in-flight calls within the grace period, release).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.core.config import ServerConfig
from server.core.errors import ModelNotFound
from server.core.types import RequestReport
from server.edges.common.auth import AdminRule, TokenChecker, check_tls_files, read_tokens
from server.edges.common.oip_repository import OipRepository
from server.edges.grpc import oip as oip_api
from server.edges.grpc.calls import CallInterceptor
from server.edges.grpc.classifier import ClassifierServicer, HealthReporter
from server.edges.grpc.drain import WATCH_METHODS, DrainGate
from server.edges.grpc.registration import GenericOnly
from server.edges.grpc.security import AdminCheck, TokenCheck, server_credentials
from server.edges.http.classify import HttpContext
from server.edges.http.security import http_ssl_context, token_middleware
from server.edges.http.server import HttpServer, build_app
from server.edges.http.status_page import status_document
from server.edges.http.worker_status import StatusShare
from server.inference.cap_tuning import figures
from server.inference.devices import InferenceThreads
from server.inference.placement import pick_device
from server.inference.threads import without_team
from server.models.control import ModelControl
from server.models.manager import ManagerSettings, ModelManager
from server.models.memory_budget import MemoryBudget
from server.models.source.watcher import RepositoryWatcher
from server.ops.cache_metrics import CacheCollector
from server.ops.host import apply_torch_threads, package_version
from server.ops.inference_stats import InferenceStats
from server.ops.logs import log_request
from server.ops.memory_metrics import MemoryCollector
from server.ops.metrics import Metrics
from server.ops.stats import EventLog, StatsCollector
from server.ops.tuning_metrics import TuningCollector, TuningFigures
from server.service import ClassifierService

log = logging.getLogger("classifyd")
LANDING_S = 0.05
"""When the daemon stops accepting: time for calls already on the wire to reach the drain gate before the listener
closes (grpc would cancel those that arrive after)."""
GOAWAY_S = 0.1
"""Then: time for grpc to write its GOAWAY before the held answers and refusals, so clients read it first."""
QUEUED_MARGIN_S = 2.0
"""Requests still queued this long before the grace period ends (at most a quarter of it) are answered
UNAVAILABLE, so that their clients have time to retry them elsewhere; batches being computed may finish."""
GRACE_ENDED = "the server is shutting down: the request did not finish within the grace period; retry it"
WATCH_ENDED = "the server is shutting down: watch again on another replica"


class Daemon:
    """One running classifyd: create, ``await start()``, ``await stop(grace)``."""

    def __init__(self, config: ServerConfig) -> None:
        """Build every part; nothing listens yet. Raises FileNotFoundError for a missing models directory,
        ValueError for a missing or bad TLS or token file (SecurityConfigError) or a device that is not there."""
        models_dir, security = config.models.models_dir, config.security
        if not models_dir.is_dir():
            raise FileNotFoundError(f"models directory {models_dir} does not exist")
        check_tls_files(security.tls_cert, security.tls_key, security.tls_client_ca)
        self.config = config
        apply_torch_threads(config.models.torch_threads)
        self.inference = InferenceThreads()  # one thread per device, made on first use
        without_team()  # this thread's torch work stays off OpenMP: only inference threads get teams
        self.manager = ModelManager(manager_settings(config), self.inference)
        self.stats = StatsCollector()
        self.events = EventLog()
        self.manager.add_listener(self.events.record)
        self.service = ClassifierService(self.manager, self.inference, max_pixels=config.limits.max_pixels,
                                         preprocess_workers=config.process.preprocess_threads,
                                         max_decode_bytes=config.limits.max_decode_bytes,
                                         observer=self.stats.observe, cache_bytes=config.limits.cache_bytes,
                                         preprocess_nice=config.process.preprocess_nice)
        self.health = health.aio.HealthServicer()
        self.health_reporter = HealthReporter(self.health, self.manager)
        self.manager.add_listener(self.health_reporter.model_changed)
        self.metrics = Metrics(self._model_lookup, self.service.queue_depths)
        self.metrics.registry.register(CacheCollector(self.service.cache.stats))
        self.metrics.registry.register(TuningCollector(self._batch_tuning))
        self.manager.add_listener(self.metrics.model_event)
        self.service.add_batch_listener(self.metrics.batch_done)
        self.control = ModelControl(self.manager, config.models.model_control)
        self.service.budget = self.budget = MemoryBudget(self.manager, self.control, config.models.max_loaded_bytes,
                                                         lazy=config.models.lazy_load)
        self.metrics.registry.register(MemoryCollector(self.budget.figures))
        self.inference_stats = InferenceStats()  # Triton's ModelStatistics
        self.service.add_batch_listener(self.inference_stats.batch_done)
        self.repository = OipRepository(self.manager, self.control, self.inference_stats)
        self._tokens = read_tokens(security.auth_token_file) if security.auth_token_file else []
        self._admin_tokens = read_tokens(security.admin_token_file) if security.admin_token_file else []
        self.gate = DrainGate()
        self._queues_closed: asyncio.Future[None] | None = None  # the end of a graceful stop: queues answered
        self.server = self._build_server()
        self.watcher: RepositoryWatcher | None = None
        self.port = 0
        self.http_port = 0
        self.http = self._build_http() if config.listen.http_port is not None else None
        self._started = time.time()
        self.ready = False  # accepting requests: between start() and stop()
        self.metrics_port: int | None = None

    def _build_http(self) -> HttpServer:
        limits = self.config.limits
        context = HttpContext(self.service, self.manager, limits.max_message_bytes, self.stats,
                              self.events, self.server_info, on_request=self._request_done,
                              max_json_bytes=limits.max_json_bytes, max_images=limits.max_images_per_request)
        if self.config.process.status_file is not None:  # a --workers worker: one page for all workers
            context.status_share = StatusShare(self.config.process.status_file, lambda: status_document(context))
        auth = [token_middleware(TokenChecker(self._tokens + self._admin_tokens))] if self._tokens else []
        security = self.config.security
        tls = (http_ssl_context(security.tls_cert, security.tls_key, security.tls_client_ca)
               if security.tls_cert and security.tls_key else None)
        admin = AdminRule(self._admin_tokens, self._tokens, allow_remote=security.allow_remote_admin)
        app = build_app(context, auth, repository=self.repository, admin=admin)
        return HttpServer(app, reuse_port=self.config.listen.reuse_port, ssl_context=tls)

    def _batch_tuning(self) -> dict[str, TuningFigures]:
        """Per model whose serving version tunes its batch cap online: the tuner's figures (exporter thread)."""
        tuned = {}
        for record in self.manager.models():
            serving = record.serving()
            found = figures(serving.loaded) if serving is not None and serving.loaded is not None else None
            if found is not None:
                tuned[record.name] = found
        return tuned

    def _model_lookup(self, name: str) -> tuple[str, frozenset[int]] | None:
        try:
            record = self.manager.get(name)
        except ModelNotFound:
            return None
        return record.name, frozenset(record.versions)

    def _request_done(self, report: RequestReport) -> None:
        log_request(report)
        self.inference_stats.request_done(report)
        self.metrics.request_done(report)

    def _build_server(self) -> grpc.aio.Server:
        listen, max_bytes = self.config.listen, self.config.limits.max_message_bytes
        options = [
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", int(listen.reuse_port)),
        ]
        if listen.max_connection_age_s > 0:
            options.append(("grpc.max_connection_age_ms", round(listen.max_connection_age_s * 1000)))
        server = grpc.aio.server(interceptors=self._interceptors(), options=options)
        limits = self.config.limits
        servicer = ClassifierServicer(self.service, self.manager, self._request_done,
                                      stream_in_flight=limits.max_stream_in_flight,
                                      reload_min_interval_s=self.config.models.reload_min_interval_s,
                                      control=self.control)
        generic = GenericOnly(server)  # one pending accept for all methods: server/edges/grpc/registration.py
        pb_grpc.add_ClassifierServicer_to_server(servicer, generic)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, generic)
        oip_servicer = oip_api.OipServicer(self.service, self.manager, lambda: self.ready, self._request_done,
                                           max_images=limits.max_images_per_request,
                                           stream_in_flight=limits.max_stream_in_flight, repository=self.repository)
        oip_name = oip_api.add_to_server(oip_servicer, generic)
        names = (pb.DESCRIPTOR.services_by_name["Classifier"].full_name, oip_name, health.SERVICE_NAME,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)  # its one method stays registered: it needs the server
        return server

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """One interceptor: the drain gate around every call, then who may call what (the token first, then model
        control), with the error mapping (server/edges/grpc/calls.py)."""
        # Operators' tokens are good for every call; clients' ones not for model control.
        auth = [TokenCheck(self._tokens + self._admin_tokens)] if self._tokens else []
        admin = AdminCheck(self._admin_tokens, self._tokens,
                                 allow_remote=self.config.security.allow_remote_admin)
        return [CallInterceptor(self.gate, [*auth, admin])]

    async def start(self, *, wait_for_curves: bool = True) -> int:
        """:meth:`listen`, then :meth:`load`; with ``wait_for_curves`` also wait for the batch curves measured
        after readiness (tests that read them). Returns the bound port. Raises OSError if it cannot bind."""
        await self.listen()
        await self.load()
        if wait_for_curves:
            await self.manager.tuned()
        return self.port

    async def listen(self) -> int:
        """Bind and start the gRPC (and HTTP, metrics) listeners with health NOT_SERVING: load balancers and
        probes can tell loading from down. Returns the bound port. Raises OSError if it cannot bind."""
        self.port = self._bind_grpc()
        self._start_metrics()
        await self.health_reporter.set_overall(False, for_good=False)
        await self.server.start()
        if self.http:
            self.http.loading(True)
            try:
                self.http_port = await self.http.start(self.config.listen.host, self.config.listen.http_port or 0)
            except OSError:
                await self.server.stop(0)
                raise
        host = self.config.listen.host
        http = f", HTTP on http://{host}:{self.http_port}/" if self.http else ""
        log.info("classifyd listening on %s:%d%s (device %s): NOT_SERVING while the models load", host, self.port,
                 http, self.manager.settings.device)
        return self.port

    async def load(self) -> None:
        """Load the repository (each model's health turns SERVING as it becomes ready), then report the server
        SERVING and start watching the repository. Blocks the calling task until every model has been tried."""
        await self.manager.load_repository()
        if self.config.models.watch and self.control.watches:
            await self._start_watcher()
        await self.health_reporter.set_overall(True)
        if self.http:
            self.http.loading(False)
        self.ready = True
        for record in self.manager.models():
            await self.health_reporter.update(record.name)
        log.info("classifyd serving on %s:%d (%.1f s after start); models: %s", self.config.listen.host, self.port,
                 time.time() - self._started, self.describe_models())
        self._warn_without_default()

    def _warn_without_default(self) -> None:
        """Several models and none marked default: requests that name no model are refused, which is easy to miss
        when a second model is added beside the one that was the default by being alone."""
        names = self.manager.model_names()
        if self.manager.default_model is None and len(names) > 1:
            log.warning("no default model: the repository has %d models (%s) and none sets default = true, so "
                        "requests that name no model get NOT_FOUND (HTTP 404); add default = true to one model's "
                        "model.toml, e.g. %s", len(names), ", ".join(names),
                        self.config.models.models_dir / names[0] / "model.toml")

    def _bind_grpc(self) -> int:
        """Add the gRPC port (TLS when configured). Returns the bound port. Raises OSError if it cannot bind."""
        listen, security = self.config.listen, self.config.security
        address = f"{listen.host}:{listen.port}"
        try:
            if security.tls_cert and security.tls_key:
                credentials = server_credentials(security.tls_cert, security.tls_key, security.tls_client_ca)
                port = self.server.add_secure_port(address, credentials)
            else:
                port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpcio reports a port in use this way
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        return port

    def _start_metrics(self) -> None:
        observability = self.config.observability
        if observability.metrics_port is not None:
            host = observability.metrics_host or self.config.listen.host
            self.metrics_port = self.metrics.serve(host, observability.metrics_port)
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)

    async def _start_watcher(self) -> None:
        models = self.config.models
        self.watcher = RepositoryWatcher(self.manager, models.models_dir, settle_s=models.settle_s, poll=models.poll,
                                         rescan_s=models.rescan_s)
        await self.watcher.start()

    def server_info(self) -> dict[str, object]:
        """What the status page and the OIP server metadata say about this daemon."""
        return {"version": package_version(), "device": str(self.manager.settings.device),
                "host": self.config.listen.host,
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

    async def stop(self, grace: float = 5.0, drain_s: float = 0.0) -> None:
        """The graceful stop (docs/production.md): NOT_SERVING at once, but serving for ``drain_s`` more seconds
        while load balancers take this replica out; then new calls are UNAVAILABLE and the listeners close; calls
        in flight get ``grace`` seconds, those still queued near its end UNAVAILABLE; then everything is released.
        Clients see OK or UNAVAILABLE (retryable), never CANCELLED. Whatever fails on the way, the listeners and
        every connection are closed in the end (a connection left open would leave its client waiting forever)."""
        grpc_stopped: asyncio.Future[None] | None = None
        try:
            await self._report_not_serving()
            if drain_s > 0:
                log.info("draining: NOT_SERVING, still serving for %.1f s", drain_s)
                await asyncio.sleep(drain_s)
            deadline = asyncio.get_running_loop().time() + grace
            grpc_stopped = await self._stop_accepting(grace)
            await self._finish_in_flight(deadline, min(QUEUED_MARGIN_S, grace / 4))
        finally:
            self.gate.release()
            await (grpc_stopped if grpc_stopped is not None else self.server.stop(0))
            if self.http:
                await self.http.close()
            await self._release()

    async def _release(self) -> None:
        """Fail what is still queued, wait for the batch being computed, release the models and the threads."""
        if self._queues_closed is not None:
            await self._queues_closed
        await self.service.aclose(drain=False)
        await self.manager.aclose()
        await asyncio.to_thread(self.inference.shutdown)  # waits for the batches being computed, if any
        await asyncio.to_thread(self.metrics.close)

    async def _report_not_serving(self) -> None:
        """Health NOT_SERVING (overall and per model, for good), HTTP not ready; stop watching the repository."""
        self.ready = False
        await self.health_reporter.set_overall(False)
        if self.http:
            self.http.draining()
        if self.watcher:
            await self.watcher.aclose()

    async def _stop_accepting(self, grace: float) -> asyncio.Future[None]:
        """New calls UNAVAILABLE, watch streams ended, the listeners closed (gRPC's GOAWAY sent before any answer
        that follows). Returns the gRPC server's stop, which ends once every call has."""
        self.service.stop_accepting()
        self.gate.hold()
        self.gate.end(WATCH_ENDED, WATCH_METHODS)
        if self.http:
            await self.http.stop_accepting()
        await asyncio.sleep(LANDING_S)
        # grpc cancels what is open after its grace: the gate has answered everything by then.
        grpc_stopped = asyncio.ensure_future(self.server.stop(grace + 1.0))
        await asyncio.sleep(GOAWAY_S)
        self.gate.release()
        return grpc_stopped

    async def _finish_in_flight(self, deadline: float, margin: float) -> None:
        """Wait for the calls in flight; ``margin`` before ``deadline`` answer those still queued UNAVAILABLE, at
        ``deadline`` every call still open."""
        if await self._idle_by(deadline - margin):
            return
        log.warning("%.1f s before the grace period ends: the requests still queued are answered UNAVAILABLE", margin)
        self._queues_closed = asyncio.ensure_future(self.service.close_queues())  # awaited by _release
        if not await self._idle_by(deadline):
            ended = self.gate.end(GRACE_ENDED)
            log.warning("grace period over: %d gRPC calls still open are answered UNAVAILABLE", ended)

    async def _idle_by(self, deadline: float) -> bool:
        """Wait until no call is open on either edge (True) or ``deadline`` passes (False)."""
        loop = asyncio.get_running_loop()
        while self.gate.open_calls or (self.http and self.http.in_flight):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True


def manager_settings(config: ServerConfig) -> ManagerSettings:
    """How the model manager loads models: the models section and the batching defaults. Raises ValueError for a
    device that is not there (torch's RuntimeError for one it cannot parse)."""
    models, batching = config.models, config.batching
    return ManagerSettings(models_dir=models.models_dir, device=pick_device(models.device),
                           default_max_batch_size=batching.max_batch_size, default_max_delay_ms=batching.max_delay_ms,
                           default_max_queue=batching.max_queue, autotune=batching.autotune,
                           trust_code=models.trust_code, cache_dir=models.cache_dir,
                           default_runtime=models.default_runtime)

