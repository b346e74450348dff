"""Loader faults contained: any exception while a version loads marks it FAILED, in a real daemon on real files.

A model constructor that asserts (torchvision's ``vit_b_16`` with an ``image_size`` its patches do not divide)
or raises anything else must neither end the process at start-up nor leave a hot swap LOADING forever.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from torch import nn

from client import tensor_request
from tests.support.faults import BrokenInit
from tests.support.kit import running_daemon, to_toml, write_model

pytestmark = pytest.mark.timeout(120)
SMALL = {"input": {"color": "L", "size": 8, "resize": 8}, "model_args": {"width": 8}}
VIT_225 = {"input": {"color": "RGB", "size": 225, "resize": 225}, "model_args": {"image_size": 225}}


def info(stub: pb_grpc.ClassifierStub, name: str) -> pb.ModelInfo:
    return stub.GetModel(pb.GetModelRequest(model=name), timeout=10)


def test_a_model_whose_constructor_asserts_fails_alone_at_start_up(tmp_path: Path) -> None:
    write_model(tmp_path, "good", manifest=SMALL)
    write_model(tmp_path, "vit", architecture="torchvision:vit_b_16", manifest=VIT_225, module=nn.Linear(1, 4))
    BrokenInit.built.clear()
    write_model(tmp_path, "index", architecture="classifyd:test_broken_init", module=nn.Linear(1, 4),
                manifest={**SMALL, "model_args": {"raises": "IndexError"}})
    with running_daemon(tmp_path, watch=False) as daemon, grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        answer = stub.Classify(tensor_request(np.zeros((8, 8), np.uint8), model="good"), timeout=20)
        assert (answer.model, answer.version) == ("good", 1)
        vit, index = info(stub, "vit").versions[0], info(stub, "index").versions[0]
        assert vit.state == index.state == pb.VersionInfo.FAILED
        assert vit.error == "AssertionError: Input shape indivisible by patch size!"
        assert index.error == "IndexError: raised by a constructor (test model)"
        failed = {(e["model"], e["kind"], e["reason"]) for e in daemon.daemon.events.recent()}
        assert ("vit", "FAILED", vit.error) in failed and ("index", "FAILED", index.error) in failed
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(tensor_request(np.zeros((8, 8), np.uint8), model="index"), timeout=20)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert BrokenInit.built and all(ref() is None for ref in BrokenInit.built)  # what was built is released


def publish(model_dir: Path, version: int, manifest: dict[str, object]) -> None:
    """A version with its own manifest, renamed into place as a finished directory."""
    staging = model_dir / f".staging-{version}"
    staging.mkdir()
    (staging / "model.toml").write_text(to_toml(manifest), encoding="utf-8")
    shutil.copy(model_dir / "1" / "model.safetensors", staging / "model.safetensors")
    staging.rename(model_dir / str(version))


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, pb_grpc.ClassifierStub]]:
    write_model(tmp_path, "swap", manifest=SMALL)
    with running_daemon(tmp_path, settle_s=0.2) as daemon, grpc.insecure_channel(daemon.target) as channel:
        yield tmp_path / "swap", pb_grpc.ClassifierStub(channel)


@pytest.mark.parametrize("raises", ["AssertionError", "StopIteration", "BaseException"])
def test_a_hot_swap_to_a_version_that_cannot_be_built_fails_it_and_the_previous_keeps_serving(
        watched: tuple[Path, pb_grpc.ClassifierStub], raises: str) -> None:
    model_dir, stub = watched
    events = stub.WatchModels(pb.WatchModelsRequest(model="swap"), timeout=60)
    seen: list[pb.ModelEvent] = []
    reader = threading.Thread(target=lambda: seen.extend(_until(events, pb.ModelEvent.FAILED)), daemon=True)
    reader.start()
    BrokenInit.built.clear()
    publish(model_dir, 2, {"architecture": "classifyd:test_broken_init", **SMALL,
                           "model_args": {"raises": raises}})
    reader.join(30)
    events.cancel()
    assert [(e.version, pb.ModelEvent.Kind.Name(e.kind)) for e in seen] == [(2, "LOADING"), (2, "FAILED")]
    assert seen[-1].reason.startswith(f"{raises}: ")
    versions = {v.version: v for v in info(stub, "swap").versions}
    assert versions[2].state == pb.VersionInfo.FAILED and versions[2].error == seen[-1].reason
    assert info(stub, "swap").serving_version == 1
    assert stub.Classify(tensor_request(np.zeros((8, 8), np.uint8), model="swap"), timeout=20).version == 1
    assert BrokenInit.built and all(ref() is None for ref in BrokenInit.built)


def _until(events: Iterator[pb.ModelEvent], kind: int) -> Iterator[pb.ModelEvent]:
    for event in events:
        yield event
        if event.kind == kind:
            return
