"""Model control under concurrency and cancellation (explicit mode, a real daemon, the gated test model): callers that
give up (a client deadline) leave loads and unloads to finish, a load during an unload's drain waits for it rather
than loading an older version, an unloaded model takes no new request at once, a model whose directory is removed
is no longer asked for, and an unexpected error of the measure fails the version rather than leaving it LOADING."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from client import tensor_request
from server.core.lifecycle import EventKind, ModelEvent
from server.models import memory
from tests.edges.test_model_control import GATED, PIXELS, SMALL, repository, wait_for
from tests.support.kit import GATE, DaemonThread, running_daemon, write_model

pytestmark = pytest.mark.timeout(300)
Setup = tuple[DaemonThread, pb_grpc.ClassifierStub, list[ModelEvent]]


@pytest.fixture
def explicit(tmp_path: Path) -> Iterator[Setup]:
    with running_daemon(repository(tmp_path / "models"), model_control="explicit", settle_s=0.2) as daemon, \
            grpc.insecure_channel(daemon.target) as channel:
        assert daemon.daemon is not None
        events: list[ModelEvent] = []
        daemon.daemon.manager.add_listener(events.append)
        try:
            yield daemon, pb_grpc.ClassifierStub(channel), events
        finally:
            GATE.open.set()


def states(stub: pb_grpc.ClassifierStub, name: str) -> list[int]:
    return [v.state for v in stub.GetModel(pb.GetModelRequest(model=name), timeout=10).versions]


def held(daemon: DaemonThread, name: str) -> list[int]:
    """The versions of ``name`` the memory accounts hold (loaded, or retired and not yet released)."""
    assert daemon.daemon is not None
    return sorted(v.version for v in daemon.daemon.manager.memory.held() if v.name == name)


def test_an_unload_whose_caller_gives_up_still_releases_the_model(explicit: Setup) -> None:
    daemon, stub, _ = explicit
    stub.LoadModel(pb.LoadModelRequest(model="gated"), timeout=60)
    GATE.close()
    in_flight = stub.Classify.future(tensor_request(PIXELS, model="gated"), timeout=60)
    assert GATE.entered.acquire(timeout=20)
    with pytest.raises(grpc.RpcError) as gave_up:  # the drain outlasts the client's deadline
        stub.UnloadModel(pb.UnloadModelRequest(model="gated"), timeout=0.5)
    assert gave_up.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    GATE.open.set()
    assert in_flight.result().predictions
    wait_for(lambda: states(stub, "gated") == [pb.VersionInfo.AVAILABLE])
    assert held(daemon, "gated") == []  # released: the budget no longer counts it


def test_a_load_whose_caller_gives_up_still_loads_the_model(tmp_path: Path) -> None:
    with running_daemon(repository(tmp_path / "models"), model_control="explicit", watch=False) as daemon, \
            grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        GATE.close()  # the warm-up's forward pass waits
        try:
            with pytest.raises(grpc.RpcError) as gave_up:
                stub.LoadModel(pb.LoadModelRequest(model="gated"), timeout=0.5)
            assert gave_up.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            GATE.open.set()
        wait_for(lambda: states(stub, "gated") == [pb.VersionInfo.READY])  # no watcher: the load itself carried on
        assert stub.Classify(tensor_request(PIXELS, model="gated"), timeout=30).predictions


def test_a_load_during_an_unloads_drain_waits_and_loads_the_newest_version(explicit: Setup) -> None:
    daemon, stub, events = explicit
    write_model(daemon.config.models.models_dir, "gated", version=2, architecture="classifyd:test_gated",
                manifest=GATED)
    wait_for(lambda: len(states(stub, "gated")) == 2)
    assert stub.LoadModel(pb.LoadModelRequest(model="gated"), timeout=60).serving_version == 2
    GATE.close()
    in_flight = stub.Classify.future(tensor_request(PIXELS, model="gated"), timeout=60)
    assert GATE.entered.acquire(timeout=20)
    unloading = stub.UnloadModel.future(pb.UnloadModelRequest(model="gated"), timeout=60)
    wait_for(lambda: pb.VersionInfo.UNLOADING in states(stub, "gated"))
    seen = len(events)
    loading = stub.LoadModel.future(pb.LoadModelRequest(model="gated"), timeout=60)
    assert daemon.daemon is not None
    control = daemon.daemon.control  # the load has arrived: it waits its turn (or, wrongly, loads version 1)
    wait_for(lambda: len(getattr(control, "_calls", ())) == 2 or any(e.version == 1 for e in events[seen:]))
    GATE.open.set()
    assert in_flight.result().predictions and unloading.result()
    assert loading.result().serving_version == 2
    assert not [e for e in events if e.version == 1 and e.kind is EventKind.READY]  # never the older version
    assert held(daemon, "gated") == [2]


def test_new_requests_are_refused_at_once_after_an_unload_even_while_a_swap_holds_the_model(
        explicit: Setup) -> None:
    daemon, stub, _ = explicit
    assert daemon.daemon is not None
    stub.LoadModel(pb.LoadModelRequest(model="gated"), timeout=60)
    GATE.close()  # version 2's warm-up waits, holding the model
    write_model(daemon.config.models.models_dir, "gated", version=2, architecture="classifyd:test_gated",
                manifest=GATED)
    wait_for(lambda: pb.VersionInfo.LOADING in states(stub, "gated"))
    unloading = stub.UnloadModel.future(pb.UnloadModelRequest(model="gated"), timeout=60)
    control = daemon.daemon.control
    wait_for(lambda: "gated" not in control._asked)
    with pytest.raises(grpc.RpcError) as refused:  # version 1 is still READY, but the model is unloaded
        stub.Classify(tensor_request(PIXELS, model="gated"), timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE and "not loaded" in (refused.value.details() or "")
    GATE.open.set()
    info = unloading.result()
    assert {v.state for v in info.versions} == {pb.VersionInfo.AVAILABLE}


def test_a_removed_and_recreated_model_is_not_loaded_until_asked(explicit: Setup) -> None:
    daemon, stub, _ = explicit
    root = daemon.config.models.models_dir
    stub.LoadModel(pb.LoadModelRequest(model="small"), timeout=60)
    shutil.rmtree(root / "small")
    wait_for(lambda: "small" not in {m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models})
    write_model(root, "small", manifest=SMALL)
    wait_for(lambda: "small" in {m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
             and states(stub, "small") != [])
    assert states(stub, "small") == [pb.VersionInfo.AVAILABLE]
    # unloading a model that is listed but not loaded succeeds and changes nothing; an unknown one is NOT_FOUND
    info = stub.UnloadModel(pb.UnloadModelRequest(model="small"), timeout=30)
    assert [v.state for v in info.versions] == [pb.VersionInfo.AVAILABLE]
    with pytest.raises(grpc.RpcError) as unknown:
        stub.UnloadModel(pb.UnloadModelRequest(model="nosuch"), timeout=30)
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


def test_an_unexpected_error_of_the_measure_fails_the_version(explicit: Setup,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, stub, _ = explicit

    def broken(*args: object) -> int:
        raise RuntimeError("measure broke")

    monkeypatch.setattr(memory, "measured_size", broken)
    with pytest.raises(grpc.RpcError) as failed:
        stub.LoadModel(pb.LoadModelRequest(model="small"), timeout=60)
    assert failed.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "RuntimeError: measure broke" in (failed.value.details() or "")
    assert states(stub, "small") == [pb.VersionInfo.FAILED]  # not left LOADING
    assert held(daemon, "small") == []  # what was built is released
