"""The rule for worker processes and torch threads per process (server/ops/host.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.ops import host

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("device", "cores", "workers"), [
    ("cpu", 1, 1), ("cpu", 2, 2), ("cpu", 16, 8), ("cuda", 2, 1), ("cuda", 8, 2), ("cuda", 16, 4), ("cuda", 64, 4),
])
def test_default_workers(device: str, cores: int, workers: int) -> None:
    assert host.default_workers(device, cores=cores) == workers


@pytest.mark.parametrize(("workers", "cores", "threads"), [(1, 2, 2), (2, 2, 1), (4, 16, 4), (8, 3, 1), (0, 4, 4)])
def test_torch_threads_share_the_cores_between_workers(workers: int, cores: int, threads: int) -> None:
    assert host.default_torch_threads(workers, cores=cores) == threads


def test_cgroup_quota_lowers_the_usable_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(host, "CGROUP_CPU_MAX", quota)
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert host.available_cores() == 8  # no file
    quota.write_text("max 100000\n")
    assert host.available_cores() == 8
    quota.write_text("250000 100000\n")
    assert host.available_cores() == 2
    quota.write_text("50000 100000\n")
    assert host.available_cores() == 1


def test_apply_sets_and_returns_the_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        assert host.apply_torch_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert host.apply_torch_threads(None, workers=1) == host.default_torch_threads(1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("workers", "cores", "threads"), [(1, 64, 64), (1, 2, 2), (1, 1, 2), (4, 16, 4), (8, 8, 2)])
def test_preprocessing_threads_share_the_cores_between_workers(workers: int, cores: int, threads: int) -> None:
    assert host.default_pool_threads(workers, cores=cores) == threads


def test_a_2_cpu_pod_on_a_64_core_node_gets_2_preprocessing_threads(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("200000 100000\n")
    monkeypatch.setattr(host, "CGROUP_CPU_MAX", quota)
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(host.os, "cpu_count", lambda: 64)
    assert host.default_pool_threads() == 2


def test_the_decode_budget_is_a_quarter_of_the_memory_shared_by_the_workers() -> None:
    assert host.default_decode_bytes(1, memory=16 << 30) == 4 << 30
    assert host.default_decode_bytes(4, memory=16 << 30) == 1 << 30
    assert host.default_decode_bytes(0, memory=8 << 30) == 2 << 30


def test_a_cgroup_memory_limit_lowers_the_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(host, "CGROUP_MEMORY_MAX", limit)
    total = host.available_memory()  # no file: the machine's RAM
    assert total == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit.write_text("max\n")
    assert host.available_memory() == total
    limit.write_text(f"{2 << 30}\n")
    assert host.available_memory() == min(total, 2 << 30)
    assert host.default_decode_bytes() == min(total, 2 << 30) // 4
    limit.write_text("garbage\n")
    assert host.available_memory() == total


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_memory_can_go_back_to_the_system_on_glibc() -> None:
    assert host._malloc_trim() is not None
    assert isinstance(host.return_freed_memory(), bool)


FREE_AND_REFAULT = """
import resource, sys
from server.ops.host import keep_freed_memory
print(keep_freed_memory())
import numpy as np
big = np.ones(12 << 20, dtype=np.uint8)  # mmap'd, then freed: glibc's trim threshold moves to 24 MiB
del big
def pass_like() -> None:  # a forward pass's activations: blocks on the heap, all freed at the end
    blocks = [np.ones(4 << 20, dtype=np.uint8) for _ in range(10)]
    del blocks
pass_like()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    pass_like()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


