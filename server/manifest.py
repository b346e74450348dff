"""Parse and validate a model's ``model.toml`` manifest and its labels.

Pure parsing: no torch, no file watching. Every problem raises
:class:`ManifestError` naming the file and the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "model.toml"
LABELS_NAME = "labels.txt"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ts")
COLOR_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
CROPS = ("center", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TOP_KEYS = {"architecture", "num_classes", "weights", "top_k", "default", "model_args", "input", "batching",
             "description", "keep_versions", "min_accuracy"}
_INPUT_KEYS = {"color", "size", "resize", "crop", "mean", "std", "interpolation"}
_BATCHING_KEYS = {"max_batch_size", "max_delay_ms", "max_queue", "autotune", "autotune_budget_s",
                  "autotune_max_batch_size", "latency_target_ms"}


class ManifestError(ValueError):
    """A manifest or labels file is missing, malformed or inconsistent."""

    def __init__(self, path: Path, message: str, key: str | None = None) -> None:
        where = f"{path}: key '{key}'" if key else str(path)
        super().__init__(f"{where}: {message}")
        self.path = path
        self.key = key


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the model's input tensor."""

    color: str = "RGB"
    height: int = 224
    width: int = 224
    resize: int = 256
    crop: str = "center"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    @property
    def channels(self) -> int:
        return COLOR_CHANNELS[self.color]


@dataclass(frozen=True)
class BatchingSpec:
    """Batcher settings; None means "use the server's default"."""

    max_batch_size: int | None = None
    max_delay_ms: float | None = None
    max_queue: int | None = None
    autotune: bool | None = None
    autotune_budget_s: float | None = None
    autotune_max_batch_size: int | None = None
    latency_target_ms: float | None = None


@dataclass(frozen=True)
class Manifest:
    """A validated model manifest."""

    path: Path
    architecture: str
    num_classes: int
    labels: tuple[str, ...]
    weights: str | None
    top_k: int
    is_default: bool
    keep_versions: int = 1
    min_accuracy: float = 0.0
    model_args: dict[str, Any] = field(default_factory=dict)
    input: InputSpec = field(default_factory=InputSpec)
    batching: BatchingSpec = field(default_factory=BatchingSpec)


def find_file(version_dir: Path, name: str) -> Path:
    """The version's own copy of ``name`` if it has one, else the model directory's."""
    own = version_dir / name
    return own if own.exists() else version_dir.parent / name


