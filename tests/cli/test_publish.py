"""``python -m server publish``: verified before it appears, atomic, numbered in turn; ``--wait`` follows it live."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from classifier.v1 import classifier_pb2 as pb
from safetensors.torch import save_file

from client import ClassifierClient
from server.cli import publish
from server.models.loader.architectures import SmallCNN
from server.models.rollout import Decision, files_digest, record_decision
from server.models.source.repository import fingerprint, version_numbers
from tests.support.daemon_process import DaemonProcess
from tests.support.digits_data import held_out_digits
from tests.support.kit import REPO

pytestmark = pytest.mark.timeout(180)
WEIGHTS = REPO / "models" / "digits" / "1" / "model.safetensors"


def repository(root: Path) -> Path:
    models = root / "models"
    models.mkdir()
    shutil.copytree(REPO / "models" / "digits", models / "digits")
    return models


FAST = ("--default-runtime", "torch")  # as the test daemons run (DaemonProcess): no ONNX export measured


def run_publish(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos")])}
    return subprocess.run([sys.executable, "-m", "server", "publish", *argv, *FAST], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=150)


def test_a_good_version_becomes_the_next_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = repository(tmp_path)
    assert publish.main([str(models / "digits"), str(WEIGHTS), *FAST]) == 0
    assert version_numbers(models / "digits") == [1, 2]
    assert (models / "digits" / "2" / "model.safetensors").read_bytes() == WEIGHTS.read_bytes()
    assert oct((models / "digits" / "2").stat().st_mode & 0o777) != oct(0o700)  # readable like the others
    assert sorted(p.name for p in (models / "digits").iterdir()) == ["1", "2", "labels.txt", "model.toml"]
    assert f"PUBLISHED: {models / 'digits' / '2'}" in capsys.readouterr().out


def test_a_broken_version_is_refused_before_anything_appears(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    models = repository(tmp_path)
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"this is not a safetensors file")
    before = sorted(str(p.relative_to(models)) for p in models.rglob("*"))
    assert publish.main([str(models / "digits"), str(broken), *FAST]) == 1
    err = capsys.readouterr().err
    assert "cannot read weights" in err and "nothing was published" in err
    assert sorted(str(p.relative_to(models)) for p in models.rglob("*")) == before  # not even a staging directory


def test_a_new_model_needs_its_manifest_and_labels_and_appears_whole(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    models = repository(tmp_path)
    with pytest.raises(SystemExit) as usage:
        publish.main([str(models / "fresh"), str(WEIGHTS)])
    assert usage.value.code == 2 and "--manifest and --labels" in capsys.readouterr().err
    digits = REPO / "models" / "digits"
    assert publish.main([str(models / "fresh"), str(WEIGHTS), "--manifest", str(digits / "model.toml"),
                         "--labels", str(digits / "labels.txt"), *FAST]) == 0
    assert sorted(p.name for p in (models / "fresh").iterdir()) == ["1", "labels.txt", "model.toml"]


def test_the_watcher_never_sees_half_a_version(tmp_path: Path) -> None:
    """Every numbered directory that ever shows up holds the complete weights file; staging names are hidden."""
    models = repository(tmp_path)
    size = WEIGHTS.stat().st_size
    seen: list[tuple[str, int]] = []
    done = threading.Event()

    def observe() -> None:
        while True:
            finished = done.is_set()  # one more look after the publish returned: the version must be there
            for entry in os.scandir(models / "digits"):
                if entry.name.isdigit() and entry.name != "1":
                    weights = Path(entry.path) / "model.safetensors"
                    seen.append((entry.name, weights.stat().st_size if weights.exists() else -1))
            if finished:
                return

    watcher = threading.Thread(target=observe)
    watcher.start()
    try:
        assert publish.main([str(models / "digits"), str(WEIGHTS), *FAST]) == 0
    finally:
        done.set()
        watcher.join()
    assert seen and all(observed == ("2", size) for observed in seen)
    assert version_numbers(models / "digits") == [1, 2]


@pytest.mark.process
@pytest.mark.slow
def test_concurrent_publishes_take_turns_and_get_different_numbers(tmp_path: Path) -> None:
    models = repository(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos")])}
    command = [sys.executable, "-m", "server", "publish", str(models / "digits"), str(WEIGHTS), *FAST]
    runs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=150) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    published = sorted(line for out, _ in outputs for line in out.splitlines() if line.startswith("PUBLISHED"))
    assert published == [f"PUBLISHED: {models / 'digits' / '2'}", f"PUBLISHED: {models / 'digits' / '3'}"]
    assert version_numbers(models / "digits") == [1, 2, 3]


@pytest.mark.process
@pytest.mark.slow
def test_publish_wait_exits_0_once_the_daemon_serves_it(tmp_path: Path) -> None:
    models = repository(tmp_path)
    with DaemonProcess(models, tmp_path, "--settle-seconds", "0.2") as daemon:
        done = run_publish(str(models / "digits"), str(WEIGHTS), "--wait", "--target", daemon.target,
                           "--wait-seconds", "120")
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert any(" digits v2 READY (serving)" in line for line in lines), done.stdout
        assert not any(" v2 FAILED" in line for line in lines)


@pytest.mark.process
@pytest.mark.slow
def test_publish_wait_exits_1_when_the_daemon_refuses_it(tmp_path: Path) -> None:
    """A version that loads offline but that the daemon fails (here: the daemon lacks --trust-code)."""
    models = repository(tmp_path)
    model = models / "coded"  # the model's files are there, no version yet
    shutil.copytree(REPO / "models" / "digits", model, ignore=shutil.ignore_patterns("1"))
    (model / "arch.py").write_text("from server.models.loader.architectures import SmallCNN as Net\n")
    manifest = model / "model.toml"
    manifest.write_text(manifest.read_text().replace('"classifyd:small_cnn"', '"python:arch.py:Net"'))
    with DaemonProcess(models, tmp_path, "--settle-seconds", "0.2") as daemon:
        done = run_publish(str(model), str(WEIGHTS), "--trust-code", "--wait", "--target", daemon.target,
                           "--wait-seconds", "120")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "PUBLISHED" in done.stdout and " coded v1 FAILED" in done.stdout, done.stdout
    assert "--trust-code" in done.stdout  # the daemon's reason, printed


@pytest.mark.parametrize("kind, serving, status", [
    ("LOADING", False, None), ("READY", True, 0), ("READY", False, None), ("FAILED", False, 1),
    ("UNLOADED", False, 1)])
def test_events_decide_the_exit_status(kind: str, serving: bool, status: int | None) -> None:
    event = pb.ModelEvent(model="m", version=2, kind=pb.ModelEvent.Kind.Value(kind), serving=serving)
    assert publish.outcome(event) == status


def test_rollout_events_decide_when_this_build_knows_them() -> None:
    known = set(pb.ModelEvent.Kind.keys())
    for kind, status in (("CANDIDATE", None), ("PROMOTED", 0), ("REJECTED", 1), ("AVAILABLE", 3)):
        if kind in known:
            assert publish.outcome(pb.ModelEvent(kind=pb.ModelEvent.Kind.Value(kind))) == status
    assert publish.kind_name(99) == "KIND_99"


@pytest.mark.process
@pytest.mark.slow
def test_publish_wait_exits_1_with_the_agreement_figure_when_a_shadow_rollout_rejects_it(tmp_path: Path) -> None:
    models = repository(tmp_path)
    manifest = models / "digits" / "model.toml"
    manifest.write_text(manifest.read_text() + '\n[rollout]\nmode = "shadow"\nmin_requests = 20\n'
                                                'min_agreement = 0.99\n')
    torch.manual_seed(1)  # random weights: they agree with the trained version on about a tenth of the digits
    untrained = tmp_path / "model.safetensors"
    save_file(SmallCNN(num_classes=10, in_channels=1, width=32).state_dict(), str(untrained))
    stop = threading.Event()
    with DaemonProcess(models, tmp_path, "--settle-seconds", "0.2") as daemon:
        traffic = threading.Thread(target=live_traffic, args=(daemon.target, stop))
        traffic.start()
        try:
            done = run_publish(str(models / "digits"), str(untrained), "--wait", "--target", daemon.target,
                               "--wait-seconds", "120")
        finally:
            stop.set()
            traffic.join()
    assert done.returncode == 1, done.stdout + done.stderr
    assert " digits v2 CANDIDATE" in done.stdout and " digits v2 REJECTED" in done.stdout, done.stdout
    assert "agreement" in done.stderr, done.stderr  # the figures of the daemon's reason


def live_traffic(target: str, stop: threading.Event) -> None:
    """Unpinned requests, one after another, until ``stop``: what the shadow rollout compares."""
    images, _ = held_out_digits()
    with ClassifierClient(target) as client:
        while not stop.is_set():
            for image in images[:40]:
                client.classify_tensor(image, model="digits", timeout=30)


def test_sigterm_interrupts_a_publish_as_ctrl_c_does() -> None:
    """A stopped pipeline job (SIGTERM) unwinds like Ctrl-C, so publish's finally removes its staging copy."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), publish.interrupted_by_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(5)  # the handler raises before this returns
    assert signal.getsignal(signal.SIGTERM) == before


