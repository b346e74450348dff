"""The memory budget (--max-loaded-bytes) and loads on demand (--lazy-load) end to end: a real daemon over real
tiny models whose parameters dominate their measured size, classifier.v1 clients, /metrics scraped."""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.http as triton_http
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from client import tensor_request
from client.__main__ import main as client_main
from server.core.errors import DeadlineExpired
from server.core.lifecycle import EventKind, ModelEvent
from server.core.types import ClassifyCall, RawTensor
from server.models.loader.architectures import SmallCNN
from server.models.memory import parameter_bytes
from server.models.memory_budget import REFUSED_RETRY_S
from tests.support.kit import DaemonThread, running_daemon, write_model

pytestmark = pytest.mark.timeout(300)

LABELS = [f"class{i}" for i in range(100_000)]  # a 128 x 100000 last layer: 51 MB, one allocation the heap returns
INPUT = {"color": "L", "size": 8, "resize": 8}
BIG = {"model_args": {"width": 64}, "input": INPUT, "batching": {"max_batch_size": 4}}
TINY = {"model_args": {"width": 4}, "input": INPUT, "batching": {"max_batch_size": 4}}
PIXELS = np.arange(64, dtype=np.uint8).reshape(8, 8)
PARAMS = parameter_bytes(SmallCNN(len(LABELS), 1, 64))
# Three never fit: a size is never below its parameters. Two do: the growth beyond them (labels, warm-up, the
# process's first load) measures 10-15 MB here, under the 0.47 x PARAMS (25 MB) this leaves.
BUDGET = int(PARAMS * 2.95)


def classify(stub: pb_grpc.ClassifierStub, model: str) -> pb.ClassifyResponse:
    return stub.Classify(tensor_request(PIXELS, model=model, top_k=1), timeout=60)


def ready_models(stub: pb_grpc.ClassifierStub) -> dict[str, int]:
    """Per model with a READY version: the ModelInfo's loaded_bytes."""
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    return {m.name: m.loaded_bytes for m in listed if any(v.state == pb.VersionInfo.READY for v in m.versions)}


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class Watch:
    """Polls ListModels in a thread while requests run: the most models READY at once, and the models ever seen
    not READY."""

    def __init__(self, stub: pb_grpc.ClassifierStub) -> None:
        self._stub = stub
        self.most = 0
        self.unready: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            ready = ready_models(self._stub)
            self.most = max(self.most, len(ready))
            self.unready |= {"a", "b", "c"} - set(ready)
            time.sleep(0.005)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def budgeted(tmp_path: Path) -> Iterator[tuple[DaemonThread, pb_grpc.ClassifierStub, list[ModelEvent]]]:
    """Three big models (``a`` with keep_loaded = true) under a budget that fits two; poll mode, lazy loads."""
    root = tmp_path / "models"
    root.mkdir()
    write_model(root, "a", labels=LABELS, manifest={**BIG, "keep_loaded": True}, seed=1)
    write_model(root, "b", labels=LABELS, manifest=BIG, seed=2)
    write_model(root, "c", labels=LABELS, manifest=BIG, seed=3)
    with running_daemon(root, watch=False, max_loaded_bytes=BUDGET, lazy_load=True, metrics_port=0) as daemon:
        events: list[ModelEvent] = []
        assert daemon.daemon is not None
        daemon.daemon.manager.add_listener(events.append)
        with grpc.insecure_channel(daemon.target) as channel:
            yield daemon, pb_grpc.ClassifierStub(channel), events


def test_round_robin_over_three_models_keeps_two_loaded(
        budgeted: tuple[DaemonThread, pb_grpc.ClassifierStub, list[ModelEvent]]) -> None:
    daemon, stub, events = budgeted
    assert daemon.daemon is not None
    loaded = ready_models(stub)
    assert len(loaded) == 2 and "a" in loaded  # the start-up loads evicted one; never the keep_loaded one
    assert all(size >= PARAMS for size in loaded.values())
    with Watch(stub) as watch:
        answers = [(name, classify(stub, name)) for _ in range(3) for name in ("a", "b", "c")]
    assert [answer.model for _, answer in answers] == ["a", "b", "c"] * 3  # every request succeeded
    assert watch.most == 2  # at most two loaded at any time
    assert "a" not in watch.unready  # keep_loaded: never evicted
    assert not any(answer.cold_start for name, answer in answers if name == "a")
    assert all(answer.cold_start for name, answer in answers[3:] if name != "a")  # b and c take turns
    assert not classify(stub, "c").cold_start  # loaded now: no cold start
    metrics = scrape(daemon.daemon.metrics_port or 0)
    evicted = {m: metrics.get(("classifyd_model_evictions_total", frozenset({("model", m)})), 0.0) for m in "abc"}
    assert evicted["a"] == 0 and evicted["b"] + evicted["c"] >= 6
    assert metrics[("classifyd_max_loaded_bytes", frozenset())] == BUDGET
    assert metrics[("classifyd_model_loaded_bytes", frozenset({("model", "c"), ("version", "1")}))] >= PARAMS
    unloads = [e for e in events if e.kind is EventKind.UNLOADED]
    assert unloads and all("evicted to make room" in e.reason for e in unloads)


