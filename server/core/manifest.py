"""Parse and validate a model's ``model.toml`` manifest and its labels.

Pure parsing: no torch, no file watching. Every problem raises
:class:`ManifestError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.core.cache_spec import CacheSpec, cache_of
from server.core.device_names import DEVICE_UNSET, device_of
from server.core.layering import Origins, merge_layers, origin_of
from server.core.rollout import RolloutSpec, rollout_of

MANIFEST_NAME = "model.toml"
LABELS_NAME = "labels.txt"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ts", ".pt2", ".onnx")
COLOR_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
CROPS = ("center", "none")
DECODES = ("auto", "cpu", "device")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ACTIVATIONS = ("softmax", "sigmoid")
PRECISIONS = ("fp32", "fp16", "bf16")
RUNTIMES = ("torch", "onnxruntime", "auto")
RUNTIME_UNSET = ""
"""``Manifest.runtime`` when no model.toml sets it: the loader applies the daemon's ``--default-runtime``."""
ONNX_ARCHITECTURE = "onnx"
"""A version shipped as ``model.onnx``: served through ONNX Runtime, no PyTorch module."""
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
REDUCTIONS = ("max", "mean")
# labels.<lang>.txt: a BCP 47-like tag such as zh, en, pt-BR or zh_Hant
_LANG_FILE = re.compile(r"^labels\.([A-Za-z]{2,8}(?:[-_][A-Za-z0-9]{1,8})*)\.txt$")

_TOP_KEYS = {"architecture", "num_classes", "weights", "top_k", "default", "model_args", "input", "batching",
             "description", "keep_versions", "min_accuracy", "activation", "threshold", "thresholds", "precision",
             "channels_last", "tiling", "preprocessing_changed", "runtime", "cache", "rollout", "device",
             "keep_loaded"}
_INPUT_KEYS = {"color", "size", "resize", "crop", "mean", "std", "interpolation", "fill_alpha", "decode"}
_BATCHING_KEYS = {"max_batch_size", "max_delay_ms", "max_queue", "autotune", "autotune_budget_s",
                  "autotune_max_batch_size", "latency_target_ms"}
_TILING_KEYS = {"tile", "stride", "reduce", "max_tiles"}
_COMPILE_KEYS = {"compile", "compile_batch_sizes"}


class ManifestError(ValueError):
    """A manifest or labels file is missing, malformed or inconsistent."""

    def __init__(self, path: Path, message: str, key: str | None = None) -> None:
        where = f"{path}: key '{key}'" if key else str(path)
        super().__init__(f"{where}: {message}")
        self.path = path
        self.key = key
        self.detail = message


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
    fill_alpha: bool = False
    decode: str = "auto"
    """Where JPEGs are decoded: ``cpu`` (Pillow, preprocessing pool), ``device`` (torchvision on the model's
    device) or ``auto`` (``device`` when that is CUDA); see :mod:`server.inference.device_decode`."""
    explicit: frozenset[str] = frozenset()
    """The ``[input]`` keys the manifest sets; the others may be resolved from the architecture at load."""
    resolved_from: str = ""
    """Where the keys the manifest leaves out came from when not classifyd's defaults, e.g. timm's config."""

    @property
    def channels(self) -> int:
        return COLOR_CHANNELS[self.color]


