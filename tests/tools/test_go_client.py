"""The Go client (client/go: the ``classify`` library and command) built from Debian's packages and run against a
real daemon process.

Skipped, with the reason, where the Go toolchain or Debian's grpc-go and protobuf source packages are missing
(``.ci/run`` installs them). The build is ``client/go/build.sh``: GOPATH mode over ``/usr/share/gocode``, stubs
generated from this checkout's proto, no module proxy.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon_process import DaemonProcess
from tests.support.kit import REPO

pytestmark = [pytest.mark.slow, pytest.mark.process, pytest.mark.timeout(300)]
GO_PACKAGES = "golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev " \
              "golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev"  # as .ci/run installs them
GOCODE = Path("/usr/share/gocode/src")
FIXTURES = REPO / "client" / "node" / "test" / "fixtures"


def _missing() -> list[str]:
    tools = [t for t in ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc") if shutil.which(t) is None]
    sources = [str(GOCODE / p) for p in ("google.golang.org/grpc", "google.golang.org/protobuf")
               if not (GOCODE / p).is_dir()]
    return tools + sources


@pytest.fixture(scope="module")
def classify_command(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The command, built once for the module. Fails (not skips) when the packages are there but the build fails."""
    missing = _missing()
    if missing:
        pytest.skip(f"no Go toolchain from Debian's packages ({', '.join(missing)} missing): "
                    f"apt-get install {GO_PACKAGES}")
    out = tmp_path_factory.mktemp("go-client")
    built = subprocess.run([str(REPO / "client" / "go" / "build.sh"), str(out)], capture_output=True, text=True,
                           timeout=240, check=False)
    assert built.returncode == 0, f"client/go/build.sh failed:\n{built.stdout}\n{built.stderr}"
    return out / "classify"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, classify_command: Path) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("go-daemon")
    shutil.copytree(REPO / "models" / "digits", root / "models" / "digits")
    with DaemonProcess(root / "models", root) as process:
        yield process


def _run(command: Path, daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(command), "--target", daemon.target, *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_go_command_classifies_images_with_the_default_model(classify_command: Path, daemon: DaemonProcess) -> None:
    images = [FIXTURES / "digit-8.png", FIXTURES / "digit-2.png"]
    done = _run(classify_command, daemon, "--top-k", "1", "--request-id", "go-1", *map(str, images))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{images[0]}: digits v1 (batch 1, request go-1)"
    assert lines[1].split()[1:] == ["8", "八"]  # score, index, label
    assert lines[2].startswith(f"{images[1]}: digits v1 (batch 1")
    assert lines[3].split()[1:] == ["2", "二"]


def test_go_command_lists_models_and_names_the_status_of_a_failure(classify_command: Path,
                                                                   daemon: DaemonProcess) -> None:
    listed = _run(classify_command, daemon, "--models")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == ["digits (serving version 1, 1 versions)"]
    image = FIXTURES / "digit-0.png"
    missing = _run(classify_command, daemon, "--model", "no-such-model", str(image))
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"{image}: NotFound: ")
    assert "no-such-model" in missing.stderr
    usage = _run(classify_command, daemon)
    assert usage.returncode == 2
    assert "usage: classify" in usage.stderr
