"""Scale-out as on Kubernetes, on loopback: replicas share one model repository; one client channel
balances over them with round_robin, health-checks them and retries UNAVAILABLE (deploy/client-service-config.json).

Under load, one of three replicas is SIGKILLed and restarted on its port, and a new model version is published
to the shared directory while it is down: no request fails, and every replica ends up serving it. And a rolling
restart of two replicas (each stopped with SIGTERM, as Kubernetes does, and started again) fails no request.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from tests.support.daemon_process import SERVER, DaemonProcess
from tests.support.digits_data import held_out_digits, png_bytes
from tests.support.kit import REPO

pytestmark = [pytest.mark.slow, pytest.mark.process]
SERVICE_CONFIG = (REPO / "deploy" / "client-service-config.json").read_text()
LOAD_THREADS = 4


@dataclass
class Outcome:
    at: float
    code: grpc.StatusCode
    version: int = 0
    pid: int = 0
    details: str = ""


@dataclass
class Load:
    """Client threads classifying over one balanced channel until stopped (bounded by a time limit)."""

    stub: pb_grpc.ClassifierStub
    images: list[bytes]
    limit_s: float = 90.0
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, index: int) -> None:
        ends = time.monotonic() + self.limit_s
        n = index
        while not self.stop.is_set() and time.monotonic() < ends:
            n += LOAD_THREADS
            request = pb.ClassifyRequest(image=self.images[n % len(self.images)])
            try:
                response, call = self.stub.Classify.with_call(request, timeout=10)
            except grpc.RpcError as exc:
                self.outcomes.append(Outcome(time.monotonic(), exc.code(), details=exc.details() or ""))
                continue
            pid = int(dict(call.trailing_metadata())["classifyd-pid"])
            self.outcomes.append(Outcome(time.monotonic(), grpc.StatusCode.OK, response.version, pid))

    def since(self, moment: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.at >= moment]


@contextmanager
def running_replicas(tmp_path: Path, count: int, *flags: str) -> Iterator[list[DaemonProcess]]:
    """``count`` daemons of the shipped server on one copy of the digits repository, stopped on exit."""
    shutil.copytree(REPO / "models" / "digits", tmp_path / "models" / "digits")
    started = [DaemonProcess(tmp_path / "models", tmp_path, "--settle-seconds", "0.3", *flags, name=f"replica{i}",
                             entry=SERVER).start() for i in range(count)]
    try:
        yield [replica.wait_serving() for replica in started]
    finally:
        for replica in started:
            replica.terminate()
        for replica in started:
            replica.stop()


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    with running_replicas(tmp_path, 3, "--grace-seconds", "2") as started:
        yield started


@contextmanager
def balanced_load(replicas: list[DaemonProcess]) -> Iterator[Load]:
    """:data:`LOAD_THREADS` threads classifying over one channel balanced over ``replicas`` as the documented
    client configuration says, until the block ends."""
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)
    options = [("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1),
               ("grpc.max_reconnect_backoff_ms", 1000)]  # find the restarted replica soon
    images = [png_bytes(image) for image in held_out_digits()[0][:32]]
    with grpc.insecure_channel(target, options=options) as channel:
        load = Load(pb_grpc.ClassifierStub(channel), images)
        threads = [threading.Thread(target=load.run, args=(i,), daemon=True) for i in range(LOAD_THREADS)]
        for thread in threads:
            thread.start()
        try:
            yield load
        finally:
            load.stop.set()
            for thread in threads:
                thread.join(30)


def serving_version(replica: DaemonProcess) -> int:
    with grpc.insecure_channel(replica.target) as channel:
        return pb_grpc.ClassifierStub(channel).GetModel(pb.GetModelRequest(model="digits"), timeout=10).serving_version


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def publish_version(models: Path, version: int) -> None:
    """Copy version 1 aside, then rename it into place: replicas never see a half-written version."""
    staging = models / "digits" / f".staging-{version}"
    shutil.copytree(models / "digits" / "1", staging)
    staging.rename(models / "digits" / str(version))


def test_replicas_survive_a_kill_a_restart_and_a_new_version(replicas: list[DaemonProcess]) -> None:
    with balanced_load(replicas) as load:
        first_pids = {r.pid for r in replicas}
        wait_until(lambda: {o.pid for o in load.outcomes} >= first_pids, 60, "every replica served")

        victim = replicas[1]
        victim.kill()
        publish_version(victim.models_dir, 2)
        wait_until(lambda: all(serving_version(r) == 2 for r in (replicas[0], replicas[2])), 60,
                   "the live replicas serve version 2")
        victim.start().wait_serving()
        assert serving_version(victim) == 2
        restarted = time.monotonic()
        wait_until(lambda: victim.pid in {o.pid for o in load.since(restarted)}, 60,
                   "the restarted replica serves the balanced channel")
        settled = time.monotonic()
        wait_until(lambda: len(load.since(settled)) >= 30, 60, "more requests")

    failures = [o for o in load.outcomes if o.code != grpc.StatusCode.OK]
    assert not failures, Counter((o.code, o.details) for o in failures)
    assert len(load.outcomes) > 100
    late = load.since(settled)
    assert {o.version for o in late} == {2}
    assert {o.pid for o in late} == {r.pid for r in replicas}


def test_a_rolling_restart_under_load_fails_no_request(tmp_path: Path) -> None:
    with running_replicas(tmp_path, 2, "--drain-seconds", "1", "--grace-seconds", "10") as replicas, \
            balanced_load(replicas) as load:
        wait_until(lambda: {o.pid for o in load.outcomes} >= {r.pid for r in replicas}, 60, "every replica served")
        for replica in replicas:  # as a Deployment's rolling update does: one at a time, SIGTERM, then a new one
            stopped = time.monotonic()
            assert replica.stop() == 0, replica.log(4000)
            assert load.since(stopped), "the other replica served while this one stopped"
            replica.start().wait_serving()
            restarted = time.monotonic()
            wait_until(lambda: replica.pid in {o.pid for o in load.since(restarted)}, 60,  # noqa: B023
                       "the restarted replica serves the balanced channel")
        settled = time.monotonic()
        wait_until(lambda: len(load.since(settled)) >= 30, 60, "more requests")

    failures = [o for o in load.outcomes if o.code != grpc.StatusCode.OK]
    assert not failures, Counter((o.code, o.details) for o in failures)
    assert {o.pid for o in load.since(settled)} == {r.pid for r in replicas}
