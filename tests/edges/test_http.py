"""The HTTP edge end to end: a real daemon with --http-port 0, a real HTTP client (aiohttp), real model files."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from client import image_request, tensor_request
from tests.support.digits_data import held_out_digits, png_bytes
from tests.support.kit import GATE, REPO, DaemonThread, encode, local_config, running_daemon, write_model
from tests.support.repository import DIGIT_LABELS, build_test_repository

pytestmark = pytest.mark.timeout(180)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


HTTP_TIMEOUT = aiohttp.ClientTimeout(total=60)
"""Generous, but a request the daemon never answers fails the test instead of hanging it (it did under load)."""


async def _send(method: str, url: str, **kwargs: Any) -> Reply:
    async with (aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session,
                session.request(method, url, **kwargs) as response):
        return Reply(response.status, dict(response.headers), await response.read())


def http(method: str, url: str, **kwargs: Any) -> Reply:
    """One blocking HTTP request (the test thread is not the daemon's loop)."""
    return asyncio.run(_send(method, url, **kwargs))


def form(image: bytes, **fields: Any) -> aiohttp.FormData:
    """What ``curl -F image=@digit.png -F top_k=3`` sends."""
    data = aiohttp.FormData()
    data.add_field("image", image, filename="digit.png", content_type="image/png")
    for name, value in fields.items():
        data.add_field(name, str(value))
    return data


def url(daemon: DaemonThread, path: str) -> str:
    assert daemon.daemon is not None
    return f"http://127.0.0.1:{daemon.daemon.http_port}{path}"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


def queue_depth(daemon: DaemonThread, model: str) -> int:
    return int(http("GET", url(daemon, f"/v1/models/{model}")).json()["queue_depth"])


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    root = build_test_repository(tmp_path_factory.mktemp("models"))
    with running_daemon(root, http_port=0) as running:
        yield running


DIGIT = png_bytes(held_out_digits()[0][-1])
BLANK = png_bytes(np.zeros((8, 8), np.uint8))


def test_multipart_raw_and_json_bodies_answer_like_grpc_with_utf8_labels(web: DaemonThread) -> None:
    with grpc.insecure_channel(web.target) as channel:
        expected = pb_grpc.ClassifierStub(channel).Classify(image_request(DIGIT), timeout=20)
    replies = {
        "multipart": http("POST", url(web, "/v1/classify"), data=form(DIGIT)),
        "raw png": http("POST", url(web, "/v1/classify"), data=DIGIT, headers={"Content-Type": "image/png"}),
        "octet-stream": http("POST", url(web, "/v1/models/digits/classify"), data=DIGIT,
                             headers={"Content-Type": "application/octet-stream"}),
        "json": http("POST", url(web, "/v1/classify"), json={"image_b64": base64.b64encode(DIGIT).decode()}),
    }
    for kind, reply in replies.items():
        assert reply.status == 200, (kind, reply.body)
        assert reply.headers["Content-Type"] == "application/json; charset=utf-8"
        body = reply.json()
        assert (body["model"], body["version"], body["batch_size"]) == ("digits", 1, 1)
        assert [(p["index"], p["label"]) for p in body["predictions"]] == \
            [(p.index, p.label) for p in expected.predictions]
        np.testing.assert_allclose([p["score"] for p in body["predictions"]],
                                   [p.score for p in expected.predictions], rtol=1e-5)
        top = body["predictions"][0]["label"]
        assert top in DIGIT_LABELS
        assert top.encode("utf-8") in reply.body and b"\\u" not in reply.body  # UTF-8, not escaped
        assert body["queue_us"] >= 0 and body["compute_us"] > 0 and body["preprocess_us"] > 0


def test_fields_from_query_form_and_json(web: DaemonThread) -> None:
    raw = http("POST", url(web, "/v1/classify?top_k=5&version=1&request_id=q1&lang=zh"), data=DIGIT,
               headers={"Content-Type": "image/png"}).json()
    assert len(raw["predictions"]) == 5 and raw["request_id"] == "q1" and raw["version"] == 1
    multipart = http("POST", url(web, "/v1/models/digits/classify"), data=form(DIGIT, top_k=10, lang="en")).json()
    assert sorted(p["label"] for p in multipart["predictions"]) == sorted(DIGIT_LABELS)
    scores = [p["score"] for p in multipart["predictions"]]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-4)
    as_json = http("POST", url(web, "/v1/classify?top_k=9"), json={
        "image_b64": "data:image/png;base64," + base64.b64encode(DIGIT).decode(), "top_k": 2, "version": 0,
        "request_id": "j1"}).json()
    assert len(as_json["predictions"]) == 2 and as_json["request_id"] == "j1"  # the body overrides the query
    header_id = http("POST", url(web, "/v1/classify"), data=form(DIGIT), headers={"X-Request-Id": "h1"}).json()
    assert header_id["request_id"] == "h1" and len(header_id["predictions"]) == 3  # the manifest's top_k