def test_concurrent_requests_for_an_evicted_model_share_one_load(
        budgeted: tuple[DaemonThread, pb_grpc.ClassifierStub, list[ModelEvent]]) -> None:
    daemon, stub, events = budgeted
    evicted = ({"b", "c"} - set(ready_models(stub))).pop()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: classify(stub, evicted), range(4)))
    assert all(a.model == evicted and a.cold_start for a in answers)
    assert [e.kind for e in events if e.model == evicted].count(EventKind.LOADING) == 1
    # a load that outlasts the request's deadline: DEADLINE_EXCEEDED, and the load carries on
    assert daemon.daemon is not None
    other = ({"b", "c"} - {evicted}).pop()
    call = ClassifyCall(model=other, payload=RawTensor("uint8", (8, 8), PIXELS.tobytes()),
                        deadline=time.monotonic() + 0.001)
    with pytest.raises(DeadlineExpired, match="load on demand"):
        daemon.call(daemon.daemon.service.classify(call))


def test_a_model_larger_than_the_budget_fails_its_load_and_the_others_serve(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "models"
    root.mkdir()
    write_model(root, "big", labels=LABELS, manifest=BIG)
    write_model(root, "tiny", manifest=TINY)
    budget = PARAMS // 2
    with running_daemon(root, watch=False, model_control="explicit", lazy_load=True, http_port=0,
                        max_loaded_bytes=budget) as daemon, grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        assert daemon.daemon is not None
        oip = triton_http.InferenceServerClient(f"127.0.0.1:{daemon.daemon.http_port}")
        tensor = triton_http.InferInput("image", [1, 8, 8, 1], "UINT8")
        tensor.set_data_from_numpy(PIXELS[None, :, :, None], binary_data=True)
        caplog.set_level(logging.INFO, logger="classifyd.models")
        caplog.set_level(logging.DEBUG, logger="classifyd.requests")  # last: the handler's level
        first = oip.infer("tiny", [tensor]).get_response()  # explicit mode: a lazy load is an implicit LoadModel
        assert first["parameters"] == {"cold_start": True}
        (logged,) = [r for r in caplog.records if r.name == "classifyd.requests"]
        assert logged.cold_start is True and "cold start" in logged.getMessage()  # type: ignore[attr-defined]
        assert not classify(stub, "tiny").cold_start
        with pytest.raises(grpc.RpcError) as failed:
            stub.LoadModel(pb.LoadModelRequest(model="big"), timeout=60)
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        message = failed.value.details() or ""
        assert f"--max-loaded-bytes {budget}" in message and "tiny version 1" in message
        assert classify(stub, "tiny").predictions  # the others keep serving
        builds = len([r for r in caplog.records if r.getMessage().startswith("model big version 1 holds")])
        assert builds == 1
        with pytest.raises(grpc.RpcError) as lazy:  # no load per request: the refusal stands until things change
            classify(stub, "big")
        assert lazy.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "refused for want of room" in (lazy.value.details() or "")
        budget_of = daemon.daemon.budget
        now = budget_of._clock()
        budget_of._clock = lambda: now + REFUSED_RETRY_S  # time passed: a request tries again; its size is known
        with pytest.raises(grpc.RpcError) as retried:  # now, so it is refused before anything is built
            classify(stub, "big")
        assert "could not be loaded on demand" in (retried.value.details() or "")
        assert "when it last loaded" in (retried.value.details() or "") and "when it last loaded" not in message
        assert builds == len([r for r in caplog.records if r.getMessage().startswith("model big version 1 holds")])
        assert client_main(["--target", daemon.target, "models"]) == 0
        listed = capsys.readouterr().out
        assert "loaded_bytes" in listed and "--max-loaded-bytes" in listed  # tiny's size; big's FAILED reason


def test_a_model_whose_requests_wait_on_its_load_is_not_evicted(
        budgeted: tuple[DaemonThread, pb_grpc.ClassifierStub, list[ModelEvent]]) -> None:
    """Requests whose load on demand just finished pin their model until they hold its version: the next queued
    load cannot evict it from under them."""
    daemon, stub, _ = budgeted
    assert daemon.daemon is not None
    budget = daemon.daemon.budget
    loaded = ({"b", "c"} & set(ready_models(stub))).pop()

    async def victims() -> tuple[str | None, str | None]:
        first = budget._victim("other")
        budget._waiting[loaded] += 1
        try:
            pinned = budget._victim("other")
        finally:
            del budget._waiting[loaded]
        return (first.name if first else None), (pinned.name if pinned else None)

    assert daemon.call(victims()) == (loaded, None)


@pytest.mark.cuda
def test_on_a_gpu_a_version_holds_its_device_memory(tmp_path: Path) -> None:
    """On CUDA the size is the growth of torch.cuda.memory_allocated during the load: the parameters at least, and
    the budget counts it (a budget below one model fails its load)."""
    root = tmp_path / "models"
    root.mkdir()
    write_model(root, "a", labels=LABELS, manifest=BIG)
    with running_daemon(root, watch=False, device="cuda", max_loaded_bytes=BUDGET) as daemon, \
            grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        size = ready_models(stub)["a"]
        assert PARAMS <= size < PARAMS * 2  # device memory: no labels, no host allocator in it
        assert classify(stub, "a").model == "a"
    with running_daemon(root, watch=False, device="cuda", max_loaded_bytes=PARAMS // 2) as daemon, \
            grpc.insecure_channel(daemon.target) as channel:
        info = pb_grpc.ClassifierStub(channel).GetModel(pb.GetModelRequest(model="a"), timeout=10)
        assert "--max-loaded-bytes" in info.versions[0].error and info.loaded_bytes == 0
