"""The model repository on disk: which versions exist, and whether their files have settled.

Stdlib only. A version directory is considered for loading only once its
files have stopped changing for a settle period, so a copy in progress is
never loaded half-written.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from server.core.rollout import DECISION_FILE

_VERSION_DIR = re.compile(r"^[0-9]+$")
# Files of the model directory that every version reads (manifest, labels, custom architecture code).
_SHARED_SUFFIXES = (".toml", ".txt", ".py")

Fingerprint = tuple[tuple[str, int, int], ...]


class RepositoryUnreachable(FileNotFoundError):
    """The models directory itself is gone (renamed away, unmounted): a filesystem outage, which says nothing
    about the models in it. Other outages (a stale NFS handle) raise their own OSError."""


def version_numbers(model_dir: Path) -> list[int]:
    """Numbered version directories of a model; anything else (``.tmp-3``, ``samples``) is ignored; none for a
    model directory that is gone. Blocks; raises RepositoryUnreachable when the models directory is gone too,
    OSError for other filesystem errors."""
    try:
        entries = list(model_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        _check_reachable(model_dir.parent)
        return []
    return sorted(int(p.name) for p in entries if _VERSION_DIR.match(p.name) and p.is_dir())


def model_present(models_dir: Path, name: str) -> bool:
    """Whether model ``name`` has a directory in the repository. Blocks; raises RepositoryUnreachable when the
    models directory itself is gone (its models are not removed by that), OSError for other filesystem errors."""
    if (models_dir / name).is_dir():
        return True
    _check_reachable(models_dir)
    return False


def model_names(models_dir: Path) -> list[str]:
    """Model directories of the repository (hidden ones, such as ``.staging``, are skipped). Blocks; raises
    OSError (RepositoryUnreachable when the models directory is gone)."""
    _check_reachable(models_dir)
    return sorted(p.name for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_reachable(models_dir: Path) -> None:
    if not models_dir.is_dir():
        raise RepositoryUnreachable(f"models directory {models_dir} is not there (renamed, removed or unmounted)")


def fingerprint(version_dir: Path) -> Fingerprint:
    """Path, size and mtime of every file a version loads from: its own files and the model's shared files.

    Blocks on ``stat`` calls. A file that vanishes while it is read is simply left out.
    """
    files = list(version_dir.rglob("*"))
    files += [p for p in version_dir.parent.iterdir() if p.suffix in _SHARED_SUFFIXES]
    entries = []
    for path in files:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if path.is_file() and not path.name.startswith(DECISION_FILE):  # a rollout's record, not the version's
            entries.append((str(path.relative_to(version_dir.parent)), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


@dataclass
class _Sighting:
    fingerprint: Fingerprint
    since: float


class SettleTracker:
    """Says when a version's files have been quiet for ``settle_s`` seconds.

    Quiet means: the fingerprint has not changed for ``settle_s`` of monotonic
    time (covers clocks that differ on network filesystems), and the newest
    file modification is ``settle_s`` old by the wall clock.
    """

    def __init__(self, settle_s: float) -> None:
        self.settle_s = settle_s
        self._seen: dict[tuple[str, int], _Sighting] = {}

    def remaining(self, key: tuple[str, int], current: Fingerprint, now: float | None = None) -> float:
        """Seconds until ``key`` counts as settled (0.0 when it already does)."""
        now = time.monotonic() if now is None else now
        seen = self._seen.get(key)
        if seen is None or seen.fingerprint != current:
            self._seen[key] = seen = _Sighting(current, now)
        stable_for = now - seen.since
        newest = max((mtime for _, _, mtime in current), default=0) / 1e9
        quiet_for = time.time() - newest
        return max(0.0, self.settle_s - stable_for, self.settle_s - quiet_for)
