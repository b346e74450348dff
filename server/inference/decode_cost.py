"""What preprocessing one input costs in memory, known before any of its pixels is decoded.

Pillow's ``Image.open`` reads only the header: format, mode (the bytes a pixel takes) and size; a tensor's dtype
and shape are in the request. From them and the model's input spec, :func:`decode_bytes` gives an upper bound of
the bytes :mod:`server.inference.preprocess` holds at once while it decodes, converts and fits the input: what a
decode reserves from the decode budget (:mod:`server.inference.decode_budget`). The encoded request itself is not
counted (the message limit bounds it). docs/production.md has the resulting table.

An image's peak is the largest of the phases it goes through, in bytes per pixel of the source (``s``: the bytes
Pillow stores a pixel of its mode in, 1 for 1/L/P, 2 for 16-bit and 4 for every other mode, RGB included):

* decoding: ``s``, plus the decoder's own buffers (progressive JPEG: its coefficients, 2 bytes per sample;
  WebP: libwebp's canvases and Pillow's copy, 12 bytes per pixel measured; compressed TIFF: its largest strip
  or tile of raw samples, at worst the whole image);
* an EXIF orientation: ``2 s`` while the image is transposed (read from the header; a PNG counts as oriented
  when its bytes contain EXIF or XMP anywhere, since its EXIF may follow the pixels);
* conversion to the model's colour mode: ``s`` + the intermediate and the result of each step (16-bit, 32-bit
  and float images become 8-bit greyscale first, palettes RGB or RGBA);
* fitting: the converted image, the four bands a four-channel model's image is split into, and the resize's
  intermediates (:func:`fit_pixels`, nearly nothing for an image far larger than the model's input).

Every input also counts ``FIXED_BYTES`` (the temporaries of a block-wise conversion). The estimates were checked
against the peak resident memory of each format, mode and model colour (tests/inference/test_decode_memory.py).
"""

from __future__ import annotations

from PIL import Image

from server.core.manifest import InputSpec, TilingSpec
from server.core.types import TENSOR_DTYPES, Box, RawTensor
from server.inference.preprocess import (
    BLOCK_PIXELS,
    HIGH_DEPTH_MODES,
    MAX_INTERMEDIATE_PIXELS,
    Opened,
    has_alpha,
    scaled_size,
    tile_count,
)

STORAGE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
"""Bytes Pillow stores one pixel of these modes in; every other mode takes 4."""
_VIA_RGB = {("LAB", "L"), ("CMYK", "L"), ("HSV", "L"), ("RGBa", "L"), ("RGBX", "RGBA"), ("YCbCr", "RGBA"),
            ("HSV", "RGBA")}
"""Conversions that go through an RGB image (preprocess's fallback for LAB, Pillow's own for the others)."""
_ORIENTATION = 0x0112
_PNG_EXIF_MARKERS = (b"eXIf", b"Raw profile type exif", b"XML:com.adobe.xmp", b"Orientation")
WEBP_DECODER_BYTES = 13
FIXED_BYTES = 32 * BLOCK_PIXELS
"""Counted for every input: the temporaries of one block of a block-wise conversion (2 MiB)."""
_RESAMPLE_ROWS = 16
"""Source rows a resize through a crop box reads beyond the box (the filter's support), rounded up."""


def storage_bytes(mode: str) -> int:
    """Bytes Pillow stores one pixel of ``mode`` in."""
    return STORAGE_BYTES.get(mode, 4)


def decode_bytes(opened: Opened, data: bytes | RawTensor, spec: InputSpec, *, box: Box | None = None,
                 tiling: TilingSpec | None = None) -> int:
    """Peak bytes preprocessing ``opened`` (its header read from ``data``) for ``spec`` holds: the whole input,
    its region ``box``, or its tiles. Blocks (reads EXIF from the header)."""
    if isinstance(opened, RawTensor):
        return tensor_bytes(opened, spec, box=box, tiling=tiling)
    rotates = may_rotate(opened, data if isinstance(data, bytes) else b"")
    width, height = opened.size
    pixels = width * height
    decoding = pixels * storage_bytes(opened.mode) + _decoder_bytes(opened)  # the decoder's buffers go with it
    after = pixels * image_bytes_per_pixel(opened.mode, spec, alpha=has_alpha(opened), rotates=rotates)
    return (max(decoding, after) + _fit_bytes(width, height, spec, storage_bytes(spec.color), 1, box, tiling)
            + FIXED_BYTES)


