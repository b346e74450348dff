"""Resizing a decoded image to the model's input through its centre crop's box: only the crop's pixels are
resampled, with the filter taps of scaling the whole image and then cropping it.

Pillow only (its resize releases the GIL); blocks: run it in the preprocessing pool, as
:mod:`server.inference.preprocess` does.
"""

from __future__ import annotations

from PIL import Image

from server.core.manifest import InputSpec

CROP_BOX_FILTERS = ("bilinear", "bicubic", "hamming", "lanczos")
"""The interpolations a centre-cropped input is resized with through its crop box (only the crop's pixels
resampled, the same filter taps: at 640x480 a third of the whole resize's time, benchmarks/preprocess_stages.py).
Measured against scaling the whole image and cropping: at most 1 level apart, on under 1 % of the values
(floating-point rounding of the fractional crop box; 0.02 % at 640x480 to 256).
Nearest and box pick or average whole source pixels, which the crop box's fractional origin can tip the other
way (255 levels): they scale the whole image as before."""


def crop_origin(width: int, height: int, spec: InputSpec) -> tuple[int, int]:
    """``(left, top)`` of the centred input-size crop of an image of ``width x height``."""
    return round((width - spec.width) / 2.0), round((height - spec.height) / 2.0)


def resize_crop_box(image: Image.Image, new_size: tuple[int, int], spec: InputSpec,
                    resample: Image.Resampling, reducing_gap: float | None) -> Image.Image:
    """The centre crop of the image scaled to ``new_size``, resampling only the source region it covers.

    With ``reducing_gap``, the whole image is first box-reduced by the integer factor Pillow's own
    ``resize(reducing_gap=...)`` would use, from the same origin, so the result is that of scaling the whole image
    and cropping (a reduction of only the crop's region would start its blocks elsewhere: up to 0.9 levels mean
    difference, measured). None for an elongated image: no reduced copy (decode_cost's bound for it)."""
    sx, sy = new_size[0] / image.width, new_size[1] / image.height
    fx, fy = 1, 1
    if reducing_gap is not None and resample != Image.Resampling.NEAREST:
        fx, fy = int(1 / sx / reducing_gap) or 1, int(1 / sy / reducing_gap) or 1
        if fx > 1 or fy > 1:
            image = image.reduce((fx, fy))
    left, top = crop_origin(*new_size, spec)
    box = (left / sx / fx, top / sy / fy, (left + spec.width) / sx / fx, (top + spec.height) / sy / fy)
    return image.resize((spec.width, spec.height), resample, box=box)
