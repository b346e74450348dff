"""``python -m server check``: every trap a model directory can hold, caught with a precise message."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from server.cli.check import main as check
from server.models.loader.architectures import SmallCNN
from tests.support.kit import REPO, encode, to_toml, write_model

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")]

SMALL = {"model_args": {"width": 8}, "input": {"color": "L", "size": 8, "resize": 8},
         "batching": {"max_batch_size": 4}}
LABELS = ["甲", "乙", "丙", "丁", "戊"]

ARCH_PY = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, in_channels, mode="ok"):
        super().__init__()
        self.linear = nn.Linear(in_channels, num_classes)
        self.mode = mode

    def forward(self, x):
        logits = self.linear(x.mean(dim=(2, 3)))
        if self.mode == "tuple":
            return logits, x
        if self.mode == "pooled":
            return logits.mean(dim=0, keepdim=True)
        return logits
'''


def run(capsys: pytest.CaptureFixture[str], model_dir: Path, *flags: str) -> tuple[int, str, str]:
    code = check([str(model_dir), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def small_model(root: Path, name: str, manifest: dict | None = None, module: torch.nn.Module | None = None) -> Path:
    return write_model(root, name, labels=LABELS, manifest=manifest or SMALL, module=module)


def edit_weights(version_dir: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = version_dir / "model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def scripted(root: Path, name: str, module: torch.nn.Module, manifest: dict) -> Path:
    version_dir = small_model(root, name, manifest={**manifest, "architecture": "torchscript"})
    (version_dir / "model.safetensors").unlink()
    torch.jit.save(torch.jit.script(module.eval()), str(version_dir / "model.ts"))
    return version_dir


def python_model(root: Path, name: str, mode: str) -> Path:
    manifest = {"architecture": "python:arch.py:Net", "model_args": {"mode": mode},
                "input": SMALL["input"], "batching": SMALL["batching"]}
    version_dir = root / name / "1"
    version_dir.mkdir(parents=True)
    (root / name / "arch.py").write_text(ARCH_PY, encoding="utf-8")
    (root / name / "model.toml").write_text(to_toml(manifest), encoding="utf-8")
    (root / name / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    save_file({"linear.weight": torch.zeros(5, 1), "linear.bias": torch.zeros(5)},
              str(version_dir / "model.safetensors"))
    return root / name


def test_a_good_model_prints_what_it_resolved_and_its_validation(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    module = SmallCNN(num_classes=5, in_channels=1, width=8)
    with torch.no_grad():  # always answers 乙
        module.classifier[2].weight.zero_()
        module.classifier[2].bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0, 0.0]))
    version_dir = small_model(tmp_path, "good", module=module,
                              manifest={**SMALL, "min_accuracy": 0.9, "activation": "sigmoid", "threshold": 0.6})
    (tmp_path / "good" / "labels.en.txt").write_text("a\nb\nc\nd\ne\n", encoding="utf-8")
    (version_dir / "samples" / "乙").mkdir(parents=True)
    for n in range(3):
        (version_dir / "samples" / "乙" / f"{n}.png").write_bytes(encode(np.full((8, 8), n * 40, np.uint8)))
    code, out, err = run(capsys, tmp_path / "good")
    assert code == 0, err
    assert "architecture  classifyd:small_cnn" in out
    assert "input         L (1 channel(s)), 8x8, crop center, resize 8, interpolation bilinear" in out
    assert "normalize     mean [0.5], std [0.5]" in out
    assert "output        sigmoid (multi-label) over 5 labels, threshold 0.6, at most 5" in out
    assert "labels        5: 甲, 乙, 丙, 丁, 戊" in out and "labels.en     5: a, b, c, d, e" in out
    assert "warm-up       ok: a batch of 4 blank 8x8x1 inputs" in out
    assert "validation    accuracy 1.000 (min_accuracy 0.900)" in out
    assert out.rstrip().endswith("version 1 can serve")


def labels_vs_head(root: Path) -> Path:
    return small_model(root, "labels_vs_head", module=SmallCNN(num_classes=10, in_channels=1, width=8)).parent


def labels_vs_output(root: Path) -> Path:
    return scripted(root, "labels_vs_output", SmallCNN(10, 1, 8), SMALL).parent


def keys(root: Path) -> Path:
    version_dir = small_model(root, "keys")
    edit_weights(version_dir, lambda s: (s.pop("classifier.2.bias"), s.update({"extra.weight": torch.zeros(2)})))
    return version_dir.parent


def channels(root: Path) -> Path:
    return small_model(root, "channels", module=SmallCNN(5, 3, 8)).parent


def scripted_channels(root: Path) -> Path:
    return scripted(root, "scripted_channels", SmallCNN(5, 3, 8), SMALL).parent


def mean(root: Path) -> Path:
    return small_model(root, "mean", manifest={**SMALL, "input": {**SMALL["input"], "mean": [0.5, 0.5, 0.5]}}).parent


def latin1_labels(root: Path) -> Path:
    version_dir = small_model(root, "latin1")
    (version_dir.parent / "labels.txt").write_bytes("ok\nété\n".encode("latin-1"))
    return version_dir.parent


TRAPS = [  # (id, builds the model directory, check's flags, words its error must contain)
    ("head", labels_vs_head, [], "the weights have 10 outputs but labels.txt has 5 labels"),
    ("output", labels_vs_output, [], "model outputs 10 logits per image but has 5 labels"),
    ("keys", keys, [], "missing keys: classifier.2.bias; unexpected keys: extra.weight"),
    ("channels", channels, [], "the weights take 3 input channel(s) but [input] color = 'L' gives 1"),
    ("scripted channels", scripted_channels, [],
     "first convolution (features.0.0) takes 3 input channel(s) but [input] color = 'L' gives 1"),
    ("mean", mean, [], "key 'input.mean': has 3 values but the input has 1 channel(s)"),
    ("utf-8", latin1_labels, [], "labels.txt: not valid UTF-8 (byte 3)"),
    ("trust", lambda root: python_model(root, "custom", "ok"), [],
     "refused: run `python -m server check --trust-code"),
    ("tuple", lambda root: python_model(root, "tuple", "tuple"), ["--trust-code"],
     "model returned tuple for a batch of 4; expected one row of 5 logits per image (4, 5)"),
    ("pooled", lambda root: python_model(root, "pooled", "pooled"), ["--trust-code"],
     "model returned shape (1, 5) for a batch of 4"),
]


@pytest.mark.parametrize(("build", "flags", "words"), [pytest.param(*trap[1:], id=trap[0]) for trap in TRAPS])
def test_each_trap_exits_1_with_a_precise_message(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  build: Callable[[Path], Path], flags: list[str],
                                                  words: str) -> None:
    torch.manual_seed(1)
    code, _, err = run(capsys, build(tmp_path), *flags)
    assert code == 1, err
    assert words in err, err


def test_the_controls_of_the_traps_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The right colour for the same weights, and custom code once trusted, load: the traps above are the traps."""
    small_model(tmp_path, "rgb_ok", manifest={**SMALL, "input": {**SMALL["input"], "color": "RGB"}})
    assert run(capsys, tmp_path / "rgb_ok")[0] == 0
    assert run(capsys, python_model(tmp_path, "custom", "ok"), "--trust-code")[0] == 0


def test_bad_usage_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, tmp_path / "nope")[0] == 2
    small_model(tmp_path, "one")
    code, _, err = run(capsys, tmp_path / "one", "--version", "7")
    assert code == 2 and "has no version 7 (versions: 1)" in err


def test_python_m_server_check_is_a_command(tmp_path: Path) -> None:
    model_dir = python_model(tmp_path, "custom", "ok")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos")])}
    refused = subprocess.run([sys.executable, "-m", "server", "check", str(model_dir)], capture_output=True,
                             text=True, env=env, timeout=120, cwd=tmp_path)
    assert refused.returncode == 1
    assert "FAILED: architecture 'python:arch.py:Net' runs the Python code of" in refused.stderr
    assert "architecture  python:arch.py:Net" in refused.stdout
