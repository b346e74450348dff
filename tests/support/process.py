"""The daemon in a process of its own (``python -m tests.support.serve``), for shutdown, fuzz and overload tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tests.support.faults  # noqa: F401 - write_model builds the test architectures in this process too
from tests.support.kit import REPO

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class DaemonProcess:
    """Starts ``python -m tests.support.serve --port 0 --port-file ...``; ``target`` once it serves."""

    def __init__(self, models_dir: Path, workdir: Path, *flags: str, start_timeout: float = 120) -> None:
        self.port_file = workdir / "port"
        self.log_path = workdir / "daemon.log"
        self.port_file.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos")])}
        command = [sys.executable, "-m", "tests.support.serve", "--models-dir", str(models_dir), "--port", "0",
                   "--port-file", str(self.port_file), "--device", "cpu", *flags]
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.port = self._wait_for_port(start_timeout)

    def _wait_for_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode} while starting:\n{self.log()}")
            if self.port_file.exists():
                return int(self.port_file.read_text())
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"daemon did not start within {timeout} s:\n{self.log()}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        """The daemon's resident memory now."""
        return int(Path(f"/proc/{self.pid}/statm").read_text(encoding="ascii").split()[1]) * PAGE_SIZE

    def alive(self) -> bool:
        return self.process.poll() is None

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(30)
        self._log.close()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
