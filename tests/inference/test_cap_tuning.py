"""The batch cap tuned while serving, in a real daemon: it moves under load when the served batch times disagree
with the load-time curve, and the move shows in GetModel, the status page and /metrics."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from client import tensor_request
from server.inference.cap_tuning import tunes_online
from tests.support.kit import PacedModel, running_daemon, write_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TINY_INPUT = {"color": "L", "size": 4, "resize": 4}
# At load time every item past the first costs 100 ms more: the knee is 1. While serving that drops to 0.5 ms, so
# each step up nearly doubles the throughput: a gain no scheduling noise of a busy test machine hides.
STEEP = {"base_ms": 40.0, "per_item_ms": 1.0, "knee": 1, "slow_ms": 100.0}


def _model(stub: pb_grpc.ClassifierStub) -> pb.ModelInfo:
    return stub.GetModel(pb.GetModelRequest(model="paced"))


def test_cap_moves_under_load_and_is_visible(tmp_path: Path) -> None:
    write_model(tmp_path, "paced", architecture="classifyd:test_paced", manifest={
        "model_args": STEEP, "input": TINY_INPUT, "batching": {"autotune_max_batch_size": 8}})
    write_model(tmp_path, "pinned", architecture="classifyd:test_paced", manifest={
        "model_args": STEEP, "input": TINY_INPUT, "batching": {"max_batch_size": 2}})
    request = tensor_request(np.zeros((4, 4), dtype=np.uint8), model="paced")
    with running_daemon(tmp_path, watch=False, http_port=0, metrics_port=0) as running, \
            grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        deadline = time.monotonic() + 30
        while not _model(stub).autotuned and time.monotonic() < deadline:  # the curve is measured after READY
            time.sleep(0.05)
        assert (_model(stub).max_batch_size, _model(stub).autotuned) == (1, True)
        assert running.daemon is not None
        loaded = running.daemon.manager.get("paced").serving().loaded  # type: ignore[union-attr]
        pinned = running.daemon.manager.get("pinned").serving().loaded  # type: ignore[union-attr]
        assert loaded is not None and pinned is not None
        assert not tunes_online(pinned)
        assert not _model(stub).batch_cap_online  # no tuner before the first request
        # The machine changed since: a larger batch now costs little more than one item.
        module = loaded.module
        assert isinstance(module, PacedModel)
        module.slow_ms = 0.5
        stub.Classify(request, timeout=30)
        assert loaded.tuner is not None
        loaded.tuner.settings = replace(loaded.tuner.settings, min_gap_s=0.2)  # a test cannot wait 5 s per step
        deadline = time.monotonic() + 60

        def client() -> None:  # closed loop: each sends its next request when its last one is answered
            while loaded.max_batch_size < 4 and time.monotonic() < deadline:
                stub.Classify(request, timeout=30)

        with ThreadPoolExecutor(12) as clients:
            for done in [clients.submit(client) for _ in range(12)]:
                done.result()
        info = _model(stub)
        status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{running.daemon.http_port}/status.json",
                                                   timeout=10).read())
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{running.daemon.metrics_port}/metrics",
                                         timeout=10).read().decode()
    assert info.max_batch_size >= 4, "the cap did not move under load"
    assert info.batch_cap_online and info.batch_cap_changes >= 2
    assert info.batch_cap_last_change.startswith("max_batch_size ")
    assert {p.batch_size for p in info.serving_batch_curve} >= {1, 2}
    assert all(p.images_per_second == pytest.approx(p.batch_size / p.batch_ms * 1000) for p in info.serving_batch_curve)
    tuning = next(m for m in status["models"] if m["name"] == "paced")["batch_tuning"]
    assert tuning["changes"] >= 2 and tuning["cap"] == loaded.max_batch_size
    assert "measured while serving" in tuning["last_change"]
    assert {e["batch_size"] for e in tuning["estimates"]} >= {1, 2}
    assert next(m for m in status["models"] if m["name"] == "pinned")["batch_tuning"] is None
    assert f'classifyd_batch_cap{{model="paced"}} {float(loaded.max_batch_size)}' in metrics
    # the torch threads under load: tuned beside the cap on a CPU with a team, else 0; the same on every surface
    assert loaded.tuner is not None
    assert info.batch_threads == tuning["threads"] == loaded.tuner.width
    assert info.batch_threads in (loaded.tuner.widths or (0,))
    assert f'classifyd_batch_threads{{model="paced"}} {float(info.batch_threads)}' in metrics
    assert {p.torch_threads for p in info.serving_batch_curve} <= set(loaded.tuner.widths or (0,))
    assert 'classifyd_batch_cap_changes_total{model="paced"}' in metrics
    assert 'model="pinned"' not in metrics.split("classifyd_batch_cap")[1].split("\n# HELP")[0]
