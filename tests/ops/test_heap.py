"""The daemon process's settled heap (server/ops/heap.py): frozen out of the collector's full passes, and what a
retired version or a rejected rollout candidate leaves in cycles still collected."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from client import tensor_request
from server.ops.heap import collect_everything, heap_settled, settle_heap, unsettle_heap
from tests.support.faults import CyclicModel
from tests.support.kit import running_daemon, write_model

SMALL = {"input": {"color": "L", "size": 8, "resize": 8}}


@pytest.fixture
def settled() -> Iterator[None]:
    """The test process's heap as the daemon process settles its own; CPython's defaults again afterwards."""
    assert not heap_settled()
    yield
    unsettle_heap()


class _Node:
    def __init__(self) -> None:
        self.me = self


def test_a_settled_heap_keeps_frozen_cycles_from_gc_collect_but_not_from_collect_everything(settled: None) -> None:
    node = _Node()
    alive = weakref.ref(node)
    assert settle_heap() > 0 and heap_settled()
    del node  # now garbage, but frozen: only a cycle collection that reaches frozen objects frees it
    gc.collect()
    assert alive() is not None
    collect_everything()
    assert alive() is None
    assert heap_settled()  # what is left is frozen again


def test_without_a_settled_heap_collect_everything_is_a_plain_collection() -> None:
    node = _Node()
    alive = weakref.ref(node)
    del node
    collect_everything()
    assert alive() is None and not heap_settled()


def test_a_retired_version_whose_module_is_a_cycle_is_freed_from_a_settled_heap(tmp_path: Path,
                                                                               settled: None) -> None:
    write_model(tmp_path, "loop", architecture="classifyd:test_cyclic", manifest=SMALL)
    with running_daemon(tmp_path, settle_s=0.2) as daemon, grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        assert stub.Classify(tensor_request(np.zeros((8, 8), np.uint8), model="loop"), timeout=20).version == 1
        CyclicModel.built.clear()  # from here: the daemon's own instance of version 1 only
        gc.collect()
        served = [ref for ref in _instances() if ref() is not None]
        settle_heap()  # as `python -m server` does after its initial load
        events = stub.WatchModels(pb.WatchModelsRequest(model="loop"), timeout=60)
        unloaded = threading.Event()
        reader = threading.Thread(target=_wait_unloaded, args=(events, 1, unloaded), daemon=True)
        reader.start()
        write_model(tmp_path, "loop", version=2, architecture="classifyd:test_cyclic", manifest=SMALL, seed=1)
        assert unloaded.wait(30), "version 1 was not unloaded"
        events.cancel()
        assert stub.Classify(tensor_request(np.zeros((8, 8), np.uint8), model="loop"), timeout=20).version == 2
    assert served and all(ref() is None for ref in served)


def test_a_rejected_candidate_whose_module_is_a_cycle_is_freed_from_a_settled_heap(tmp_path: Path,
                                                                                 settled: None) -> None:
    # a shadow rollout that no other version agrees with: rejected once it has scored enough requests
    rollout = {"mode": "shadow", "min_requests": 20, "min_agreement": 0.999, "max_compute_ratio": 1000.0}
    manifest = {**SMALL, "rollout": rollout}
    write_model(tmp_path, "loop", architecture="classifyd:test_cyclic", manifest=manifest)
    inputs = [np.random.default_rng(i).integers(0, 256, (8, 8), dtype=np.uint8) for i in range(20)]
    with running_daemon(tmp_path, settle_s=0.2) as daemon, grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        assert stub.Classify(tensor_request(inputs[0], model="loop"), timeout=20).version == 1
        events = stub.WatchModels(pb.WatchModelsRequest(model="loop", include_current=True), timeout=120)
        kinds: dict[int, threading.Event] = {pb.ModelEvent.READY: threading.Event(),
                                             pb.ModelEvent.CANDIDATE: threading.Event(),
                                             pb.ModelEvent.REJECTED: threading.Event()}
        reader = threading.Thread(target=_wait_events, args=(events, kinds), daemon=True)
        reader.start()
        assert kinds[pb.ModelEvent.READY].wait(30), "the stream did not start"  # it sees every later event
        CyclicModel.built.clear()  # from here: the instances built for version 2
        write_model(tmp_path, "loop", version=2, architecture="classifyd:test_cyclic", manifest=manifest, seed=1)
        assert kinds[pb.ModelEvent.CANDIDATE].wait(30), "version 2 did not become a candidate"
        gc.collect()  # write_model's own instance (a cycle too): only the daemon's stays
        candidate = [ref for ref in CyclicModel.built if ref() is not None]
        settle_heap()  # the candidate frozen with the rest, as another release's collection would leave it
        for _ in range(50):  # the rollout scores the candidate on these; version 1 answers them
            if kinds[pb.ModelEvent.REJECTED].is_set():
                break
            for array in inputs:
                assert stub.Classify(tensor_request(array, model="loop"), timeout=20).version == 1
        assert kinds[pb.ModelEvent.REJECTED].wait(30), "version 2 was not rejected"
        events.cancel()
        freed = _wait_until(lambda: all(ref() is None for ref in candidate), 30)
    assert candidate and freed, "the rejected candidate's cyclic module is still alive"


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``condition`` (the release runs on a worker thread after the candidate's requests drain)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_events(events: Iterator[pb.ModelEvent], kinds: dict[int, threading.Event]) -> None:
    """Set the event of each kind in ``kinds`` as it arrives (READY: version 1's current state; the others:
    version 2's)."""
    try:
        for event in events:
            if event.kind in kinds and event.version == (1 if event.kind == pb.ModelEvent.READY else 2):
                kinds[event.kind].set()
    except grpc.RpcError:
        pass


def _instances() -> list[weakref.ref[object]]:
    """Weak references to every CyclicModel alive now (the daemon built version 1's before ``built`` was
    cleared)."""
    return [weakref.ref(o) for o in gc.get_objects() if type(o) is CyclicModel]


def _wait_unloaded(events: Iterator[pb.ModelEvent], version: int, done: threading.Event) -> None:
    try:
        for event in events:
            if event.kind == pb.ModelEvent.UNLOADED and event.version == version:
                done.set()
                return
    except grpc.RpcError:
        pass