def faults_per_pass(env: dict[str, str]) -> tuple[str, int]:
    """A fresh process's allocator message and the page faults of each pass after the first."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", FREE_AND_REFAULT], env={**clean, **env}, cwd=REPO,
                          capture_output=True, text=True, check=True, timeout=60)
    message, faults = done.stdout.strip().splitlines()
    return message, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_memory_a_pass_frees_is_kept_for_the_next_one_instead_of_refaulted() -> None:
    message, kept = faults_per_pass({})
    assert "freed memory stays in the process" in message
    chosen, default = faults_per_pass({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"})  # a choice: left alone
    assert "left as the environment sets it (GLIBC_TUNABLES)" in chosen
    if default < 1000:
        pytest.skip(f"this glibc kept the memory by itself ({default} faults a pass): nothing to compare")
    assert kept < 100 < default


@pytest.mark.parametrize(("name", "value"), [("MALLOC_TRIM_THRESHOLD_", "1"), ("MALLOC_MMAP_THRESHOLD_", "1"),
                                             ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")])
def test_an_allocator_the_environment_chose_is_left_alone(monkeypatch: pytest.MonkeyPatch, name: str,
                                                          value: str) -> None:
    called: list[tuple[int, int]] = []
    monkeypatch.setattr(host, "_mallopt", lambda: lambda param, value: called.append((param, value)) or 1)
    monkeypatch.setenv(name, value)
    assert "left as the environment sets it" in host.keep_freed_memory()
    assert called == []


def test_without_mallopt_the_allocator_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*host.ALLOCATOR_ENVIRONMENT, "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(host, "_mallopt", lambda: None)
    assert host.keep_freed_memory() == "memory allocator left as it is (not glibc)"
    monkeypatch.setattr(host, "_mallopt", lambda: lambda param, value: 0)
    assert "glibc refused" in host.keep_freed_memory()


def _own_nice() -> int:
    import threading
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_a_thread_lowers_its_own_priority_and_only_its_own() -> None:
    from concurrent.futures import ThreadPoolExecutor

    def lowered(increment: int) -> tuple[bool, int, int]:
        before = _own_nice()
        return host.lower_thread_priority(increment), before, _own_nice()

    main_before = _own_nice()
    with ThreadPoolExecutor(max_workers=1) as pool:
        done, before, after = pool.submit(lowered, 3).result()
        assert done and after == min(19, before + 3)
        assert pool.submit(lowered, 0).result() == (False, after, after)  # 0: nothing changes
    assert _own_nice() == main_before  # the calling thread of the pool is untouched


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_inputs_for_an_eager_cpu_forward_pass_are_prepared_at_a_lower_priority_and_others_not() -> None:
    import asyncio
    from types import SimpleNamespace

    from server.inference.prepare import InputPreparer

    eager = SimpleNamespace(device=torch.device("cpu"), runtime=None)
    onnx = SimpleNamespace(device=torch.device("cpu"), runtime=SimpleNamespace(name="onnxruntime"))
    gpu = SimpleNamespace(device=torch.device("cuda"), runtime=None)

    async def nice_for(nice: int, version: object) -> int:
        preparer = InputPreparer(workers=2, nice=nice)
        try:
            pool = preparer.pool_for(version)  # type: ignore[arg-type]
            return await asyncio.get_running_loop().run_in_executor(pool, _own_nice)
        finally:
            preparer.shutdown()

    base = _own_nice()
    assert asyncio.run(nice_for(5, eager)) == min(19, base + 5)
    assert asyncio.run(nice_for(5, onnx)) == base
    assert asyncio.run(nice_for(5, gpu)) == base
    assert asyncio.run(nice_for(0, eager)) == base


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_prepare_decodes_an_eager_version_s_input_on_the_lower_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    from types import SimpleNamespace

    from server.inference import prepare

    base = _own_nice()
    if base > 14:
        pytest.skip("the test process is already near the lowest priority")
    monkeypatch.setattr(prepare, "_prepare", lambda held, *args: _own_nice())  # what prepare() runs in the pool
    version = SimpleNamespace(device=torch.device("cpu"), runtime=None, decodes_on_device=False,
                              manifest=SimpleNamespace(input=SimpleNamespace(), tiling=None))

    async def nice_of_prepare() -> int:
        preparer = prepare.InputPreparer(workers=1, nice=5)
        try:
            return await preparer.prepare(b"not an image", version)  # type: ignore[arg-type,return-value]
        finally:
            preparer.shutdown()

    assert asyncio.run(nice_of_prepare()) == base + 5
