"""Decode an encoded image or raw tensor into the model's input pixels.

PIL and numpy only: the result is an ``HxWxC`` numpy array (uint8, or float32
in 0..1 for float tensors) of exactly the model's input size; normalisation to
mean/std happens batched on the inference thread (inside the graph on ONNX
Runtime: :mod:`server.inference.onnx_normalise`). The resize goes through the
crop's box (:mod:`server.inference.resize`). With a ``[tiling]`` section,
:func:`preprocess_tiles` cuts the input into overlapping tiles first and fits
each one. These functions block (PIL decode and resize release the GIL): run
them in a thread pool. Every problem with the input raises
:class:`server.core.errors.InvalidInput` saying what was wrong.

Memory: :func:`open_input` reads only an image's header (or checks a tensor's
shape), so what decoding will cost is known before any pixel is decoded
(:mod:`server.inference.decode_cost`, the table in docs/production.md). 16-bit,
32-bit and float images are converted in blocks of rows, with integer or float32
arithmetic: their temporaries stay a few MiB whatever the image's size.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterator
from typing import TypeGuard

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from server.core.config import MAX_PIXELS
from server.core.errors import InvalidInput
from server.core.manifest import COLOR_CHANNELS, InputSpec, TilingSpec
from server.core.types import TENSOR_DTYPES, Box, RawTensor
from server.inference.resize import CROP_BOX_FILTERS, crop_origin, resize_crop_box

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")
# An image so elongated that scaling its shorter side to `resize` would make a larger intermediate image than
# this is resized through its crop box only: a 1x100000 image must not become a 256x25,600,000 one.
MAX_INTERMEDIATE_PIXELS = 1 << 22
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
DRAFT_MARGIN = 3
"""A JPEG is decoded at 1/2, 1/4 or 1/8 scale only while it stays at least this many times the size it is resized
to in both dimensions: the margin of the resize's own ``reducing_gap``, so libjpeg's DCT scaling only replaces part
of the box reduction the resize would do. Measured against a full decode (docs/benchmarks.md): mean absolute
difference ≤ 0.75 levels, 99th percentile ≤ 5 levels (the bound docs/api.md states); a margin of 1 gave up to 2.0
and 24."""
DRAFT_FILTERS = ("bilinear", "bicubic")
"""The interpolations reduced-scale decoding is used with: measured within the bound. Nearest picks pixels a reduced
decode would average; box, hamming and lanczos measured outside it (box: p99 20 levels)."""
RESIZE_GAP = 3.0
"""Pillow's ``reducing_gap``: an image over this many times its target is box-reduced by an integer factor first."""
BLOCK_PIXELS = 1 << 16
"""Pixels converted at a time by the block-wise conversions (deep images to 8 bits, colour tensors to grey)."""

Source = Image.Image | np.ndarray
"""A decoded input in the model's colour mode: a PIL image, or an ``H x W x C`` array from a tensor."""
Opened = Image.Image | RawTensor
"""An input whose header is read and checked (:func:`open_input`) and whose pixels are not decoded yet."""
Payload = bytes | RawTensor | Image.Image
"""What the functions below take: a request's input, or one already opened by :func:`open_input`."""


def preprocess(payload: Payload, spec: InputSpec, max_pixels: int = MAX_PIXELS,
               box: Box | None = None) -> np.ndarray:
    """Turn one request's input (or its region ``box``) into an ``H x W x C`` array of the model's input size.
    A large JPEG is decoded at reduced scale (:func:`draft_jpeg`) unless a region is asked for."""
    if box is None and not isinstance(payload, RawTensor):
        payload = open_input(payload, max_pixels)
        draft_jpeg(payload, spec)
    source = load_source(payload, spec, max_pixels)
    return fit(crop(source, box) if box else source, spec)


def preprocess_tiles(payload: Payload, spec: InputSpec, tiling: TilingSpec,
                     max_pixels: int = MAX_PIXELS) -> list[tuple[Box, np.ndarray]]:
    """Cut the input into the overlapping tiles of ``tiling`` and fit each to the model's input size.

    The tile count is checked against ``max_tiles`` before any box is listed (and, from the header, before
    any pixel is decoded when no orientation could make it fit)."""
    opened = open_input(payload, max_pixels)
    check_opened_tiles(opened, tiling)
    source = load_source(opened, spec, max_pixels)
    height, width = _source_size(source)  # an EXIF orientation may have swapped them
    check_tile_count(width, height, tiling, tile_count(width, height, tiling))
    return [(box, fit(crop(source, box), spec)) for box in tile_boxes(width, height, tiling)]


