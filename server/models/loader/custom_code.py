"""``architecture = "python:<file>:<name>"``: a model class from a Python file of the model directory.

Loading such a file executes it, so it is refused unless the daemon runs with
``--trust-code``. Each load imports the file under a fresh module name, so a
hot swap of the code (a changed ``arch.py``) builds from the new file and never
from a cached module. Blocks on file reads and on the user's code.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from server.core.manifest import find_file

PREFIX = "python:"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_loads = itertools.count(1)


class CustomCodeError(ValueError):
    """The custom architecture is refused, missing, or does not build an ``nn.Module``."""


def parse_reference(architecture: str) -> tuple[str, str]:
    """``python:arch.py:DefectClassifier`` → ``("arch.py", "DefectClassifier")``. Raises CustomCodeError."""
    file_name, _, name = architecture[len(PREFIX):].rpartition(":")
    if not file_name.endswith(".py") or "/" in file_name or "\\" in file_name or not _IDENTIFIER.match(name):
        raise CustomCodeError(f"architecture {architecture!r}: expected 'python:<file>.py:<ClassName>' with the "
                              "file in the model or version directory")
    return file_name, name


def require_trust(architecture: str, version_dir: Path, trust_code: bool) -> Path:
    """The code file ``architecture`` names. Raises CustomCodeError when code may not run (no --trust-code)."""
    file_name, _ = parse_reference(architecture)
    path = find_file(version_dir, file_name)
    if not trust_code:
        raise UntrustedCode(architecture, path)
    return path


class UntrustedCode(CustomCodeError):
    """A ``python:`` architecture refused because code may not run; :meth:`advise` words the fix per command."""

    DAEMON = "start classifyd with --trust-code to allow it"

    def __init__(self, architecture: str, path: Path) -> None:
        self.architecture = architecture
        self.path = path
        super().__init__(self.advise(self.DAEMON))

    def advise(self, how: str) -> str:
        """The refusal, ending with ``how`` to allow the code (the daemon's flag, or ``check``'s)."""
        return f"architecture {self.architecture!r} runs the Python code of {self.path}; refused: {how}"


def build_custom(architecture: str, version_dir: Path, num_classes: int, in_channels: int,
                 args: dict[str, Any], *, trust_code: bool) -> nn.Module:
    """Import the file named by ``architecture`` and call the class (or factory) it names.

    ``num_classes`` and ``in_channels`` are passed when the constructor takes parameters of those names and
    ``args`` (the manifest's ``[model_args]``) does not set them. Raises CustomCodeError.
    """
    path = require_trust(architecture, version_dir, trust_code)
    name = parse_reference(architecture)[1]
    if not path.is_file():
        raise CustomCodeError(f"architecture {architecture!r}: {path} does not exist (looked in the version "
                              "directory, then the model directory)")
    factory = getattr(_import(path), name, None)
    if not callable(factory):
        raise CustomCodeError(f"{path} defines no class or function {name!r}")
    kwargs = {**_implicit_args(factory, num_classes, in_channels, args), **args}
    try:
        module = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's constructor may raise anything: a failed load
        raise CustomCodeError(f"{path}: {name}({_show(kwargs)}) raised {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise CustomCodeError(f"{path}: {name}(...) returned {type(module).__name__}, not a torch.nn.Module")
    return module


def _import(path: Path) -> Any:
    """Execute ``path`` as a new module; it is not left in ``sys.modules``, so nothing is cached."""
    module_name = f"classifyd_custom_{next(_loads)}_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise CustomCodeError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and typing look the module up while it executes
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any error in the user's file fails the load
        raise CustomCodeError(f"{path}: importing it raised {type(exc).__name__}: {exc}") from None
    finally:
        sys.modules.pop(module_name, None)
    return module


def _implicit_args(factory: Any, num_classes: int, in_channels: int, args: dict[str, Any]) -> dict[str, Any]:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    offered = {"num_classes": num_classes, "in_channels": in_channels}
    return {k: v for k, v in offered.items() if k in parameters and k not in args}


def _show(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
