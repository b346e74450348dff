"""Turn a version directory's weights file into an ``nn.Module`` in eval mode.

Blocks on file reads and tensor work; call it off the event loop. Raises
:class:`WeightsError` with a message naming the file or the layer at fault.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from server.core.manifest import WEIGHT_SUFFIXES, Manifest
from server.models.loader import custom_code
from server.models.loader.architectures import ArchitectureError, build_architecture
from server.models.loader.exported import ExportError, load_exported

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")


class WeightsError(ValueError):
    """Weights are missing, unreadable, or do not fit the architecture.

    ``file_outputs`` is set when the classification head's output count differs from the architecture's,
    ``file_in_channels`` when the first convolution's input channels do, ``untrusted`` when code may not run.
    """

    def __init__(self, message: str, *, file_outputs: int | None = None, file_in_channels: int | None = None,
                 untrusted: custom_code.UntrustedCode | None = None) -> None:
        super().__init__(message)
        self.file_outputs = file_outputs
        self.file_in_channels = file_in_channels
        self.untrusted = untrusted


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


def build_model(version_dir: Path, manifest: Manifest, *, trust_code: bool = False) -> nn.Module:
    """Build the manifest's architecture and load the version's weights into it (eval mode, CPU).

    ``trust_code`` allows ``python:`` architectures, which execute a file of the model directory.
    """
    architecture = manifest.architecture
    if architecture.startswith(custom_code.PREFIX):
        try:
            custom_code.require_trust(architecture, version_dir, trust_code)
        except custom_code.UntrustedCode as exc:
            raise WeightsError(str(exc), untrusted=exc) from None
        except custom_code.CustomCodeError as exc:
            raise WeightsError(str(exc)) from None
    path = find_weights(version_dir, manifest)
    _check_archive_kind(path, architecture)
    if architecture == "torchscript":
        return _load_torchscript(path)
    if architecture == "torch_export":
        try:
            return load_exported(path).eval()
        except ExportError as exc:
            raise WeightsError(str(exc)) from None
    module = _construct(version_dir, manifest, trust_code)
    try:
        load_state_dict_strict(module, read_state_dict(path), path)
    except WeightsError as exc:
        raise WeightsError(f"{exc}{_hint(exc, manifest)}") from None
    return module.eval()


def _check_archive_kind(path: Path, architecture: str) -> None:
    """An exported program or TorchScript archive under another architecture is named first, before any other error."""
    kind = archive_kind(path)
    if kind is not None and kind != architecture:
        raise WeightsError(f"{path}: {archive_advice(kind, architecture)}")


def _construct(version_dir: Path, manifest: Manifest, trust_code: bool) -> nn.Module:
    args = dict(manifest.model_args)
    try:
        if manifest.architecture.startswith(custom_code.PREFIX):
            return custom_code.build_custom(manifest.architecture, version_dir, manifest.num_classes,
                                            manifest.input.channels, args, trust_code=trust_code)
        return build_architecture(manifest.architecture, manifest.num_classes, manifest.input.channels, args)
    except custom_code.CustomCodeError as exc:
        raise WeightsError(str(exc)) from None
    except (ArchitectureError, TypeError) as exc:
        raise WeightsError(f"{manifest.path}: architecture {manifest.architecture!r}: {exc}") from None


def _hint(exc: WeightsError, manifest: Manifest) -> str:
    """The usual cause of a head or first-layer shape mismatch: the labels file, or the input colour."""
    if exc.file_outputs is not None:
        return (f"; the weights have {exc.file_outputs} outputs but labels.txt has {manifest.num_classes} labels "
                "(label count must equal the model's output width)")
    if exc.file_in_channels is not None:
        return (f"; the weights take {exc.file_in_channels} input channel(s) but [input] color = "
                f"{manifest.input.color!r} gives {manifest.input.channels}")
    return ""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a .pt/.pth checkpoint (weights_only).

    A file that is an exported program, a TorchScript archive or a pickled module is named as such first,
    with what to do instead; torch's own message is passed on only for other failures, without colour codes.
    """
    kind = archive_kind(path)
    if kind is not None:
        raise WeightsError(f"{path}: {archive_advice(kind)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(f"{path}: {_pickled_advice(str(exc))}") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is a failed load, never a served model
        raise WeightsError(f"{path}: cannot read weights: {type(exc).__name__}: {plain(str(exc))}") from None
    return _unwrap(raw, path)


ARCHIVES = {"torch_export": "torch.export program", "torchscript": "TorchScript archive"}


def archive_advice(kind: str, architecture: str | None = None) -> str:
    """Said first when the weights file is a self-describing archive the manifest's architecture does not read."""
    given = f'the manifest gives "{architecture}"' if architecture else "not a state dict"
    return f'the file is a {ARCHIVES[kind]}: set architecture = "{kind}" ({given})'

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_SAVE_STATE_DICT = ('save the weights only: torch.save(model.state_dict(), "model.pt"), or '
                    'safetensors.torch.save_file(model.state_dict(), "model.safetensors")')


def plain(message: str) -> str:
    """``message`` without terminal colour codes (torch marks up some of its errors)."""
    return _ANSI.sub("", message)


def _pickled_advice(message: str) -> str:
    """What to do when a checkpoint holds pickled Python objects (usually a whole module) instead of tensors."""
    found = _GLOBAL.search(message)
    what = f"a pickled {found.group(1)} object" if found else "pickled Python objects"
    return (f"the file holds {what} (torch.save(model) saves the whole module), not a state dict; "
            f"classifyd never unpickles code: {_SAVE_STATE_DICT}")


def archive_kind(path: Path) -> str | None:
    """``"torch_export"`` or ``"torchscript"`` when the file is such a self-describing archive, else None."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    if any(n.endswith("/archive_format") or "serialized_exported_program" in n for n in names):
        return "torch_export"
    if any(n.endswith("/constants.pkl") or "/code/__torch__/" in n for n in names):
        return "torchscript"
    return None


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
    last = [k for k, t in expected.items() if t.dim() > 0][-2:]  # the head: the last weight and bias
    first_conv = next((k for k, t in expected.items() if t.dim() == 4), None)
    for key, tensor in expected.items():
        found = state[key]
        if tuple(found.shape) == tuple(tensor.shape):
            continue
        same_rank = found.dim() == tensor.dim()
        head = key in last and same_rank and found.shape[1:] == tensor.shape[1:]
        stem = key == first_conv and same_rank and found.shape[0] == tensor.shape[0] and \
            found.shape[2:] == tensor.shape[2:]
        raise WeightsError(f"{path}: layer '{key}' has shape {tuple(found.shape)} in the file, "
                           f"the architecture expects {tuple(tensor.shape)}",
                           file_outputs=int(found.shape[0]) if head else None,
                           file_in_channels=int(found.shape[1]) if stem else None)
    module.load_state_dict(state, strict=True)


def _few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _load_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():  # torch deprecates TorchScript in favour of torch.export; still loads it
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # noqa: BLE001 - a broken archive is a failed load
        raise WeightsError(f"{path}: cannot load TorchScript archive: {type(exc).__name__}: {plain(str(exc))}") \
            from None
