"""Every fenced block of README.md and docs/recipes.md, run as written (the convention: tests/support/recipes.py).

Each page gets a working directory of its own: a copy of ``models/``, ``.venv`` linked in, and the shipped daemon
(``python -m server``, ``--trust-code``, HTTP on, ``--max-batch-size 4`` so that warm-ups are short) watching
that copy. Blocks run in page order in that directory, each test one block, so the test ids count the blocks run
(``:run``, ``:file``) and not run (``:not-run``, skipped with the page's reason). The only change made to a
block's text is the address: ``127.0.0.1:50051`` and ``127.0.0.1:8080`` become the test daemon's ports, and
``python -m client`` gets ``--target`` for them. After each block the test waits until the daemon has caught up
with the directory, and fails if a version FAILED.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from classifier.v1 import classifier_pb2 as pb

from client import ClassifierClient
from tests.support.daemon_process import SERVER, DaemonProcess
from tests.support.kit import REPO
from tests.support.recipes import Block, blocks

PAGES = {"README.md": REPO / "README.md", "docs/recipes.md": REPO / "docs" / "recipes.md"}
ALL = [block for page, path in PAGES.items() for block in blocks(path, page)]
SETTLE_S = 0.2
BLOCK_TIMEOUT_S = 300
BUSY = {pb.VersionInfo.LOADING, pb.VersionInfo.UNLOADING}


@dataclass
class Workspace:
    """A page's working directory and the daemon serving its ``models/``."""

    root: Path
    daemon: DaemonProcess
    http_port: int

    def address(self, text: str) -> str:
        """``text`` with the documented ports replaced by this daemon's."""
        text = text.replace("127.0.0.1:50051", self.daemon.target)
        text = text.replace("127.0.0.1:8080", f"127.0.0.1:{self.http_port}")
        return text.replace("-m client ", f"-m client --target {self.daemon.target} ")

    def snapshot(self) -> dict[str, float]:
        """Every path under ``models/`` with its modification time: to tell whether a block changed the tree."""
        return {str(p): p.stat().st_mtime for p in (self.root / "models").rglob("*")}

    def catch_up(self, timeout: float = 120.0) -> None:
        """Block until no version is loading or unloading and every model directory's newest version is listed.
        Raises AssertionError if a version FAILED, or with the listing after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with ClassifierClient(self.daemon.target) as client:
            while True:
                models = client.list_models(timeout=10)
                listing = {m.name: {v.version: v.state for v in m.versions} for m in models}
                if self._caught_up(listing):
                    failed = [f"{m.name} v{v.version}: {v.error}" for m in models for v in m.versions
                              if v.state == pb.VersionInfo.FAILED]
                    assert not failed, f"a recipe's version failed to load: {failed}"
                    return
                assert time.monotonic() < deadline, f"daemon did not catch up: {listing}\n{self.daemon.log(3000)}"
                time.sleep(0.1)

    def _caught_up(self, listing: dict[str, dict[int, int]]) -> bool:
        if any(state in BUSY for versions in listing.values() for state in versions.values()):
            return False
        for model in (self.root / "models").iterdir():
            numbered = [int(v.name) for v in model.iterdir() if v.is_dir() and v.name.isdigit()]
            if model.name.startswith(".") or not (model / "model.toml").exists() or not numbered:
                continue
            if max(numbered) not in listing.get(model.name, {}):
                return False
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workspaces:
    """One workspace per page, made on first use (:meth:`get`); :meth:`close` kills their daemons."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.made: dict[str, Workspace] = {}

    def get(self, page: str) -> Workspace:
        """The page's workspace, its daemon serving. Blocks while the daemon starts."""
        if page not in self.made:
            root = self.factory.mktemp(page.replace("/", "_"))
            shutil.copytree(REPO / "models", root / "models")
            (root / ".venv").symlink_to(REPO / ".venv")
            http_port = free_port()
            daemon = DaemonProcess(root / "models", root, "--trust-code", "--http-port", str(http_port),
                                   "--max-batch-size", "4", "--settle-seconds", str(SETTLE_S), entry=SERVER)
            self.made[page] = Workspace(root, daemon.start().wait_serving(), http_port)
            self.made[page].catch_up()
        return self.made[page]

    def close(self) -> None:
        for workspace in self.made.values():
            workspace.daemon.kill()


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspaces]:
    made = Workspaces(tmp_path_factory)
    yield made
    made.close()


def run_block(workspace: Workspace, block: Block) -> None:
    """Run (or write) one block in the workspace. Raises AssertionError with its output when it fails."""
    root = workspace.root
    if block.note_kind == "file":
        target = root / block.note_value
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.text, encoding="utf-8")
        return
    command = ["bash", "-e", "-c"] if block.info == "sh" else [str(REPO / ".venv" / "bin" / "python"), "-c"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos")]),
           "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",  # curl and gRPC: never a proxy
           "XDG_CACHE_HOME": str(root / ".cache")}  # `check` exports runtime = "auto" models: not into ~/.cache
    result = subprocess.run([*command, workspace.address(block.text)], cwd=root, env=env, capture_output=True,
                            text=True, timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, (f"{block.id} exited {result.returncode}\n{block.text}\nstdout:\n{result.stdout}"
                                    f"\nstderr:\n{result.stderr}\ndaemon:\n{workspace.daemon.log(3000)}")


def test_every_block_follows_the_convention() -> None:
    errors = [error for block in ALL if (error := block.rule_error)]
    assert not errors, "\n".join(errors)
    assert len(ALL) > 20


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", ALL, ids=[block.id for block in ALL])
def test_block(block: Block, workspaces: Workspaces) -> None:
    if block.note_kind == "not run":
        pytest.skip(f"not run: {block.note_value}")
    if block.note_kind == "needs" and shutil.which(block.note_value) is None:
        pytest.skip(f"needs {block.note_value}, not installed here")
    assert block.rule_error is None, block.rule_error
    workspace = workspaces.get(block.page)
    before = workspace.snapshot()
    run_block(workspace, block)
    if workspace.snapshot() != before:
        time.sleep(SETTLE_S + 0.8)  # the watcher's settle time, then the reload it starts
    workspace.catch_up()