def tile_count(width: int, height: int, tiling: TilingSpec) -> int:
    """How many tiles :func:`tile_boxes` gives, by arithmetic: no box is listed."""
    return _start_count(width, tiling.tile[1], tiling.stride[1]) * _start_count(height, tiling.tile[0],
                                                                                tiling.stride[0])


def check_opened_tiles(opened: Opened, tiling: TilingSpec) -> None:
    """Raise InvalidInput if an opened input gives more than ``max_tiles`` tiles whichever way round an EXIF
    orientation turns it: known from the header, before any pixel is decoded."""
    width, height = opened_size(opened)
    check_tile_count(width, height, tiling, min(tile_count(width, height, tiling), tile_count(height, width, tiling)))


def check_tile_count(width: int, height: int, tiling: TilingSpec, count: int) -> None:
    """Raise InvalidInput if ``count`` tiles of an image of ``width x height`` exceed the model's ``max_tiles``."""
    if count > tiling.max_tiles:
        raise InvalidInput(f"image of {width}x{height} pixels gives {count} tiles of "
                           f"{tiling.tile[1]}x{tiling.tile[0]}, more than the model's limit of {tiling.max_tiles}")


def tile_boxes(width: int, height: int, tiling: TilingSpec) -> list[Box]:
    """Tiles ``stride`` apart, row by row; the last row and column are aligned to the far edges so the whole
    image is covered. An image smaller than a tile in a dimension is one tile of its own size there.
    Lists every box: check :func:`tile_count` first."""
    tile_h, tile_w = tiling.tile
    stride_h, stride_w = tiling.stride
    return [(x, y, min(tile_w, width), min(tile_h, height))
            for y in _starts(height, tile_h, stride_h) for x in _starts(width, tile_w, stride_w)]


