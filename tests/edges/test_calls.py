"""The daemon's one server interceptor (server/edges/grpc/calls.py): the drain gate, the token and model-control
checks in order, and the error mapping, with one wrapper per method."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from unittest.mock import ANY

import grpc
import pytest

from server.core.errors import ModelNotFound
from server.edges.grpc.calls import CallInterceptor
from server.edges.grpc.common import failure_status
from server.edges.grpc.drain import DrainGate
from server.edges.grpc.security import AdminCheck, TokenCheck

RELOAD = "/classifier.v1.Classifier/ReloadModel"
CLASSIFY = "/classifier.v1.Classifier/Classify"
WATCH = "/classifier.v1.Classifier/WatchModels"
REMOTE = "ipv4:10.0.0.7:50000"


@dataclass
class Context:
    """What the wrappers read of a call's context; ``abort`` records the status and raises grpc's AbortError."""

    address: str = "ipv4:127.0.0.1:50000"
    status: tuple[grpc.StatusCode, str] | None = None

    def peer(self) -> str:
        return self.address

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise grpc.aio.AbortError()


@dataclass(frozen=True)
class Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


@dataclass
class Service:
    """A servicer method that answers, or raises ``error``; counts its calls and sees the gate's open calls."""

    gate: DrainGate
    error: Exception | None = None
    calls: int = 0
    open_seen: list[int] = field(default_factory=list)

    async def handle(self, request: object, context: object) -> str:
        self.calls += 1
        self.open_seen.append(self.gate.open_calls)
        if self.error is not None:
            raise self.error
        return "handled"


def _interceptor(gate: DrainGate) -> CallInterceptor:
    """Client tokens and no admin tokens: model control only from this machine, so a remote call with a wrong token
    is refused by both checks, and the status says which ran first."""
    return CallInterceptor(gate, [TokenCheck(["client"]), AdminCheck((), ["client"])])


async def _call(interceptor: CallInterceptor, service: Service, method: str, token: str = "",
                peer: str = "ipv4:127.0.0.1:50000") -> tuple[object, Context]:
    async def continuation(details: object) -> grpc.RpcMethodHandler:
        return service.handler

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    handler = await interceptor.intercept_service(continuation, Details(method, metadata))
    context = Context(peer)
    try:
        return await handler.unary_unary(None, context), context
    except grpc.aio.AbortError:
        return context.status, context


def _service(gate: DrainGate, error: Exception | None = None) -> Service:
    service = Service(gate, error)
    service.handler = grpc.unary_unary_rpc_method_handler(service.handle)  # type: ignore[attr-defined]
    return service


def test_the_token_is_checked_before_model_control_and_a_refused_call_never_reaches_the_handler() -> None:
    async def body() -> None:
        gate = DrainGate()
        interceptor, service = _interceptor(gate), _service(gate)
        answer, _ = await _call(interceptor, service, RELOAD, token="wrong", peer=REMOTE)
        assert isinstance(answer, tuple) and answer[0] is grpc.StatusCode.UNAUTHENTICATED
        answer, _ = await _call(interceptor, service, RELOAD, token="client", peer=REMOTE)
        assert isinstance(answer, tuple) and answer[0] is grpc.StatusCode.PERMISSION_DENIED
        assert service.calls == 0
        assert await _call(interceptor, service, RELOAD, token="client") == ("handled", ANY)  # from this machine
        assert await _call(interceptor, service, CLASSIFY, token="client", peer=REMOTE) == ("handled", ANY)
        assert service.open_seen == [1, 1]  # inside the drain gate: each call counted while it runs
        assert gate.open_calls == 0

    asyncio.run(body())


def test_one_wrapper_per_method_and_a_refusal_s_own_handler_is_not_kept() -> None:
    async def body() -> None:
        interceptor = _interceptor(DrainGate())
        service = _service(DrainGate())

        async def continuation(details: object) -> grpc.RpcMethodHandler:
            return service.handler  # type: ignore[attr-defined,no-any-return]

        def details(token: str) -> Details:
            return Details(CLASSIFY, (("authorization", f"Bearer {token}"),))

        first = await interceptor.intercept_service(continuation, details("client"))
        assert await interceptor.intercept_service(continuation, details("client")) is first
        refused = await interceptor.intercept_service(continuation, details("wrong"))
        assert refused is not first
        assert await interceptor.intercept_service(continuation, details("client")) is first

    asyncio.run(body())


FAILURES = [
    (ModelNotFound("no model 'x'"), grpc.StatusCode.NOT_FOUND, False),
    (ValueError("a bug"), grpc.StatusCode.INTERNAL, True),
]


@pytest.mark.parametrize(("error", "code", "logged"), FAILURES)
def test_errors_become_their_status_inside_the_gate(error: Exception, code: grpc.StatusCode, logged: bool,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> tuple[object, DrainGate]:
        gate = DrainGate()
        answer, _ = await _call(_interceptor(gate), _service(gate, error), CLASSIFY, token="client")
        return answer, gate

    with caplog.at_level(logging.ERROR, logger="classifyd.grpc"):
        answer, gate = asyncio.run(body())
    assert isinstance(answer, tuple) and answer[0] is code
    assert ("unexpected error in " + CLASSIFY in caplog.text) is logged
    assert gate.open_calls == 0


@pytest.mark.parametrize(("error", "code", "logged"), FAILURES)
def test_a_stream_request_s_failure_gets_the_status_and_the_log_a_call_gets(
        error: Exception, code: grpc.StatusCode, logged: bool, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="classifyd.grpc"):
        try:
            raise error
        except Exception as exc:  # noqa: BLE001 - the stream's handlers catch everything the same way
            status = failure_status(exc, "svc/Stream")
    assert status == (code, "internal error: ValueError: a bug" if logged else str(error))
    assert ("unexpected error in svc/Stream" in caplog.text) is logged
    assert ("Traceback" in caplog.text) is logged


def test_a_server_stream_s_error_becomes_its_status_and_a_call_the_gate_ends_is_answered_unavailable() -> None:
    async def body() -> None:
        gate = DrainGate()
        interceptor = _interceptor(gate)
        started = asyncio.Event()

        async def stream(request: object, context: object) -> AsyncIterator[str]:
            yield "first"
            raise ModelNotFound("no model 'x'")

        async def waits(request: object, context: object) -> str:
            started.set()
            await asyncio.Event().wait()  # until the gate ends the call
            return "never"

        async def continuation(details: Details) -> grpc.RpcMethodHandler:
            if details.method == WATCH:
                return grpc.unary_stream_rpc_method_handler(stream)
            return grpc.unary_unary_rpc_method_handler(waits)

        token = (("authorization", "Bearer client"),)
        handler = await interceptor.intercept_service(continuation, Details(WATCH, token))
        context, answers = Context(), []
        with pytest.raises(grpc.aio.AbortError):
            async for answer in handler.unary_stream(None, context):
                answers.append(answer)
        assert answers == ["first"] and context.status == (grpc.StatusCode.NOT_FOUND, "no model 'x'")

        handler = await interceptor.intercept_service(continuation, Details(CLASSIFY, token))
        context = Context()
        call = asyncio.ensure_future(handler.unary_unary(None, context))
        await started.wait()
        assert gate.end("the daemon is stopping") == 1
        with pytest.raises(grpc.aio.AbortError):
            await call
        assert context.status == (grpc.StatusCode.UNAVAILABLE, "the daemon is stopping")
        assert gate.open_calls == 0

    asyncio.run(body())
