"""``architecture = "torch_export"``: a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``).

An exported program only accepts the batch sizes it was exported for: one
static size, or the range of a dynamic ``torch.export.Dim``. :class:`BatchAdapter`
makes any batch fit: it splits batches larger than the program's maximum and
pads smaller ones (with copies of the last input, whose rows are then dropped)
up to its minimum. A program exported with a static batch of 1 therefore
serves one image per forward pass; export with a dynamic batch dimension to
let the batcher's batches through whole. Blocks on file reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class ExportError(ValueError):
    """The file is not a usable exported program."""


class BatchAdapter(nn.Module):
    """Runs an exported program on batches of any size by splitting and padding to its batch range."""

    def __init__(self, program: nn.Module, min_batch: int, max_batch: int | None) -> None:
        super().__init__()
        self.program = program
        self.min_batch = min_batch
        self.max_batch = max_batch

    def train(self, mode: bool = True) -> BatchAdapter:
        # exported programs reject train()/eval(): they were traced in the mode they were exported in
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = x.shape[0]
        if self.min_batch <= count and (self.max_batch is None or count <= self.max_batch):
            return self.program(x)
        step = self.max_batch or count
        outputs = []
        for start in range(0, count, step):
            chunk = x[start:start + step]
            real = chunk.shape[0]
            if real < self.min_batch:
                chunk = torch.cat([chunk, chunk[-1:].expand(self.min_batch - real, *chunk.shape[1:])])
            outputs.append(self.program(chunk)[:real])
        return torch.cat(outputs)


def load_exported(path: Path) -> BatchAdapter:
    """Load a ``torch.export.save`` file as a module that takes any batch size. Raises ExportError."""
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable archive is a failed load
        raise ExportError(f"{path}: cannot load torch.export program: {type(exc).__name__}: {exc}") from None
    inputs = list(program.graph_signature.user_inputs)
    if len(inputs) != 1:
        raise ExportError(f"{path}: the exported program takes {len(inputs)} inputs ({', '.join(inputs)}); "
                          "classifyd passes one image batch [N, C, H, W]")
    min_batch, max_batch = batch_range(program, inputs[0])
    return BatchAdapter(program.module(), min_batch, max_batch)


def batch_range(program: torch.export.ExportedProgram, input_name: str) -> tuple[int, int | None]:
    """The smallest and largest batch the program accepts (largest None: unbounded)."""
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == input_name)
    value = node.meta.get("val")
    if value is None or value.dim() != 4:
        shape = "unknown" if value is None else list(value.shape)
        raise ExportError(f"the exported program's input has shape {shape}; expected [N, C, H, W]")
    batch = value.shape[0]
    if isinstance(batch, int):
        return batch, batch
    bounds = program.range_constraints.get(batch.node.expr)
    if bounds is None:
        return 1, None
    try:
        upper: int | None = int(bounds.upper)
    except (TypeError, ValueError, AttributeError):  # int_oo: no upper bound
        upper = None
    return max(1, int(bounds.lower)), upper