def _start_count(length: int, tile: int, stride: int) -> int:
    """``len(_starts(length, tile, stride))``: the strided starts plus the one aligned to the far edge."""
    return 1 if length <= tile else -(-(length - tile) // stride) + 1


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def open_input(payload: Payload, max_pixels: int = MAX_PIXELS) -> Opened:
    """Read an image's header (not its pixels), or check a tensor's dtype, shape and size; an image already
    opened is returned as it is. Raises InvalidInput."""
    if isinstance(payload, RawTensor):
        check_tensor(payload, max_pixels)
        return payload
    return payload if isinstance(payload, Image.Image) else open_image(payload, max_pixels)


def opened_size(opened: Opened) -> tuple[int, int]:
    """``(width, height)`` of an opened input, from its header (before any EXIF orientation)."""
    return (opened.shape[1], opened.shape[0]) if isinstance(opened, RawTensor) else opened.size


def load_source(payload: Payload, spec: InputSpec, max_pixels: int = MAX_PIXELS) -> Source:
    """Decode an image and convert it to the model's colour mode, or validate a tensor and match its channels."""
    if isinstance(payload, RawTensor):
        return tensor_to_array(payload, spec, max_pixels)
    image = decode_image(payload, max_pixels)
    try:
        return _convert(image, spec)
    except InvalidInput:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a decoded-but-odd image makes Pillow raise is bad input
        raise InvalidInput(f"{_modes(image, spec)} and cannot be converted ({type(exc).__name__}: {exc})") from None


def _modes(image: Image.Image, spec: InputSpec) -> str:
    """What the model takes and what the image is, e.g. "the model takes 4-channel RGBA input; this JPEG is RGB
    (3 channels, no alpha)"."""
    bands = len(image.getbands())
    alpha = "" if has_alpha(image) else ", no alpha"
    return (f"the model takes {spec.channels}-channel {spec.color} input; this {image.format or 'image'} "
            f"({image.width}x{image.height}) is {image.mode} ({bands} channel{'s' if bands > 1 else ''}{alpha})")


def crop(source: Source, box: Box) -> Source:
    """The region ``box`` of a decoded input."""
    x, y, width, height = box
    if isinstance(source, np.ndarray):
        return source[y:y + height, x:x + width]
    return source.crop((x, y, x + width, y + height))


def fit(source: Source, spec: InputSpec) -> np.ndarray:
    """Resize and crop a decoded input to the model's input size."""
    return _fit_array(source, spec) if isinstance(source, np.ndarray) else _fit_image(source, spec)


def _source_size(source: Source) -> tuple[int, int]:
    if isinstance(source, np.ndarray):
        return source.shape[0], source.shape[1]
    return source.height, source.width


def decode_image(data: bytes | Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an encoded image (or one :func:`open_image` opened), EXIF orientation applied. Raises InvalidInput."""
    with _decode_errors():
        image = data if isinstance(data, Image.Image) else open_image(data, max_pixels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
        # in place: without an orientation, exif_transpose would otherwise return a copy of the whole image
        ImageOps.exif_transpose(image, in_place=True)
        return image


def draft_jpeg(image: Image.Image, spec: InputSpec) -> None:
    """Before its pixels are decoded, let libjpeg decode a JPEG at the strongest DCT reduction (1/2, 1/4, 1/8)
    that divides both its sides and keeps it :data:`DRAFT_MARGIN` times the size it is resized to. Other images,
    other interpolations (:data:`DRAFT_FILTERS`) and images too small for 1/2 are left as they are. Changes
    ``image`` in place (its size, not its orientation): the decode cost reserved from the header stays an upper
    bound. Blocks only on the header; raises InvalidInput if Pillow cannot set up the reduced decode."""
    if image.format not in ("JPEG", "MPO") or spec.interpolation not in DRAFT_FILTERS:
        return
    if spec.channels == 4 and not spec.fill_alpha:
        return  # refused for want of alpha: the message names the image's own size
    scale = draft_scale(image.width, image.height, spec)
    if scale > 1:
        with _decode_errors():
            image.draft(image.mode, (image.width // scale, image.height // scale))


def draft_scale(width: int, height: int, spec: InputSpec) -> int:
    """The DCT scale divisor (8, 4, 2, or 1 for none) :func:`draft_jpeg` decodes a ``width x height`` JPEG at."""
    # stretched (crop = none): a square, whichever way an EXIF orientation turns the image; scaled_size is the
    # same whichever way round it turns
    side = max(spec.width, spec.height)
    wanted = (side, side) if spec.crop == "none" else scaled_size(width, height, spec)
    for scale in (8, 4, 2):
        # an exact divisor only: a partial last block would shift the resize's sampling grid by up to a pixel
        if (width % scale == 0 and height % scale == 0 and width // scale >= DRAFT_MARGIN * wanted[0]
                and height // scale >= DRAFT_MARGIN * wanted[1]):
            return scale
    return 1


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read an encoded image's header only (format, mode, size, EXIF), not its pixels, and check its format and
    size against ``max_pixels``. Raises InvalidInput with the same messages as :func:`decode_image`."""
    if not data:
        raise InvalidInput("empty image: the request's image field has no bytes")
    with _decode_errors():
        with warnings.catch_warnings():
            # The daemon enforces its own, configurable pixel limit below; PIL's fixed one only as a backstop.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        _check_image(image, max_pixels)
        return image


@contextlib.contextmanager
def _decode_errors() -> Iterator[None]:
    """Whatever decoding an image raises becomes InvalidInput."""
    try:
        yield
    except InvalidInput:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InvalidInput(_decode_message(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"cannot decode image: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - corrupt files make decoders raise almost anything; all are bad input
        raise InvalidInput(f"cannot decode image: {type(exc).__name__}: {exc}") from None


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


def _convert(image: Image.Image, spec: InputSpec) -> Image.Image:
    """Convert to the model's colour mode; palette, 16-bit, float and alpha images included.

    A 4-channel (RGBA) model needs a fourth channel: images without alpha are refused unless the manifest
    sets ``fill_alpha``, since a channel such as near-infrared cannot be made up. Raises InvalidInput.
    """
    color = spec.color
    if image.mode == color:
        return image
    alpha = has_alpha(image)
    if color == "RGBA" and not alpha and not spec.fill_alpha:
        raise InvalidInput(f"{_modes(image, spec)}: send a PNG or WebP with alpha, or a 4-channel tensor (a fourth "
                           "channel cannot be made up; the model's manifest would have to set fill_alpha = true)")
    if image.mode in HIGH_DEPTH_MODES:
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if alpha else "RGB")
    if image.mode == color:
        return image  # Image.convert to its own mode would copy the whole image
    try:
        return image.convert(color)
    except ValueError:
        pass
    try:  # Pillow converts some modes (LAB) only to RGB
        return image.convert("RGB").convert(color)
    except ValueError as exc:
        raise InvalidInput(f"{_modes(image, spec)} and cannot be converted to {color}: {exc}") from None


def has_alpha(image: Image.Image) -> bool:
    """Whether an image has an alpha channel (a palette image: a transparent colour). Known from the header."""
    return image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Greyscale deeper than 8 bits to ``L``, scaled instead of clipped at 255, a block of rows at a time.

    16-bit modes: ÷ 65535 (257 levels to one). 32-bit integers: kept when ≤ 255, read as 16-bit when ≤ 65535,
    else scaled by their maximum; negative values are 0. Floats: read as 0..1 when ≤ 1.0, else clipped to
    0..255; NaN is 0. Besides the result (1 byte per pixel), only one block's temporaries are allocated.
    """
    width, height = image.size
    peak = 65535 if image.mode.startswith("I;16") else image.getextrema()[1]  # Pillow's own pass: no copy
    out = np.empty((height, width), np.uint8)
    rows = max(1, BLOCK_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = _deep_to_8bit(np.asarray(image.crop((0, top, width, bottom))), peak)
    return Image.fromarray(out)


def _deep_to_8bit(block: np.ndarray, peak: float) -> np.ndarray:
    """One block of :func:`_to_8bit`: float32 for floats, integers (rounded to nearest) for the rest."""
    if block.dtype.kind == "f":
        values = block.astype(np.float32)  # a writable copy, converted in place from here
        np.nan_to_num(values, copy=False, nan=0.0)
        if peak <= 1.0:
            values *= np.float32(255.0)
        np.rint(values, out=values)
        return np.clip(values, 0, 255, out=values).astype(np.uint8)
    values = block.astype(np.int64)  # a writable copy, converted in place from here
    np.maximum(values, 0, out=values)
    if peak <= 255:
        return values.astype(np.uint8)  # 0..peak
    if peak <= 65535:  # round(v * 255 / 65535), and 65535 = 255 * 257
        values += 128
        values //= 257
        return values.astype(np.uint8)
    top = int(peak)  # round(v * 255 / peak), v <= peak
    values *= 510
    values += top
    values //= 2 * top
    return values.astype(np.uint8)


def _fit_image(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Resize and crop to the input size (see :func:`_fit_band`). Four channels are resampled one by one,
    so a fourth channel (alpha, or e.g. near-infrared) never scales the colour channels."""
    if len(image.getbands()) == 4:
        return np.dstack([_fit_band(band, spec) for band in image.split()])
    return _as_hwc(_fit_band(image, spec))


def _fit_band(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Resize (shorter side to ``resize``) and centre-crop, or stretch to the input size when crop = none."""
    resample = _RESAMPLE[spec.interpolation]
    if spec.crop == "none":
        if image.size != (spec.width, spec.height):
            image = image.resize((spec.width, spec.height), resample)
        return np.asarray(image)
    new_size = scaled_size(image.width, image.height, spec)
    if new_size[0] * new_size[1] > MAX_INTERMEDIATE_PIXELS:
        return np.asarray(resize_crop_box(image, new_size, spec, resample, None))
    if new_size != image.size and spec.interpolation in CROP_BOX_FILTERS:
        return np.asarray(resize_crop_box(image, new_size, spec, resample, RESIZE_GAP))
    if new_size != image.size:
        image = image.resize(new_size, resample, reducing_gap=RESIZE_GAP)
    left, top = crop_origin(image.width, image.height, spec)
    image = image.crop((left, top, left + spec.width, top + spec.height))
    return np.asarray(image)


def scaled_size(width: int, height: int, spec: InputSpec) -> tuple[int, int]:
    """``(width, height)`` an image is scaled to before the centre crop (``crop = "center"``): the shorter side to
    ``resize``, each side at least the input size."""
    # the same arithmetic as torchvision's Resize(resize) + CenterCrop, which most models were trained with
    short, long = min(width, height), max(width, height)
    scaled_long = spec.resize * long // short
    scaled = (spec.resize, scaled_long) if width <= height else (scaled_long, spec.resize)
    return max(spec.width, scaled[0]), max(spec.height, scaled[1])


def _as_hwc(array: np.ndarray) -> np.ndarray:
    return array[:, :, None] if array.ndim == 2 else array


def is_model_sized(payload: bytes | RawTensor, spec: InputSpec) -> TypeGuard[RawTensor]:
    """Whether ``payload`` is a uint8 tensor of exactly the model's input shape with the right byte count: then
    :func:`tensor_to_array` only views it (constant time, no copy) and may run on the event loop."""
    return (isinstance(payload, RawTensor) and payload.dtype == "uint8"
            and payload.shape == (spec.height, spec.width, spec.channels)
            and len(payload.data) == spec.height * spec.width * spec.channels)


def check_tensor(tensor: RawTensor, max_pixels: int = MAX_PIXELS) -> np.dtype:
    """Check a raw tensor's dtype, shape, pixel count and byte count (not its values); its numpy dtype.
    Raises InvalidInput."""
    dtype = TENSOR_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidInput(f"tensor dtype must be UINT8 or FLOAT32, got {tensor.dtype}")
    shape = tensor.shape
    if len(shape) not in (2, 3) or any(d < 1 for d in shape):
        raise InvalidInput(f"tensor shape must be [height, width] or [height, width, channels], got {list(shape)}")
    if shape[0] * shape[1] > max_pixels:
        raise InvalidInput(f"tensor of {shape[0]}x{shape[1]} pixels exceeds the limit of {max_pixels} pixels")
    count = math.prod(shape)  # Python ints: huge dimensions must not wrap around
    if count * dtype.itemsize != len(tensor.data):
        raise InvalidInput(f"tensor of shape {list(shape)} and dtype {tensor.dtype} needs "
                           f"{count * dtype.itemsize} bytes, got {len(tensor.data)}")
    return dtype


def tensor_to_array(tensor: RawTensor, spec: InputSpec, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Validate a raw tensor and view it as ``H x W x C`` with the model's channel count."""
    dtype = check_tensor(tensor, max_pixels)
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)
    # a float64 sum is finite exactly when every float32 value is, and needs no array of flags
    if dtype.kind == "f" and not math.isfinite(float(array.sum(dtype=np.float64))):
        raise InvalidInput("tensor contains NaN or infinite values")
    return _match_channels(_as_hwc(array), spec)


def _match_channels(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    have, want = array.shape[2], spec.channels
    if have == want:
        return array
    if want == 1 and have in (3, 4):
        return _as_hwc(_to_grey(array))
    if want == 3 and have == 1:
        return np.repeat(array, 3, axis=2)
    if want == 3 and have == 4:
        return array[:, :, :3]
    if want == 4 and have in (1, 3) and spec.fill_alpha:
        rgb = np.repeat(array, 3, axis=2) if have == 1 else array
        opaque = np.full((*array.shape[:2], 1), 255 if array.dtype == np.uint8 else 1.0, dtype=array.dtype)
        return np.concatenate([rgb, opaque], axis=2)
    names = {v: k for k, v in COLOR_CHANNELS.items()}
    reason = "they cannot be converted"
    if want == 4 and have in (1, 3):
        reason = "a fourth channel (alpha, or e.g. near-infrared) cannot be made up (the model's manifest does " \
                 "not set fill_alpha)"
    raise InvalidInput(f"tensor has {have} channel(s); the model takes {want} ({names.get(want, '?')}) and {reason}")


def _to_grey(array: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of a colour tensor's first three channels, a block of rows at a time."""
    height, width = array.shape[:2]
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = np.empty((height, width), array.dtype)
    rows = max(1, BLOCK_PIXELS // width)
    for top in range(0, height, rows):
        grey = array[top:top + rows, :, :3].astype(np.float32) @ weights
        out[top:top + rows] = grey.round() if array.dtype == np.uint8 else grey
    return out


def _fit_array(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resize a tensor to the input size only when it is not that size already (floats band by band)."""
    if array.shape[:2] == (spec.height, spec.width):
        return array
    if array.dtype != np.uint8:
        bands = [_fit_band(Image.fromarray(np.ascontiguousarray(array[:, :, i]), "F"), spec)
                 for i in range(array.shape[2])]
        return np.dstack(bands).astype(np.float32)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    image = Image.fromarray(array[:, :, 0] if mode == "L" else np.ascontiguousarray(array), mode)
    return _fit_image(image, spec)