def test_staging_left_by_a_killed_publish_goes_at_the_next_one(tmp_path: Path) -> None:
    models = repository(tmp_path)
    old_inside = models / "digits" / ".publish-abc"
    old_beside = models / ".publish-digits-def"
    fresh = models / "digits" / ".publish-ghi"  # a publish on another host may still be using it
    for path in (old_inside, old_beside, fresh):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"weights")
    for path in (old_inside, old_beside):
        os.utime(path, (0, 0))
    assert publish.main([str(models / "digits"), str(WEIGHTS), *FAST]) == 0
    assert not old_inside.exists() and not old_beside.exists() and fresh.exists()
    assert version_numbers(models / "digits") == [1, 2]


def test_preprocessing_is_compared_with_the_newest_version_not_rejected(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    models = repository(tmp_path)
    rejected = models / "digits" / "2"
    rejected.mkdir()
    shutil.copyfile(WEIGHTS, rejected / "model.safetensors")
    (rejected / "model.toml").write_text("preprocessing_changed = true\n\n[input]\nmean = [0.4]\n")
    record_decision(rejected, Decision(False, "agreement 0.5 < 0.98", "rollout",
                                       files_digest(fingerprint(rejected)), 0.0))
    assert publish.main([str(models / "digits"), str(WEIGHTS), *FAST]) == 0  # like version 1, which serves
    assert "preprocessing same as version 1" in capsys.readouterr().out
