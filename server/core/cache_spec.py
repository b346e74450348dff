"""A model's ``[cache]``: whether its answers go into the daemon's response cache (server/ops/response_cache.py).

Pure: :func:`server.core.manifest.parse_manifest` calls :func:`cache_of` with its own error type, which names the
file that set the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_KEYS = ("enabled",)


@dataclass(frozen=True)
class CacheSpec:
    """A validated ``[cache]`` table."""

    enabled: bool = False


def cache_of(manifest: dict[str, Any], path: Path, error: Callable[[Path, str, str], Exception]) -> CacheSpec:
    """The ``[cache]`` table of a decoded manifest (none: off). Raises ``error(path, message, key)``."""
    table = manifest.get("cache", {})
    if not isinstance(table, dict):
        raise error(path, "must be a table: [cache] with enabled = true", "cache")
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise error(path, f"unknown key (known: {', '.join(_KEYS)})", f"cache.{unknown[0]}")
    enabled = table.get("enabled", False)
    if not isinstance(enabled, bool):
        raise error(path, f"must be true or false, got {enabled!r}", "cache.enabled")
    return CacheSpec(enabled)