def image_bytes_per_pixel(mode: str, spec: InputSpec, *, alpha: bool = False, rotates: bool = False) -> int:
    """Peak bytes per source pixel of an image of ``mode`` preprocessed for ``spec``, beyond its decoder's buffer
    and the small resize intermediates: the largest of the phases in the module docstring."""
    source, result = storage_bytes(mode), storage_bytes(spec.color)
    steps = [storage_bytes(step) for step in conversion_steps(mode, spec.color, alpha=alpha)]
    converting = max((source + step + (steps[i - 1] if i else 0) for i, step in enumerate(steps)), default=0)
    fitting = result + (4 if spec.channels == 4 else 0)  # Image.split(): four 1-byte bands
    return max(source, 2 * source if rotates else 0, converting, fitting)


def conversion_steps(mode: str, color: str, *, alpha: bool = False) -> list[str]:
    """The modes preprocessing converts an image of ``mode`` through to reach ``color``, the last one ``color``
    (none when ``mode`` is ``color``)."""
    if mode == color:
        return []
    steps = []
    if mode in HIGH_DEPTH_MODES:
        mode = "L"
        steps.append(mode)
    if mode == "P":
        mode = "RGBA" if alpha else "RGB"
        steps.append(mode)
    if mode != color:
        steps += ["RGB", color] if (mode, color) in _VIA_RGB else [color]
    return steps


def may_rotate(image: Image.Image, data: bytes) -> bool:
    """Whether decoding may transpose the image for its EXIF orientation (a second copy for a moment)."""
    if image.format == "PNG":  # Pillow reads a PNG's EXIF with its pixels: look for one anywhere in the file
        return any(marker in data for marker in _PNG_EXIF_MARKERS)
    try:
        return image.getexif().get(_ORIENTATION, 1) in range(2, 9)
    except Exception:  # noqa: BLE001 - decoding will say what is wrong with the EXIF; count the copy until then
        return True


def _decoder_bytes(image: Image.Image) -> int:
    """The decoder's own buffers while it decodes ``image`` (beyond the image itself), from the header."""
    try:
        return _header_decoder_bytes(image)
    except Exception:  # noqa: BLE001 - a header too odd to size: count 8 bytes a pixel; decoding will judge it
        return 8 * image.size[0] * image.size[1]


def _header_decoder_bytes(image: Image.Image) -> int:
    width, height = image.size
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        return width * height * _jpeg_coefficient_bytes(image)
    if image.format == "WEBP":  # libwebp's decoded canvases and Pillow's copy of them (measured: 12 per pixel)
        return width * height * WEBP_DECODER_BYTES
    if image.format == "TIFF" and image.info.get("compression", "raw") != "raw":
        return _tiff_strip_bytes(image)
    return 0  # baseline JPEG, PNG, GIF, BMP, raw TIFF: a few rows at a time


