"""Decode an encoded image or raw tensor into the model's input pixels.

PIL and numpy only: the result is an ``HxWxC`` numpy array (uint8, or float32
in 0..1 for float tensors) of exactly the model's input size; normalisation to
mean/std happens batched on the inference thread. These functions block (PIL
decode and resize release the GIL): run them in a thread pool. Every problem
with the input raises :class:`server.errors.InvalidInput` saying what was wrong.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import InvalidInput
from server.manifest import COLOR_CHANNELS, InputSpec

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")
MAX_PIXELS = 100_000_000
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_DTYPES = {"uint8": np.dtype("<u1"), "float32": np.dtype("<f4")}


@dataclass(frozen=True)
class RawTensor:
    """A raw tensor from a request, not yet validated."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def preprocess(payload: bytes | RawTensor, spec: InputSpec, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Turn one request's input into an ``H x W x C`` array of the model's input size."""
    if isinstance(payload, RawTensor):
        return _fit_array(tensor_to_array(payload, spec), spec)
    image = decode_image(payload, max_pixels)
    return _fit_image(_convert(image, spec.color), spec)


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an encoded image, EXIF orientation applied. Raises InvalidInput."""
    if not data:
        raise InvalidInput("empty image: the request's image field has no bytes")
    try:
        with warnings.catch_warnings():
            # The daemon enforces its own, configurable pixel limit below; PIL's fixed one only as a backstop.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_image(image, max_pixels)
            image.load()
        return ImageOps.exif_transpose(image) or image
    except InvalidInput:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InvalidInput(_decode_message(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"cannot decode image: {exc}") from None


def _check_image(image: Image.Image, max_pixels: int) -> None:
    if image.format not in SUPPORTED_FORMATS:
        raise InvalidInput(f"unsupported image format {image.format}; supported: JPEG, PNG, WebP, BMP, GIF, TIFF")
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInput(f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidInput(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")


def _decode_message(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "cannot decode image: not a JPEG, PNG, WebP, BMP, GIF or TIFF file (or corrupt)"
    return f"image too large: {exc}"


def _convert(image: Image.Image, color: str) -> Image.Image:
    """Convert to the model's colour mode; palette, 16-bit and alpha images included."""
    if image.mode == color:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping at 255
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array * 255.0 / peak, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    return image.convert(color)


def _fit_image(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Resize (shorter side to ``resize``) and centre-crop, or stretch to the input size when crop = none."""
    resample = _RESAMPLE[spec.interpolation]
    if spec.crop == "none":
        if image.size != (spec.width, spec.height):
            image = image.resize((spec.width, spec.height), resample)
        return _as_hwc(np.asarray(image))
    width, height = image.size
    scale = spec.resize / min(width, height)
    new_size = (max(spec.width, round(width * scale)), max(spec.height, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, resample, reducing_gap=3.0)
    left = (image.width - spec.width) // 2
    top = (image.height - spec.height) // 2
    image = image.crop((left, top, left + spec.width, top + spec.height))
    return _as_hwc(np.asarray(image))


def _as_hwc(array: np.ndarray) -> np.ndarray:
    return array[:, :, None] if array.ndim == 2 else array


def tensor_to_array(tensor: RawTensor, spec: InputSpec) -> np.ndarray:
    """Validate a raw tensor and view it as ``H x W x C`` with the model's channel count."""
    dtype = _DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidInput(f"tensor dtype must be UINT8 or FLOAT32, got {tensor.dtype}")
    shape = tensor.shape
    if len(shape) not in (2, 3) or any(d < 1 for d in shape):
        raise InvalidInput(f"tensor shape must be [height, width] or [height, width, channels], got {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64))
    if count * dtype.itemsize != len(tensor.data):
        raise InvalidInput(f"tensor of shape {list(shape)} and dtype {tensor.dtype} needs "
                           f"{count * dtype.itemsize} bytes, got {len(tensor.data)}")
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput("tensor contains NaN or infinite values")
    return _match_channels(_as_hwc(array), spec.channels)


def _match_channels(array: np.ndarray, channels: int) -> np.ndarray:
    have = array.shape[2]
    if have == channels:
        return array
    if have == 1 and channels == 3:
        return np.repeat(array, 3, axis=2)
    if have in (3, 4) and channels == 1:
        rgb = array[:, :, :3].astype(np.float32)
        grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return _as_hwc(grey.round().astype(array.dtype) if array.dtype == np.uint8 else grey)
    if have == 4 and channels == 3:
        return array[:, :, :3]
    names = {v: k for k, v in COLOR_CHANNELS.items()}
    raise InvalidInput(f"tensor has {have} channel(s); the model takes {channels} ({names.get(channels, '?')}) "
                       "and they cannot be converted")


def _fit_array(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resize a tensor to the input size only when it is not that size already."""
    if array.shape[:2] == (spec.height, spec.width):
        return array
    if array.dtype != np.uint8:
        raise InvalidInput(f"float32 tensors must already be {spec.height}x{spec.width}; got "
                           f"{array.shape[0]}x{array.shape[1]}")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    image = Image.fromarray(array[:, :, 0] if mode == "L" else array, mode)
    return _fit_image(image, spec)
