"""Decode JPEGs and fit them to the model's input size on the model's device (nvJPEG on CUDA).

The device alternative to :mod:`server.inference.preprocess`'s Pillow path, for JPEG payloads only. Two steps:
:func:`probe` reads a payload's header in the preprocessing pool and says whether the device path can take it;
:func:`decode_batch` decodes a batch of such payloads with ``torchvision.io.decode_jpeg`` (batched nvJPEG on CUDA)
and resizes and crops them on the device: in the preprocessing pool on CUDA (no CPU torch operators run there, so
it may overlap the forward pass), on the inference thread on the CPU. The geometry (scaled size, centre crop,
EXIF orientation, filter) is exactly the Pillow path's; pixel values differ by a few levels (another JPEG decoder
and resampler). Anything the device path cannot reproduce goes to the Pillow path instead: other formats, CMYK
JPEGs, filters other than nearest/bilinear/bicubic, extremely elongated images, tiled models, and single JPEGs
the device decoder refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from server.core.config import MAX_PIXELS
from server.core.errors import InvalidInput
from server.core.manifest import InputSpec, Manifest
from server.inference.preprocess import (
    MAX_INTERMEDIATE_PIXELS,
    crop_origin,
    open_image,
    preprocess,
    scaled_size,
)

# Pillow's NEAREST samples at pixel centres: torch's "nearest-exact", not its "nearest".
# torchvision's names; torchvision itself is imported on first use (CUDA only): importing it costs about a
# second of start-up, before the daemon can bind its ports.
_FILTERS = {"nearest": "NEAREST_EXACT", "bilinear": "BILINEAR", "bicubic": "BICUBIC"}
# An RGBA model gets an RGB decode plus an opaque alpha channel, as Pillow's convert("RGBA") gives a JPEG.
_READ_MODES = {"RGB": "RGB", "L": "GRAY", "RGBA": "RGB"}
# Pillow modes of JPEGs both decoders turn into the same colours (CMYK/YCCK JPEGs are left to Pillow).
_JPEG_MODES = ("RGB", "L")
_EXIF_ORIENTATION = 0x0112
# What Pillow's ImageOps.exif_transpose does for each EXIF orientation, on C x H x W tensors.
_ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda t: t.flip(-1),
    3: lambda t: t.flip(-2, -1),
    4: lambda t: t.flip(-2),
    5: lambda t: t.transpose(-2, -1),
    6: lambda t: t.transpose(-2, -1).flip(-1),  # rotate 90° clockwise
    7: lambda t: t.transpose(-2, -1).flip(-2, -1),
    8: lambda t: t.transpose(-2, -1).flip(-2),  # rotate 90° counter-clockwise
}


@dataclass(frozen=True)
class DeviceJpeg:
    """A payload :func:`probe` accepted for the device path: its bytes and the EXIF orientation to apply
    (nvJPEG ignores EXIF, so it is read from the header in the preprocessing pool)."""

    data: bytes
    orientation: int = 1


def supports(spec: InputSpec) -> bool:
    """Whether the device path can produce this input spec exactly like the Pillow path (colour mode, filter)."""
    color_ok = spec.color in ("RGB", "L") or (spec.color == "RGBA" and spec.fill_alpha)
    return color_ok and spec.interpolation in _FILTERS


def uses_device_decode(manifest: Manifest, device: torch.device) -> bool:
    """Whether JPEG payloads of this model (its resolved manifest) are decoded on ``device``.

    ``[input] decode``: ``"cpu"`` never, ``"device"`` always, ``"auto"`` when ``device`` is CUDA; and never for a
    tiled model or an input spec the device path cannot reproduce (:func:`supports`). Pure; does not block.
    """
    spec = manifest.input
    if spec.decode == "cpu" or manifest.tiling is not None or not supports(spec):
        return False
    return spec.decode == "device" or device.type == "cuda"


def probe(payload: bytes, spec: InputSpec, max_pixels: int = MAX_PIXELS) -> DeviceJpeg | None:
    """The payload as a :class:`DeviceJpeg` when the device path can take it, else None (use the Pillow path).

    Reads the header only (Pillow, no pixel decoding): cheap, but blocking; meant for the preprocessing pool.
    Raises InvalidInput, with the Pillow path's messages, for an empty or unidentifiable payload, an unsupported
    format, or an image over ``max_pixels``.
    """
    image = open_image(payload, max_pixels)
    if image.format != "JPEG" or image.mode not in _JPEG_MODES or not supports(spec):
        return None
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block: the Pillow path reports it
        return None
    orientation = orientation if orientation in _ORIENT else 1
    width, height = (image.height, image.width) if orientation >= 5 else image.size
    if spec.crop == "center" and _too_elongated(width, height, spec):
        return None
    return DeviceJpeg(payload, orientation)


def decode_batch(jpegs: Sequence[DeviceJpeg], spec: InputSpec,
                 device: torch.device) -> list[torch.Tensor | InvalidInput]:
    """One ``C x H x W`` uint8 tensor of the model's input size on ``device`` per JPEG, in order.

    Blocks for the decoder's host work (on CUDA, nvJPEG's CPU stages; the device work is queued on the current
    stream), and for Pillow on the JPEGs the device decoder refuses: on the CPU call it on the inference thread (the
only one that runs torch CPU operators); on CUDA any worker thread will do. Such a JPEG
    is decoded by the Pillow path instead, so a corrupt one gets, in its slot, the InvalidInput the Pillow path
    would raise, and the others are unaffected. The tensors may be views of a shared batch tensor. Raises
    ``torch.cuda.OutOfMemoryError`` when the device runs out of memory, ValueError when ``spec`` fails
    :func:`supports`.
    """
    if not supports(spec):
        raise ValueError(f"the device path cannot reproduce this input spec ({spec.color}, {spec.interpolation})")
    results: list[torch.Tensor | InvalidInput | None] = [None] * len(jpegs)
    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for index, (jpeg, image) in enumerate(zip(jpegs, _decode(jpegs, _READ_MODES[spec.color], device), strict=True)):
        if image is not None and jpeg.orientation in _ORIENT:
            image = _ORIENT[jpeg.orientation](image)
        if image is None or (spec.crop == "center" and _too_elongated(image.shape[-1], image.shape[-2], spec)):
            results[index] = _pillow_path(jpeg, spec, device)
        else:
            groups.setdefault((image.shape[-2], image.shape[-1]), []).append((index, image))
    for members in groups.values():  # same-size images are resized as one batch
        fitted = _fit(torch.stack([image for _, image in members]), spec)
        for (index, _), tensor in zip(members, fitted, strict=True):
            results[index] = tensor
    return cast(list[torch.Tensor | InvalidInput], results)  # every slot is filled above


def _decode(jpegs: Sequence[DeviceJpeg], mode_name: str, device: torch.device) -> list[torch.Tensor | None]:
    """Decode all JPEGs in one call (``mode_name``: an ImageReadMode name); if that fails, one by one, with None
    for each that fails."""
    if not jpegs:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg  # first use only: see _FILTERS

    mode = getattr(ImageReadMode, mode_name)
    # bytearray: torch.frombuffer warns on read-only buffers, and the copy is small next to the decode
    data = [torch.frombuffer(bytearray(jpeg.data), dtype=torch.uint8) for jpeg in jpegs]
    try:
        return list(decode_jpeg(data, mode=mode, device=device))
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError:  # one bad JPEG fails the whole call
        pass
    decoded: list[torch.Tensor | None] = []
    for one in data:
        try:
            decoded.append(decode_jpeg([one], mode=mode, device=device)[0])
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:
            decoded.append(None)
    return decoded


def _fit(batch: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Resize and crop an ``N x C x H x W`` batch with the Pillow path's geometry (preprocess._fit_band)."""
    height, width = batch.shape[-2:]
    size = (spec.width, spec.height) if spec.crop == "none" else scaled_size(width, height, spec)
    if size != (width, height):
        # antialias=True is Pillow's resampling (a = -0.5 for bicubic); nearest ignores it
        from torchvision.transforms.v2 import InterpolationMode  # first use only: see _FILTERS
        from torchvision.transforms.v2.functional import resize

        filter_ = getattr(InterpolationMode, _FILTERS[spec.interpolation])
        batch = resize(batch, [size[1], size[0]], interpolation=filter_, antialias=True)
    left, top = crop_origin(size[0], size[1], spec)
    batch = batch[..., top:top + spec.height, left:left + spec.width]
    if spec.color == "RGBA":
        opaque = torch.full_like(batch[:, :1], 255)
        batch = torch.cat([batch, opaque], dim=1)
    return batch


def _too_elongated(width: int, height: int, spec: InputSpec) -> bool:
    """The Pillow path resizes such an image through a fractional crop box, which the device path cannot."""
    new_width, new_height = scaled_size(width, height, spec)
    return new_width * new_height > MAX_INTERMEDIATE_PIXELS


def _pillow_path(jpeg: DeviceJpeg, spec: InputSpec, device: torch.device) -> torch.Tensor | InvalidInput:
    try:
        array = preprocess(jpeg.data, spec)
    except InvalidInput as exc:
        return exc
    return torch.tensor(array, device=device).permute(2, 0, 1)

