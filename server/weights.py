"""Turn a version directory's weights file into an ``nn.Module`` in eval mode.

Blocks on file reads and tensor work; call it off the event loop. Raises
:class:`WeightsError` with a message naming the file or the layer at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from server.architectures import ArchitectureError, build_architecture
from server.manifest import WEIGHT_SUFFIXES, Manifest

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")


class WeightsError(ValueError):
    """Weights are missing, unreadable, or do not fit the architecture."""


def find_weights(version_dir: Path, manifest: Manifest) -> Path:
    """The weights file of a version: the manifest's ``weights`` or the only weights file present."""
    if manifest.weights:
        path = version_dir / manifest.weights
        if not path.is_file():
            raise WeightsError(f"{path}: weights file named by the manifest does not exist")
        return path
    found = sorted(p for p in version_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) != 1:
        what = "no weights file" if not found else f"{len(found)} weights files ({', '.join(p.name for p in found)})"
        raise WeightsError(f"{version_dir}: {what}; expected exactly one of *{', *'.join(WEIGHT_SUFFIXES)} "
                           "or 'weights' in the manifest")
    return found[0]


def build_model(version_dir: Path, manifest: Manifest) -> nn.Module:
    """Build the manifest's architecture and load the version's weights into it (eval mode, CPU)."""
    path = find_weights(version_dir, manifest)
    if manifest.architecture == "torchscript":
        return _load_torchscript(path)
    try:
        module = build_architecture(manifest.architecture, manifest.num_classes, manifest.input.channels,
                                    dict(manifest.model_args))
    except (ArchitectureError, TypeError) as exc:
        raise WeightsError(f"{manifest.path}: architecture {manifest.architecture!r}: {exc}") from None
    load_state_dict_strict(module, read_state_dict(path), path)
    return module.eval()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a .pt/.pth checkpoint (weights_only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a failed load, never a served model
        raise WeightsError(f"{path}: cannot read weights: {type(exc).__name__}: {exc}") from None
    return _unwrap(raw, path)


def _unwrap(raw: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(raw, nn.Module):
        raw = raw.state_dict()
    for key in _WRAPPER_KEYS:
        if isinstance(raw, Mapping) and key in raw and isinstance(raw[key], Mapping):
            raw = raw[key]
            break
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise WeightsError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return {_strip_prefix(k): v for k, v in raw.items()}


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_state_dict_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped key is a WeightsError naming it."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        raise WeightsError(f"{path}: weights do not match the architecture; {'; '.join(parts)}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise WeightsError(f"{path}: layer '{key}' has shape {tuple(state[key].shape)} in the file, "
                               f"the architecture expects {tuple(tensor.shape)}")
    module.load_state_dict(state, strict=True)


def _few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _load_torchscript(path: Path) -> nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # noqa: BLE001 - a broken archive is a failed load
        raise WeightsError(f"{path}: cannot load TorchScript archive: {type(exc).__name__}: {exc}") from None
