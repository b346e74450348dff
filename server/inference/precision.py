"""Which precision a model runs at on its device, and the autocast context that applies it.

``fp16`` needs CUDA: on any other device the model runs in ``fp32`` and the
reason is reported (logged at load, and ``ModelInfo.precision`` says ``fp32``).
``bf16`` runs under autocast on the CPU and on CUDA devices that support it.
"""

from __future__ import annotations

import contextlib

import torch

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def effective_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """The precision the model will run at, and why it differs from ``requested`` ("" when it does not)."""
    if requested == "fp16" and device.type != "cuda":
        return "fp32", f"precision fp16 needs a CUDA device; running fp32 on {device}"
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp32", f"precision bf16 is not supported by {torch.cuda.get_device_name(device)}; running fp32"
    if requested == "bf16" and device.type not in ("cpu", "cuda"):
        return "fp32", f"precision bf16 is only applied on cpu and cuda devices; running fp32 on {device}"
    return requested, ""


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op for fp32). Enter it on the inference thread."""
    dtype = _DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
