"""Model swaps without code: torchvision, timm, TorchScript, torch.export and python: architectures.

Every model is random-initialised here and saved the way a user would save it;
the daemon's scores are compared with the same module run locally.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torchvision
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from PIL import Image
from torch import nn

from client import image_request, tensor_request
from server.models.loader.architectures import SmallCNN
from tests.support.kit import encode, running_daemon, to_toml

pytestmark = [pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")]

FLOWERS = ["daisy", "dandelion", "rose", "sunflower", "tulip"]
DEFECTS = ["划痕", "凹坑", "裂纹", "污渍", "正常"]
DEFECTS_EN = ["scratch", "dent", "crack", "stain", "ok"]


def write_dir(root: Path, name: str, manifest: dict, labels: list[str], version: int = 1) -> Path:
    """A model directory with a manifest and labels; returns its version directory (created, empty)."""
    version_dir = root / name / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    (root / name / "model.toml").write_text(to_toml(manifest), encoding="utf-8")
    (root / name / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    return version_dir


def local_scores(module: nn.Module, pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Softmax of ``module`` on an H x W x C uint8 array that is already the model's input size."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    with torch.no_grad():
        return torch.softmax(module.eval()(x[None]), dim=1)[0].numpy()


def scores(response: pb.ClassifyResponse) -> np.ndarray:
    out = np.zeros(len(response.predictions), np.float32)
    for p in response.predictions:
        out[p.index] = p.score
    return out


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SMALL_INPUT = {"size": 64, "crop": "none"}


def test_resnet18_to_mobilenet_v3_small_by_editing_one_manifest_line(tmp_path: Path) -> None:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    resnet.fc = nn.Linear(resnet.fc.in_features, len(FLOWERS))  # fine-tuned the usual way: a new head
    version_1 = write_dir(tmp_path, "flowers", {"architecture": "torchvision:resnet18", "input": SMALL_INPUT,
                                                "batching": {"max_batch_size": 4}}, FLOWERS)
    # a DataParallel checkpoint: prefixed keys inside {"state_dict": ...}, as training scripts write them
    wrapped = {"state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, version_1 / "model.pt")
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with running_daemon(tmp_path, watch=False) as daemon, grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        first = stub.Classify(image_request(encode(pixels), model="flowers", top_k=5), timeout=60)
        assert first.version == 1 and {p.label for p in first.predictions} == set(FLOWERS)
        np.testing.assert_allclose(scores(first), local_scores(resnet, pixels, *IMAGENET), atol=1e-4)

        mobilenet = torchvision.models.mobilenet_v3_small(weights=None)
        mobilenet.classifier[3] = nn.Linear(mobilenet.classifier[3].in_features, len(FLOWERS))
        version_2 = tmp_path / "flowers" / "2"
        version_2.mkdir()
        torch.save(mobilenet.state_dict(), version_2 / "model.pt")
        manifest = tmp_path / "flowers" / "model.toml"
        text = manifest.read_text(encoding="utf-8")
        manifest.write_text(text.replace('"torchvision:resnet18"', '"torchvision:mobilenet_v3_small"'),
                            encoding="utf-8")
        info = stub.ReloadModel(pb.ReloadModelRequest(model="flowers"), timeout=120)
        assert info.architecture == "torchvision:mobilenet_v3_small" and info.serving_version == 2
        second = stub.Classify(image_request(encode(pixels), model="flowers", top_k=5), timeout=60)
        assert second.version == 2
        np.testing.assert_allclose(scores(second), local_scores(mobilenet, pixels, *IMAGENET), atol=1e-4)


def test_timm_vit_is_served_with_timm_preprocessing(tmp_path: Path) -> None:
    import timm
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(1)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=3)
    version_dir = write_dir(tmp_path, "vit", {"architecture": "timm:test_vit", "batching": {"max_batch_size": 2}},
                            ["a", "b", "c"])
    torch.save(vit.state_dict(), version_dir / "model.pth")
    tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32)
    tiny_dir = write_dir(tmp_path, "tiny", {"architecture": "timm:vit_tiny_patch16_224",
                                            "model_args": {"img_size": 32}, "input": {"mean": [0.4, 0.4, 0.4]},
                                            "batching": {"max_batch_size": 2}}, ["a", "b", "c"])
    torch.save(tiny.state_dict(), tiny_dir / "model.pth")
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (180, 200, 3), dtype=np.uint8))
    expected = torch.softmax(vit.eval()(create_transform(**resolve_data_config({}, model=vit))(image)[None]), 1)
    with running_daemon(tmp_path, watch=False) as daemon, grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        spec = stub.GetModel(pb.GetModelRequest(model="vit"), timeout=10).input
        assert (spec.height, spec.width, spec.resize, spec.crop, spec.interpolation) == (160, 160, 168, "center",
                                                                                          "bicubic")
        assert list(spec.mean) == [0.5] * 3 and list(spec.std) == [0.5] * 3
        assert "timm's pretrained config for test_vit" in spec.resolved_from
        response = stub.Classify(image_request(encode(np.asarray(image)), model="vit", top_k=3), timeout=60)
        np.testing.assert_allclose(scores(response), expected[0].detach().numpy(), atol=1e-3)
        tiny_spec = stub.GetModel(pb.GetModelRequest(model="tiny"), timeout=10).input
        # img_size from model_args wins over timm's 224; the manifest's own mean wins over timm's
        assert (tiny_spec.height, tiny_spec.width, tiny_spec.resize) == (32, 32, 35)
        assert list(tiny_spec.mean) == pytest.approx([0.4] * 3) and list(tiny_spec.std) == [0.5] * 3
        assert "mean" not in tiny_spec.resolved_from
        assert stub.Classify(image_request(encode(np.asarray(image)), model="tiny"), timeout=60).predictions


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    module = SmallCNN(num_classes=3, in_channels=3, width=8).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics: a model left in train mode would differ
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.5, 0.5)
                layer.running_var.uniform_(0.5, 2.0)
    return module


def test_torchscript_and_torch_export_programs_need_no_code(tmp_path: Path) -> None:
    module = small_cnn(3)
    example = torch.zeros(2, 3, 16, 16)
    manifest = {"input": {"size": 16, "crop": "none"}, "batching": {"max_batch_size": 8}}
    torch.jit.save(torch.jit.script(module), write_dir(tmp_path, "scripted", {"architecture": "torchscript",
                                                                               **manifest}, FLOWERS[:3]) / "model.ts")
    batch = torch.export.Dim("batch", max=64)
    dynamic = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(dynamic, write_dir(tmp_path, "exported", {"architecture": "torch_export", **manifest},
                                         FLOWERS[:3]) / "model.pt2")
    static = torch.export.export(module, (torch.zeros(1, 3, 16, 16),))  # batch fixed at 1: split per image
    torch.export.save(static, write_dir(tmp_path, "static", {"architecture": "torch_export", **manifest},
                                        FLOWERS[:3]) / "model.pt2")
    torch.export.save(dynamic, write_dir(tmp_path, "mislabelled", {"architecture": "classifyd:small_cnn",
                                                                   **manifest}, FLOWERS[:3]) / "model.pt")
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(12)]
    with running_daemon(tmp_path, watch=False) as daemon, grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for name in ("scripted", "exported", "static"):
            futures = [stub.Classify.future(tensor_request(i, model=name, top_k=3), timeout=60) for i in images]
            responses = [f.result() for f in futures]
            for pixels, response in zip(images, responses, strict=True):
                np.testing.assert_allclose(scores(response), local_scores(module, pixels, *IMAGENET), atol=1e-4)
            if name != "scripted":
                assert max(r.batch_size for r in responses) > 1, name  # batches of any size fit the program
        failed = stub.GetModel(pb.GetModelRequest(model="mislabelled"), timeout=10).versions[0]
        assert failed.state == pb.VersionInfo.FAILED
        assert 'the file is a torch.export program: set architecture = "torch_export"' in failed.error
        assert "corrupt" not in failed.error  # the kind of file is said first, not torch's own guess


ARCH_PY = '''
import torch
from torch import nn

SCALE = {scale}


class DefectClassifier(nn.Module):
    def __init__(self, num_classes, in_channels=3, hidden=16):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3))) * SCALE
'''


def import_file(path: Path) -> object:
    spec = importlib.util.spec_from_file_location("user_arch", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_defects(root: Path) -> nn.Module:
    manifest = {"architecture": "python:arch.py:DefectClassifier", "model_args": {"hidden": 12},
                "input": {"size": 32, "crop": "none"}, "batching": {"max_batch_size": 4}}
    version_dir = write_dir(root, "defects", manifest, DEFECTS)
    (root / "defects" / "labels.en.txt").write_text("\n".join(DEFECTS_EN) + "\n", encoding="utf-8")
    (root / "defects" / "arch.py").write_text(ARCH_PY.format(scale=1.0), encoding="utf-8")
    torch.manual_seed(5)
    model = import_file(root / "defects" / "arch.py").DefectClassifier(num_classes=5, hidden=12)
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(version_dir / "model.safetensors"))
    return model


def test_custom_architecture_is_refused_without_trust_code(tmp_path: Path) -> None:
    write_defects(tmp_path)
    with running_daemon(tmp_path, watch=False) as daemon, grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        version = stub.GetModel(pb.GetModelRequest(model="defects"), timeout=10).versions[0]
        assert version.state == pb.VersionInfo.FAILED
        assert "refused: start classifyd with --trust-code to allow it" in version.error
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(tensor_request(np.zeros((32, 32, 3), np.uint8), model="defects"), timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def test_custom_five_class_architecture_with_chinese_labels_and_code_hot_swap(tmp_path: Path) -> None:
    model = write_defects(tmp_path)
    pixels = np.random.default_rng(6).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with running_daemon(tmp_path, watch=False, trust_code=True) as daemon, \
            grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        response = stub.Classify(tensor_request(pixels, model="defects", top_k=5), timeout=60)
        assert [p.label for p in response.predictions] == [DEFECTS[p.index] for p in response.predictions]
        assert sorted(p.label for p in response.predictions) == sorted(DEFECTS)
        np.testing.assert_allclose(scores(response), local_scores(model, pixels, *IMAGENET), atol=1e-4)
        english = stub.Classify(tensor_request(pixels, model="defects", top_k=5, lang="en"), timeout=60)
        assert english.lang == "en" and [p.label for p in english.predictions] == \
            [DEFECTS_EN[p.index] for p in response.predictions]
        # the code changes: the reload imports the new file, not a cached module
        (tmp_path / "defects" / "arch.py").write_text(ARCH_PY.format(scale=0.0), encoding="utf-8")
        info = stub.ReloadModel(pb.ReloadModelRequest(model="defects"), timeout=60)
        assert info.versions[0].generation == 2 and info.versions[0].state == pb.VersionInfo.READY
        flat = stub.Classify(tensor_request(pixels, model="defects", top_k=5), timeout=60)
        assert [p.score for p in flat.predictions] == pytest.approx([0.2] * 5)
