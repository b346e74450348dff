"""The runtime job's pieces without a subprocess: the correctness gate's inputs (at most 32 validation samples,
one label at a time), and the job's result for every failure (it never raises)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from server.core.manifest import parse_manifest
from server.inference.runtime import LoadedVersion
from server.models.loader import onnx
from server.models.loader.gate import MAX_IMAGES, gate_inputs
from server.models.loader.runtime_job import JobRequest, RuntimeSpeed, choose, run_job
from tests.models.test_onnx import SMALL
from tests.support.kit import write_model

LABELS = ("a", "b", "c", "d")


def version(**keys: Any) -> LoadedVersion:
    manifest = parse_manifest({"architecture": "classifyd:small_cnn", "input": {"size": 8, "resize": 8}, **keys},
                              Path("model.toml"), LABELS)
    return LoadedVersion(name="m", version=1, manifest=manifest, module=nn.Identity(), device=torch.device("cpu"),
                         max_batch_size=4, max_delay_ms=0.0)


def test_the_gate_decodes_at_most_32_samples_taking_every_label_in_turn(tmp_path: Path) -> None:
    shade = {label: 40 * (i + 1) for i, label in enumerate(LABELS)}
    for label in LABELS:
        folder = tmp_path / "samples" / label
        folder.mkdir(parents=True)
        for i in range(10):  # 40 samples: the gate takes 8 of each label
            Image.fromarray(np.full((8, 8, 3), shade[label], np.uint8)).save(folder / f"{i}.png")
        (folder / "z-broken.png").write_bytes(b"not an image")  # last of each label: never decoded
    inputs = gate_inputs(version(), tmp_path)
    assert inputs.kind == "validation samples" and len(inputs.arrays) == MAX_IMAGES
    labels = [next(label for label, value in shade.items() if abs(float(a.mean()) - value) < 3) for a in inputs.arrays]
    assert labels[:4] == list(LABELS) and all(labels.count(label) == 8 for label in LABELS)


def test_the_job_reports_any_export_or_measurement_failure_as_its_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    version_dir = write_model(tmp_path / "models", "animals", labels=list(LABELS), manifest=SMALL)
    request = JobRequest(version_dir, tmp_path / "cache", measure_s=0.01)

    def session_fails(*args: Any) -> None:
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model failed")  # what ONNX Runtime raises

    monkeypatch.setattr(onnx, "cached_export", session_fails)
    result = run_job(request)
    assert (result.runtime, result.reason) == (
        "torch", "the export could not be opened or checked: RuntimeError: [ONNXRuntimeError] : 1 : FAIL : Load "
                 "model failed")


def test_speeds_measured_on_a_busy_host_say_so_and_an_idle_measurement_does_not(tmp_path: Path) -> None:
    version_dir = write_model(tmp_path / "models", "animals", labels=list(LABELS), manifest=SMALL)
    idle = run_job(JobRequest(version_dir, tmp_path / "cache", measure_s=0.05))
    assert "busy host" not in idle.reason  # this test's own passes get a CPU (nothing else runs beside them)
    speeds = [RuntimeSpeed("torch", 1, 13.0), RuntimeSpeed("torch", 8, 20.0),
              RuntimeSpeed("onnxruntime", 1, 900.0), RuntimeSpeed("onnxruntime", 8, 935.0)]
    starved = choose(speeds, "model.onnx", "gate passed", cpu_share=0.25)
    assert starved.runtime == "onnxruntime"  # the choice stands
    assert "47× eager" in starved.reason and "on a busy host (the passes had a CPU 25% of their time" in starved.reason
    assert "busy host" not in choose(speeds, "model.onnx", "gate passed", cpu_share=0.9).reason
