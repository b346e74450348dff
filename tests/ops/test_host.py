"""The rule for worker processes and torch threads per process (server/ops/host.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.ops import host


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
