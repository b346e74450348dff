from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DTYPE_UNSPECIFIED: _ClassVar[Tensor.DType]
        UINT8: _ClassVar[Tensor.DType]
        FLOAT32: _ClassVar[Tensor.DType]
    DTYPE_UNSPECIFIED: Tensor.DType
    UINT8: Tensor.DType
    FLOAT32: Tensor.DType
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: Tensor.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[Tensor.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "version", "image", "tensor", "top_k", "request_id", "return_tiles", "lang")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RETURN_TILES_FIELD_NUMBER: _ClassVar[int]
    LANG_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    image: bytes
    tensor: Tensor
    top_k: int
    request_id: str
    return_tiles: bool
    lang: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., image: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ..., return_tiles: _Optional[bool] = ..., lang: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("index", "label", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    score: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class TileResult(_message.Message):
    __slots__ = ("x", "y", "width", "height", "predictions", "batch_size")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    x: int
    y: int
    width: int
    height: int
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    batch_size: int
    def __init__(self, x: _Optional[int] = ..., y: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("predictions", "model", "version", "request_id", "batch_size", "queue_us", "compute_us", "preprocess_us", "error", "tiles", "tile_count", "lang", "cache_hit", "cold_start")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_US_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    TILE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LANG_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model: str
    version: int
    request_id: str
    batch_size: int
    queue_us: int
    compute_us: int
    preprocess_us: int
    error: Error
    tiles: _containers.RepeatedCompositeFieldContainer[TileResult]
    tile_count: int
    lang: str
    cache_hit: bool
    cold_start: bool
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., request_id: _Optional[str] = ..., batch_size: _Optional[int] = ..., queue_us: _Optional[int] = ..., compute_us: _Optional[int] = ..., preprocess_us: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., tiles: _Optional[_Iterable[_Union[TileResult, _Mapping]]] = ..., tile_count: _Optional[int] = ..., lang: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., cold_start: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "versions", "num_labels", "input", "device", "max_batch_size", "is_default", "architecture", "default_top_k", "max_delay_ms", "serving_version", "activation", "precision", "precision_note", "channels_last", "languages", "tiling", "runtime", "runtime_reason", "runtime_speeds", "rollout", "loaded_bytes", "batch_curve", "autotuned", "latency_target_ms", "batch_cap_online", "serving_batch_curve", "batch_cap_changes", "batch_cap_last_change", "batch_threads")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_NOTE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_LAST_FIELD_NUMBER: _ClassVar[int]
    LANGUAGES_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_REASON_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_SPEEDS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCH_CURVE_FIELD_NUMBER: _ClassVar[int]
    AUTOTUNED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_TARGET_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_CAP_ONLINE_FIELD_NUMBER: _ClassVar[int]
    SERVING_BATCH_CURVE_FIELD_NUMBER: _ClassVar[int]
    BATCH_CAP_CHANGES_FIELD_NUMBER: _ClassVar[int]
    BATCH_CAP_LAST_CHANGE_FIELD_NUMBER: _ClassVar[int]
    BATCH_THREADS_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    num_labels: int
    input: InputSpec
    device: str
    max_batch_size: int
    is_default: bool
    architecture: str
    default_top_k: int
    max_delay_ms: float
    serving_version: int
    activation: str
    precision: str
    precision_note: str
    channels_last: bool
    languages: _containers.RepeatedScalarFieldContainer[str]
    tiling: Tiling
    runtime: str
    runtime_reason: str
    runtime_speeds: _containers.RepeatedCompositeFieldContainer[RuntimeSpeed]
    rollout: Rollout
    loaded_bytes: int
    batch_curve: _containers.RepeatedCompositeFieldContainer[BatchPoint]
    autotuned: bool
    latency_target_ms: float
    batch_cap_online: bool
    serving_batch_curve: _containers.RepeatedCompositeFieldContainer[BatchPoint]
    batch_cap_changes: int
    batch_cap_last_change: str
    batch_threads: int
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ..., num_labels: _Optional[int] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., device: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., is_default: _Optional[bool] = ..., architecture: _Optional[str] = ..., default_top_k: _Optional[int] = ..., max_delay_ms: _Optional[float] = ..., serving_version: _Optional[int] = ..., activation: _Optional[str] = ..., precision: _Optional[str] = ..., precision_note: _Optional[str] = ..., channels_last: _Optional[bool] = ..., languages: _Optional[_Iterable[str]] = ..., tiling: _Optional[_Union[Tiling, _Mapping]] = ..., runtime: _Optional[str] = ..., runtime_reason: _Optional[str] = ..., runtime_speeds: _Optional[_Iterable[_Union[RuntimeSpeed, _Mapping]]] = ..., rollout: _Optional[_Union[Rollout, _Mapping]] = ..., loaded_bytes: _Optional[int] = ..., batch_curve: _Optional[_Iterable[_Union[BatchPoint, _Mapping]]] = ..., autotuned: _Optional[bool] = ..., latency_target_ms: _Optional[float] = ..., batch_cap_online: _Optional[bool] = ..., serving_batch_curve: _Optional[_Iterable[_Union[BatchPoint, _Mapping]]] = ..., batch_cap_changes: _Optional[int] = ..., batch_cap_last_change: _Optional[str] = ..., batch_threads: _Optional[int] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("candidate_version", "mode", "decision", "compared", "min_requests", "agreement", "min_agreement", "topk_overlap", "mean_abs_diff", "errors", "error_rate", "compute_ratio", "labels_differ")
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MIN_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    TOPK_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_RATIO_FIELD_NUMBER: _ClassVar[int]
    LABELS_DIFFER_FIELD_NUMBER: _ClassVar[int]
    candidate_version: int
    mode: str
    decision: str
    compared: int
    min_requests: int
    agreement: float
    min_agreement: float
    topk_overlap: float
    mean_abs_diff: float
    errors: int
    error_rate: float
    compute_ratio: float
    labels_differ: bool
    def __init__(self, candidate_version: _Optional[int] = ..., mode: _Optional[str] = ..., decision: _Optional[str] = ..., compared: _Optional[int] = ..., min_requests: _Optional[int] = ..., agreement: _Optional[float] = ..., min_agreement: _Optional[float] = ..., topk_overlap: _Optional[float] = ..., mean_abs_diff: _Optional[float] = ..., errors: _Optional[int] = ..., error_rate: _Optional[float] = ..., compute_ratio: _Optional[float] = ..., labels_differ: _Optional[bool] = ...) -> None: ...

class RuntimeSpeed(_message.Message):
    __slots__ = ("runtime", "batch_size", "images_per_second")
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    runtime: str
    batch_size: int
    images_per_second: float
    def __init__(self, runtime: _Optional[str] = ..., batch_size: _Optional[int] = ..., images_per_second: _Optional[float] = ...) -> None: ...

class BatchPoint(_message.Message):
    __slots__ = ("batch_size", "images_per_second", "batch_ms", "torch_threads")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BATCH_MS_FIELD_NUMBER: _ClassVar[int]
    TORCH_THREADS_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    images_per_second: float
    batch_ms: float
    torch_threads: int
    def __init__(self, batch_size: _Optional[int] = ..., images_per_second: _Optional[float] = ..., batch_ms: _Optional[float] = ..., torch_threads: _Optional[int] = ...) -> None: ...

class Tiling(_message.Message):
    __slots__ = ("tile_height", "tile_width", "stride_y", "stride_x", "reduce", "max_tiles")
    TILE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    TILE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    STRIDE_Y_FIELD_NUMBER: _ClassVar[int]
    STRIDE_X_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    MAX_TILES_FIELD_NUMBER: _ClassVar[int]
    tile_height: int
    tile_width: int
    stride_y: int
    stride_x: int
    reduce: str
    max_tiles: int
    def __init__(self, tile_height: _Optional[int] = ..., tile_width: _Optional[int] = ..., stride_y: _Optional[int] = ..., stride_x: _Optional[int] = ..., reduce: _Optional[str] = ..., max_tiles: _Optional[int] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("height", "width", "channels", "color", "mean", "std", "resize", "crop", "interpolation", "resolved_from")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_FROM_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    channels: int
    color: str
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    resize: int
    crop: str
    interpolation: str
    resolved_from: str
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., color: _Optional[str] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., resize: _Optional[int] = ..., crop: _Optional[str] = ..., interpolation: _Optional[str] = ..., resolved_from: _Optional[str] = ...) -> None: ...

class WatchModelsRequest(_message.Message):
    __slots__ = ("model", "include_current")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CURRENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    include_current: bool
    def __init__(self, model: _Optional[str] = ..., include_current: _Optional[bool] = ...) -> None: ...

class ModelEvent(_message.Message):
    __slots__ = ("model", "version", "kind", "reason", "time_unix_ms", "serving")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ModelEvent.Kind]
        LOADING: _ClassVar[ModelEvent.Kind]
        READY: _ClassVar[ModelEvent.Kind]
        FAILED: _ClassVar[ModelEvent.Kind]
        UNLOADED: _ClassVar[ModelEvent.Kind]
        AVAILABLE: _ClassVar[ModelEvent.Kind]
        CANDIDATE: _ClassVar[ModelEvent.Kind]
        PROMOTED: _ClassVar[ModelEvent.Kind]
        REJECTED: _ClassVar[ModelEvent.Kind]
    KIND_UNSPECIFIED: ModelEvent.Kind
    LOADING: ModelEvent.Kind
    READY: ModelEvent.Kind
    FAILED: ModelEvent.Kind
    UNLOADED: ModelEvent.Kind
    AVAILABLE: ModelEvent.Kind
    CANDIDATE: ModelEvent.Kind
    PROMOTED: ModelEvent.Kind
    REJECTED: ModelEvent.Kind
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    kind: ModelEvent.Kind
    reason: str
    time_unix_ms: int
    serving: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., kind: _Optional[_Union[ModelEvent.Kind, str]] = ..., reason: _Optional[str] = ..., time_unix_ms: _Optional[int] = ..., serving: _Optional[bool] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class PromoteVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RejectVersionRequest(_message.Message):
    __slots__ = ("model", "version", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    reason: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackModelRequest(_message.Message):
    __slots__ = ("model", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "state", "error", "generation", "validation_accuracy")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[VersionInfo.State]
        LOADING: _ClassVar[VersionInfo.State]
        READY: _ClassVar[VersionInfo.State]
        FAILED: _ClassVar[VersionInfo.State]
        UNLOADING: _ClassVar[VersionInfo.State]
        AVAILABLE: _ClassVar[VersionInfo.State]
        CANDIDATE: _ClassVar[VersionInfo.State]
        REJECTED: _ClassVar[VersionInfo.State]
    STATE_UNSPECIFIED: VersionInfo.State
    LOADING: VersionInfo.State
    READY: VersionInfo.State
    FAILED: VersionInfo.State
    UNLOADING: VersionInfo.State
    AVAILABLE: VersionInfo.State
    CANDIDATE: VersionInfo.State
    REJECTED: VersionInfo.State
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: VersionInfo.State
    error: str
    generation: int
    validation_accuracy: float
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[VersionInfo.State, str]] = ..., error: _Optional[str] = ..., generation: _Optional[int] = ..., validation_accuracy: _Optional[float] = ...) -> None: ...