@dataclass(frozen=True)
class TilingSpec:
    """Classify an image as overlapping tiles of ``tile`` pixels, ``stride`` apart (both ``(height, width)``)."""

    tile: tuple[int, int]
    stride: tuple[int, int]
    reduce: str = "max"
    max_tiles: int = 256


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
    keep_loaded: bool = False  # never evicted by the memory budget (--max-loaded-bytes): server/models/memory_budget.py
    min_accuracy: float = 0.0
    model_args: dict[str, Any] = field(default_factory=dict)
    input: InputSpec = field(default_factory=InputSpec)
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    activation: str = "softmax"
    thresholds: tuple[float, ...] = ()
    """Per-label score thresholds (sigmoid only): a label is reported when its score reaches its threshold."""
    precision: str = "fp32"
    channels_last: bool = False
    tiling: TilingSpec | None = None
    compile: str = "off"
    """torch.compile mode, or "off" (eager)."""
    compile_batch_sizes: tuple[int, ...] = ()
    """The batch-size buckets to compile; empty: powers of two up to max_batch_size, and max_batch_size."""
    cache: CacheSpec = field(default_factory=CacheSpec)
    runtime: str = RUNTIME_UNSET
    """What runs the forward pass: "torch", "onnxruntime" (exported, cached and verified at load) or "auto" (torch
    first, ONNX Runtime once verified and measured faster: server/models/loader/runtime_choice.py); unset (""):
    the daemon's --default-runtime, which the loader resolves as soon as it reads the manifest."""
    device: str = DEVICE_UNSET  # where it runs instead of --device: server/inference/placement.py
    translations: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Labels by language tag (lower case, ``-`` separated), from ``labels.<lang>.txt``."""
    preprocessing_changed: bool = False
    """The version's own model.toml acknowledges that its preprocessing differs from the serving version's."""
    rollout: RolloutSpec = field(default_factory=RolloutSpec)  # how a new version goes live: server/core/rollout.py
    origins: Origins = field(default_factory=dict)
    """Which model.toml set each key (see :mod:`server.core.layering`); empty for a manifest not read from files."""

    def labels_for(self, lang: str) -> tuple[str, tuple[str, ...]]:
        """The language actually used for ``lang`` and its labels: the exact tag, then its primary
        subtag (``zh`` for ``zh-CN``), else ``labels.txt`` (returned as language ``""``)."""
        tag = normalize_lang(lang)
        for candidate in (tag, tag.split("-")[0]):
            if candidate in self.translations:
                return candidate, self.translations[candidate]
        return "", self.labels


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


def normalize_lang(tag: str) -> str:
    """``zh_CN`` and ``ZH-cn`` are both ``zh-cn``."""
    return tag.strip().lower().replace("_", "-")


def read_translations(version_dir: Path, labels: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Every ``labels.<lang>.txt`` of the model and version directories (the version's own file wins).

    Blocks on file reads. Raises ManifestError when a file is unreadable or its line count differs from
    ``labels``: line *i* of every language file must name output *i*.
    """
    files: dict[str, Path] = {}
    for directory in (version_dir.parent, version_dir):  # later wins: the version's own copy
        for path in sorted(directory.glob("labels.*.txt")):
            match = _LANG_FILE.match(path.name)
            if match and path.is_file():
                files[normalize_lang(match.group(1))] = path
    translations = {}
    for lang, path in sorted(files.items()):
        translated = read_labels(path)
        if len(translated) != len(labels):
            raise ManifestError(path, f"has {len(translated)} labels but {LABELS_NAME} has {len(labels)}; "
                                      "line i of every labels file must name output i")
        translations[lang] = translated
    return translations


def load_manifest(version_dir: Path) -> Manifest:
    """Read and validate the manifest and labels that apply to ``version_dir``: the version's own ``model.toml``
    merged key by key over the model's (:mod:`server.core.layering`); either may be absent, not both.

    Blocks on file reads. Raises ManifestError naming the file that set the offending key.
    """
    layers = _read_layers(version_dir)
    raw, origins = merge_layers(layers)
    path = layers[-1][0]
    labels = read_labels(find_file(version_dir, LABELS_NAME))
    try:
        manifest = parse_manifest(raw, path, labels, read_translations(version_dir, labels))
        if len(layers) > 1:  # the model directory's [rollout] governs: a version may only make it stricter
            rollout_of(raw, path, ManifestError, governing=layers[0][1])
    except ManifestError as exc:
        origin = origin_of(origins, exc.key) if exc.key else None
        merged = f" ({path} is merged over {layers[0][0]}, key by key)" if len(layers) > 1 else ""
        raise ManifestError(origin or exc.path, exc.detail + merged, exc.key) from None
    return dataclasses.replace(manifest, origins=origins)


