"""Shared fixtures (a real daemon over a temporary model repository) and the hooks every test relies on."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch

from tests.support.architectures import register_test_architectures
from tests.support.kit import DaemonThread, running_daemon
from tests.support.repository import build_test_repository


def pytest_configure(config: pytest.Config) -> None:
    """Register the test architectures (``classifyd:test_gated``...) before any test builds a model."""
    register_test_architectures()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where torch sees no CUDA device (the one copy of that rule)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def check_defaults_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m server check`` in process serves manifests that set no runtime on torch, as the test kit's daemons
    do (tests/support/kit.py): its default, auto, would export and measure every test model. Tests of auto say so."""
    monkeypatch.setattr("server.cli.check.DEFAULT_RUNTIME", "torch")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    root = build_test_repository(tmp_path_factory.mktemp("models"))
    with running_daemon(root) as running:
        yield running


@pytest.fixture
def channel(daemon: DaemonThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(daemon.target) as chan:
        yield chan
