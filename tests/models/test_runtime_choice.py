"""``runtime = "auto"``: a version goes live on PyTorch, a niced background job exports, verifies and measures it,
and it switches to ONNX Runtime between batches when that is verified and faster; otherwise it stays on PyTorch
with the reason. The correctness gate's inputs (samples, ``warmup/``, synthetic) and its message."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from PIL import Image

from client import image_request
from server.cli import check
from server.inference.devices import InferenceThreads
from server.inference.runtimes import OnnxRuntime, TorchRuntime
from server.models.loader import onnx
from server.models.loader.gate import gate_inputs
from server.models.loader.pipeline import LoadFailed
from server.models.loader.runtime_job import JobRequest, JobResult
from server.models.manager import ManagerSettings, ModelManager
from tests.models.test_model_formats import local_scores, scores
from tests.models.test_onnx import LABELS, NORM, SMALL, inference, load, module_of  # noqa: F401 -- a fixture
from tests.support.kit import encode, running_daemon, write_model

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

TRICKY = '''
import torch
from torch import nn


class Tricky(nn.Module):
    """Scores that hang on a Python-level branch: an exporter traces it once, on its all-zero example."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.conv(x).mean(dim=(2, 3)))
        if bool(x.abs().sum() > 0):  # true for every real image, false for the exporters' example
            logits = logits * 4.0
        return logits
