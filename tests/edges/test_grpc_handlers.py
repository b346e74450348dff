"""The interceptors' wrappers are made once per method and handler (server/edges/grpc/wrapped.py), and the services
are served through their generic handlers only (server/edges/grpc/registration.py), in a running daemon too."""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio._server
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc

from server.edges.grpc.registration import GenericOnly
from server.edges.grpc.wrapped import WrappedHandlers
from tests.support.kit import running_daemon, write_model


async def _first(request: object, context: object) -> str:
    return "first"


async def _second(request: object, context: object) -> str:
    return "second"


def test_a_wrapper_is_made_once_per_method_and_handler_and_anew_when_the_handler_changes() -> None:
    made: list[tuple[object, str]] = []

    def wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        made.append((handler, method))
        return grpc.unary_unary_rpc_method_handler(handler.unary_unary)

    wrapped = WrappedHandlers(wrap)
    first = grpc.unary_unary_rpc_method_handler(_first)
    second = grpc.unary_unary_rpc_method_handler(_second)

    once = wrapped.get(first, "/a/A")
    assert wrapped.get(first, "/a/A") is once  # every later call of the method gets the same wrapper
    other = wrapped.get(first, "/b/B")  # another method: its own wrapper (wrappers close over the method)
    assert other is not once
    assert made == [(first, "/a/A"), (first, "/b/B")]

    # a handler made for one call (another interceptor's refusal) is wrapped for that call, never reused for the
    # method's own handler afterwards
    refused = wrapped.get(second, "/a/A")
    assert refused.unary_unary is _second
    again = wrapped.get(first, "/a/A")
    assert again.unary_unary is _first
    assert made[2:] == [(second, "/a/A"), (first, "/a/A")]


def test_generic_only_registration_adds_the_generic_handlers_and_drops_the_registered_methods() -> None:
    class Server:
        def __init__(self) -> None:
            self.generic: list[object] = []

        def add_generic_rpc_handlers(self, handlers: tuple[object, ...]) -> None:
            self.generic.extend(handlers)

        def add_registered_method_handlers(self, service: str, handlers: dict[str, object]) -> None:
            raise AssertionError("registered methods make grpc.aio wait on one future per method for every call")

    server = Server()
    handler = grpc.method_handlers_generic_handler("a.A", {"Call": grpc.unary_unary_rpc_method_handler(_first)})
    proxy = GenericOnly(server)  # type: ignore[arg-type]
    proxy.add_generic_rpc_handlers((handler,))
    proxy.add_registered_method_handlers("a.A", {"Call": grpc.unary_unary_rpc_method_handler(_first)})
    assert server.generic == [handler]


def test_a_running_daemon_registers_only_reflection_s_method_and_still_serves_every_service(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[str] = []
    original = grpc.aio._server.Server.add_registered_method_handlers

    def spy(self: grpc.aio.Server, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        registered.append(service)
        original(self, service, handlers)

    monkeypatch.setattr(grpc.aio._server.Server, "add_registered_method_handlers", spy)
    write_model(tmp_path, "m")
    with running_daemon(tmp_path) as daemon, grpc.insecure_channel(daemon.target) as channel:
        models = pb_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        live = oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip.ServerLiveRequest(), timeout=30)
        listed = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
    # grpc.aio waits on one future per registered method for every call it accepts: reflection keeps its one
    assert registered == [reflection.SERVICE_NAME]
    assert [m.name for m in models.models] == ["m"]
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert live.live
    names = {s.name for s in listed.list_services_response.service}
    assert {"classifier.v1.Classifier", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
