"""The response cache on a real daemon: every edge reports hits, options and versions miss, metrics count them."""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc
from prometheus_client.parser import text_string_to_metric_families

from client import tensor_request
from tests.edges.test_http import http, url
from tests.support.kit import DaemonThread, encode, running_daemon, write_model

pytestmark = pytest.mark.timeout(180)
MANIFEST = {"model_args": {"width": 8}, "input": {"color": "L", "size": 8, "resize": 8}, "top_k": 2}
PIXELS = np.arange(64, dtype=np.uint8).reshape(8, 8)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    root = tmp_path_factory.mktemp("models")
    cached = write_model(root, "cached", manifest={**MANIFEST, "cache": {"enabled": True}})
    (cached.parent / "labels.zh.txt").write_text("甲\n乙\n丙\n丁\n", encoding="utf-8")
    write_model(root, "plain", manifest=MANIFEST)
    with running_daemon(root, watch=False, http_port=0, metrics_port=0, reload_min_interval_s=0.0) as running:
        yield running


@pytest.fixture
def stub(daemon: DaemonThread) -> Iterator[pb_grpc.ClassifierStub]:
    with grpc.insecure_channel(daemon.target) as channel:
        yield pb_grpc.ClassifierStub(channel)


def classify(stub: pb_grpc.ClassifierStub, pixels: np.ndarray = PIXELS, **options: object) -> pb.ClassifyResponse:
    return stub.Classify(tensor_request(pixels, model=str(options.pop("model", "cached")), **options), timeout=30)


def answer(response: pb.ClassifyResponse) -> tuple[object, ...]:
    return (response.model, response.version, response.lang, response.batch_size,
            [(p.index, p.label, p.score) for p in response.predictions])


def fresh_pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)


def test_a_repeated_request_is_answered_from_the_cache_with_the_same_answer(
        stub: pb_grpc.ClassifierStub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="classifyd.requests")
    pixels = fresh_pixels(1)
    first = classify(stub, pixels)
    second = classify(stub, pixels, request_id="again")
    assert not first.cache_hit and second.cache_hit
    assert answer(second) == answer(first)
    assert (second.queue_us, second.compute_us, second.preprocess_us) == (0, 0, 0)
    (record,) = [r for r in caplog.records if getattr(r, "request_id", "") == "again"]
    assert record.cache_hit is True and "cache hit" in record.getMessage()  # type: ignore[attr-defined]


def test_every_option_that_changes_the_answer_misses(stub: pb_grpc.ClassifierStub) -> None:
    pixels = fresh_pixels(2)
    assert not classify(stub, pixels).cache_hit
    assert not classify(stub, pixels, top_k=3).cache_hit
    in_chinese = classify(stub, pixels, lang="zh")
    assert not in_chinese.cache_hit and in_chinese.lang == "zh"
    assert classify(stub, pixels, lang="zh-CN").cache_hit  # the same labels file answers: the same answer
    assert not classify(stub, pixels.reshape(4, 16)).cache_hit  # the same bytes in another shape
    assert not classify(stub, pixels.astype(np.float32) / 255).cache_hit
    assert classify(stub, pixels, top_k=3).cache_hit and classify(stub, pixels).cache_hit


def test_a_model_without_cache_enabled_is_always_computed(stub: pb_grpc.ClassifierStub) -> None:
    assert not any(classify(stub, model="plain").cache_hit for _ in range(3))


def test_http_and_oip_report_hits_too(daemon: DaemonThread) -> None:
    pixels = fresh_pixels(3)
    oip_body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [8, 8], "data": pixels.ravel().tolist()}]}
    first = http("POST", url(daemon, "/v2/models/cached/infer"), json=oip_body).json()
    second = http("POST", url(daemon, "/v2/models/cached/infer"), json=oip_body).json()
    assert "parameters" not in first and second["parameters"] == {"cache_hit": True}
    assert second["outputs"] == first["outputs"]
    with grpc.insecure_channel(daemon.target) as channel:
        request = oip.ModelInferRequest(model_name="cached")
        request.inputs.add(name="image", datatype="UINT8", shape=[8, 8])
        request.raw_input_contents.append(pixels.tobytes())
        response = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert response.parameters["cache_hit"].bool_param  # the same tensor from another edge: one key rule
    described = http("GET", url(daemon, "/v1/models/cached")).json()
    assert described["cache"]["hits"] >= 2 and described["cache"]["active"]
    assert "cache" not in http("GET", url(daemon, "/v1/models/plain")).json()


