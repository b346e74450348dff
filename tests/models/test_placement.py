"""Per-model devices: the manifest's ``device`` key, the placement rule (server/inference/placement.py) and one
inference thread per device (server/inference/devices.py). The rule's GPU cases run here on the CPU with torch's
CUDA queries monkeypatched; the tests marked ``cuda`` need real GPUs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import torch

from server.core.manifest import ManifestError, load_manifest
from server.edges.grpc.classifier import model_info
from server.inference import placement
from server.inference.devices import InferenceThreads, device_key
from server.inference.placement import place, place_version, settle
from server.models.manager import ManagerSettings, ModelManager
from tests.support.kit import to_toml, write_model

pytestmark = pytest.mark.timeout(120)

SMALL = {"architecture": "classifyd:small_cnn", "model_args": {"width": 4},
         "input": {"color": "L", "size": 8, "resize": 8}, "batching": {"max_batch_size": 2}}


# ----- the manifest key


@pytest.mark.parametrize("value", ["cpu", "cuda", "cuda:0", "cuda:12", "auto"])
def test_the_device_forms_parse(tmp_path: Path, value: str) -> None:
    version_dir = write_model(tmp_path, "m", manifest={**SMALL, "device": value})
    assert load_manifest(version_dir).device == value


def test_no_device_key_leaves_the_daemons_device(tmp_path: Path) -> None:
    assert load_manifest(write_model(tmp_path, "m", manifest=SMALL)).device == ""


@pytest.mark.parametrize(("value", "says"), [("gpu", 'must be "cpu", "cuda", "cuda:N"'), ("cuda:x", "got 'cuda:x'"),
                                             ("CUDA", "got 'CUDA'"), (1, "must be a string")])
def test_a_bad_device_names_the_key_and_the_forms(tmp_path: Path, value: object, says: str) -> None:
    version_dir = write_model(tmp_path, "m", manifest={**SMALL, "device": value})
    with pytest.raises(ManifestError, match="key 'device'") as raised:
        load_manifest(version_dir)
    assert says in str(raised.value)


def test_a_versions_own_model_toml_sets_its_device(tmp_path: Path) -> None:
    version_dir = write_model(tmp_path, "m", manifest={**SMALL, "device": "cpu"})
    (version_dir / "model.toml").write_text(to_toml({"device": "auto"}), encoding="utf-8")
    manifest = load_manifest(version_dir)
    assert manifest.device == "auto" and manifest.origins["device"] == version_dir / "model.toml"


# ----- the placement rule


def gpus(monkeypatch: pytest.MonkeyPatch, free_gib: list[float]) -> None:
    """Make torch see ``len(free_gib)`` GPUs with that much free memory each."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(free_gib))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(free_gib))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (int(free_gib[index] * 2**30), 80 * 2**30))


def test_auto_takes_the_gpu_with_the_most_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus(monkeypatch, [10.0, 30.5, 20.0])
    chosen = place("auto")
    assert chosen.device == torch.device("cuda", 1)
    assert chosen.why == "auto: most free memory of 3 GPUs (cuda:0 10.0 GiB, cuda:1 30.5 GiB, cuda:2 20.0 GiB free)"
    gpus(monkeypatch, [30.0, 30.0])
    assert place("auto").device == torch.device("cuda", 0)  # a tie: the lowest index


def test_auto_is_the_cpu_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus(monkeypatch, [])
    assert place("auto").device == torch.device("cpu")
    assert placement.pick_device("auto") == torch.device("cpu")  # the daemon's --device follows the same rule


def test_a_gpu_that_is_not_there_is_refused_with_what_torch_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus(monkeypatch, [])
    with pytest.raises(ValueError, match="device 'cuda' is not there: torch sees no CUDA device"):
        place("cuda")
    gpus(monkeypatch, [8.0, 8.0])
    with pytest.raises(ValueError, match=r"device 'cuda:2' is not there: torch sees 2 CUDA device\(s\), cuda:0 to "
                                         "cuda:1"):
        place("cuda:2")
    assert place("cuda:1").device == torch.device("cuda", 1)


