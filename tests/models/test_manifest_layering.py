"""A manifest that travels with its weights: changing the model-level model.toml never takes a loaded version down.

Real files, a real daemon, real clients. The model-level model.toml is changed to another architecture under a
version that has no model.toml of its own: that version keeps serving, the change is reported FAILED for it with
the reason, the fix the reason names works, and rolling back to it after a newer version works.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from pathlib import Path

import grpc
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from tests.models.test_hot_swap import (
    INPUT,
    LABELS,
    MANIFEST,
    SETTLE_S,
    biased_module,
    model,
    wait_for,
)
from tests.support.kit import running_daemon, to_toml, write_model

pytestmark = pytest.mark.timeout(120)

GATED = {"architecture": "classifyd:test_gated", "input": MANIFEST["input"], "batching": MANIFEST["batching"]}
"""Another architecture, with the same input: only the weights tell the two apart."""


def failed_events(stub: pb_grpc.ClassifierStub, into: list[pb.ModelEvent]) -> grpc.Future:
    """Collect the model's FAILED events on a thread until the returned stream is cancelled."""
    events = stub.WatchModels(pb.WatchModelsRequest(model="swap"))

    def collect() -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end of the test
            for event in events:
                if event.kind == pb.ModelEvent.FAILED:
                    into.append(event)
    threading.Thread(target=collect, daemon=True).start()
    return events


def test_a_model_level_manifest_change_keeps_the_older_version_serving_and_rollback_works(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_model(root, "swap", labels=LABELS, manifest=MANIFEST, module=biased_module(0))  # no 1/model.toml
    shared = root / "swap" / "model.toml"
    with running_daemon(root, settle_s=SETTLE_S) as daemon, grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        failures: list[pb.ModelEvent] = []
        events = failed_events(stub, failures)
        shared.write_text(to_toml(GATED), encoding="utf-8")  # the old "one manifest line" swap
        wait_for(lambda: "reload failed" in model(stub).versions[0].error)
        info = model(stub)
        error = info.versions[0].error
        assert (info.serving_version, info.versions[0].state, info.versions[0].generation) == (
            1, pb.VersionInfo.READY, 1)
        assert "version 1 has no architecture of its own" in error and "'classifyd:test_gated'" in error
        assert "missing keys: linear.weight, linear.bias" in error and "unexpected keys: features." in error
        assert f"put a model.toml naming it in {root / 'swap' / '1'}/" in error
        response = stub.Classify(INPUT, timeout=10)  # still answered by version 1's loaded files
        assert (response.version, response.predictions[0].index) == (1, 0)
        wait_for(lambda: any(e.version == 1 for e in failures))
        assert "version 1 has no architecture of its own" in failures[0].reason

        # The fix the error names: version 1 carries its own manifest, so the shared file no longer applies to it.
        (root / "swap" / "1" / "model.toml").write_text(to_toml(MANIFEST), encoding="utf-8")
        wait_for(lambda: model(stub).versions[0].generation == 2)
        assert model(stub).versions[0].error == ""

        # A newer version of the other architecture, its manifest beside its weights, then a rollback to 1.
        staging = root / "swap" / ".staging-2"
        staging.mkdir()
        write_model(tmp_path / "made", "gated", labels=LABELS, architecture="classifyd:test_gated",
                    manifest={"input": MANIFEST["input"]})
        shutil.copy(tmp_path / "made" / "gated" / "1" / "model.safetensors", staging)
        (staging / "model.toml").write_text(to_toml(GATED), encoding="utf-8")
        staging.rename(root / "swap" / "2")
        wait_for(lambda: model(stub).serving_version == 2)
        assert stub.Classify(INPUT, timeout=10).version == 2
        shutil.rmtree(root / "swap" / "2")
        wait_for(lambda: model(stub).serving_version == 1 and len(model(stub).versions) == 1)
        response = stub.Classify(INPUT, timeout=10)
        assert (response.version, response.predictions[0].index) == (1, 0)
        events.cancel()


def test_a_version_without_its_own_manifest_that_is_retired_names_the_fix_when_rolled_back_to(
        tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_model(root, "swap", labels=LABELS, manifest=MANIFEST, module=biased_module(0))
    write_model(tmp_path / "made", "gated", labels=LABELS, architecture="classifyd:test_gated",
                manifest={"input": MANIFEST["input"]})
    with running_daemon(root, settle_s=SETTLE_S) as daemon, grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        staging = root / "swap" / ".staging-2"
        staging.mkdir()
        shutil.copy(tmp_path / "made" / "gated" / "1" / "model.safetensors", staging)
        (root / "swap" / "model.toml").write_text(to_toml(GATED), encoding="utf-8")
        staging.rename(root / "swap" / "2")
        wait_for(lambda: model(stub).serving_version == 2 and len(model(stub).versions) == 1)
        shutil.rmtree(root / "swap" / "2")  # version 1 was unloaded: it loads again under the shared manifest
        wait_for(lambda: any(v.state == pb.VersionInfo.FAILED for v in model(stub).versions))
        error = next(v.error for v in model(stub).versions if v.version == 1)
        assert "version 1 has no architecture of its own" in error and "'classifyd:test_gated'" in error