def test_v1_json_reports_cache_hit(daemon: DaemonThread) -> None:
    image = encode(fresh_pixels(4))
    replies = [http("POST", url(daemon, "/v1/models/cached/classify"), data=image,
                    headers={"Content-Type": "image/png"}).json() for _ in range(2)]
    assert [r["cache_hit"] for r in replies] == [False, True]
    assert replies[0]["predictions"] == replies[1]["predictions"]


def test_a_hot_swap_or_a_reload_never_serves_an_old_answer(daemon: DaemonThread, stub: pb_grpc.ClassifierStub,
                                                            tmp_path: Path) -> None:
    pixels = fresh_pixels(5)
    classify(stub, pixels)
    before = classify(stub, pixels)
    assert before.cache_hit
    # a new generation of the same version (the files re-read): its answers are its own
    stub.ReloadModel(pb.ReloadModelRequest(model="cached"), timeout=60)
    reloaded = classify(stub, pixels)
    assert not reloaded.cache_hit and reloaded.version == before.version
    # a new version
    models_dir = daemon.config.models.models_dir
    write_model(models_dir, "cached", version=before.version + 1, seed=7,
                manifest={**MANIFEST, "cache": {"enabled": True}})
    assert stub.ReloadModel(pb.ReloadModelRequest(model="cached"), timeout=60).serving_version == before.version + 1
    swapped = classify(stub, pixels)
    assert not swapped.cache_hit and swapped.version == before.version + 1
    assert classify(stub, pixels).cache_hit


def test_metrics_count_hits_misses_and_bytes(daemon: DaemonThread, stub: pb_grpc.ClassifierStub) -> None:
    before = scrape(daemon)
    pixels = fresh_pixels(6)
    for _ in range(3):
        classify(stub, pixels)
    after = scrape(daemon)
    lookups = "classifyd_cache_lookups_total"
    assert after[(lookups, "cached", "hit")] - before.get((lookups, "cached", "hit"), 0) == 2
    assert after[(lookups, "cached", "miss")] - before.get((lookups, "cached", "miss"), 0) == 1
    assert (lookups, "plain", "hit") not in after
    assert 0 < after[("classifyd_cache_bytes", "", "")] <= after[("classifyd_cache_budget_bytes", "", "")]
    assert after[("classifyd_cache_entries", "", "")] >= 1
    assert 0 < after[("classifyd_cache_hit_ratio", "cached", "")] < 1
    # still counted as requests, by the version that answered
    assert after[("classifyd_requests_total", "cached", "")] - before.get(("classifyd_requests_total", "cached", ""),
                                                                         0) == 3


def scrape(daemon: DaemonThread) -> dict[tuple[str, str, str], float]:
    """Samples by (name, model, result); requests summed over versions and codes."""
    assert daemon.daemon is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.daemon.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, s.labels.get("model", ""), s.labels.get("result", ""))
            samples[key] = samples.get(key, 0.0) + s.value
    return samples


def test_a_swap_while_a_large_payload_is_hashed_does_not_fail_the_request(tmp_path: Path) -> None:
    """The key of a payload of 64 KiB or more is hashed in a worker thread: the version must be leased before that
    hop, or a swap meanwhile releases it under the request (a request pinning version 1 then failed NOT_FOUND)."""
    root = tmp_path / "models"
    write_model(root, "swap", manifest={**MANIFEST, "cache": {"enabled": True}})
    image = encode(np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8))
    assert len(image) >= 64 * 1024
    with running_daemon(root, watch=False) as running, grpc.insecure_channel(running.target) as channel:
        assert running.daemon is not None
        manager, cache = running.daemon.manager, running.daemon.service.cache
        first = manager.resolve("swap")
        real_key = cache.key

        def key_after_a_swap(*args: object, **kwargs: object) -> bytes:  # runs in the worker thread
            write_model(root, "swap", version=2, manifest={**MANIFEST, "cache": {"enabled": True}}, seed=1)
            running.call(manager.reconcile("swap"))  # version 2 serves, version 1 is retired
            for _ in range(200):  # unleased, it is released now: wait for that rather than race it
                if first.leases or first.released:
                    break
                threading.Event().wait(0.05)
            return real_key(*args, **kwargs)  # type: ignore[arg-type]

        cache.key = key_after_a_swap  # type: ignore[method-assign]
        request = pb.ClassifyRequest(image=image, model="swap", version=1)
        response = pb_grpc.ClassifierStub(channel).Classify(request, timeout=30)
        assert response.version == 1 and response.predictions  # the pinned version, kept loaded for it
        assert manager.resolve("swap").version == 2