def read_labels(path: Path) -> tuple[str, ...]:
    """Read UTF-8 labels, one per line. Raises ManifestError if missing, not UTF-8 or empty."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(path, "labels file not found") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(path, f"not valid UTF-8 (byte {exc.start})") from None
    labels = tuple(line.strip() for line in text.splitlines())
    while labels and not labels[-1]:
        labels = labels[:-1]
    if not labels:
        raise ManifestError(path, "no labels")
    return labels


def load_manifest(version_dir: Path) -> Manifest:
    """Read and validate the manifest and labels that apply to ``version_dir``.

    Blocks on file reads. Raises ManifestError.
    """
    path = find_file(version_dir, MANIFEST_NAME)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(path, "manifest not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(path, f"invalid TOML: {exc}") from None
    return parse_manifest(raw, path, read_labels(find_file(version_dir, LABELS_NAME)))


def parse_manifest(raw: dict[str, Any], path: Path, labels: tuple[str, ...]) -> Manifest:
    """Validate a decoded manifest. Raises ManifestError naming the offending key."""
    _reject_unknown(raw, _TOP_KEYS, path, "")
    architecture = _get(raw, "architecture", str, path)
    if architecture is None:
        raise ManifestError(path, "required", "architecture")
    num_classes = _get(raw, "num_classes", int, path, default=len(labels))
    if num_classes != len(labels):
        raise ManifestError(path, f"{num_classes} classes but labels.txt has {len(labels)} labels", "num_classes")
    top_k = _get(raw, "top_k", int, path, default=min(5, num_classes))
    if not 1 <= top_k <= num_classes:
        raise ManifestError(path, f"must be between 1 and {num_classes}", "top_k")
    model_args = _get(raw, "model_args", dict, path, default={})
    keep_versions = _get(raw, "keep_versions", int, path, default=1)
    if keep_versions < 1:
        raise ManifestError(path, "must be at least 1", "keep_versions")
    min_accuracy = _get(raw, "min_accuracy", (int, float), path, default=0.0)
    if not 0.0 <= min_accuracy <= 1.0:
        raise ManifestError(path, "must be between 0.0 and 1.0", "min_accuracy")
    return Manifest(
        path=path,
        architecture=architecture,
        num_classes=num_classes,
        labels=labels,
        weights=_get(raw, "weights", str, path),
        top_k=top_k,
        is_default=_get(raw, "default", bool, path, default=False),
        keep_versions=keep_versions,
        min_accuracy=float(min_accuracy),
        model_args=model_args,
        input=_parse_input(_get(raw, "input", dict, path, default={}), path),
        batching=_parse_batching(_get(raw, "batching", dict, path, default={}), path),
    )


def _parse_input(raw: dict[str, Any], path: Path) -> InputSpec:
    _reject_unknown(raw, _INPUT_KEYS, path, "input.")
    color = _choice(raw, "color", tuple(COLOR_CHANNELS), "RGB", path)
    height, width = _size(raw.get("size", 224), path)
    default_resize = round(min(height, width) / 0.875)
    resize = _get(raw, "resize", int, path, default=default_resize, key_prefix="input.")
    if resize < 1:
        raise ManifestError(path, "must be positive", "input.resize")
    channels = COLOR_CHANNELS[color]
    default_mean, default_std = _default_norm(channels)
    mean = _floats(raw, "mean", default_mean, channels, path)
    std = _floats(raw, "std", default_std, channels, path)
    if any(s <= 0 for s in std):
        raise ManifestError(path, "every std must be > 0", "input.std")
    return InputSpec(
        color=color,
        height=height,
        width=width,
        resize=resize,
        crop=_choice(raw, "crop", CROPS, "center", path),
        mean=mean,
        std=std,
        interpolation=_choice(raw, "interpolation", INTERPOLATIONS, "bilinear", path),
    )


def _parse_batching(raw: dict[str, Any], path: Path) -> BatchingSpec:
    _reject_unknown(raw, _BATCHING_KEYS, path, "batching.")
    size = _get(raw, "max_batch_size", int, path, key_prefix="batching.")
    if size is not None and size < 1:
        raise ManifestError(path, "must be at least 1", "batching.max_batch_size")
    delay = _get(raw, "max_delay_ms", (int, float), path, key_prefix="batching.")
    if delay is not None and delay < 0:
        raise ManifestError(path, "must be >= 0", "batching.max_delay_ms")
    queue = _get(raw, "max_queue", int, path, key_prefix="batching.")
    if queue is not None and queue < 1:
        raise ManifestError(path, "must be at least 1", "batching.max_queue")
    return BatchingSpec(max_batch_size=size, max_delay_ms=None if delay is None else float(delay), max_queue=queue,
                        **_parse_autotune(raw, path, size, delay))


def _parse_autotune(raw: dict[str, Any], path: Path, size: int | None, delay: float | None) -> dict[str, Any]:
    autotune = _get(raw, "autotune", bool, path, key_prefix="batching.")
    if autotune and size is not None:
        raise ManifestError(path, "autotune = true chooses the batch cap itself: remove max_batch_size, or use "
                                  "autotune_max_batch_size to bound the sizes it tries", "batching.autotune")
    budget = _get(raw, "autotune_budget_s", (int, float), path, key_prefix="batching.")
    if budget is not None and not budget > 0:
        raise ManifestError(path, "must be > 0", "batching.autotune_budget_s")
    ceiling = _get(raw, "autotune_max_batch_size", int, path, key_prefix="batching.")
    if ceiling is not None and ceiling < 1:
        raise ManifestError(path, "must be at least 1", "batching.autotune_max_batch_size")
    target = _get(raw, "latency_target_ms", (int, float), path, key_prefix="batching.")
    if target is not None and not target > 0:
        raise ManifestError(path, "must be > 0", "batching.latency_target_ms")
    if target is not None and delay:
        raise ManifestError(path, "with latency_target_ms the batcher decides how long to wait: remove max_delay_ms",
                            "batching.latency_target_ms")
    return {"autotune": autotune, "autotune_budget_s": None if budget is None else float(budget),
            "autotune_max_batch_size": ceiling, "latency_target_ms": None if target is None else float(target)}


def _default_norm(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if channels == 4:
        return (*IMAGENET_MEAN, 0.5), (*IMAGENET_STD, 0.5)
    return (0.5,), (0.5,)


def _size(value: Any, path: Path) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)
    if not ok:
        raise ManifestError(path, "must be a positive integer or [height, width]", "input.size")
    return value[0], value[1]


def _floats(raw: dict[str, Any], key: str, default: tuple[float, ...], channels: int, path: Path) -> tuple[float, ...]:
    value = raw.get(key, default)
    if not isinstance(value, list | tuple) or not all(isinstance(v, int | float) for v in value):
        raise ManifestError(path, "must be a list of numbers", f"input.{key}")
    if len(value) != channels:
        raise ManifestError(path, f"has {len(value)} values but the input has {channels} channel(s)", f"input.{key}")
    return tuple(float(v) for v in value)


def _choice(raw: dict[str, Any], key: str, choices: tuple[str, ...], default: str, path: Path) -> str:
    value = raw.get(key, default)
    if value not in choices:
        raise ManifestError(path, f"must be one of {', '.join(choices)}; got {value!r}", f"input.{key}")
    return value


def _get(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path, default: Any = None,
         key_prefix: str = "") -> Any:
    if key not in raw:
        return default
    value = raw[key]
    if isinstance(value, bool) and kind is not bool:
        value = object()  # TOML booleans are ints in Python; reject them where a number is meant
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestError(path, f"must be of type {names}", key_prefix + key)
    return value


def _reject_unknown(raw: dict[str, Any], known: set[str], path: Path, prefix: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ManifestError(path, f"unknown key (known: {', '.join(sorted(known))})", prefix + unknown[0])
