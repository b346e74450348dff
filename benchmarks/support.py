"""Shared pieces of the benchmark scripts: a daemon subprocess, random-init model directories, run facts.

Nothing here measures anything; the scripts in this folder do.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_SERVING = re.compile(r"classifyd serving on (\S+):(\d+)")


class DaemonProcess:
    """``python -m server`` in a subprocess on a free port, its log in a file. Use as a context manager."""

    def __init__(self, models_dir: Path, log_path: Path, *flags: str) -> None:
        self.command = [sys.executable, "-m", "server", "--models-dir", str(models_dir), "--port", "0", *flags]
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.target = ""

    def start(self, timeout_s: float = 300.0) -> str:
        """Start and wait until it serves; returns ``host:port``. Raises RuntimeError with the log's tail."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "protos"), env.get("PYTHONPATH")]))
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = _SERVING.search(self.log_path.read_text(encoding="utf-8", errors="replace"))
            if match:
                self.target = f"{match.group(1)}:{match.group(2)}"
                return self.target
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"daemon did not start: {' '.join(self.command)}\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (graceful stop), then SIGKILL if it has not exited within 30 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> DaemonProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def manifest_text(architecture: str, *, input_table: dict[str, Any] | None = None,
                  batching: dict[str, Any] | None = None, top: dict[str, Any] | None = None) -> str:
    """A model.toml with an architecture, optional top-level keys (``top``) and [input] and [batching] tables."""
    lines = [f'architecture = "{architecture}"'] + [f"{k} = {_toml(v)}" for k, v in (top or {}).items()]
    for name, table in (("input", input_table), ("batching", batching)):
        if table:
            lines += ["", f"[{name}]"] + [f"{k} = {_toml(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def torchvision_weights(arch: str, path: Path, *, seed: int, num_classes: int = 1000) -> Path:
    """Save random-init weights of ``torchvision:<arch>`` (never downloaded) as safetensors at ``path``."""
    import torch
    from safetensors.torch import save_file

    from server.models.loader.architectures import build_architecture

    torch.manual_seed(seed)
    module = build_architecture(f"torchvision:{arch}", num_classes, 3, {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def write_torchvision_model(models_dir: Path, arch: str, *, seed: int = 0, num_classes: int = 1000,
                            batching: dict[str, Any] | None = None, top: dict[str, Any] | None = None,
                            input_table: dict[str, Any] | None = None) -> Path:
    """``models_dir/<arch>/`` with a manifest (``top``-level keys, ``[input]`` and ``[batching]`` tables as
    given), ``num_classes`` labels and version 1. Returns the version dir."""
    model_dir = models_dir / arch
    model_dir.mkdir(parents=True, exist_ok=True)
    manifest = manifest_text(f"torchvision:{arch}", batching=batching, top=top, input_table=input_table)
    (model_dir / "model.toml").write_text(manifest, encoding="utf-8")
    (model_dir / "labels.txt").write_text("".join(f"class{i}\n" for i in range(num_classes)), encoding="utf-8")
    torchvision_weights(arch, model_dir / "1" / "model.safetensors", seed=seed, num_classes=num_classes)
    return model_dir / "1"


def copy_digits(models_dir: Path) -> Path:
    """The default digits model copied into ``models_dir``. Returns its version 1 directory."""
    shutil.copytree(REPO / "models" / "digits", models_dir / "digits")
    return models_dir / "digits" / "1"


def run_facts(script: str, device: str = "cpu") -> dict[str, Any]:
    """Machine, software, date, commit and command (``python -m <script> <args>``) for the record."""
    import torch
    import torchvision

    from client.bench import machine

    facts = {**machine(), "torch": torch.__version__, "torchvision": torchvision.__version__,
             "torch_threads": torch.get_num_threads(), "device": device, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
             "commit": _commit(), "command": " ".join(["python -m", script, *sys.argv[1:]])}
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def _commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=False, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               check=False, timeout=10)
    except OSError:
        return "unknown"
    return result.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if result.returncode == 0 else "unknown"


def facts_block(facts: dict[str, Any]) -> str:
    """The run facts as a Markdown list."""
    gpu = f", GPU {facts['gpu']}" if "gpu" in facts else ""
    return "\n".join([
        f"- Machine: {facts['cpu']}, {facts['cores']} cores{gpu} (host {facts['host']})",
        f"- Software: Python {facts['python']}, torch {facts['torch']} ({facts['torch_threads']} threads), "
        f"torchvision {facts['torchvision']}, grpcio {facts['grpcio']}; device {facts['device']}",
        f"- Date: {facts['date']}; commit {facts['commit']}",
        f"- Command: `{facts['command']}`",
    ])


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def emit(section: str, markdown: Path | None) -> None:
    """Print a results section and, with ``markdown``, append it to that file (the scripts' ``--markdown``)."""
    print(section)
    if markdown:
        with markdown.open("a", encoding="utf-8") as handle:
            handle.write("\n" + section)
