"""Test helper: classifyd in an OS process of its own, for tests that signal it, kill it, run several or watch
its memory.

By default the process runs ``python -m tests.support.serve``: the real command line with the test
architectures registered (``classifyd:test_slow``...). ``entry=SERVER`` runs ``python -m server`` itself, for
``--workers`` (whose spawned workers import the parent's main module) and for replicas of the shipped daemon.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.kit import REPO

SERVER = "server"
"""``python -m server``: the daemon exactly as shipped."""
TEST_SERVER = "tests.support.serve"
"""``python -m tests.support.serve``: the same, with the test architectures registered."""
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class DaemonProcess:
    """``python -m <entry> --port-file ...`` in a subprocess, its output in ``workdir/<name>.log``.

    ``start()`` returns at once and ``wait_serving()`` blocks until the port file appears; as a context manager
    it does both and kills the process (SIGKILL) on exit. ``start()`` again after ``kill()`` restarts it with the
    same flags (and the same port once one was bound, unless ``port`` was 0 and the kernel picks another).
    """

    def __init__(self, models_dir: Path, workdir: Path, *flags: str, port: int = 0, name: str = "daemon",
                 entry: str = TEST_SERVER) -> None:
        self.models_dir = models_dir
        self.flags = flags
        self.port = port
        self.entry = entry
        self.port_file = workdir / f"{name}.port"
        self.log_path = workdir / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The running (or exited) process. Raises AssertionError before :meth:`start`."""
        assert self._process is not None, "DaemonProcess.start() was not called"
        return self._process

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> DaemonProcess:
        """Start without waiting; :meth:`wait_serving` waits."""
        self.port_file.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(REPO / "protos"),
                                                                          os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", self.entry, "--models-dir", str(self.models_dir), "--port", str(self.port),
                   "--port-file", str(self.port_file), "--device", "cpu", "--default-runtime", "torch", *self.flags]
        with self.log_path.open("ab") as log:  # appends: a restarted daemon's log follows the first one's
            self._process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_serving(self, timeout: float = 120.0) -> DaemonProcess:
        """Block until the port file appears: the initial load is done, every model tried (the port answers
        earlier, health NOT_SERVING; tests/daemon/test_startup.py watches that). Raises RuntimeError if the process
        exits first, TimeoutError
        (after killing it) if it does not serve within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode} while starting:\n{self.log(4000)}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"daemon did not start within {timeout} s:\n{self.log(4000)}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        return self

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def rss_bytes(self) -> int:
        """The daemon's resident memory now."""
        return int(Path(f"/proc/{self.pid}/statm").read_text(encoding="ascii").split()[1]) * PAGE_SIZE

    def log(self, tail: int | None = None) -> str:
        """What the daemon printed so far (its last ``tail`` characters if given)."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return text if tail is None else text[-tail:]

    def wait(self, timeout: float) -> int:
        """Block until the process exits; its exit status. Raises subprocess.TimeoutExpired."""
        return self.process.wait(timeout)

    def terminate(self) -> None:
        """SIGTERM without waiting (stop several daemons at once, then :meth:`stop` each)."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in ``timeout``. Returns the exit status."""
        if self._process is None:
            return 0
        self.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(30)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no graceful stop. Nothing to do once it exited."""
        if self.alive():
            self.process.kill()
        if self._process is not None:
            self._process.wait(30)

    def __enter__(self) -> DaemonProcess:
        return self.start().wait_serving()

    def __exit__(self, *exc: object) -> None:
        self.kill()