def test_held_out_digits_over_http_reach_95_percent(web: DaemonThread) -> None:
    images, truth = held_out_digits()

    async def classify_all() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            async def one(image: np.ndarray) -> dict[str, Any]:
                async with session.post(url(web, "/v1/classify"), data=form(png_bytes(image))) as response:
                    assert response.status == 200
                    return await response.json()
            return list(await asyncio.gather(*(one(i) for i in images)))

    answers = asyncio.run(classify_all())
    correct = [a["predictions"][0]["index"] == t for a, t in zip(answers, truth, strict=True)]
    assert np.mean(correct) >= 0.95
    assert all(a["predictions"][0]["label"] == DIGIT_LABELS[a["predictions"][0]["index"]] for a in answers)


def test_http_and_grpc_requests_are_batched_together(web: DaemonThread) -> None:
    pixels = np.zeros((8, 8), np.uint8)
    with grpc.insecure_channel(web.target) as channel, ThreadPoolExecutor(4) as pool:
        stub = pb_grpc.ClassifierStub(channel)
        GATE.close()
        try:
            blocker = stub.Classify.future(tensor_request(pixels, model="gated"), timeout=60)
            assert GATE.entered.acquire(timeout=20)  # one batch computes; the next requests queue behind it
            over_http = [pool.submit(http, "POST", url(web, "/v1/models/gated/classify"), data=BLANK,
                                     headers={"Content-Type": "image/png"}) for _ in range(2)]
            over_grpc = stub.Classify.future(tensor_request(pixels, model="gated"), timeout=60)
            wait_until(lambda: queue_depth(web, "gated") == 3, "3 requests queue for model gated")
        finally:
            GATE.open.set()
        assert blocker.result().batch_size == 1
        assert over_grpc.result().batch_size == 3
        assert [f.result().json()["batch_size"] for f in over_http] == [3, 3]


def _error(reply: Reply, status: int, code: str, words: str) -> None:
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert words in body["error"]["message"]


PNG = {"Content-Type": "image/png"}
BAD_REQUESTS = [
    (400, "INVALID_ARGUMENT", "cannot decode image", "POST", "/v1/classify", {"data": b"garbage", "headers": PNG}),
    (400, "INVALID_ARGUMENT", "empty image", "POST", "/v1/classify", {"data": b"", "headers": PNG}),
    (400, "INVALID_ARGUMENT", "top_k must be an integer, got 'abc'", "POST", "/v1/classify?top_k=abc",
     {"data": DIGIT, "headers": PNG}),
    (400, "INVALID_ARGUMENT", "top_k = 11 is larger than the 10 labels", "POST", "/v1/classify",
     {"json": {"image_b64": base64.b64encode(DIGIT).decode(), "top_k": 11}}),
    (400, "INVALID_ARGUMENT", "image_b64 is not valid base64", "POST", "/v1/classify", {"json": {"image_b64": "%%"}}),
    (400, "INVALID_ARGUMENT", "body is not valid JSON", "POST", "/v1/classify",
     {"data": b"{", "headers": {"Content-Type": "application/json"}}),
    (400, "INVALID_ARGUMENT", "unknown field(s) topk", "POST", "/v1/classify?topk=3", {"data": DIGIT, "headers": PNG}),
    (400, "INVALID_ARGUMENT", "no image", "POST", "/v1/classify",
     {"data": aiohttp.FormData({"top_k": "3"}, default_to_multipart=True)}),
    (415, "INVALID_ARGUMENT", "unsupported Content-Type 'text/plain'", "POST", "/v1/classify",
     {"data": DIGIT, "headers": {"Content-Type": "text/plain"}}),
    (404, "NOT_FOUND", "unknown model 'nope'", "POST", "/v1/models/nope/classify", {"data": DIGIT, "headers": PNG}),
    (404, "NOT_FOUND", "has no loaded version 7", "POST", "/v1/classify?version=7", {"data": DIGIT, "headers": PNG}),
    (404, "NOT_FOUND", "no such endpoint: GET /v1/nothing", "GET", "/v1/nothing", {}),
    (405, "UNIMPLEMENTED", "method GET is not allowed on /v1/classify", "GET", "/v1/classify", {}),
    (503, "UNAVAILABLE", "model broken: no version is ready", "POST", "/v1/models/broken/classify",
     {"data": DIGIT, "headers": PNG}),
]


@pytest.mark.parametrize(("status", "code", "words", "method", "path", "kwargs"), BAD_REQUESTS,
                         ids=[b[2] for b in BAD_REQUESTS])