'''


def runtime_events(daemon: Any, timeout: float = 240.0) -> list[dict[str, Any]]:
    """The daemon's events, oldest first, once one reports the runtime choice (the job is a real subprocess)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = daemon.daemon.events.recent()[::-1]
        if any(e["reason"].startswith("runtime ") for e in events):
            return events
        assert not any(e["kind"] == "FAILED" for e in events), events
        time.sleep(0.2)
    raise AssertionError(f"no runtime choice within {timeout} s: {daemon.daemon.events.recent()}")


def model_info(daemon: Any, name: str) -> pb.ModelInfo:
    with grpc.insecure_channel(daemon.target) as channel:
        return pb_grpc.ClassifierStub(channel).GetModel(pb.GetModelRequest(model=name), timeout=60)


def classify(daemon: Any, name: str, pixels: np.ndarray) -> np.ndarray:
    with grpc.insecure_channel(daemon.target) as channel:
        return scores(pb_grpc.ClassifierStub(channel).Classify(image_request(encode(pixels), model=name, top_k=4),
                                                               timeout=60))


@pytest.mark.slow
def test_auto_goes_live_on_torch_then_switches_to_onnxruntime_and_a_restart_reuses_the_export(
        tmp_path: Path) -> None:
    version_dir = write_model(tmp_path / "models", "animals", labels=LABELS, manifest=SMALL)
    cache = tmp_path / "cache"
    pixels = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with running_daemon(tmp_path / "models", watch=False, cache_dir=cache, default_runtime="auto",
                        http_port=0) as daemon:
        events = runtime_events(daemon)
        info = model_info(daemon, "animals")
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.daemon.http_port}/v1/models/animals",
                                    timeout=60) as reply:
            described = json.loads(reply.read())
        serving = type(daemon.daemon.manager.resolve("animals").runtime)  # type: ignore[union-attr]
        answer = classify(daemon, "animals", pixels)
    kinds = [(e["kind"], e["reason"]) for e in events if e["model"] == "animals"]
    assert [k for k, _ in kinds] == ["LOADING", "READY", "READY"]  # live first (on torch), then the switch
    assert kinds[2][1].startswith("runtime switched to onnxruntime (") and "× eager)" in kinds[2][1]
    assert serving is OnnxRuntime
    assert info.runtime == "onnxruntime" and "export made now" in info.runtime_reason
    assert {(s.runtime, s.batch_size) for s in info.runtime_speeds} == {
        ("torch", 1), ("torch", 8), ("onnxruntime", 1), ("onnxruntime", 8)}
    assert (described["runtime"], described["runtime_reason"]) == ("onnxruntime", info.runtime_reason)
    assert len(described["runtime_speeds"]) == 4
    np.testing.assert_allclose(answer, local_scores(module_of(version_dir), pixels, *NORM), atol=onnx.TOLERANCE)
    (cached,) = cache.glob("*.onnx")
    stamp = cached.stat().st_mtime_ns
    with running_daemon(tmp_path / "models", watch=False, cache_dir=cache, default_runtime="auto") as daemon:
        runtime_events(daemon)
        info = model_info(daemon, "animals")
    assert info.runtime == "onnxruntime" and "export from the cache" in info.runtime_reason
    assert list(cache.glob("*.onnx")) == [cached] and cached.stat().st_mtime_ns == stamp  # no re-export


@pytest.mark.slow
def test_a_model_whose_onnx_scores_differ_stays_on_torch_with_the_largest_difference(tmp_path: Path) -> None:
    torch.manual_seed(0)
    namespace: dict[str, Any] = {}
    exec(TRICKY, namespace)  # the test's own model code, also written for the daemon to load
    version_dir = write_model(tmp_path / "models", "tricky", labels=LABELS, architecture="python:tricky.py:Tricky",
                              module=namespace["Tricky"](),
                              manifest={"input": SMALL["input"], "batching": SMALL["batching"], "runtime": "auto"})
    (version_dir / "tricky.py").write_text(TRICKY)
    with running_daemon(tmp_path / "models", watch=False, cache_dir=tmp_path / "cache", trust_code=True) as daemon:
        events = runtime_events(daemon)
        info = model_info(daemon, "tricky")
        serving = type(daemon.daemon.manager.resolve("tricky").runtime)  # type: ignore[union-attr]
        classify(daemon, "tricky", np.zeros((32, 32, 3), np.uint8))  # still served
    (choice,) = [e for e in events if e["reason"].startswith("runtime ")]
    assert choice["kind"] == "READY" and choice["reason"].startswith("runtime stays torch: ")
    assert serving is TorchRuntime and info.runtime == "torch"
    assert "largest probability difference" in info.runtime_reason and "on synthetic image" in info.runtime_reason
    assert not info.runtime_speeds


def auto_manager(models: Path, cache: Path, command: Any) -> tuple[InferenceThreads, ModelManager, list[str]]:
    """A manager of ``models`` with ``runtime = "auto"`` by default whose jobs run ``command``; its events' reasons."""
    thread = InferenceThreads()
    manager = ModelManager(ManagerSettings(models, torch.device("cpu"), cache_dir=cache, default_runtime="auto"),
                           thread)
    reasons: list[str] = []
    manager.add_listener(lambda event: reasons.append(event.reason))
    manager.runtimes.command = command
    return thread, manager, reasons


def test_a_version_replaced_while_its_job_runs_never_switches_and_shutdown_kills_the_job(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_model(models, "animals", labels=LABELS, manifest=SMALL)
    pids = tmp_path / "pids"
    pids.mkdir()

    def stand_in(request: JobRequest) -> list[str]:  # a job that never ends on its own; says it started, and how
        marker = pids / request.version_dir.name
        return [sys.executable, "-c", f"import ctypes, os, time; c = ctypes.c_int(); ctypes.CDLL(None).prctl(2, "
                                      f"ctypes.byref(c)); open({str(marker)!r} + '.how', 'w').write(f'{{os.nice(0)}} "
                                      f"{{c.value}}'); open({str(marker)!r}, 'w').write(str(os.getpid())); "
                                      "time.sleep(120)"]

    async def wait_for(path: Path) -> int:
        for _ in range(600):
            if path.is_file() and path.read_text():
                return int(path.read_text())
            await asyncio.sleep(0.05)
        raise AssertionError(f"the job never started: {path}")

    async def scenario() -> tuple[type, int, list[str]]:
        thread, manager, reasons = auto_manager(models, tmp_path / "cache", stand_in)
        try:
            await manager.load_repository()
            first_pid = await wait_for(pids / "1")
            write_model(models, "animals", version=2, labels=LABELS, manifest=SMALL, seed=1)
            await manager.reconcile("animals")  # version 2 takes over; version 1 retires, its job is killed
            second_pid = await wait_for(pids / "2")  # one job at a time: version 2's starts once 1's is gone
            assert not _alive(first_pid)
            serving = type(manager.resolve("animals").runtime)
        finally:
            await manager.aclose()
            thread.shutdown()
        return serving, second_pid, reasons

    serving, second_pid, reasons = asyncio.run(scenario())
    assert serving is TorchRuntime
    assert (pids / "1.how").read_text() == "19 9"  # started niced, and SIGKILLed (9) if the daemon dies
    assert not _alive(second_pid)  # shutdown killed the running job
    assert not any(r.startswith("runtime ") for r in reasons)


def choose_with(tmp_path: Path, command: Any, manifest: dict[str, Any], between: Any = None) -> list[str]:
    """The events' reasons once ``command`` (a stand-in job) ran for the only version; ``between(version_dir)``
    runs once the job started (it writes ``started`` into its working directory) and before it may end."""
    version_dir = write_model(tmp_path / "models", "animals", labels=LABELS, manifest=manifest)

    async def scenario() -> list[str]:
        thread, manager, reasons = auto_manager(tmp_path / "models", tmp_path / "c", command)
        try:
            await manager.load_repository()
            if between is not None:
                while not (tmp_path / "started").is_file():
                    await asyncio.sleep(0.05)
                between(version_dir)
                (tmp_path / "go").write_text("")
            for _ in range(1200):
                if any(r.startswith("runtime ") for r in reasons) or manager.runtimes.idle():
                    break
                await asyncio.sleep(0.05)
        finally:
            await manager.aclose()
            thread.shutdown()
        return reasons

    return asyncio.run(scenario())


def test_a_job_that_cannot_start_is_reported_and_torch_serves_on(tmp_path: Path) -> None:
    reasons = choose_with(tmp_path, lambda request: [str(tmp_path / "no-such-python")], SMALL)
    (reason,) = [r for r in reasons if r.startswith("runtime ")]
    assert reason.startswith("runtime stays torch: the runtime job could not start: ") and "no-such-python" in reason


def test_auto_on_a_version_onnx_runtime_cannot_serve_starts_no_job(tmp_path: Path) -> None:
    started: list[JobRequest] = []
    reasons = choose_with(tmp_path, lambda request: started.append(request) or [sys.executable, "-c", ""],
                          {**SMALL, "precision": "bf16"})
    assert not started and not any(r.startswith("runtime ") for r in reasons)


def test_an_export_of_files_edited_after_the_load_is_never_switched_to(tmp_path: Path) -> None:
    result = JobResult("onnxruntime", "faster", (), str(tmp_path / "export.onnx"))
    job = (f"import pathlib, time; d = pathlib.Path({str(tmp_path)!r}); (d / 'started').write_text(''); "
           f"[time.sleep(0.05) for _ in range(2400) if not (d / 'go').exists()]; print({result.to_json()!r})")

    def edit(version_dir: Path) -> None:  # edited in place (a reload of it would fail, the loaded version serves on)
        weights = next(version_dir.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes() + b" ")

    reasons = choose_with(tmp_path, lambda request: [sys.executable, "-c", job], SMALL, edit)
    (reason,) = [r for r in reasons if r.startswith("runtime ")]
    assert reason.startswith("runtime stays torch: the files in ") and "changed after the version was loaded" in reason


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def write_warmup(version_dir: Path, count: int) -> list[str]:
    folder = version_dir / "warmup"
    folder.mkdir()
    rng = np.random.default_rng(11)
    names = [f"w{i}.png" for i in range(count)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / name)
    return names


def test_the_warmup_dir_feeds_the_warm_up_and_the_gate(
        tmp_path: Path, inference: InferenceThreads, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    version_dir = write_model(tmp_path / "models", "animals", labels=LABELS,
                              manifest={**SMALL, "runtime": "onnxruntime"})
    names = write_warmup(version_dir, 3)
    with caplog.at_level(logging.INFO, logger="classifyd.models"):
        loaded = load(inference, version_dir, tmp_path / "cache")
    assert "warm-up at batch size 4 on 3 warmup/ image(s)" in caplog.text
    assert "on 3 warmup/ images (tolerance" in caplog.text
    inputs = gate_inputs(loaded.version, version_dir)
    assert (inputs.kind, inputs.names) == ("warmup/ images", names)
    assert inputs.arrays[0].shape == (32, 32, 3)  # preprocessed as requests are (resized to the input)


def test_explicit_onnxruntime_with_a_failing_gate_fails_the_load_naming_the_largest_difference(
        tmp_path: Path, inference: InferenceThreads) -> None:  # noqa: F811
    version_dir = write_model(tmp_path / "models", "animals", labels=LABELS,
                              manifest={**SMALL, "runtime": "onnxruntime"})
    write_warmup(version_dir, 2)
    cache = tmp_path / "cache"
    load(inference, version_dir, cache).version.release()
    (cached,) = cache.glob("*.onnx")
    other = write_model(tmp_path / "other", "animals", labels=LABELS, manifest={**SMALL, "runtime": "onnxruntime"},
                        seed=7)
    load(inference, other, tmp_path / "other-cache").version.release()
    shutil.copy(next((tmp_path / "other-cache").glob("*.onnx")), cached)  # other weights under this key
    with pytest.raises(LoadFailed, match=r"largest probability difference [0-9.e-]+ \(tolerance 0.0001\) on "
                                         r"w[01]\.png, label '(cat|dog|fox|owl)' \(PyTorch [0-9.]+, ONNX Runtime "
                                         r"[0-9.]+\); top-1 differs on [0-9] of 2 warmup/ images"):
        load(inference, version_dir, cache)


@pytest.mark.slow
def test_check_prints_the_runtime_auto_chooses_and_the_speeds_it_measured(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_model(tmp_path / "models", "animals", labels=LABELS, manifest={**SMALL, "runtime": "auto"})
    assert check.main([str(tmp_path / "models" / "animals"), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "runtime       auto: measuring eager PyTorch against ONNX Runtime" in out
    chosen = next(line for line in out.splitlines() if line.startswith("runtime       ") and "chosen: " in line)
    assert chosen.split()[1] in ("torch", "onnxruntime") and "× eager" in chosen and "gate passed on 8" in chosen
    for name in ("torch", "onnxruntime"):
        line = next(line for line in out.splitlines() if line.startswith(f"  {name} "))
        assert "images/s at batch 1" in line and "at batch 8" in line
    assert list((tmp_path / "cache").glob("*.onnx"))  # the daemon's cache: the daemon reuses this export
