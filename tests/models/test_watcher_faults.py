"""Watcher faults contained: filesystem errors of the models directory are an outage, not a change.

A real daemon watches a temp models directory. The directory renamed away and back, or a stale NFS handle
(``ESTALE``, simulated), must unload nothing, kill no watcher task, be logged once per outage, and leave the
watcher finding the next published version.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from client import tensor_request
from server.models import manager as manager_module
from server.models.source import repository, watcher
from tests.support.kit import DaemonThread, running_daemon, write_model

pytestmark = pytest.mark.timeout(120)
SMALL = {"input": {"color": "L", "size": 8, "resize": 8}, "model_args": {"width": 8}}
REQUEST = tensor_request(np.zeros((8, 8), np.uint8), model="m")


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def serving(stub: pb_grpc.ClassifierStub) -> int:
    return stub.GetModel(pb.GetModelRequest(model="m"), timeout=10).serving_version


def publish(models_dir: Path, version: int) -> None:
    """Version ``version`` of model ``m``: a copy of version 1, renamed into place."""
    staging = models_dir / "m" / f".staging-{version}"
    shutil.copytree(models_dir / "m" / "1", staging)
    staging.rename(models_dir / "m" / str(version))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_model(root, "m", manifest=SMALL)
    return root


@pytest.fixture
def daemon(repo: Path) -> Iterator[DaemonThread]:
    with running_daemon(repo, settle_s=0.2, rescan_s=0.3) as running:
        yield running


def logged_once_per_outage(caplog: pytest.LogCaptureFixture, cause: str = "") -> None:
    """Each outage (of the models directory, or of one model's directory) was logged once when it started, with
    ``cause``, and once when it ended: not once per retry."""
    messages = [r.getMessage() for r in caplog.records if r.name == "classifyd.watch"]
    started = [m.partition(" cannot be read")[0] for m in messages if " cannot be read " in m]
    ended = [m.partition(" can be read again")[0] for m in messages if " can be read again " in m]
    assert started and sorted(started) == sorted(set(started)) == sorted(ended), messages
    assert all(cause in m for m in messages if " cannot be read " in m)


def test_the_models_directory_renamed_away_and_back_unloads_nothing_and_a_new_version_goes_live(
        repo: Path, daemon: DaemonThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="classifyd.watch")
    away = repo.with_name("models-away")
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        assert serving(stub) == 1
        repo.rename(away)
        (away / "m" / "1" / "touched").write_text("an event for model m while its directory is away")
        outage = daemon.daemon.watcher.outage
        wait_for(lambda: outage.errors >= 3)  # the rescan and the reconcile of m retried, with backoff
        assert stub.Classify(REQUEST, timeout=20).version == 1  # still loaded: an outage removes nothing
        away.rename(repo)
        wait_for(lambda: outage.errors == 0)
        publish(repo, 2)
        wait_for(lambda: serving(stub) == 2)
        assert stub.Classify(REQUEST, timeout=20).version == 2
    logged_once_per_outage(caplog)
    assert any("models directory" in r.getMessage() and "is not there" in r.getMessage() for r in caplog.records)


async def no_events(*args: Any, stop_event: Any, **kwargs: Any) -> AsyncIterator[set[tuple[int, str]]]:
    """A watch that reports nothing (a network filesystem without change events): only the rescan finds changes."""
    await stop_event.wait()
    return
    yield set()  # an async generator, as watchfiles.awatch is


def test_a_stale_file_handle_during_rescans_does_not_kill_the_rescan(
        repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="classifyd.watch")
    stale = {"on": False}

    def flaky(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if stale["on"]:
                raise OSError(errno.ESTALE, "Stale file handle", str(args[0]))
            return real(*args)
        return call

    monkeypatch.setattr(watcher.watchfiles, "awatch", no_events)
    monkeypatch.setattr(watcher, "model_names", flaky(repository.model_names))
    monkeypatch.setattr(manager_module, "model_present", flaky(repository.model_present))
    with running_daemon(repo, settle_s=0.2, rescan_s=0.3) as daemon, grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        outage = daemon.daemon.watcher.outage
        stale["on"] = True
        wait_for(lambda: outage.errors >= 3)
        assert stub.Classify(REQUEST, timeout=20).version == 1
        stale["on"] = False
        publish(repo, 2)  # no watch event: only a rescan that survived the outage can find it
        wait_for(lambda: serving(stub) == 2)
    logged_once_per_outage(caplog, "Stale file handle")
