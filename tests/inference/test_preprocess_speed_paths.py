"""Pre-processing's fast paths: a large JPEG decoded at reduced scale (libjpeg's DCT scaling through Pillow's
``draft``) when it stays DRAFT_MARGIN times the resize target, within the documented bound of a full decode
(docs/api.md, "Pre-processing"); every other input decoded in full as before."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from server.core.manifest import InputSpec
from server.core.types import RawTensor
from server.inference import preprocess as pre

pytestmark = pytest.mark.timeout(60)

MEAN_BOUND = 0.75  # levels: the bound docs/api.md states (bilinear and bicubic)
P99_BOUND = 5


def photo(width: int, height: int, seed: int = 0, noise: float = 20.0) -> Image.Image:
    """Gradients plus noise, as in benchmarks/preprocess_stages.py."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), (x + y) * 3 % 256], axis=-1)
    base += np.random.default_rng(seed).normal(0, noise, base.shape).astype(np.float32)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}), **options)
    return out.getvalue()


def full_decode(data: bytes, spec: InputSpec) -> np.ndarray:
    """The path without draft: every pixel decoded, then resized and cropped."""
    return pre.fit(pre.load_source(data, spec), spec)


@pytest.fixture
def drafts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The sizes JpegImageFile.draft is asked for during the test."""
    asked: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> Any:
        assert size is not None
        asked.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return asked


def test_a_large_jpeg_is_decoded_at_reduced_scale(drafts: list[tuple[int, int]]) -> None:
    data = encode(photo(4000, 3000))
    opened = pre.open_input(data)
    assert isinstance(opened, Image.Image)
    pre.draft_jpeg(opened, InputSpec())
    assert opened.size == (2000, 1500)  # 1/2: 1/4 (1000x750) is under 3 x the 341x256 it is resized to
    assert pre.preprocess(data, InputSpec()).shape == (224, 224, 3)
    assert drafts == [(2000, 1500), (2000, 1500)]


@pytest.mark.parametrize(("width", "height", "spec"), [
    (640, 480, InputSpec()),  # never twice the 256 resize
    (2731, 2049, InputSpec()),  # 1/2 would leave a partial last block: the sampling grid would shift
    (4000, 3000, InputSpec(interpolation="nearest")),  # nearest picks pixels; a reduced decode averages them
    (4000, 3000, InputSpec(interpolation="box")),  # measured outside the bound
    (4000, 3000, InputSpec(interpolation="lanczos")),
])
def test_other_jpegs_are_decoded_in_full(width: int, height: int, spec: InputSpec,
                                         drafts: list[tuple[int, int]]) -> None:
    assert pre.draft_scale(width, height, spec) == 1 or spec.interpolation not in pre.DRAFT_FILTERS
    pre.preprocess(encode(photo(width, height)), spec)
    assert drafts == []


def test_a_region_and_tiles_are_cut_from_the_full_image(drafts: list[tuple[int, int]]) -> None:
    data = encode(photo(4000, 3000))
    assert pre.preprocess(data, InputSpec(), box=(100, 200, 3000, 2000)).shape == (224, 224, 3)
    assert drafts == []


def test_a_tensor_or_png_is_never_drafted(drafts: list[tuple[int, int]]) -> None:
    big = photo(2048, 1536)
    pre.preprocess(encode(big, "PNG"), InputSpec())
    pixels = np.asarray(big)
    pre.preprocess(RawTensor("uint8", pixels.shape, pixels.tobytes()), InputSpec())
    assert drafts == []


@pytest.mark.parametrize(("width", "height", "spec", "scale"), [
    (2048, 1536, InputSpec(), 2),
    (4000, 3000, InputSpec(), 2),
    (8000, 6000, InputSpec(), 4),
    (4000, 3000, InputSpec(height=160, width=200, crop="none"), 4),  # stretched: 3 x 200 in both sides
    (4000, 3000, InputSpec(interpolation="bicubic", color="L", mean=(0.5,), std=(0.5,)), 2),
])
def test_draft_scale(width: int, height: int, spec: InputSpec, scale: int) -> None:
    assert pre.draft_scale(width, height, spec) == scale
    assert pre.draft_scale(height, width, spec) == scale  # whichever way an EXIF orientation turns it


@pytest.mark.parametrize(("width", "height", "seed", "noise", "spec"), [
    (2048, 1536, 0, 20.0, InputSpec()),  # exactly 3 x the resize target at 1/2
    (2736, 2048, 1, 20.0, InputSpec()),
    (4000, 3000, 2, 4.0, InputSpec()),
    (2048, 1536, 3, 20.0, InputSpec(interpolation="bicubic")),  # sharper filters keep more of the noise
    (2048, 1536, 4, 20.0, InputSpec(height=160, width=200, crop="none")),
])
def test_reduced_decode_stays_within_the_bound(width: int, height: int, seed: int, noise: float,
                                               spec: InputSpec) -> None:
    data = encode(photo(width, height, seed, noise))
    assert pre.draft_scale(width, height, spec) > 1
    diff = np.abs(pre.preprocess(data, spec).astype(np.int16) - full_decode(data, spec).astype(np.int16))
    assert diff.mean() <= MEAN_BOUND, f"mean abs diff {diff.mean():.3f}"
    assert np.percentile(diff, 99) <= P99_BOUND, f"p99 diff {np.percentile(diff, 99)}"


def test_an_exif_rotated_large_jpeg_is_drafted_and_turned(drafts: list[tuple[int, int]]) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(photo(4000, 3000, seed=5), exif=exif)
    got = pre.preprocess(data, InputSpec(height=224, width=160, crop="none"))
    assert got.shape == (224, 160, 3)
    assert drafts
    diff = np.abs(got.astype(np.int16) - full_decode(data, InputSpec(height=224, width=160, crop="none")))
    assert diff.mean() <= MEAN_BOUND