def _jpeg_coefficient_bytes(image: Image.Image) -> int:
    """Bytes per pixel of a progressive JPEG's coefficients (2 per sample, chroma by its subsampling), all kept
    until the last scan."""
    layers = getattr(image, "layer", None) or [(0, 1, 1, 0)] * len(image.getbands())
    largest = max(h * v for _, h, v, _ in layers) or 1
    return -(-2 * sum(h * v for _, h, v, _ in layers) // largest)


def _tiff_strip_bytes(image: Image.Image) -> int:
    """A compressed TIFF's largest strip or tile of raw samples (at least 4 bytes a pixel when libtiff decodes
    it as RGBA: JPEG-compressed or YCbCr); a single strip holds the whole image."""
    tags = getattr(image, "tag_v2", {})
    width, height = image.size
    samples, bits = tags.get(277, len(image.getbands())), tags.get(258, 8)
    widest = max(bits) if isinstance(bits, tuple) and bits else bits
    try:
        raw = -(-int(samples) * int(widest) // 8)
        if "jpeg" in str(image.info.get("compression")) or tags.get(262) == 6:  # PhotometricInterpretation YCbCr
            raw = max(raw, 4)
        tile = int(tags.get(322) or 0) * int(tags.get(323) or 0)
        pixels = min(width * height, tile or width * min(height, int(tags.get(278) or height)))
    except (TypeError, ValueError):  # a header odd enough not to say: the whole image, 8 bytes a pixel
        raw, pixels = 8, width * height
    return raw * pixels


def tensor_bytes(tensor: RawTensor, spec: InputSpec, *, box: Box | None = None,
                 tiling: TilingSpec | None = None) -> int:
    """Peak bytes preprocessing a checked tensor holds beyond its own data (a tensor of the model's shape is only
    viewed: 0 when it needs no resize)."""
    height, width = tensor.shape[:2]
    have = tensor.shape[2] if len(tensor.shape) == 3 else 1
    item = TENSOR_DTYPES[tensor.dtype].itemsize
    want = spec.channels
    if have == want:
        converting = 0
    elif want == 1:
        converting = item  # the grey result; the colour channels are read a block of rows at a time
    elif want == 3:
        converting = 3 * item if have == 1 else 0  # 1 → 3: repeated; 4 → 3: a view
    else:
        converting = 7 * item  # the fourth channel filled: channels repeated, then concatenated
    if box is None and tiling is None and (height, width) == (spec.height, spec.width):
        return width * height * converting + FIXED_BYTES
    # resized: a contiguous copy and a Pillow image of each band (floats), or of the whole array (uint8)
    fitting = 8 if item == 4 else {1: 0, 3: 4 + (3 if have == 4 else 0), 4: 4}[want]
    return (width * height * (converting + fitting) + _fit_bytes(width, height, spec, 4, item, box, tiling)
            + FIXED_BYTES)


def _fit_bytes(width: int, height: int, spec: InputSpec, pixel_bytes: int, item: int, box: Box | None,
               tiling: TilingSpec | None) -> int:
    """Bytes of fitting the whole input, its ``box`` or each of its tiles (one at a time) to the model's size:
    the crop, the resize's intermediates and the results (``item`` bytes per value)."""
    output = spec.width * spec.height * spec.channels * item
    if tiling is not None:
        count = min(max(tile_count(width, height, tiling), tile_count(height, width, tiling)), tiling.max_tiles)
        tile_h, tile_w = min(tiling.tile[0], max(width, height)), min(tiling.tile[1], max(width, height))
        return pixel_bytes * (tile_w * tile_h + fit_pixels(tile_w, tile_h, spec)) + count * output
    if box is not None:
        _, _, box_w, box_h = box
        return pixel_bytes * (box_w * box_h + fit_pixels(box_w, box_h, spec)) + output
    longer, shorter = max(width, height), min(width, height)  # either way round: the orientation may swap them
    return pixel_bytes * max(fit_pixels(longer, shorter, spec), fit_pixels(shorter, longer, spec)) + output


def fit_pixels(width: int, height: int, spec: InputSpec) -> int:
    """An upper bound of the pixels of the images Pillow makes while it fits ``width x height`` to ``spec``:
    the reduced image (``reducing_gap=3``: under 6x the scaled size each way), the horizontal pass of the
    resize (scaled width x source rows) and the scaled, cropped and copied results."""
    if spec.crop == "none":
        return spec.width * height + 3 * spec.width * spec.height
    scaled_w, scaled_h = scaled_size(width, height, spec)
    if scaled_w * scaled_h > MAX_INTERMEDIATE_PIXELS:  # resized through the crop box: only the rows it covers
        rows = min(height, spec.height * height // scaled_h + _RESAMPLE_ROWS)
        return spec.width * rows + 3 * spec.width * spec.height
    reduced = min(width * height, 36 * scaled_w * scaled_h)
    return reduced + scaled_w * height + 3 * scaled_w * scaled_h
