"""``python -m server check`` compares the version's resolved preprocessing with the version serving before it.

The issue's trap: a timm model turned into TorchScript with a version-level model.toml of just
``architecture = "torchscript"`` loses timm's preprocessing (here test_efficientnet's 160 px, resize 168, bicubic).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.cli.check import main as check
from server.models.loader.architectures import build_architecture
from tests.support.kit import to_toml, write_model

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")]

LABELS = ["甲", "乙", "丙"]
TIMM = {"architecture": "timm:test_efficientnet", "batching": {"max_batch_size": 2}}


def timm_then_torchscript(root: Path, version_manifest: dict) -> Path:
    """Version 1: timm state dict under the model-level manifest; version 2: the same model traced to
    TorchScript, with its own model.toml ``version_manifest``. Returns the model directory."""
    write_model(root, "eff", labels=LABELS, architecture=TIMM["architecture"], manifest=TIMM)
    module = build_architecture(TIMM["architecture"], len(LABELS), 3, {}).eval()
    version_dir = root / "eff" / "2"
    version_dir.mkdir()
    torch.jit.save(torch.jit.trace(module, torch.zeros(1, 3, 160, 160)), str(version_dir / "model.ts"))
    (version_dir / "model.toml").write_text(to_toml(version_manifest), encoding="utf-8")
    return root / "eff"


def run(capsys: pytest.CaptureFixture[str], model_dir: Path) -> tuple[int, str, str]:
    code = check([str(model_dir), "--max-batch-size", "2"])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_torchscript_version_that_drops_timm_preprocessing_is_refused(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, timm_then_torchscript(tmp_path, {"architecture": "torchscript"}))
    assert code == 1, out + err
    assert err.strip() == (
        "FAILED: preprocessing differs from serving version 1: size 160x160 → 224x224, resize 168 → 256, "
        "interpolation bicubic → bilinear; set preprocessing_changed = true in the new version's own model.toml "
        "if this is intended")


def test_acknowledged_or_kept_preprocessing_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    acknowledged = timm_then_torchscript(tmp_path / "a", {"architecture": "torchscript", "preprocessing_changed": True})
    code, out, _ = run(capsys, acknowledged)
    assert code == 0
    assert "preprocessing changed from version 1, acknowledged by preprocessing_changed = true: size 160x160" in out
    kept = {"architecture": "torchscript", "input": {"size": 160, "resize": 168, "interpolation": "bicubic"}}
    code, out, _ = run(capsys, timm_then_torchscript(tmp_path / "k", kept))
    assert code == 0
    assert "preprocessing same as version 1, the version serving before it" in out


def test_the_only_version_has_nothing_to_compare_with(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_model(tmp_path, "eff", labels=LABELS, architecture=TIMM["architecture"], manifest=TIMM)
    code, out, _ = run(capsys, tmp_path / "eff")
    assert code == 0 and "preprocessing no older version builds: nothing to compare with" in out
