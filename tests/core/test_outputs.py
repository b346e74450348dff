"""Outputs: sigmoid multi-label with thresholds, top-k, per-language labels, and precision/layout settings."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from client import tensor_request
from server.models.loader.architectures import SmallCNN
from tests.support.kit import running_daemon, write_model

pytestmark = pytest.mark.timeout(120)

ATTRIBUTES = ["stripes", "spots", "glossy", "metal", "wood"]
ATTRIBUTES_ZH = ["条纹", "斑点", "光泽", "金属", "木材"]
ATTRIBUTES_EN_GB = ["stripes", "spots", "glossy", "metal", "timber"]
LOGITS = [2.0, -2.0, 0.5, -0.1, 1.0]  # sigmoid: 0.881, 0.119, 0.622, 0.475, 0.731
SMALL = {"color": "L", "size": 8, "resize": 8}
BASE = {"model_args": {"width": 8}, "input": SMALL}


def constant_module(logits: list[float]) -> torch.nn.Module:
    """A model whose logits are ``logits`` for every input (its last layer is a pure bias)."""
    torch.manual_seed(0)
    module = SmallCNN(num_classes=len(logits), in_channels=1, width=8)
    with torch.no_grad():
        module.classifier[2].weight.zero_()
        module.classifier[2].bias.copy_(torch.tensor(logits))
    return module


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.ClassifierStub]:
    root = tmp_path_factory.mktemp("models")
    sigmoid = {"activation": "sigmoid", "threshold": 0.5, "thresholds": {"glossy": 0.7}, **BASE}
    write_model(root, "attributes", labels=ATTRIBUTES, manifest=sigmoid, module=constant_module(LOGITS))
    (root / "attributes" / "labels.zh.txt").write_text("\n".join(ATTRIBUTES_ZH) + "\n", encoding="utf-8")
    (root / "attributes" / "labels.en-GB.txt").write_text("\n".join(ATTRIBUTES_EN_GB) + "\n", encoding="utf-8")
    write_model(root, "single", labels=ATTRIBUTES, manifest={**BASE, "top_k": 2},
                module=constant_module(LOGITS))
    short = write_model(root, "short_zh", labels=ATTRIBUTES, manifest=BASE)
    (short.parent / "labels.zh.txt").write_text("\n".join(ATTRIBUTES_ZH[:4]) + "\n", encoding="utf-8")
    write_model(root, "unknown_threshold", labels=ATTRIBUTES,
                manifest={**BASE, "activation": "sigmoid", "thresholds": {"plastic": 0.3}})
    write_model(root, "softmax_threshold", labels=ATTRIBUTES, manifest={**BASE, "threshold": 0.3})
    module = constant_module([0.3, -0.2, 0.1, 0.0, 0.25])
    torch.manual_seed(3)
    with torch.no_grad():
        module.classifier[2].weight.normal_()  # outputs depend on the input, so precision shows in the scores
    for name, extra in [("fp32", {}), ("fp16", {"precision": "fp16"}),
                        ("bf16", {"precision": "bf16", "channels_last": True})]:
        write_model(root, name, labels=ATTRIBUTES, manifest={**BASE, **extra}, module=module)
    with running_daemon(root, watch=False) as daemon, grpc.insecure_channel(daemon.target) as channel:
        yield pb_grpc.ClassifierStub(channel)


INPUT = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3


def classify(stub: pb_grpc.ClassifierStub, model: str, top_k: int = 0, lang: str = "") -> pb.ClassifyResponse:
    return stub.Classify(tensor_request(INPUT, model=model, top_k=top_k, lang=lang), timeout=30)


def test_sigmoid_lists_every_label_above_its_threshold_best_first(stub: pb_grpc.ClassifierStub) -> None:
    response = classify(stub, "attributes")
    # glossy (0.622) is under its own threshold 0.7; metal (0.475) and spots (0.119) under the model's 0.5
    assert [p.label for p in response.predictions] == ["stripes", "wood"]
    assert [p.score for p in response.predictions] == pytest.approx([1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(-1.0))])
    assert [p.label for p in classify(stub, "attributes", top_k=1).predictions] == ["stripes"]  # top_k still caps
    info = stub.GetModel(pb.GetModelRequest(model="attributes"), timeout=10)
    assert info.activation == "sigmoid" and info.default_top_k == 5


def test_softmax_returns_the_top_k_of_a_distribution(stub: pb_grpc.ClassifierStub) -> None:
    response = classify(stub, "single")
    assert [p.label for p in response.predictions] == ["stripes", "wood"]  # the manifest's top_k = 2
    everything = classify(stub, "single", top_k=5)
    assert sum(p.score for p in everything.predictions) == pytest.approx(1.0, abs=1e-5)
    assert stub.GetModel(pb.GetModelRequest(model="single"), timeout=10).activation == "softmax"


def test_request_language_selects_the_labels_file(stub: pb_grpc.ClassifierStub) -> None:
    for lang, labels, used in [("zh", ATTRIBUTES_ZH, "zh"), ("zh-CN", ATTRIBUTES_ZH, "zh"),
                               ("en_gb", ATTRIBUTES_EN_GB, "en-gb"), ("fr", ATTRIBUTES, ""), ("", ATTRIBUTES, "")]:
        response = classify(stub, "attributes", lang=lang, top_k=5)
        assert response.lang == used, lang
        assert [p.label for p in response.predictions] == [labels[p.index] for p in response.predictions], lang
    assert [p.label for p in classify(stub, "attributes", lang="zh").predictions] == ["条纹", "木材"]
    info = stub.GetModel(pb.GetModelRequest(model="attributes"), timeout=10)
    assert sorted(info.languages) == ["en-gb", "zh"]


@pytest.mark.parametrize(("model", "words"), [
    ("short_zh", "labels.zh.txt: has 4 labels but labels.txt has 5; line i of every labels file must name output i"),
    ("unknown_threshold", "key 'thresholds.plastic': 'plastic' is not a label of labels.txt"),
    ("softmax_threshold", 'key \'threshold\': applies only to activation = "sigmoid"'),
])
def test_inconsistent_output_settings_fail_the_load_clearly(stub: pb_grpc.ClassifierStub, model: str,
                                                            words: str) -> None:
    version = stub.GetModel(pb.GetModelRequest(model=model), timeout=10).versions[0]
    assert version.state == pb.VersionInfo.FAILED
    assert words in version.error


def test_precision_and_channels_last_apply_where_the_device_supports_them(stub: pb_grpc.ClassifierStub) -> None:
    fp16 = stub.GetModel(pb.GetModelRequest(model="fp16"), timeout=10)
    assert fp16.precision == "fp32" and "fp16 needs a CUDA device" in fp16.precision_note  # this test runs on CPU
    bf16 = stub.GetModel(pb.GetModelRequest(model="bf16"), timeout=10)
    assert bf16.precision == "bf16" and bf16.channels_last and not bf16.precision_note
    reference = {p.index: p.score for p in classify(stub, "fp32", top_k=5).predictions}
    half = {p.index: p.score for p in classify(stub, "bf16", top_k=5).predictions}
    assert half == pytest.approx(reference, abs=3e-2)
    assert half != pytest.approx(reference, abs=1e-7)  # bf16 really ran: it rounds differently
    assert {p.index: p.score for p in classify(stub, "fp16", top_k=5).predictions} == pytest.approx(reference,
                                                                                                   abs=1e-6)
