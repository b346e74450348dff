"""Preprocessing changes caught at swap time: a version whose resolved input differs from the serving version's is
refused with the difference named (the serving version keeps answering), unless its own model.toml acknowledges it.
Real files, a real daemon, real clients."""

from __future__ import annotations

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
    Publisher,
    biased_module,
    model,
    state_of,
    wait_for,
    weights_bytes,
)
from tests.support.kit import running_daemon, to_toml, write_model

pytestmark = pytest.mark.timeout(120)

CHANGED = {**MANIFEST, "input": {**MANIFEST["input"], "interpolation": "bicubic", "mean": [0.4]}}


def version(info: pb.ModelInfo, number: int) -> pb.VersionInfo:
    return next(v for v in info.versions if v.version == number)


def test_a_preprocessing_change_is_refused_with_the_difference_named_unless_acknowledged(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_model(root, "swap", labels=LABELS, manifest=MANIFEST, module=biased_module(0))
    with running_daemon(root, settle_s=SETTLE_S) as daemon, grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        publisher = Publisher(root / "swap")
        publisher.by_rename(2, weights_bytes(biased_module(1), tmp_path), {"model.toml": to_toml(CHANGED)})
        wait_for(lambda: state_of(model(stub), 2) == pb.VersionInfo.FAILED)
        assert version(model(stub), 2).error == (
            "preprocessing differs from serving version 1: interpolation bilinear → bicubic, mean [0.5] → [0.4]; "
            "set preprocessing_changed = true in the new version's own model.toml if this is intended")
        response = stub.Classify(INPUT, timeout=10)
        assert (response.version, response.predictions[0].index) == (1, 0)
        assert model(stub).serving_version == 1

        acknowledged = {**CHANGED, "preprocessing_changed": True}
        (root / "swap" / "2" / "model.toml").write_text(to_toml(acknowledged), encoding="utf-8")
        wait_for(lambda: model(stub).serving_version == 2)
        response = stub.Classify(INPUT, timeout=10)
        assert (response.version, response.predictions[0].index) == (2, 1)
        assert list(model(stub).input.mean) == pytest.approx([0.4])


def test_older_versions_are_not_compared_and_new_files_of_the_serving_version_are(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_model(root, "swap", labels=LABELS, manifest={**MANIFEST, "keep_versions": 2}, module=biased_module(0))
    with running_daemon(root, settle_s=SETTLE_S) as daemon, grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        acknowledged = {**CHANGED, "keep_versions": 2, "preprocessing_changed": True}
        Publisher(root / "swap").by_rename(2, weights_bytes(biased_module(1), tmp_path),
                                           {"model.toml": to_toml(acknowledged)})
        wait_for(lambda: model(stub).serving_version == 2)
        # version 1, kept for pinning, reloads beside the serving version 2 without being compared with it
        info = stub.ReloadModel(pb.ReloadModelRequest(model="swap"), timeout=60)
        assert sorted((v.version, v.state, v.generation, v.error) for v in info.versions) == [
            (1, pb.VersionInfo.READY, 2, ""), (2, pb.VersionInfo.READY, 2, "")]
        # new files of the serving version are a swap too: refused, the loaded generation keeps serving
        changed = {**CHANGED, "keep_versions": 2, "input": {**CHANGED["input"], "mean": [0.3]}}
        (root / "swap" / "2" / "model.toml").write_text(to_toml(changed), encoding="utf-8")
        wait_for(lambda: "reload failed" in version(model(stub), 2).error)
        assert version(model(stub), 2).error.startswith(
            "reload failed: preprocessing differs from serving version 2: mean [0.4] → [0.3]; set")
        response = stub.Classify(INPUT, timeout=10)
        assert (response.version, response.predictions[0].index) == (2, 1)