def test_auto_counts_versions_placed_and_not_yet_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up places several models before any allocates its weights: each placed one counts its files' size on
    its GPU until it settles, so they spread over equal GPUs instead of all taking the first."""
    gpus(monkeypatch, [10.0, 10.0])
    dirs = [write_model(tmp_path, name, manifest={**SMALL, "device": "auto"}) for name in "abc"]
    placed = [place_version("auto", torch.device("cpu"), d) for d in dirs]
    assert [p.device.index for p in placed] == [0, 1, 0]
    assert placed[0].reserved == sum(f.stat().st_size for f in dirs[0].iterdir() if f.is_file()) > 0
    for chosen in placed:
        settle(chosen)
    settle(placed[0])  # once only
    assert not placement._reserved
    again = place_version("auto", torch.device("cpu"), dirs[1])
    settle(again)
    settle(None)
    assert again.device.index == 0 and not placement._reserved  # built: the GPUs are equal again


def test_a_version_without_a_device_runs_on_the_daemons() -> None:
    chosen = place_version("", torch.device("cpu"))
    assert chosen.device == torch.device("cpu") and chosen.why == "the daemon's --device"
    with pytest.raises(ValueError, match="must be"):
        place("tpu")


# ----- one inference thread per device


def test_one_thread_per_device_and_shutdown_closes_them_all() -> None:
    threads = InferenceThreads()
    cpu = threads.for_device(torch.device("cpu"))
    assert threads.for_device(torch.device("cpu")) is cpu
    first, second = threads.for_device(torch.device("cuda", 0)), threads.for_device(torch.device("cuda", 1))
    assert len({id(cpu), id(first), id(second)}) == 3
    assert threads.devices() == ["cpu", "cuda:0", "cuda:1"]
    assert device_key(torch.device("cuda", 3)) == "cuda:3"
    threads.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        threads.for_device(torch.device("cpu"))
    with pytest.raises(RuntimeError):  # each thread was stopped too
        cpu._executor.submit(lambda: None)


def test_two_devices_threads_run_at_the_same_time() -> None:
    """A call blocked on one device's thread does not hold up another device's (no GPU is touched)."""
    threads = InferenceThreads()
    both = threading.Barrier(2, timeout=10)

    async def scenario() -> list[int]:
        zero, one = threads.for_device(torch.device("cuda", 0)), threads.for_device(torch.device("cuda", 1))
        return list(await asyncio.gather(zero.run(both.wait), one.run(both.wait)))

    try:
        assert sorted(asyncio.run(scenario())) == [0, 1]  # each waited for the other: they ran concurrently
    finally:
        threads.shutdown()


# ----- loading through the manager


T = TypeVar("T")


def with_manager(models: Path, body: Callable[[ModelManager, InferenceThreads], Awaitable[T]]) -> T:
    """``body(manager, threads)`` after the repository loaded, on a manager of the daemon on the CPU with torch as
    the runtime ("auto" would start a background export job per model); everything closed after."""
    threads = InferenceThreads()

    async def scenario() -> T:
        manager = ModelManager(ManagerSettings(models, torch.device("cpu"), default_runtime="torch"), threads)
        try:
            await manager.load_repository()
            return await body(manager, threads)
        finally:
            await manager.aclose()

    try:
        return asyncio.run(scenario())
    finally:
        threads.shutdown()


def test_two_cpu_models_share_the_cpu_thread_and_auto_is_the_cpu_here(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    gpus(monkeypatch, [])
    write_model(tmp_path, "a", manifest={**SMALL, "device": "cpu"})
    write_model(tmp_path, "b", manifest={**SMALL, "device": "auto"})

    async def body(manager: ModelManager, threads: InferenceThreads) -> None:
        a, b = manager.resolve("a"), manager.resolve("b")
        assert a.device == b.device == torch.device("cpu")
        assert threads.for_version(a) is threads.for_version(b) and threads.devices() == ["cpu"]
        assert model_info(manager.get("b"), "cuda:0").device == "cpu"  # the version's placement, not --device
        scores = await threads.for_version(a).run(a.predict, [np.zeros((8, 8, 1), np.uint8)])
        assert scores.shape == (1, 4)

    with_manager(tmp_path, body)


def test_a_device_that_is_not_there_fails_the_version_and_the_previous_keeps_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    gpus(monkeypatch, [])
    write_model(tmp_path, "m", manifest=SMALL)

    async def body(manager: ModelManager, threads: InferenceThreads) -> tuple[int, str, str]:
        version_two = write_model(tmp_path, "m", version=2, manifest=SMALL)
        (version_two / "model.toml").write_text(to_toml({"device": "cuda:1"}), encoding="utf-8")
        await manager.reconcile("m")
        record = manager.get("m")
        return manager.resolve("m").version, record.versions[2].state.name, record.versions[2].error

    caplog.set_level("INFO", logger="classifyd.models")
    serving, state, error = with_manager(tmp_path, body)
    assert (serving, state) == (1, "FAILED")
    assert error.startswith("device 'cuda:1' is not there: torch sees no CUDA device")
    assert "model m version 1 loading: on cpu (the daemon's --device)" in caplog.text


# ----- on real GPUs


@pytest.mark.cuda
def test_versions_on_two_real_gpus_compute_on_their_own_threads_and_auto_takes_one(tmp_path: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    write_model(tmp_path, "zero", manifest={**SMALL, "device": "cuda:0"})
    write_model(tmp_path, "one", manifest={**SMALL, "device": "cuda:1"})
    write_model(tmp_path, "placed", manifest={**SMALL, "device": "auto"})
    pixels = [np.zeros((8, 8, 1), np.uint8)] * 2

    async def body(manager: ModelManager, threads: InferenceThreads) -> None:
        zero, one, placed = (manager.resolve(n) for n in ("zero", "one", "placed"))
        assert (zero.device.index, one.device.index) == (0, 1)
        assert placed.device.type == "cuda" and placed.device.index in range(torch.cuda.device_count())
        assert threads.for_version(zero) is not threads.for_version(one)
        assert await threads.for_version(one).run(torch.cuda.current_device) == 1  # OOM splits empty its cache
        rows = await asyncio.gather(threads.for_version(zero).run(zero.predict, pixels),
                                    threads.for_version(one).run(one.predict, pixels))
        assert [r.shape for r in rows] == [(2, 4), (2, 4)]
        assert model_info(manager.get("one"), "cuda:0").device == "cuda:1"

    with_manager(tmp_path, body)
