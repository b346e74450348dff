"""Test helpers: a real daemon on port 0 in a background thread, and model directories built on the fly."""

from __future__ import annotations

import asyncio
import io
import shutil
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from server.core.config import ServerConfig
from server.daemon import Daemon
from server.models.loader.architectures import build_architecture

REPO = Path(__file__).resolve().parents[2]


class DaemonThread:
    """Runs :class:`Daemon` on its own event loop in a thread, so tests can use blocking clients."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.daemon: Daemon | None = None
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="daemon", daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> DaemonThread:
        self._thread.start()
        if not self._ready.wait(120):
            raise TimeoutError("daemon did not start")
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.daemon = Daemon(self.config)
        self.port = await self.daemon.start()
        self._ready.set()
        await self._stop.wait()
        await self.daemon.stop(2.0)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the daemon's loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


def local_config(models_dir: Path, **settings: Any) -> ServerConfig:
    """A :class:`ServerConfig` serving ``models_dir`` on the CPU, 127.0.0.1 and a free port, with flat ``settings``
    (``watch=False, http_port=0, tls_cert=...``), each given to the config section with a field of that name.
    Raises TypeError for a name no section has."""
    # torch unless a test asks for another runtime: "auto" would start a background export job per test model
    flat = {"models_dir": models_dir, "port": 0, "device": "cpu", "default_runtime": "torch", **settings}
    defaults = ServerConfig()
    sections: dict[str, Any] = {}
    for section in fields(ServerConfig):
        kind = type(getattr(defaults, section.name))
        sections[section.name] = kind(**{f.name: flat.pop(f.name) for f in fields(kind) if f.name in flat})
    if flat:
        raise TypeError(f"no config section has {', '.join(flat)}")
    return ServerConfig(**sections)


@contextmanager
def running_daemon(models_dir: Path, **settings: Any) -> Iterator[DaemonThread]:
    """A daemon serving ``models_dir`` on 127.0.0.1 and a free port (:func:`local_config`), stopped on exit."""
    thread = DaemonThread(local_config(models_dir, **settings)).start()
    try:
        yield thread
    finally:
        thread.stop()


def write_model(root: Path, name: str, *, version: int = 1, labels: list[str] | None = None,
                architecture: str = "classifyd:small_cnn", manifest: dict[str, Any] | None = None,
                seed: int = 0, module: nn.Module | None = None) -> Path:
    """Write ``root/name`` with a manifest, labels and random-init safetensors weights. Returns the version dir.

    Published as docs/hot-swap.md recommends, so a watching daemon never sees half of it: a new version is written
    under a hidden name and renamed into place, new weights of an existing version replace the old file in one
    rename, and the model's shared files are written only when their content changes (a rewrite alone changes
    their mtime, which reloads every version that uses them)."""
    labels = labels or [f"class{i}" for i in range(4)]
    manifest = {"architecture": architecture, **(manifest or {})}
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    _write_if_changed(model_dir / "labels.txt", "\n".join(labels) + "\n")
    _write_if_changed(model_dir / "model.toml", to_toml(manifest))
    if module is None:
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[manifest.get("input", {}).get("color", "RGB")]
        torch.manual_seed(seed)
        module = build_architecture(architecture, len(labels), channels, dict(manifest.get("model_args", {})))
    tensors = {k: v.contiguous() for k, v in module.state_dict().items()}
    version_dir = model_dir / str(version)
    staging = model_dir / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(tensors, str(staging / "model.safetensors"))
    if version_dir.is_dir():
        (staging / "model.safetensors").replace(version_dir / "model.safetensors")
        staging.rmdir()
    else:
        staging.rename(version_dir)
    return version_dir


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def to_toml(data: dict[str, Any]) -> str:
    """A tiny TOML writer for manifests (scalars, lists, one level of tables)."""
    lines = [f"{k} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_value(v)}" for k, v in table.items()]
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)
    return text


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return repr(value)


def encode(array: np.ndarray, fmt: str = "PNG", **params: Any) -> bytes:
    """Encode an ``H x W`` or ``H x W x C`` uint8 array as an image file."""
    image = Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


class Gate:
    """A switch a test model's forward pass waits on, so tests control when batches finish."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Semaphore(0)
        self.batches: list[int] = []

    def close(self) -> None:
        """Make forward passes block from now on, forgetting batches that entered before."""
        self.open.clear()
        self.entered = threading.Semaphore(0)
        self.batches = []


GATE = Gate()


class GatedModel(nn.Module):
    """A tiny classifier whose forward blocks until ``GATE.open`` is set and records batch sizes."""

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        GATE.batches.append(x.shape[0])
        GATE.entered.release()
        GATE.open.wait(30)
        return self.linear(x.mean(dim=(2, 3)))


class PacedModel(nn.Module):
    """A tiny classifier whose forward pass sleeps for a batch time the test chooses (``model_args``):
    ``base_ms + per_item_ms * b`` up to ``knee`` items, then ``slow_ms`` more for each item beyond."""

    def __init__(self, num_classes: int, in_channels: int = 1, base_ms: float = 5.0, per_item_ms: float = 1.0,
                 knee: int = 8, slow_ms: float = 10.0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, num_classes)
        self.base_ms, self.per_item_ms, self.knee, self.slow_ms = base_ms, per_item_ms, knee, slow_ms

    def batch_s(self, size: int) -> float:
        return (self.base_ms + self.per_item_ms * min(size, self.knee) + self.slow_ms * max(0, size - self.knee)) / 1e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.batch_s(x.shape[0]))
        return self.linear(x.mean(dim=(2, 3)))
