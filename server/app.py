"""Assemble the daemon: model manager, service, gRPC server with health and reflection.

``Daemon.start()`` binds the port (0 picks a free one, as tests do) and
returns once every model in the repository has been tried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.grpc_api import ClassifierServicer, ErrorInterceptor, HealthReporter
from server.manager import ManagerSettings, ModelManager
from server.preprocess import MAX_PIXELS
from server.runtime import InferenceThread, pick_device
from server.service import ClassifierService
from server.watcher import RepositoryWatcher

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
    trust_code: bool = False


class Daemon:
    """One running classifyd: create, ``await start()``, ``await stop(grace)``."""

    def __init__(self, config: ServerConfig) -> None:
        if not config.models_dir.is_dir():
            raise FileNotFoundError(f"models directory {config.models_dir} does not exist")
        self.config = config
        self.inference = InferenceThread()
        settings = ManagerSettings(
            models_dir=config.models_dir,
            device=pick_device(config.device),
            default_max_batch_size=config.max_batch_size,
            default_max_delay_ms=config.max_delay_ms,
            default_max_queue=config.max_queue,
            trust_code=config.trust_code,
        )
        self.manager = ModelManager(settings, self.inference)
        self.service = ClassifierService(self.manager, self.inference, max_pixels=config.max_pixels)
        self.health = health.aio.HealthServicer()
        self.health_reporter = HealthReporter(self.health, self.manager)
        self.manager.add_listener(self.health_reporter.model_changed)
        self.server = self._build_server()
        self.watcher: RepositoryWatcher | None = None
        self.port = 0

    def _build_server(self) -> grpc.aio.Server:
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
        ]
        server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=options)
        pb_grpc.add_ClassifierServicer_to_server(ClassifierServicer(self.service, self.manager), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (pb.DESCRIPTOR.services_by_name["Classifier"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        return server

    async def start(self) -> int:
        """Load the repository, bind and start serving. Returns the bound port. Raises OSError if it cannot bind."""
        await self.manager.load_repository()
        address = f"{self.config.host}:{self.config.port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        if self.config.watch:
            self.watcher = RepositoryWatcher(self.manager, self.config.models_dir, settle_s=self.config.settle_s,
                                             poll=self.config.poll, rescan_s=self.config.rescan_s)
            await self.watcher.start()
        await self.health_reporter.set_overall(True)
        for record in self.manager.models():
            await self.health_reporter.update(record.name)
        log.info("classifyd serving on %s:%d (device %s); models: %s", self.config.host, self.port,
                 self.manager.settings.device, self.describe_models())
        return self.port

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
        """Report NOT_SERVING, finish in-flight requests within ``grace`` seconds, release everything."""
        await self.health_reporter.set_overall(False)
        if self.watcher:
            await self.watcher.aclose()
        await self.server.stop(grace)
        await self.service.aclose(drain=False)
        await self.manager.aclose()
        self.inference.shutdown()

    async def wait(self) -> None:
        """Block until the server stops."""
        await self.server.wait_for_termination()
