"""OpenTelemetry traces over real gRPC and HTTP: two concurrent requests ride one batch; each has its request span
with preprocess, queue and compute children, the batch span links to both, and a caller's ``traceparent``
(gRPC metadata or HTTP header) is continued. Spans go to the SDK's in-memory exporter (server/ops/tracing.py)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server.edges.common.oip_codec import join_bytes_elements
from server.ops import tracing
from tests.support.daemon_process import SERVER, DaemonProcess
from tests.support.kit import DaemonThread, encode, running_daemon, write_model

pytestmark = pytest.mark.timeout(120)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
STAGES = ["classifyd.compute", "classifyd.preprocess", "classifyd.queue"]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


@pytest.fixture
def daemon(tmp_path: Path, spans: InMemorySpanExporter) -> Iterator[DaemonThread]:
    """A model whose batches close at two requests and not before (the delay outlasts the test)."""
    write_model(tmp_path, "pair", manifest={"input": {"color": "L", "size": 8, "resize": 8},
                                            "batching": {"max_batch_size": 2, "max_delay_ms": 60000}})
    with running_daemon(tmp_path, http_port=0, watch=False) as running:
        yield running


def _png() -> bytes:
    return encode(np.full((8, 8), 120, np.uint8), "PNG")


def _together(*calls: Callable[[], Any]) -> list[Any]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result(60) for f in [pool.submit(call) for call in calls]]


def _tree(exporter: InMemorySpanExporter, names: list[str]) -> tuple[list[ReadableSpan], ReadableSpan]:
    """The request spans named ``names`` (in that order) and the one batch span; asserts the tree and the links."""
    finished = exporter.get_finished_spans()
    batches = [s for s in finished if s.name == "classifyd.batch"]
    assert len(batches) == 1, [s.name for s in finished]
    batch = batches[0]
    requests = []
    for name in names:
        (request,) = [s for s in finished if s.name == name and s not in requests][:1]
        requests.append(request)
        children = sorted((s for s in finished if s.parent is not None and s.parent.span_id == request.context.span_id),
                          key=lambda s: s.name)
        assert [c.name for c in children] == STAGES
        compute = children[0]
        assert compute.attributes["classifyd.batch_size"] == 2
        assert [link.context.span_id for link in compute.links] == [batch.context.span_id]
        assert request.attributes["classifyd.code"] == "OK" and request.attributes["classifyd.model"] == "pair"
        queue = children[2]
        assert queue.end_time == batch.start_time  # waited until the batch began
    assert batch.parent is None  # a trace of its own, linked to every request it computed
    assert {link.context.span_id for link in batch.links} == {r.context.span_id for r in requests}
    assert batch.attributes["classifyd.batch_size"] == 2
    return requests, batch


def test_grpc_classify_and_oip_requests_in_one_batch_have_span_trees_and_continue_the_callers_trace(
        daemon: DaemonThread, spans: InMemorySpanExporter) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        classifier, inference = pb_grpc.ClassifierStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)
        infer = oip.ModelInferRequest(model_name="pair", id="oip-1")
        infer.inputs.add(name="image", datatype="BYTES", shape=[1])
        infer.raw_input_contents.append(join_bytes_elements([_png()]))
        answers = _together(
            lambda: classifier.Classify(pb.ClassifyRequest(model="pair", image=_png(), request_id="grpc-1"),
                                        metadata=(("traceparent", TRACEPARENT),), timeout=60),
            lambda: inference.ModelInfer(infer, timeout=60))
    assert answers[0].batch_size == 2
    (classify, model_infer), _ = _tree(spans, ["classifier.v1.Classifier/Classify",
                                               "inference.GRPCInferenceService/ModelInfer"])
    assert format(classify.context.trace_id, "032x") == TRACE_ID  # the caller's trace goes on
    assert format(classify.parent.span_id, "016x") == PARENT_ID
    assert classify.attributes["classifyd.request_id"] == "grpc-1"
    assert model_infer.parent is None and model_infer.attributes["classifyd.request_id"] == "oip-1"


def _post(url: str, headers: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=_png(), headers={"Content-Type": "image/png", **headers})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_http_requests_in_one_batch_have_span_trees_and_a_traceparent_header_is_continued(
        daemon: DaemonThread, spans: InMemorySpanExporter) -> None:
    assert daemon.daemon is not None
    url = f"http://127.0.0.1:{daemon.daemon.http_port}/v1/models/pair/classify"
    answers = _together(lambda: _post(url, {"traceparent": TRACEPARENT, "X-Request-Id": "http-1"}),
                        lambda: _post(url, {"X-Request-Id": "http-2"}))
    assert [a["batch_size"] for a in answers] == [2, 2]
    requests, _ = _tree(spans, ["POST /v1/classify", "POST /v1/classify"])
    by_id = {r.attributes["classifyd.request_id"]: r for r in requests}
    assert format(by_id["http-1"].context.trace_id, "032x") == TRACE_ID
    assert format(by_id["http-1"].parent.span_id, "016x") == PARENT_ID
    assert by_id["http-2"].parent is None  # no header: a new trace
    assert by_id["http-2"].context.trace_id != by_id["http-1"].context.trace_id


def test_a_failed_request_span_says_why_and_tracing_off_opens_no_span(daemon: DaemonThread,
                                                                      spans: InMemorySpanExporter) -> None:
    with grpc.insecure_channel(daemon.target) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(model="absent", image=_png()), timeout=30)
    (failed,) = spans.get_finished_spans()
    assert failed.attributes["classifyd.code"] == "NOT_FOUND"
    assert failed.status.description.startswith("NOT_FOUND: ")
    tracing.install(None)
    assert tracing.start_request("x", {"traceparent": TRACEPARENT}) is None
    assert tracing.item_trace() is None and tracing.open_batch("pair", []) is None


@pytest.mark.process
def test_the_daemon_process_traces_as_otel_variables_say_and_flushes_spans_when_it_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(tmp_path / "models", "pair", manifest={"input": {"color": "L", "size": 8, "resize": 8}})
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "classifyd-test")
    with DaemonProcess(tmp_path / "models", tmp_path, "--drain-seconds", "0", entry=SERVER) as daemon:
        with grpc.insecure_channel(daemon.target) as channel:
            pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(model="pair", image=_png()),
                                                     metadata=(("traceparent", TRACEPARENT),), timeout=60)
        assert daemon.stop() == 0
        log = daemon.log()
    assert "tracing: OpenTelemetry spans exported" in log
    assert '"name": "classifier.v1.Classifier/Classify"' in log  # flushed at the stop, not lost
    assert f'"trace_id": "0x{TRACE_ID}"' in log and '"service.name": "classifyd-test"' in log
