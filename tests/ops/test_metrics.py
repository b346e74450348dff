"""/metrics after a known workload: every documented metric is there, with the right counts."""

from __future__ import annotations

import re
import shutil
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from client import tensor_request
from tests.support.kit import REPO, DaemonThread, running_daemon, write_model

pytestmark = pytest.mark.timeout(120)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(REPO / "models" / "digits", root / "digits")
    broken = write_model(root, "broken", manifest={"input": {"color": "L", "size": 8, "resize": 8}})
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    # reload_min_interval_s=0: two tests of this module reload digits within the default 5 s
    with running_daemon(root, watch=False, metrics_port=0, reload_min_interval_s=0.0) as running:
        yield running


def test_metrics_count_a_known_workload(daemon: DaemonThread) -> None:
    assert daemon.daemon.metrics_port
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for _ in range(5):
            stub.Classify(tensor_request(np.zeros((8, 8), np.uint8)), timeout=20)
        stub.Classify(tensor_request(np.zeros((8, 8), np.uint8), version=1), timeout=20)
        bad = [pb.ClassifyRequest(image=b"not an image"),
               pb.ClassifyRequest(model="digits", version=1, top_k=99, image=b"x"),
               pb.ClassifyRequest(model="no-such-model", image=b"x"),
               pb.ClassifyRequest(model="digits", version=12345, image=b"x")]
        for request in bad:
            with pytest.raises(grpc.RpcError):
                stub.Classify(request, timeout=20)
        # A new version of digits: loaded and swapped in.
        models_dir = daemon.config.models.models_dir
        shutil.copytree(models_dir / "digits" / "1", models_dir / "digits" / "2")
        assert stub.ReloadModel(pb.ReloadModelRequest(model="digits"), timeout=60).serving_version == 2
        assert stub.Classify(tensor_request(np.zeros((8, 8), np.uint8)), timeout=20).version == 2

    text, samples = scrape(daemon.daemon.metrics_port)
    assert value(samples, "classifyd_requests_total", model="digits", version="1", code="OK") == 6
    assert value(samples, "classifyd_requests_total", model="digits", version="2", code="OK") == 1
    assert value(samples, "classifyd_requests_total", model="digits", version="", code="INVALID_ARGUMENT") == 1
    assert value(samples, "classifyd_requests_total", model="digits", version="1", code="INVALID_ARGUMENT") == 1
    assert value(samples, "classifyd_requests_total", model="(unknown)", version="", code="NOT_FOUND") == 1
    assert value(samples, "classifyd_requests_total", model="digits", version="", code="NOT_FOUND") == 1
    assert value(samples, "classifyd_request_latency_seconds_count", model="digits") == 7
    assert value(samples, "classifyd_queue_seconds_count", model="digits") == 7
    assert value(samples, "classifyd_preprocess_seconds_count", model="digits") == 7
    assert value(samples, "classifyd_batch_size_count", model="digits") == 7  # one at a time: 7 batches
    assert value(samples, "classifyd_batch_size_sum", model="digits") == 7
    assert value(samples, "classifyd_batch_compute_seconds_count", model="digits") == 7
    assert value(samples, "classifyd_queue_depth", model="digits") == 0
    assert value(samples, "classifyd_queue_limit", model="digits") == 1024
    assert value(samples, "classifyd_model_loads_total", model="digits", result="ready") == 2
    assert value(samples, "classifyd_model_loads_total", model="broken", result="failed") == 1
    assert value(samples, "classifyd_model_load_seconds_count", model="digits", result="ready") == 2
    assert value(samples, "classifyd_model_load_seconds_count", model="broken", result="failed") == 1
    assert value(samples, "classifyd_model_swaps_total", model="digits") == 1
    assert value(samples, "classifyd_model_serving_version", model="digits") == 2
    assert value(samples, "process_resident_memory_bytes") > 10_000_000

    exposed = {m.group(1) for m in re.finditer(r"^# TYPE (\w+) ", text, re.MULTILINE)
               if not m.group(1).endswith("_created")}
    documented = set(re.findall(r"^\| `(\w+)` \|", (REPO / "docs" / "metrics.md").read_text(), re.MULTILINE))
    assert {n for n in exposed if n.startswith("classifyd_")} == {n for n in documented if n.startswith("classifyd_")}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= documented & exposed


def test_reloading_the_serving_version_keeps_its_serving_gauge(daemon: DaemonThread) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        serving = stub.GetModel(pb.GetModelRequest(model="digits"), timeout=10).serving_version
        events = stub.WatchModels(pb.WatchModelsRequest(model="digits"), timeout=60)
        reloaded = stub.ReloadModel(pb.ReloadModelRequest(model="digits"), timeout=60)
        assert reloaded.serving_version == serving  # the same version, as a new generation
        for event in events:  # the old generation is released after the new one took over
            if event.kind == pb.ModelEvent.UNLOADED:  # a retired generation is never called serving
                assert event.version == serving and not event.serving
                assert f"version {serving} serves" in event.reason, event.reason
                break
        events.cancel()
        assert stub.Classify(tensor_request(np.zeros((8, 8), np.uint8)), timeout=20).version == serving
    _, samples = scrape(daemon.daemon.metrics_port)
    assert value(samples, "classifyd_model_serving_version", model="digits") == serving
    assert ("classifyd_model_serving_version", frozenset({("model", "broken")})) not in samples  # never served


def test_unknown_model_names_do_not_create_series(daemon: DaemonThread) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for n in range(20):
            with pytest.raises(grpc.RpcError):
                stub.Classify(pb.ClassifyRequest(model=f"fuzz-{n}", image=b"x"), timeout=20)
    text, _ = scrape(daemon.daemon.metrics_port)
    assert "fuzz-" not in text