def test_bad_requests_get_the_grpc_consistent_status_and_a_json_error(
        web: DaemonThread, status: int, code: str, words: str, method: str, path: str, kwargs: dict[str, Any]) -> None:
    reply = http(method, url(web, path), **kwargs)
    _error(reply, status, code, words)
    assert ("Retry-After" in reply.headers) == (status == 503)
    assert http("POST", url(web, "/v1/classify"), data=form(DIGIT)).status == 200


@contextmanager
def computing(pool: ThreadPoolExecutor, target: str) -> Iterator[Future[Reply]]:
    """A request to a gated model, held in its forward pass until the block ends (the gate then opens)."""
    GATE.close()
    try:
        blocker = pool.submit(http, "POST", target, data=BLANK, headers=PNG)
        assert GATE.entered.acquire(timeout=20)
        yield blocker
    finally:
        GATE.open.set()


def test_timeout_passed_while_queued_is_504(web: DaemonThread) -> None:
    gated = url(web, "/v1/models/gated/classify")
    with ThreadPoolExecutor(1) as pool:
        with computing(pool, gated) as blocker:
            started = time.monotonic()
            late = http("POST", gated + "?timeout_ms=300", data=BLANK, headers=PNG)
            waited = time.monotonic() - started
        _error(late, 504, "DEADLINE_EXCEEDED", "timeout of 300 ms passed")
        assert waited < 15  # answered at its timeout, not when the gate opened
        assert blocker.result().status == 200
    _error(http("POST", gated + "?timeout_ms=-1", data=BLANK, headers=PNG), 400, "INVALID_ARGUMENT", "timeout_ms")


def test_full_queue_is_429_with_retry_after(web: DaemonThread) -> None:
    narrow = url(web, "/v1/models/narrow/classify")
    queued: list[Future[Reply]] = []
    with ThreadPoolExecutor(8) as pool:
        with computing(pool, narrow) as blocker:
            rejected = None
            while rejected is None:  # an earlier request may still be preprocessing, so the queue fills a bit later
                reply = pool.submit(http, "POST", narrow, data=BLANK, headers=PNG)
                try:
                    rejected = reply.result(timeout=2)
                except TimeoutError:
                    queued.append(reply)
                    assert len(queued) <= 4
        _error(rejected, 429, "RESOURCE_EXHAUSTED", "max_queue=2")
        assert rejected.headers["Retry-After"] == "1"
        assert blocker.result().status == 200 and all(f.result().status == 200 for f in queued)


def test_body_and_pixel_limits_are_the_grpc_limits(tmp_path: Path) -> None:
    shutil.copytree(REPO / "models" / "digits", tmp_path / "digits")
    big = encode(np.zeros((40, 40), np.uint8))  # 1,600 pixels, a few hundred bytes
    with running_daemon(tmp_path, http_port=0, max_message_bytes=4096, max_pixels=1000, watch=False) as limited:
        too_long = bytes(5000)
        _error(http("POST", url(limited, "/v1/classify"), data=too_long, headers=PNG), 413, "RESOURCE_EXHAUSTED",
               "exceeds the limit of 4096 bytes")
        _error(http("POST", url(limited, "/v1/classify"), data=form(too_long)), 413, "RESOURCE_EXHAUSTED",
               "exceeds the limit of 4096 bytes")
        _error(http("POST", url(limited, "/v1/classify"), data=big, headers=PNG), 400, "INVALID_ARGUMENT",
               "exceeds the limit of 1000 pixels")
        assert http("POST", url(limited, "/v1/classify"), data=DIGIT, headers=PNG).status == 200
    with running_daemon(tmp_path, watch=False) as grpc_only:
        assert grpc_only.daemon is not None and grpc_only.daemon.http is None


def test_status_json_counts_grpc_and_http_requests_and_lists_events(web: DaemonThread) -> None:
    def wide() -> dict[str, Any]:
        models = {m["name"]: m for m in http("GET", url(web, "/status.json")).json()["models"]}
        return models["wide"]

    before = wide()["stats"]["requests"]
    image = encode(np.zeros((64, 64, 3), np.uint8))
    with grpc.insecure_channel(web.target) as channel:
        pb_grpc.ClassifierStub(channel).Classify(image_request(image, model="wide"), timeout=20)
    assert http("POST", url(web, "/v1/models/wide/classify"), data=image, headers=PNG).status == 200
    after = wide()
    assert after["stats"]["requests"] == before + 2
    assert after["stats"]["latency_ms"]["p50"] > 0 and after["stats"]["batch_sizes"]["1"] >= 2
    assert list(after["stats"]["batch_sizes"])[-1] == "9-16"  # every bucket up to max_batch_size 16
    assert (after["serving_version"], after["max_batch_size"], after["input"]["width"]) == (1, 16, 64)

    status = http("GET", url(web, "/status.json")).json()
    assert status["server"]["default_model"] == "digits"
    assert status["server"]["http_port"] == web.daemon.http_port and status["server"]["grpc_port"] == web.port
    events = {(e["model"], e["version"], e["kind"]): e for e in status["events"]}
    assert events[("digits", 1, "READY")]["serving"] is True
    assert "cannot read weights" in events[("broken", 1, "FAILED")]["reason"]
    broken = next(m for m in status["models"] if m["name"] == "broken")
    assert broken["versions"][0]["state"] == "FAILED" and "cannot read weights" in broken["versions"][0]["error"]
    listed = http("GET", url(web, "/v1/models")).json()["models"]
    assert [m["name"] for m in listed] == sorted(m["name"] for m in listed)
    assert http("GET", url(web, "/v1/models/digits")).json()["default"] is True


