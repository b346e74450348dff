"""Test helper: classifyd as a real OS process (``python -m server``), for tests that kill it or run several."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.kit import REPO


class DaemonProcess:
    """``python -m server`` in a subprocess; its bound port is read from ``--port-file``."""

    def __init__(self, models_dir: Path, workdir: Path, *extra: str, port: int = 0, name: str = "daemon") -> None:
        self.models_dir = models_dir
        self.extra = extra
        self.port = port
        self.port_file = workdir / f"{name}.port"
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> DaemonProcess:
        """Start without waiting; :meth:`wait_serving` waits."""
        self.port_file.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos"),
                                                            os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, "-m", "server", "--models-dir", str(self.models_dir), "--port", str(self.port),
                   "--port-file", str(self.port_file), "--device", "cpu", *self.extra]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_serving(self, timeout: float = 120.0) -> DaemonProcess:
        """Block until the port file appears. Raises RuntimeError if the process exits first, TimeoutError."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon did not start in {timeout} s: {self.log()}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no graceful stop, as a crash or an OOM kill."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def terminate(self) -> None:
        """SIGTERM without waiting (stop several daemons at once, then :meth:`stop` each)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in ``timeout``. Returns the exit status."""
        if self.process is None:
            return 0
        self.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(30)
