"""The device names a manifest's ``device`` key and the daemon's ``--device`` take, checked by their form.

Pure: no torch. Whether the named device is there is decided at load, by
:func:`server.inference.placement.place` (a device that is not there fails the version's load, not the manifest).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEVICE_UNSET = ""
"""``Manifest.device`` when no model.toml sets it: the version runs on the daemon's ``--device``."""
DEVICE_FORMS = '"cpu", "cuda", "cuda:N" (N a GPU index) or "auto"'
_DEVICE = re.compile(r"cpu|cuda|cuda:\d+|auto")


def device_problem(name: str) -> str:
    """What is wrong with ``name`` as a device name; "" when it is one of :data:`DEVICE_FORMS`."""
    return "" if _DEVICE.fullmatch(name) else f"must be {DEVICE_FORMS}; got {name!r}"


def device_of(manifest: dict[str, Any], path: Path, error: Callable[[Path, str, str], Exception]) -> str:
    """The ``device`` of a decoded manifest (:data:`DEVICE_UNSET` when absent). Raises ``error(path, message,
    key)`` (the manifest parser's ManifestError) for a value that is not a string of one of the forms."""
    value = manifest.get("device", DEVICE_UNSET)
    if not isinstance(value, str):
        raise error(path, f"must be a string: {DEVICE_FORMS}", "device")
    problem = device_problem(value) if value != DEVICE_UNSET else ""
    if problem:
        raise error(path, problem, "device")
    return value
