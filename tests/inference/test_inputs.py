"""Inputs through gRPC: grayscale, RGBA, RGB+NIR tensors, 16-bit, palette and EXIF-rotated images.

Every model here is a probe (tests/support/probe_model.py) whose outputs are the pixel
means that reached it, so each test checks what the model actually saw.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from PIL import Image

from client import image_request, tensor_request
from server.core.manifest import InputSpec
from server.core.types import RawTensor
from server.inference.preprocess import is_model_sized
from tests.support.kit import encode, running_daemon, write_model
from tests.support.probe_model import decode, probe_labels, probe_manifest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.ClassifierStub]:
    root = tmp_path_factory.mktemp("models")
    for name, color, extra in [("grey", "L", {}), ("rgb", "RGB", {}), ("rgba", "RGBA", {}),
                               ("rgba_fill", "RGBA", {"fill_alpha": True})]:
        write_model(root, name, architecture="classifyd:test_probe", labels=probe_labels(color),
                    manifest=probe_manifest(color, input=extra))
    with running_daemon(root, watch=False) as daemon, grpc.insecure_channel(daemon.target) as channel:
        yield pb_grpc.ClassifierStub(channel)


def seen(stub: pb_grpc.ClassifierStub, request: pb.ClassifyRequest) -> dict[str, float]:
    """The pixel means (0..1) the probe model saw."""
    return decode(stub.Classify(request, timeout=30).predictions)


def refused(stub: pb_grpc.ClassifierStub, request: pb.ClassifyRequest) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(request, timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.details()


def save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png16(array: np.ndarray) -> bytes:
    """A 16-bit greyscale (H x W) or RGB (H x W x 3) PNG, written by hand: Pillow cannot write 16-bit RGB."""
    height, width = array.shape[:2]
    color_type = 2 if array.ndim == 3 else 0
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_grayscale_model_takes_grey_colour_16_bit_and_float_inputs(stub: pb_grpc.ClassifierStub) -> None:
    grey = np.full((20, 30), 77, np.uint8)
    assert seen(stub, image_request(encode(grey), model="grey"))["channel0"] == pytest.approx(77 / 255, abs=1e-4)
    colour = np.zeros((20, 30, 3), np.uint8) + np.array([200, 100, 50], np.uint8)
    # ITU-R 601 luma, as Pillow converts: 0.299 R + 0.587 G + 0.114 B = 124.2
    assert seen(stub, image_request(encode(colour), model="grey"))["channel0"] == pytest.approx(124 / 255, abs=1e-4)
    deep = png16(np.full((16, 16), 32896, np.uint16))  # 32896 / 65535 * 255 = 128: scaled, not clipped at 255
    assert seen(stub, image_request(deep, model="grey"))["channel0"] == pytest.approx(128 / 255, abs=1e-4)
    assert seen(stub, tensor_request(grey, model="grey"))["channel0"] == pytest.approx(77 / 255, abs=1e-4)
    floats = np.full((50, 40), 0.25, np.float32)  # float tensors of any size are resized too
    assert seen(stub, tensor_request(floats, model="grey"))["channel0"] == pytest.approx(0.25, abs=1e-4)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_rgba_images_reach_a_four_channel_model_unchanged(stub: pb_grpc.ClassifierStub, fmt: str) -> None:
    pixels = np.zeros((24, 40, 4), np.uint8) + np.array([10, 20, 30, 40], np.uint8)
    means = seen(stub, image_request(save(Image.fromarray(pixels, "RGBA"), fmt), model="rgba"))
    assert [means[f"channel{i}"] for i in range(4)] == pytest.approx([10 / 255, 20 / 255, 30 / 255, 40 / 255],
                                                                      abs=1e-4)


def test_palette_image_keeps_its_transparency(stub: pb_grpc.ClassifierStub) -> None:
    image = Image.new("P", (32, 32), 1)
    image.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red, index 1 blue
    image.paste(0, (0, 0, 32, 16))  # top half red, and transparent
    data = save(image, "PNG", transparency=0)
    rgba = seen(stub, image_request(data, model="rgba"))
    assert [rgba[f"channel{i}"] for i in range(4)] == pytest.approx([0.5, 0.0, 0.5, 0.5], abs=1e-4)
    assert rgba["top"] == pytest.approx(1.0, abs=1e-4)  # red is on top: the orientation is kept
    rgb = seen(stub, image_request(data, model="rgb"))
    assert [rgb[f"channel{i}"] for i in range(3)] == pytest.approx([0.5, 0.0, 0.5], abs=1e-4)


def test_sixteen_bit_colour_png_is_scaled_to_eight_bits(stub: pb_grpc.ClassifierStub) -> None:
    data = png16(np.zeros((8, 8, 3), np.uint16) + np.array([40000, 20000, 65535], np.uint16))
    means = seen(stub, image_request(data, model="rgb"))
    assert [means[f"channel{i}"] for i in range(3)] == pytest.approx([40000 / 65535, 20000 / 65535, 1.0],
                                                                      abs=1.5 / 255)


def test_rgb_plus_nir_tensors_keep_every_channel_when_resized(stub: pb_grpc.ClassifierStub) -> None:
    # NIR = 0 everywhere: resampling with alpha premultiplication would zero the colour channels
    pixels = np.zeros((48, 64, 4), np.uint8) + np.array([200, 150, 100, 0], np.uint8)
    pixels[:, :32, 3] = 255  # NIR bright on the left half only
    means = seen(stub, tensor_request(pixels, model="rgba"))
    assert [means[f"channel{i}"] for i in range(4)] == pytest.approx([200 / 255, 150 / 255, 100 / 255, 0.5],
                                                                      abs=2e-3)
    floats = pixels.astype(np.float32) / 255
    assert seen(stub, tensor_request(floats, model="rgba")) == pytest.approx(means, abs=2e-3)
    rgb = seen(stub, tensor_request(pixels, model="rgb"))  # an RGB model drops the fourth channel
    assert [rgb[f"channel{i}"] for i in range(3)] == pytest.approx([200 / 255, 150 / 255, 100 / 255], abs=2e-3)


def test_inputs_without_a_fourth_channel_are_refused_unless_the_model_fills_alpha(
        stub: pb_grpc.ClassifierStub) -> None:
    jpeg = encode(np.full((16, 16, 3), 90, np.uint8), "JPEG")
    said = refused(stub, image_request(jpeg, model="rgba"))  # what the model takes, what it got, what to send
    assert said.startswith("the model takes 4-channel RGBA input; this JPEG (16x16) is RGB (3 channels, no alpha): "
                           "send a PNG or WebP with alpha, or a 4-channel tensor"), said
    assert "cannot convert image" not in said and "None" not in said
    rgb = np.full((16, 16, 3), 90, np.uint8)
    message = refused(stub, tensor_request(rgb, model="rgba"))
    assert "tensor has 3 channel(s)" in message and "fourth channel" in message
    assert seen(stub, image_request(jpeg, model="rgba_fill"))["channel3"] == pytest.approx(1.0, abs=1e-4)
    filled = seen(stub, tensor_request(np.full((16, 16), 51, np.uint8), model="rgba_fill"))
    assert [filled[f"channel{i}"] for i in range(4)] == pytest.approx([0.2, 0.2, 0.2, 1.0], abs=1e-4)
    two = np.zeros((16, 16, 2), np.uint8)
    assert "tensor has 2 channel(s); the model takes 1 (L) and they cannot be converted" in \
        refused(stub, tensor_request(two, model="grey"))
    assert stub.Classify(tensor_request(rgb, model="rgb"), timeout=30).predictions  # still serving


def test_exif_orientation_is_applied_before_resizing(stub: pb_grpc.ClassifierStub) -> None:
    stored = np.zeros((20, 40), np.uint8)
    stored[:, :20] = 255  # white on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the white half ends up on top
    rotated = save(Image.fromarray(stored, "L"), "JPEG", quality=95, exif=exif.tobytes())
    means = seen(stub, image_request(rotated, model="grey"))
    assert means["top"] == pytest.approx(1.0, abs=0.03)
    assert means["left"] == pytest.approx(0.5, abs=0.03)
    plain = seen(stub, image_request(save(Image.fromarray(stored, "L"), "JPEG", quality=95), model="grey"))
    assert plain["left"] == pytest.approx(1.0, abs=0.03) and plain["top"] == pytest.approx(0.5, abs=0.03)


def test_images_of_any_shape_are_fitted(stub: pb_grpc.ClassifierStub) -> None:
    for height, width in [(3, 500), (700, 2), (1, 1)]:
        means = seen(stub, image_request(encode(np.full((height, width, 3), 64, np.uint8)), model="rgb"))
        assert means["channel1"] == pytest.approx(64 / 255, abs=1e-3)


def test_only_uint8_tensors_of_exactly_the_input_shape_skip_the_preprocessing_pool() -> None:
    spec = InputSpec(height=4, width=6, color="RGB")
    assert is_model_sized(RawTensor("uint8", (4, 6, 3), bytes(72)), spec)
    assert not is_model_sized(RawTensor("uint8", (4, 6, 3), bytes(71)), spec)  # wrong length: the pool says why
    assert not is_model_sized(RawTensor("float32", (4, 6, 3), bytes(288)), spec)  # NaN checks read every value
    assert not is_model_sized(RawTensor("uint8", (4, 6), bytes(24)), spec)  # channels to match
    assert not is_model_sized(RawTensor("uint8", (6, 4, 3), bytes(72)), spec)  # to resize
    assert not is_model_sized(b"\x89PNG", spec)
