"""Hot swap from the watched model directory: real files in a temp dir, a real daemon, real clients."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from client import tensor_request
from server.models.loader.architectures import SmallCNN
from tests.support.kit import GATE, DaemonThread, running_daemon, to_toml, write_model

pytestmark = pytest.mark.timeout(300)

SETTLE_S = 0.5
LABELS = ["甲", "乙", "丙", "丁"]
MANIFEST = {"architecture": "classifyd:small_cnn", "model_args": {"width": 8},
            "input": {"color": "L", "size": 8, "resize": 8}, "batching": {"max_batch_size": 8}}
INPUT = tensor_request(np.arange(64, dtype=np.uint8).reshape(8, 8), model="swap", top_k=1)


def biased_module(winner: int, num_classes: int = 4) -> torch.nn.Module:
    """A model that predicts class ``winner`` for every input (its last layer is a pure bias)."""
    torch.manual_seed(winner)
    module = SmallCNN(num_classes=num_classes, in_channels=1, width=8)
    linear = module.classifier[2]
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.nn.functional.one_hot(torch.tensor(winner), num_classes).float() * 6)
    return module


def weights_bytes(module: torch.nn.Module, tmp: Path) -> bytes:
    path = tmp / f"w{id(module)}.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path.read_bytes()


class Publisher:
    """Publishes versions of model ``swap`` the ways users do."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir

    def by_rename(self, version: int, weights: bytes, extra: dict[str, str] | None = None) -> float:
        staging = self.model_dir / f".staging-{version}"
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(weights)
        for name, text in (extra or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        staging.rename(self.model_dir / str(version))
        return time.monotonic()

    def by_slow_copy(self, version: int, weights: bytes) -> float:
        target = self.model_dir / str(version)
        target.mkdir()
        half = len(weights) // 2
        with (target / "model.safetensors").open("wb") as handle:
            handle.write(weights[:half])
            handle.flush()
            os.fsync(handle.fileno())
            time.sleep(SETTLE_S * 0.7)  # longer than half the settle period: must not be loaded half-written
            handle.write(weights[half:])
        return time.monotonic()


class Clients:
    """Threads that classify continuously and record every outcome."""

    def __init__(self, target: str, count: int = 4) -> None:
        self.responses: list[pb.ClassifyResponse] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(target)
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(count)]

    def _loop(self) -> None:
        stub = pb_grpc.ClassifierStub(self._channel)
        while not self._stop.is_set():
            try:
                self.responses.append(stub.Classify(INPUT, timeout=30))
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        self._channel.close()


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> float:
    """Poll ``condition`` until true; returns the time it became true (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def model(stub: pb_grpc.ClassifierStub, name: str = "swap") -> pb.ModelInfo:
    return stub.GetModel(pb.GetModelRequest(model=name), timeout=10)


def state_of(info: pb.ModelInfo, version: int) -> int | None:
    return next((v.state for v in info.versions if v.version == version), None)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    write_model(root, "swap", labels=LABELS, manifest=MANIFEST, module=biased_module(0))
    return root


@pytest.fixture
def daemon(repo: Path) -> Iterator[DaemonThread]:
    with running_daemon(repo, settle_s=SETTLE_S) as running:
        yield running


@pytest.mark.slow
def test_torture_twenty_publishes_zero_failures_and_every_response_matches_its_version(
    repo: Path, daemon: DaemonThread, tmp_path: Path
) -> None:
    weights = {0: weights_bytes(biased_module(0), tmp_path), 1: weights_bytes(biased_module(1), tmp_path)}
    mismatch = {"model.toml": to_toml({**MANIFEST, "num_classes": 5}), "labels.txt": "\n".join([*LABELS, "戊"])}
    publisher = Publisher(repo / "swap")
    winner_of = {1: 0}
    bad_versions = {7: "corrupt", 13: "mismatch"}
    with grpc.insecure_channel(daemon.target) as channel, Clients(daemon.target) as clients:
        stub = pb_grpc.ClassifierStub(channel)
        events = stub.WatchModels(pb.WatchModelsRequest(model="swap"))
        failed_events: list[int] = []
        watcher = threading.Thread(target=lambda: failed_events.extend(
            e.version for e in _until_cancelled(events) if e.kind == pb.ModelEvent.FAILED), daemon=True)
        watcher.start()
        serving = 1
        for version in range(2, 22):
            if bad_versions.get(version) == "corrupt":
                publisher.by_rename(version, b"\x00garbage, not safetensors" * 100)
            elif bad_versions.get(version) == "mismatch":
                publisher.by_rename(version, weights[version % 2], mismatch)
            else:
                winner_of[version] = version % 2
                publish = publisher.by_slow_copy if version % 3 == 0 else publisher.by_rename
                publish(version, weights[version % 2])
                # a hang detector, not a speed check (docs/benchmarks.md#benchmarksswap_benchpy-hot-swap-under-load)
                wait_for(lambda v=version: model(stub).serving_version == v)
                serving = version
                continue
            wait_for(lambda v=version: state_of(model(stub), v) == pb.VersionInfo.FAILED)
            assert model(stub).serving_version == serving
        time.sleep(0.3)
        events.cancel()
        watcher.join(10)
    assert sorted(failed_events) == sorted(bad_versions)  # no good version was ever tried half-written
    assert clients.failures == []
    assert len(clients.responses) > 100
    served = {r.version for r in clients.responses}
    assert served.isdisjoint(bad_versions)
    assert len(served) >= 10
    for response in clients.responses:
        assert response.predictions[0].index == winner_of[response.version], response
        assert response.predictions[0].label == LABELS[winner_of[response.version]]
    info = model(stub_for(daemon))
    errors = {v.version: v.error for v in info.versions if v.state == pb.VersionInfo.FAILED}
    assert "cannot read weights" in errors[7]
    assert "shape" in errors[13] and "classifier.2" in errors[13]
    assert [v.version for v in info.versions if v.state == pb.VersionInfo.READY] == [21]


def _until_cancelled(events: Iterator[pb.ModelEvent]) -> Iterator[pb.ModelEvent]:
    try:
        yield from events
    except grpc.RpcError as exc:
        if exc.code() is not grpc.StatusCode.CANCELLED:
            raise


def stub_for(daemon: DaemonThread) -> pb_grpc.ClassifierStub:
    return pb_grpc.ClassifierStub(grpc.insecure_channel(daemon.target))


def test_failed_load_then_good_version_goes_live(repo: Path, daemon: DaemonThread, tmp_path: Path) -> None:
    stub = stub_for(daemon)
    publisher = Publisher(repo / "swap")
    publisher.by_rename(2, b"broken")
    wait_for(lambda: state_of(model(stub), 2) == pb.VersionInfo.FAILED)
    assert stub.Classify(INPUT, timeout=10).version == 1
    # The same version directory fixed in place is picked up too.
    (repo / "swap" / "2" / "model.safetensors").write_bytes(weights_bytes(biased_module(1), tmp_path))
    wait_for(lambda: model(stub).serving_version == 2)
    assert stub.Classify(INPUT, timeout=10).predictions[0].index == 1
    publisher.by_rename(3, weights_bytes(biased_module(0), tmp_path))
    wait_for(lambda: model(stub).serving_version == 3)


def test_changed_weights_of_a_version_reload_as_a_new_generation(repo: Path, daemon: DaemonThread,
                                                                  tmp_path: Path) -> None:
    stub = stub_for(daemon)
    assert model(stub).versions[0].generation == 1
    (repo / "swap" / "1" / "model.safetensors").write_bytes(weights_bytes(biased_module(2), tmp_path))
    wait_for(lambda: model(stub).versions[0].generation == 2)
    assert stub.Classify(INPUT, timeout=10).predictions[0].index == 2
    info = stub.ReloadModel(pb.ReloadModelRequest(model="swap"), timeout=30)
    assert info.versions[0].generation == 3 and info.serving_version == 1


def test_removing_a_model_unloads_it_after_in_flight_requests_finish(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    write_model(root, "gone", architecture="classifyd:test_gated",
                manifest={"input": {"color": "L", "size": 8, "resize": 8}, "batching": {"max_batch_size": 2}})
    request = tensor_request(np.zeros((8, 8), np.uint8), model="gone")
    with running_daemon(root, settle_s=SETTLE_S) as daemon, grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        events = stub.WatchModels(pb.WatchModelsRequest(model="gone"))
        GATE.close()
        try:
            in_flight = [stub.Classify.future(request, timeout=60) for _ in range(6)]
            assert GATE.entered.acquire(timeout=20)
            shutil.rmtree(root / "gone")
            wait_for(lambda: "gone" not in {m.name for m in stub.ListModels(pb.ListModelsRequest()).models})
            with pytest.raises(grpc.RpcError) as caught:
                stub.Classify(request, timeout=10)
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        finally:
            GATE.open.set()
        assert all(f.result().predictions for f in in_flight)
        kinds = []
        for event in events:
            kinds.append(event.kind)
            if event.kind == pb.ModelEvent.UNLOADED:
                assert event.reason == "model directory removed; no version serves now" and not event.serving
                break
        events.cancel()
        assert pb.ModelEvent.UNLOADED in kinds


def test_a_new_model_directory_is_served_without_restart(repo: Path, daemon: DaemonThread, tmp_path: Path) -> None:
    stub = stub_for(daemon)
    staging = tmp_path / "staging"
    write_model(staging, "fresh", labels=["是", "否"], manifest=MANIFEST)
    shutil.move(staging / "fresh", repo / "fresh")
    request = tensor_request(np.zeros((8, 8), np.uint8), model="fresh")
    wait_for(lambda: model(stub, "fresh").serving_version == 1 if "fresh" in
             {m.name for m in stub.ListModels(pb.ListModelsRequest()).models} else False)
    assert stub.Classify(request, timeout=10).predictions[0].label in {"是", "否"}


def test_watch_models_reports_a_swap(repo: Path, daemon: DaemonThread, tmp_path: Path) -> None:
    stub = stub_for(daemon)
    events = stub.WatchModels(pb.WatchModelsRequest(model="swap", include_current=True))
    first = next(events)
    assert (first.version, first.kind, first.serving) == (1, pb.ModelEvent.READY, True)
    Publisher(repo / "swap").by_rename(2, weights_bytes(biased_module(1), tmp_path))
    seen = []
    for event in events:
        seen.append((event.version, pb.ModelEvent.Kind.Name(event.kind), event.serving))
        if event.kind == pb.ModelEvent.UNLOADED:
            break
    events.cancel()
    assert seen == [(2, "LOADING", False), (2, "READY", True), (1, "UNLOADED", False)]


def test_keep_versions_allows_pinning_an_older_version(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    write_model(root, "swap", labels=LABELS, manifest={**MANIFEST, "keep_versions": 2}, module=biased_module(0))
    write_model(root, "swap", version=2, labels=LABELS, manifest={**MANIFEST, "keep_versions": 2},
                module=biased_module(1))
    with running_daemon(root, settle_s=SETTLE_S) as daemon:
        stub = stub_for(daemon)
        assert stub.Classify(INPUT, timeout=10).version == 2
        pinned = pb.ClassifyRequest()
        pinned.CopyFrom(INPUT)
        pinned.version = 1
        response = stub.Classify(pinned, timeout=10)
        assert (response.version, response.predictions[0].index) == (1, 0)
        pinned.version = 9
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(pinned, timeout=10)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        assert "no loaded version 9" in caught.value.details()


def test_validation_samples_gate_a_version(repo: Path, daemon: DaemonThread, tmp_path: Path) -> None:
    stub = stub_for(daemon)
    sample = (tmp_path / "s.png")
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(sample)
    manifest = to_toml({**MANIFEST, "min_accuracy": 0.9})
    for version, winner, folder in ((2, 1, LABELS[0]), (3, 1, LABELS[1])):
        staging = repo / "swap" / f".staging-{version}"
        (staging / "samples" / folder).mkdir(parents=True)
        shutil.copy(sample, staging / "samples" / folder / "a.png")
        (staging / "model.toml").write_text(manifest, encoding="utf-8")
        (staging / "model.safetensors").write_bytes(weights_bytes(biased_module(winner), tmp_path))
        staging.rename(repo / "swap" / str(version))
        if version == 2:  # predicts 乙 for a sample labelled 甲: refused, version 1 keeps serving
            wait_for(lambda: state_of(model(stub), 2) == pb.VersionInfo.FAILED)
            failed = next(v for v in model(stub).versions if v.version == 2)
            assert "validation accuracy 0.000" in failed.error and "min_accuracy 0.900" in failed.error
            assert stub.Classify(INPUT, timeout=10).version == 1
    wait_for(lambda: model(stub).serving_version == 3)
    ready = next(v for v in model(stub).versions if v.version == 3)
    assert ready.validation_accuracy == pytest.approx(1.0)


def test_watching_an_unknown_model_with_current_state_is_not_found(daemon: DaemonThread) -> None:
    events = stub_for(daemon).WatchModels(pb.WatchModelsRequest(model="nope", include_current=True), timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        next(events)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert "unknown model 'nope'" in caught.value.details()
