"""``--workers``: several server processes on one port, and ``--port-file``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon_process import SERVER, DaemonProcess
from tests.support.digits_data import held_out_digits, png_bytes
from tests.support.kit import REPO, DaemonThread, local_config
from tests.support.repository import DIGIT_LABELS


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("workers")
    shutil.copytree(REPO / "models" / "digits", root / "models" / "digits")
    with socket.socket() as probe:  # --workers needs a concrete HTTP port; a free one, released for the daemon
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    daemon = DaemonProcess(root / "models", root, "--workers", "2", "--grace-seconds", "2", "--metrics-port", "0",
                           "--metrics-port-file", str(root / "metrics.port"), "--http-port", str(http_port),
                           entry=SERVER).start()
    daemon.http_port = http_port  # type: ignore[attr-defined]
    try:
        yield daemon.wait_serving()
    finally:
        daemon.stop()


def serving_pid(target: str, png: bytes) -> tuple[int, str]:
    """Classify over a new connection (no shared subchannel); the serving PID and the top label."""
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        response, call = pb_grpc.ClassifierStub(channel).Classify.with_call(pb.ClassifyRequest(image=png), timeout=30)
    return int(dict(call.trailing_metadata())["classifyd-pid"]), response.predictions[0].label


def pids_seen(target: str, png: bytes, want: int, attempts: int = 60) -> set[int]:
    """PIDs serving new connections, until ``want`` distinct ones were seen (the kernel picks per connection)."""
    pids: set[int] = set()
    for _ in range(attempts):
        try:
            pid, _ = serving_pid(target, png)
        except grpc.RpcError as exc:  # a connection queued at a worker that was just killed is reset
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            continue
        pids.add(pid)
        if len(pids) >= want:
            break
    return pids


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.process
def test_two_workers_serve_one_port_from_two_processes(workers: DaemonProcess) -> None:
    images, labels = held_out_digits()
    pids = pids_seen(workers.target, png_bytes(images[0]), want=2)
    assert len(pids) == 2, pids
    assert workers.pid not in pids
    assert all(parent_of(pid) == workers.pid for pid in pids)
    for image, label in zip(images[:6], labels[:6], strict=True):
        assert serving_pid(workers.target, png_bytes(image))[1] == DIGIT_LABELS[label]


def daemon_metrics(daemon: DaemonProcess) -> dict[str, float]:
    """The parent's /metrics: every sample's value by its name and sorted labels."""
    port = int((daemon.port_file.parent / "metrics.port").read_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        page = reply.read().decode()
    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for family in text_string_to_metric_families(page) for s in family.samples}


@pytest.mark.process
def test_metrics_report_both_workers_as_one_daemon(workers: DaemonProcess) -> None:
    ok = "classifyd_requests_total[('code', 'OK'), ('model', 'digits'), ('version', '1')]"
    before = daemon_metrics(workers)
    png = png_bytes(held_out_digits()[0][0])
    answered = 0
    pids: set[int] = set()
    while len(pids) < 2 and answered < 60:
        pids.add(serving_pid(workers.target, png)[0])
        answered += 1
    after = daemon_metrics(workers)
    assert len(pids) == 2, "the kernel never spread the connections over both workers"
    assert after["classifyd_workers_up[('worker', '0')]"] == after["classifyd_workers_up[('worker', '1')]"] == 1
    assert after[ok] - before.get(ok, 0.0) == answered  # requests served by either worker, summed
    assert after["classifyd_model_serving_version[('model', 'digits')]"] == 1  # a gauge is not doubled
    assert after["classifyd_request_latency_seconds_count[('model', 'digits')]"] >= answered


def status_json(daemon: DaemonProcess) -> dict:
    """/status.json over a new connection: whichever worker the kernel picks answers."""
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/status.json", timeout=30) as reply:
        return json.loads(reply.read())


@pytest.mark.process
def test_the_status_page_shows_both_workers_whichever_answers(workers: DaemonProcess) -> None:
    png = png_bytes(held_out_digits()[0][0])
    pids = pids_seen(workers.target, png, want=2)
    assert len(pids) == 2
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # each worker shares its figures once a second
        documents = [status_json(workers) for _ in range(6)]
        if all({w["pid"] for w in d["workers"]} == pids and all(w["requests"] for w in d["workers"])
               for d in documents):
            break
        time.sleep(0.5)
    assert {d["pid"] for d in documents} <= pids
    for document in documents:
        assert {w["pid"] for w in document["workers"]} == pids, document["workers"]
        assert all(w["requests"] >= 1 for w in document["workers"]), document["workers"]  # both served
        digits = next(m for m in document["models"] if m["name"] == "digits")
        assert digits["stats"]["requests"] == sum(w["requests"] for w in document["workers"])


@pytest.mark.process
def test_each_worker_answers_health_checks(workers: DaemonProcess) -> None:
    for _ in range(6):
        with grpc.insecure_channel(workers.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "digits"):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
@pytest.mark.process
def test_a_dead_worker_is_replaced(workers: DaemonProcess) -> None:
    png = png_bytes(held_out_digits()[0][0])
    before = pids_seen(workers.target, png, want=2)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = pids_seen(workers.target, png, want=2, attempts=20)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.5)
    assert len(now) == 2 and victim not in now, (before, now)
    assert all(parent_of(pid) == workers.pid for pid in now)


@pytest.mark.slow
@pytest.mark.process
def test_a_worker_that_cannot_start_fails_the_daemon(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "missing", tmp_path, "--workers", "2", entry=SERVER).start()
    assert daemon.process is not None
    assert daemon.process.wait(120) == 2
    assert "does not exist" in daemon.log()


@pytest.mark.process
def test_sigterm_stops_every_worker(workers: DaemonProcess) -> None:
    """Runs last: it stops the module's daemon."""
    children = pids_seen(workers.target, png_bytes(held_out_digits()[0][0]), want=2)
    assert workers.stop() == 0
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], workers.log()
    with grpc.insecure_channel(workers.target) as channel, pytest.raises(grpc.RpcError) as failed:
        pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(image=b"x"), timeout=2)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.process
def test_a_busy_port_is_an_error_without_reuse_port(tmp_path: Path) -> None:
    """Only --workers / --reuse-port share a port; otherwise a second server must not bind it silently."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            DaemonThread(local_config(REPO / "models", port=port, watch=False)).start()
        daemon = DaemonProcess(REPO / "models", tmp_path, "--workers", "2", port=port, entry=SERVER).start()
        assert daemon.process is not None and daemon.process.wait(60) == 2
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in daemon.log()


def test_workers_auto_applies_the_host_rule_without_loading_torch() -> None:
    from server.cli.main import parse_args
    from server.ops.host import default_workers

    assert parse_args(["--workers", "auto", "--device", "cpu"]).workers == default_workers("cpu")
    assert parse_args(["--workers", "auto", "--device", "cuda"]).workers == default_workers("cuda")
    assert parse_args([]).workers == 1
