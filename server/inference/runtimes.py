"""What runs a version's forward pass: its PyTorch module, or an ONNX Runtime session.

:class:`server.inference.runtime.LoadedVersion` normalises a batch to ``N x C x H x W`` float and hands it to its
runtime (an ONNX graph with the pixel input of :mod:`server.inference.onnx_normalise` takes a uint8 batch as it
is); batching, autotune, tiling, the activation and OOM handling are the same whatever runs the graph. Calls
block (the forward pass): run them on the inference thread, like every forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from server.inference.onnx_normalise import ADDED_INPUTS, PIXELS, float_feed, pixel_feed, pixel_model


class Runtime(Protocol):
    """A forward pass: normalised ``N x C x H x W`` float batch → ``N x classes`` logits."""

    name: str

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


class TorchRuntime:
    """The version's PyTorch module, called as it is (eager, compiled or exported)."""

    name = "torch"

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module(batch)


@dataclass(frozen=True)
class OnnxInput:
    """The graph's image input as read from the ONNX file: its name and ``N x C x H x W`` dimensions
    (None where the dimension is dynamic, a symbol or unknown)."""

    name: str
    dims: tuple[int | None, ...]
    outputs: int
    """How many outputs the graph has (the first one is used)."""
    classes: int | None
    """The first output's last dimension when the graph fixes it."""


class OnnxRuntime:
    """An ``onnxruntime.InferenceSession`` on the CPU execution provider; ``source`` says where the graph came
    from (the version's model.onnx, or the cached export of its module)."""

    name = "onnxruntime"

    def __init__(self, session: ort.InferenceSession, source: str) -> None:
        self.session = session
        self.source = source
        self.input = describe_session(session)
        self.takes_pixels = any(i.name == PIXELS for i in session.get_inputs())
        """Whether the graph also takes uint8 ``N x H x W x C`` batches and normalises them itself
        (:mod:`server.inference.onnx_normalise`): ``LoadedVersion.predict`` feeds those through :meth:`pixels`."""

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        # ORT takes dense C-order arrays: a channels-last batch is copied once here
        array = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        feed = float_feed(self.input.name, array) if self.takes_pixels else {self.input.name: array}
        logits = self.session.run(None, feed)[0]
        return torch.from_numpy(np.asarray(logits)).to(batch.device)

    def pixels(self, batch: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
        """Logits of an ``N x H x W x C`` uint8 batch, normalised inside the graph with ``mean`` and ``inv_std``
        (``1 x C x 1 x 1``): the same float32 operations as the torch normalisation. Needs :attr:`takes_pixels`."""
        feed = pixel_feed(self.input.name, batch.cpu().numpy(), mean.cpu().numpy(), inv_std.cpu().numpy())
        return torch.from_numpy(np.asarray(self.session.run(None, feed)[0])).to(batch.device)


def open_session(model: Path | bytes, threads: int, *, pixels: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime session for ``model`` (a file or its bytes) on the CPU with ``threads`` intra-op threads
    (the host rule's torch thread count: server/ops/host.py) and one inter-op thread, with (``pixels``) the uint8
    pixel input prepended where the graph allows it (:func:`server.inference.onnx_normalise.pixel_model`; its
    inputs must then all be fed: :class:`OnnxRuntime` does). Blocks (the rewrite
    and graph optimisation, seconds for a large model); raises onnxruntime's errors for a file it cannot load."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    # Idle intra-op threads sleep rather than spin: spinning takes the cores JPEG decoding needs. Served
    # mobilenet_v3_small at concurrency 32 (docs/benchmarks.md): 414 img/s without spinning against 339 with it,
    # and the same median at concurrency 1 (4.85 ms against 4.88 ms; p99 5.7 against 11.6 ms).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise in our logs
    if pixels:
        model = pixel_model(model)  # uint8 batches normalised in the graph, where the graph allows it
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def describe_session(session: ort.InferenceSession) -> OnnxInput:
    """The session's single image input and its outputs. Raises ValueError for a graph with more than one input
    or no output."""
    inputs = [i for i in session.get_inputs() if i.name not in ADDED_INPUTS]  # onnx_normalise's pixel path
    outputs = session.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise ValueError(f"the ONNX graph has {len(inputs)} inputs and {len(outputs)} outputs; classifyd serves "
                         "graphs with one image input (N x C x H x W) and the logits as first output")
    dims = tuple(d if isinstance(d, int) else None for d in inputs[0].shape)
    last = outputs[0].shape[-1] if outputs[0].shape else None
    return OnnxInput(inputs[0].name, dims, len(outputs), last if isinstance(last, int) else None)