def _read_layers(version_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The decoded model-level and version-level manifests that exist, the model's first. Raises ManifestError
    when neither exists, one is not TOML, or the model's sets a key only a version may set."""
    layers = []
    for path in (version_dir.parent / MANIFEST_NAME, version_dir / MANIFEST_NAME):
        try:
            layers.append((path, tomllib.loads(path.read_text(encoding="utf-8"))))
        except FileNotFoundError:
            continue
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(path, f"invalid TOML: {exc}") from None
    if not layers:
        raise ManifestError(version_dir.parent / MANIFEST_NAME, "manifest not found")
    model_level = layers[0][0].parent != version_dir
    if model_level and "preprocessing_changed" in layers[0][1]:
        raise ManifestError(layers[0][0], "acknowledges one version's preprocessing change: set it in that "
                                          f"version's own {MANIFEST_NAME} ({version_dir / MANIFEST_NAME})",
                            "preprocessing_changed")
    return layers


def parse_manifest(raw: dict[str, Any], path: Path, labels: tuple[str, ...],
                   translations: dict[str, tuple[str, ...]] | None = None) -> Manifest:
    """Validate a decoded manifest. Raises ManifestError naming the offending key."""
    _reject_unknown(raw, _TOP_KEYS | _COMPILE_KEYS, path, "")
    architecture = _get(raw, "architecture", str, path)
    if architecture is None:
        raise ManifestError(path, "required", "architecture")
    num_classes = _get(raw, "num_classes", int, path, default=len(labels))
    if num_classes != len(labels):
        raise ManifestError(path, f"{num_classes} classes but labels.txt has {len(labels)} labels", "num_classes")
    activation = _choice(raw, "activation", ACTIVATIONS, "softmax", path, prefix="")
    # multi-label: every label above its threshold is reported unless top_k caps it
    default_top_k = num_classes if activation == "sigmoid" else min(5, num_classes)
    top_k = _get(raw, "top_k", int, path, default=default_top_k)
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
        keep_versions=keep_versions, keep_loaded=_get(raw, "keep_loaded", bool, path, default=False),
        min_accuracy=float(min_accuracy),
        model_args=model_args,
        input=_parse_input(_get(raw, "input", dict, path, default={}), path),
        batching=_parse_batching(_get(raw, "batching", dict, path, default={}), path),
        activation=activation,
        thresholds=_parse_thresholds(raw, activation, labels, path),
        precision=_choice(raw, "precision", PRECISIONS, "fp32", path, prefix=""),
        channels_last=_get(raw, "channels_last", bool, path, default=False),
        tiling=_parse_tiling(_get(raw, "tiling", dict, path), path),
        translations=dict(translations or {}),
        preprocessing_changed=_get(raw, "preprocessing_changed", bool, path, default=False),
        runtime=_parse_runtime(raw, architecture, path),
        device=device_of(raw, path, ManifestError),
        rollout=rollout_of(raw, path, ManifestError),
        cache=cache_of(raw, path, ManifestError),
        **_parse_compile(raw, path),
    )


def _parse_runtime(raw: dict[str, Any], architecture: str, path: Path) -> str:
    """``runtime``; an ``onnx`` architecture always runs on ONNX Runtime, and only there."""
    default = "onnxruntime" if architecture == ONNX_ARCHITECTURE else RUNTIME_UNSET
    runtime = _choice(raw, "runtime", RUNTIMES, default, path, prefix="") if "runtime" in raw else default
    if architecture == ONNX_ARCHITECTURE and runtime != "onnxruntime":
        raise ManifestError(path, 'architecture = "onnx" runs on ONNX Runtime only; remove runtime or set '
                                  '"onnxruntime"', "runtime")
    if runtime == "onnxruntime" and raw.get("compile", "off") != "off":
        raise ManifestError(path, 'torch.compile does not apply to runtime = "onnxruntime"; set one or the other',
                            "runtime")
    return runtime