def test_stop_finishes_http_requests_in_flight_and_refuses_new_ones(tmp_path: Path) -> None:
    write_model(tmp_path, "gated", architecture="classifyd:test_gated",
                manifest={"input": {"color": "L", "size": 8, "resize": 8}})
    running = DaemonThread(local_config(tmp_path, http_port=0, watch=False)).start()
    stopper = threading.Thread(target=running.stop)

    def refused() -> bool:
        try:
            return http("POST", url(running, "/v1/classify"), data=BLANK, headers=PNG).status == 503
        except aiohttp.ClientConnectionError:
            return True

    with ThreadPoolExecutor(1) as pool:
        with computing(pool, url(running, "/v1/classify")) as in_flight:
            stopper.start()
            wait_until(refused, "new requests are refused")
        assert in_flight.result().status == 200
    stopper.join(60)


def test_oip_errors_use_the_protocols_body_and_the_same_codes(web: DaemonThread) -> None:
    cases = [
        (400, "INVALID_ARGUMENT", "body is not valid JSON", "/v2/models/digits/infer", {"data": b"{"}),
        (400, "INVALID_ARGUMENT", "expected exactly one input tensor", "/v2/models/digits/infer", {"json": {}}),
        (400, "INVALID_ARGUMENT", "needs 64 bytes, got 3", "/v2/models/digits/infer",
         {"json": {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [8, 8], "data": [1, 2, 3]}]}}),
        (400, "INVALID_ARGUMENT", "model_version must be a version number", "/v2/models/digits/versions/x/infer",
         {"json": {}}),
        (404, "NOT_FOUND", "unknown model 'nope'", "/v2/models/nope/infer",
         {"json": {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [8, 8], "data": [0] * 64}]}}),
    ]
    for status, code, words, path, kwargs in cases:
        reply = http("POST", url(web, path), **kwargs)
        assert reply.status == status, reply.body
        assert reply.json()["code"] == code and words in reply.json()["error"], reply.body
    nested = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 1],
                          "data": held_out_digits()[0][-1][None, :, :, None].tolist()}],
              "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}], "id": "x"}
    answer = http("POST", url(web, "/v2/models/digits/infer"), json=nested)
    assert answer.status == 200 and "八".encode() in answer.body
    body = answer.json()
    assert body["id"] == "x" and body["outputs"][0]["shape"] == [1, 2] and body["outputs"][0]["datatype"] == "BYTES"
    assert body["outputs"][0]["data"][0].endswith(":8:八")


def test_lang_and_return_tiles_reach_the_service(tmp_path: Path) -> None:
    labels = ["猫", "狗", "鸟", "鱼"]
    write_model(tmp_path, "pets", labels=labels, manifest={
        "input": {"color": "L", "size": 8, "resize": 8}, "batching": {"max_batch_size": 8},
        "tiling": {"tile": 16, "stride": 16, "reduce": "max"}})
    (tmp_path / "pets" / "labels.en.txt").write_text("cat\ndog\nbird\nfish\n", encoding="utf-8")
    image = encode(np.zeros((32, 32), np.uint8))
    with running_daemon(tmp_path, http_port=0) as daemon:
        english = http("POST", url(daemon, "/v1/models/pets/classify?lang=en&top_k=4"), data=form(image)).json()
        assert english["lang"] == "en"
        assert {p["label"] for p in english["predictions"]} == {"cat", "dog", "bird", "fish"}
        tiled = http("POST", url(daemon, "/v1/models/pets/classify"),
                     json={"image_b64": base64.b64encode(image).decode(), "return_tiles": True}).json()
        assert tiled["tile_count"] == 4 and len(tiled["tiles"]) == 4
        assert {(t["x"], t["y"], t["width"], t["height"]) for t in tiled["tiles"]} == \
            {(0, 0, 16, 16), (16, 0, 16, 16), (0, 16, 16, 16), (16, 16, 16, 16)}
        assert all(p["label"] in labels for p in tiled["predictions"])
        bad = http("POST", url(daemon, "/v1/models/pets/classify?return_tiles=maybe"), data=form(image))
        assert bad.status == 400 and "return_tiles" in bad.json()["error"]["message"]
