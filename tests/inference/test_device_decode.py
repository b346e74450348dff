"""The device JPEG path (server/inference/device_decode.py) against the Pillow path, on device cpu.

torchvision.io.decode_jpeg runs on the CPU too (libjpeg-turbo instead of nvJPEG), so the geometry (scaled size,
centre crop, EXIF orientation) and the pixel agreement with server.inference.preprocess are checked here on real JPEGs.
Measured on CPU: mean absolute difference ≤ 0.05 levels for 640x480-class images (≤ 0.32 for large photos, which
Pillow first box-reduces), at most 0.3 % of the values more than 2 levels apart. The bounds below leave room.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from server.core.errors import InvalidInput
from server.core.manifest import InputSpec, ManifestError, parse_manifest
from server.inference.device_decode import DeviceJpeg, decode_batch, probe, supports, uses_device_decode
from server.inference.preprocess import preprocess

pytestmark = [pytest.mark.timeout(60),
              # torchvision 0.29 deprecates its codecs for TorchCodec (not in 0.26, the GPU machine's version)
              pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.io.image")]

CPU = torch.device("cpu")
MEAN_ABS_LIMIT = 0.5  # levels
WITHIN = 3  # levels ...
WITHIN_SHARE = 0.99  # ... for at least this share of the values


def photo(height: int, width: int, seed: int = 0) -> Image.Image:
    """Gradients plus noise: smooth enough for JPEG, varied enough that a shifted crop would show."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 3 % 256], axis=-1)
    noisy = base + np.random.default_rng(seed).normal(0, 20, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def jpeg(image: Image.Image, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def device_path(data: bytes, spec: InputSpec) -> np.ndarray:
    """The device path's H x W x C result for one payload, as the Pillow path returns it."""
    job = probe(data, spec)
    assert job is not None
    (result,) = decode_batch([job], spec, CPU)
    assert isinstance(result, torch.Tensor)
    return result.permute(1, 2, 0).numpy()


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.mean() <= MEAN_ABS_LIMIT, f"mean abs diff {diff.mean():.3f}"
    assert (diff <= WITHIN).mean() >= WITHIN_SHARE, f"only {(diff <= WITHIN).mean():.4f} within {WITHIN} levels"


@pytest.mark.parametrize(("height", "width", "spec"), [
    (480, 640, InputSpec()),
    (640, 480, InputSpec(interpolation="bicubic")),
    (13, 21, InputSpec()),  # tiny: upscaled
    (1800, 2400, InputSpec()),  # large: Pillow box-reduces by 2 first (reducing_gap), the device path does not
    (480, 640, InputSpec(color="L", mean=(0.5,), std=(0.5,))),
    (300, 500, InputSpec(height=192, width=256, resize=219)),  # non-square input
    (300, 500, InputSpec(height=160, width=200, crop="none")),  # stretched
    (481, 641, InputSpec(height=223, width=223, resize=255)),  # odd sizes: the crop origin's rounding
])
def test_output_matches_the_pillow_path(height: int, width: int, spec: InputSpec) -> None:
    data = jpeg(photo(height, width))
    got = device_path(data, spec)
    assert got.shape == (spec.height, spec.width, spec.channels)
    assert_close(got, preprocess(data, spec))


def test_nearest_samples_the_same_pixels_except_exact_ties() -> None:
    spec = InputSpec(interpolation="nearest")
    data = jpeg(photo(480, 640))
    diff = np.abs(device_path(data, spec).astype(np.int16) - preprocess(data, spec).astype(np.int16))
    # 640 -> 341 puts one sample exactly on a pixel boundary (column 170 of the 341-wide image, 112 of the crop);
    # Pillow's rounding takes the pixel on the left there, torch's the one on the right
    columns = np.nonzero((diff > WITHIN).any(axis=(0, 2)))[0]
    assert list(columns) in ([], [112])


def test_grayscale_jpeg_for_an_rgb_model_and_rgb_jpeg_for_a_grey_model() -> None:
    grey = jpeg(photo(300, 400).convert("L"))
    assert_close(device_path(grey, InputSpec()), preprocess(grey, InputSpec()))
    grey_spec = InputSpec(color="L", mean=(0.5,), std=(0.5,), interpolation="bicubic")
    colour = jpeg(photo(400, 300))
    assert_close(device_path(colour, grey_spec), preprocess(colour, grey_spec))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(orientation: int) -> None:
    stored = np.zeros((60, 100), np.uint8)
    stored[:30, :50] = 255  # one bright quadrant: every orientation puts it in a different place
    stored[30:, 50:] = 128
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(Image.fromarray(stored, "L"), exif=exif.tobytes())
    spec = InputSpec(color="L", mean=(0.5,), std=(0.5,), height=40, width=80, resize=40)
    job = probe(data, spec)
    assert job is not None and job.orientation == orientation
    assert_close(device_path(data, spec), preprocess(data, spec))


def test_rgba_model_with_fill_alpha_gets_an_opaque_fourth_channel() -> None:
    spec = InputSpec(color="RGBA", mean=(0.5,) * 4, std=(0.5,) * 4, fill_alpha=True)
    data = jpeg(photo(480, 640))
    got = device_path(data, spec)
    assert (got[:, :, 3] == 255).all()
    assert_close(got, preprocess(data, spec))


def test_a_batch_of_mixed_sizes_keeps_its_order() -> None:
    spec = InputSpec()
    payloads = [jpeg(photo(h, w, seed=i)) for i, (h, w) in enumerate([(480, 640), (640, 480), (480, 640), (9, 9)])]
    jobs = [probe(data, spec) for data in payloads]
    results = decode_batch([job for job in jobs if job], spec, CPU)
    assert len(results) == 4
    for data, result in zip(payloads, results, strict=True):
        assert isinstance(result, torch.Tensor) and result.device == CPU and result.dtype == torch.uint8
        assert_close(result.permute(1, 2, 0).numpy(), preprocess(data, spec))
    assert decode_batch([], spec, CPU) == []


def test_one_corrupt_jpeg_fails_alone_with_the_pillow_message() -> None:
    spec = InputSpec()
    good = jpeg(photo(480, 640))
    cut = good[:len(good) // 2]
    zeroed = good[:600] + bytes(len(good) - 600)
    # (lighter damage, e.g. a few flipped bytes of entropy-coded data, both decoders turn into wrong pixels
    # without an error)
    for bad in (cut, zeroed):
        job = probe(bad, spec)  # the header is fine: only decoding finds the damage
        assert job is not None
        results = decode_batch([DeviceJpeg(good), job, DeviceJpeg(good)], spec, CPU)
        assert isinstance(results[0], torch.Tensor) and isinstance(results[2], torch.Tensor)
        assert isinstance(results[1], InvalidInput)
        with pytest.raises(InvalidInput) as pillow:
            preprocess(bad, spec)
        assert str(results[1]) == str(pillow.value)
        assert torch.equal(results[0], results[2])


def test_probe_sends_only_jpegs_the_device_path_reproduces() -> None:
    spec = InputSpec()
    image = photo(48, 64)
    assert probe(jpeg(image), spec) == DeviceJpeg(jpeg(image), 1)
    for fmt in ("PNG", "WEBP", "BMP"):
        out = io.BytesIO()
        image.save(out, fmt)
        assert probe(out.getvalue(), spec) is None
    assert probe(jpeg(image.convert("CMYK")), spec) is None
    assert probe(jpeg(image), InputSpec(interpolation="lanczos")) is None
    assert probe(jpeg(image), InputSpec(color="RGBA", mean=(0.5,) * 4, std=(0.5,) * 4)) is None  # no fill_alpha


def test_probe_refuses_bad_payloads_with_the_pillow_messages() -> None:
    spec = InputSpec()
    big = jpeg(photo(100, 120))
    for data, max_pixels in [(b"not an image at all", 10**8), (b"", 10**8), (jpeg(photo(48, 64))[:300], 10**8),
                             (big, 100 * 120 - 1)]:
        with pytest.raises(InvalidInput) as device:
            probe(data, spec, max_pixels)
        with pytest.raises(InvalidInput) as pillow:
            preprocess(data, spec, max_pixels)
        assert str(device.value) == str(pillow.value)
    assert "exceeds the limit of 11999 pixels" in str(device.value)
    assert probe(big, spec, 100 * 120) is not None


def test_extremely_elongated_images_take_the_pillow_path() -> None:
    spec = InputSpec()
    data = jpeg(photo(2, 5000))  # scaling the short side to 256 would make a 640000 x 256 image
    assert probe(data, spec) is None
    (result,) = decode_batch([DeviceJpeg(data)], spec, CPU)  # still right when handed over anyway
    assert isinstance(result, torch.Tensor)
    assert np.array_equal(result.permute(1, 2, 0).numpy(), preprocess(data, spec))


def manifest(input_keys: dict[str, Any], **top: Any) -> Any:
    raw = {"architecture": "classifyd:small_cnn", "input": input_keys, **top}
    return parse_manifest(raw, Path("m.toml"), ("a", "b"))


def test_decode_key_and_the_choice_it_makes() -> None:
    cuda, cpu = torch.device("cuda", 0), CPU
    assert manifest({}).input.decode == "auto"
    assert uses_device_decode(manifest({}), cuda) and not uses_device_decode(manifest({}), cpu)
    assert uses_device_decode(manifest({"decode": "device"}), cpu)
    assert not uses_device_decode(manifest({"decode": "cpu"}), cuda)
    assert not uses_device_decode(manifest({"decode": "device", "interpolation": "lanczos"}), cuda)
    assert not uses_device_decode(manifest({"decode": "device", "color": "RGBA"}), cuda)
    assert uses_device_decode(manifest({"color": "RGBA", "fill_alpha": True}), cuda)
    assert not uses_device_decode(manifest({"decode": "device"}, tiling={"tile": 224}), cuda)
    assert supports(InputSpec(color="L", interpolation="nearest"))
    with pytest.raises(ManifestError, match=r"key 'input.decode': must be one of auto, cpu, device; got 'gpu'"):
        manifest({"decode": "gpu"})
    with pytest.raises(ManifestError, match=r"key 'input.decode': must be one of"):
        manifest({"decode": True})
