"""Start-up of the real process with seven small models: it talks and binds at once.

The ports answer (health NOT_SERVING) before the models load; the models load concurrently and go READY
before their batch curves are measured (measured afterwards, one at a time); each model logs ``loading`` and
``ready``. The 2 s and 10 s bounds are the issue's acceptance figures for this 2-core machine.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.daemon_process import DaemonProcess
from tests.support.kit import write_model

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]
MODELS = [f"m{i}" for i in range(7)]
BIND_WITHIN_S = 2.0
READY_WITHIN_S = 10.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
                  ("grpc.max_reconnect_backoff_ms", 50)]
"""The channel retries the not-yet-bound port every few ms, not after grpc's default second or more."""


def free_port() -> int:
    """A port free now (the daemon binds it a moment later; the kernel does not hand it out again that soon)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def seven_models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    for seed, name in enumerate(MODELS):
        # small CNNs on 64x64 inputs, autotuned (the server's defaults)
        write_model(root, name, seed=seed, manifest={"input": {"size": 64, "resize": 64}})
    return root


@pytest.fixture
def daemon(seven_models: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(seven_models, tmp_path, port=free_port())
    try:
        yield process
    finally:
        process.kill()


def check(stub: health_pb2_grpc.HealthStub, service: str) -> int | None:
    """The health status of ``service``; None while the port does not answer (or the service is not known yet)."""
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=0.5).status
    except grpc.RpcError:
        return None


def poll(predicate: object, deadline: float, daemon: DaemonProcess) -> float:
    """Call ``predicate()`` every 20 ms until it is true; the monotonic time it became so. Fails at ``deadline``."""
    assert callable(predicate)
    while not predicate():
        assert daemon.alive(), f"daemon exited:\n{daemon.log(4000)}"
        assert time.monotonic() < deadline, f"not in time:\n{daemon.log(4000)}"
        time.sleep(0.02)
    return time.monotonic()


def test_seven_models_bind_at_once_and_are_ready_within_seconds(daemon: DaemonProcess) -> None:
    launched = time.monotonic()
    daemon.start()
    with grpc.insecure_channel(daemon.target, options=FAST_RECONNECT) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        first: list[int] = []

        def answered() -> bool:
            status = check(stub, "")
            if status is not None:
                first.append(status)
            return status is not None

        bound = poll(answered, launched + 60, daemon)
        ready = poll(lambda: all(check(stub, name) == SERVING for name in ["", *MODELS]), launched + 60, daemon)
    log = daemon.log()
    assert first[0] == NOT_SERVING, f"the server said SERVING before its models were tried\n{log}"
    assert bound - launched < BIND_WITHIN_S, f"the port answered {bound - launched:.1f} s after launch\n{log}"
    assert ready - launched < READY_WITHIN_S, f"the models were ready {ready - launched:.1f} s after launch\n{log}"
    assert "memory allocator: freed memory stays in the process" in log  # set before anything was loaded
    for name in MODELS:
        assert re.search(rf"model {name} version 1 loading: ", log), f"no loading line for {name}\n{log}"
        assert re.search(rf"model {name} version 1 ready on cpu .*\d s\)", log), f"no ready line for {name}\n{log}"