def _parse_compile(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    mode = _choice(raw, "compile", COMPILE_MODES, "off", path, prefix="")
    sizes = _get(raw, "compile_batch_sizes", list, path)
    if sizes is None:
        return {"compile": mode, "compile_batch_sizes": ()}
    if mode == "off":
        raise ManifestError(path, 'applies only when compile is not "off"', "compile_batch_sizes")
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ManifestError(path, "must be a non-empty list of positive integers", "compile_batch_sizes")
    if any(b <= a for a, b in itertools.pairwise(sizes)):
        raise ManifestError(path, f"must be strictly increasing; got {sizes}", "compile_batch_sizes")
    return {"compile": mode, "compile_batch_sizes": tuple(sizes)}


def _parse_thresholds(raw: dict[str, Any], activation: str, labels: tuple[str, ...],
                      path: Path) -> tuple[float, ...]:
    """One threshold per label: ``[thresholds]`` by label, else ``threshold``, else 0.5 (sigmoid only)."""
    if activation != "sigmoid":
        for key in ("threshold", "thresholds"):
            if key in raw:
                raise ManifestError(path, 'applies only to activation = "sigmoid" (multi-label); softmax '
                                          "responses are cut by top_k", key)
        return ()
    default = _unit(_get(raw, "threshold", (int, float), path, default=0.5), path, "threshold")
    per_label = _get(raw, "thresholds", dict, path, default={})
    unknown = sorted(set(per_label) - set(labels))
    if unknown:
        raise ManifestError(path, f"{unknown[0]!r} is not a label of {LABELS_NAME}", f"thresholds.{unknown[0]}")
    values = {}
    for label, value in per_label.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ManifestError(path, "must be a number", f"thresholds.{label}")
        values[label] = _unit(value, path, f"thresholds.{label}")
    return tuple(values.get(label, default) for label in labels)


def _unit(value: float, path: Path, key: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ManifestError(path, "must be between 0.0 and 1.0", key)
    return float(value)


def _parse_tiling(raw: dict[str, Any] | None, path: Path) -> TilingSpec | None:
    if raw is None:
        return None
    _reject_unknown(raw, _TILING_KEYS, path, "tiling.")
    if "tile" not in raw:
        raise ManifestError(path, "required in [tiling]", "tiling.tile")
    tile = _size(raw["tile"], path, "tiling.tile")
    stride = _size(raw.get("stride", list(tile)), path, "tiling.stride")
    if stride[0] > tile[0] or stride[1] > tile[1]:
        raise ManifestError(path, f"{list(stride)} is larger than the tile {list(tile)}: tiles would leave gaps",
                            "tiling.stride")
    max_tiles = _get(raw, "max_tiles", int, path, default=256, key_prefix="tiling.")
    if max_tiles < 1:
        raise ManifestError(path, "must be at least 1", "tiling.max_tiles")
    return TilingSpec(tile=tile, stride=stride, reduce=_choice(raw, "reduce", REDUCTIONS, "max", path,
                                                                prefix="tiling."), max_tiles=max_tiles)


def _parse_input(raw: dict[str, Any], path: Path) -> InputSpec:
    _reject_unknown(raw, _INPUT_KEYS, path, "input.")
    color = _choice(raw, "color", tuple(COLOR_CHANNELS), "RGB", path)
    height, width = _size(raw.get("size", 224), path, "input.size")
    resize = _get(raw, "resize", int, path, default=default_resize(height, width), key_prefix="input.")
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
        fill_alpha=_get(raw, "fill_alpha", bool, path, default=False, key_prefix="input."),
        decode=_choice(raw, "decode", DECODES, "auto", path),
        explicit=frozenset(raw),
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


def default_resize(height: int, width: int) -> int:
    """The ``resize`` that makes the centre crop keep 87.5 % of the shorter side (256 for 224)."""
    return round(min(height, width) / 0.875)


def _default_norm(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if channels == 4:
        return (*IMAGENET_MEAN, 0.5), (*IMAGENET_STD, 0.5)
    return (0.5,), (0.5,)


def _size(value: Any, path: Path, key: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    ok = isinstance(value, list) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok:
        raise ManifestError(path, "must be a positive integer or [height, width]", key)
    return value[0], value[1]


def _floats(raw: dict[str, Any], key: str, default: tuple[float, ...], channels: int, path: Path) -> tuple[float, ...]:
    value = raw.get(key, default)
    if not isinstance(value, list | tuple) or not all(isinstance(v, int | float) for v in value):
        raise ManifestError(path, "must be a list of numbers", f"input.{key}")
    if len(value) != channels:
        raise ManifestError(path, f"has {len(value)} values but the input has {channels} channel(s)", f"input.{key}")
    return tuple(float(v) for v in value)


def _choice(raw: dict[str, Any], key: str, choices: tuple[str, ...], default: str, path: Path,
            prefix: str = "input.") -> str:
    value = raw.get(key, default)
    if value not in choices:
        raise ManifestError(path, f"must be one of {', '.join(choices)}; got {value!r}", prefix + key)
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
