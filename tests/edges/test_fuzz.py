"""Bad input, by fuzzing: a generated corpus plus hypothesis, thousands of cases against the real daemon process.

Every case gets OK (a corrupted image that still decodes is a valid image) or INVALID_ARGUMENT, NOT_FOUND or
RESOURCE_EXHAUSTED with a message; never INTERNAL, UNKNOWN or UNAVAILABLE. Well-formed requests sent alongside
all succeed, the daemon stays up, and its memory stays bounded.
"""

from __future__ import annotations

import asyncio
import io
import math
import shutil
import struct
import zlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from client import image_request, tensor_request
from tests.support.daemon_process import DaemonProcess
from tests.support.digits_data import held_out_digits, png_bytes
from tests.support.kit import REPO, write_model

pytestmark = [pytest.mark.slow, pytest.mark.process, pytest.mark.timeout(300)]
MAX_PIXELS = 1_000_000
MAX_MESSAGE = 1 << 20
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
RSS_GROWTH_LIMIT = 200 * 1024 * 1024
CONCURRENCY = 64
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
MODES = {"JPEG": ("L", "RGB", "CMYK"), "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
         "WEBP": ("RGB", "RGBA"), "BMP": ("1", "L", "P", "RGB"), "GIF": ("L", "P"),
         "TIFF": ("1", "L", "RGB", "RGBA", "CMYK", "I;16", "F")}


# ----- the corpus


def _encode(array: np.ndarray, mode: str, fmt: str) -> bytes:
    image = Image.fromarray(array[:, :, :3] if array.ndim == 3 else array).convert(mode if mode != "I;16" else "I")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def valid_images(rng: np.random.Generator) -> list[bytes]:
    """Small images of every supported format in several colour modes."""
    images = []
    for fmt in FORMATS:
        for mode in MODES[fmt]:
            size = tuple(int(v) for v in rng.integers(4, 40, 2))
            images.append(_encode(rng.integers(0, 256, (*size, 3), dtype=np.uint8), mode, fmt))
    return images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, depth: int = 8, color: int = 0) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(bytes(64)))
            + _png_chunk(b"IEND", b""))


def real_png_bomb(side: int) -> bytes:
    """A genuinely ``side`` x ``side`` PNG of zeros: a few kilobytes that decode to ``side``² bytes."""
    raw = b"".join(b"\x00" + bytes(side) for _ in range(side))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw, 9))
            + _png_chunk(b"IEND", b""))


def headers_claiming(width: int, height: int) -> list[bytes]:
    """Headers of the other formats claiming a huge (or zero) size, with next to no pixel data."""
    gif = (b"GIF89a" + struct.pack("<HHBBB", width & 0xFFFF, height & 0xFFFF, 0, 0, 0) + b","
           + struct.pack("<HHHHB", 0, 0, width & 0xFFFF, height & 0xFFFF, 0) + b"\x02\x02\x44\x01\x00;")
    bmp = (struct.pack("<2sIHHI", b"BM", 70, 0, 0, 54)
           + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0) + bytes(16))
    jpeg = (b"\xff\xd8\xff\xc0" + struct.pack(">HBHHB", 11, 8, height & 0xFFFF, width & 0xFFFF, 1) + b"\x01\x11\x00"
            + b"\xff\xd9")
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 200),
               (278, 4, height), (279, 4, 1)]
    tiff = (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
            + b"".join(struct.pack("<HHII", tag, kind, 1, value & 0xFFFFFFFF) for tag, kind, value in entries)
            + struct.pack("<I", 0) + bytes(16))
    vp8x = bytes(4) + ((width - 1) & 0xFFFFFF).to_bytes(3, "little") + ((height - 1) & 0xFFFFFF).to_bytes(3, "little")
    webp = b"RIFF" + struct.pack("<I", 4 + 8 + len(vp8x)) + b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return [gif, bmp, jpeg, tiff, webp]


def image_cases(rng: np.random.Generator, valid: list[bytes]) -> list[pb.ClassifyRequest]:
    """Truncated and corrupted images, bombs, odd sizes, zero and random bytes, for both test models."""
    blobs: list[bytes] = [b"", b"\x00", b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"RIFF"]
    for data in valid:
        blobs += [data[:int(cut)] for cut in rng.integers(0, len(data), 30)]
        for _ in range(30):
            corrupt = bytearray(data)
            for position in rng.integers(0, len(data), int(rng.integers(1, 6))):
                corrupt[position] = int(rng.integers(0, 256))
            blobs.append(bytes(corrupt))
    for side in (30000, 65535, 100000, (1 << 31) - 1):
        blobs.append(png_claiming(side, side))
    blobs += [png_claiming(0, 10), png_claiming(10, 0), png_claiming(1, 2_000_000), png_claiming(8, 8, 16, 6),
              png_claiming(8, 8, 3, 2), real_png_bomb(2000)]
    for width, height in ((30000, 30000), (65535, 65535), (0, 8), (8, 0), (1 << 30, 1), (1, 1 << 24)):
        blobs += headers_claiming(width, height)
    for length in (1, 7, 100, 1000, 10000):
        blobs += [rng.bytes(length) for _ in range(4)]
        blobs += [magic + rng.bytes(length) for magic in (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM",
                                                          b"II*\x00", b"RIFF\x00\x00\x00\x00WEBPVP8 ")]
    models = ("", "digits", "rgb")
    return [pb.ClassifyRequest(model=models[n % 3], image=blob, request_id=f"img{n}") for n, blob in enumerate(blobs)]


def _tensor(dtype: int, shape: list[int], data: bytes, **fields: object) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(tensor=pb.Tensor(dtype=dtype, shape=shape, data=data), **fields)


def tensor_and_field_cases(rng: np.random.Generator) -> list[pb.ClassifyRequest]:
    """Wrong byte lengths, dtypes, ranks and channels; NaN and Inf; absurd names, top_k and versions."""
    u8, f32 = pb.Tensor.UINT8, pb.Tensor.FLOAT32
    cases = [_tensor(u8, [8, 8], bytes(n)) for n in (0, 1, 63, 65, 128, 256)]
    cases += [_tensor(f32, [8, 8], bytes(n)) for n in (0, 64, 255, 257)]
    cases += [_tensor(d, [8, 8], bytes(64 * s)) for d in (0, 3, 7, 99, -1) for s in (1, 4)]
    cases += [_tensor(u8, shape, bytes(max(1, int(np.prod(shape))) if all(v > 0 for v in shape) else 8))
              for shape in ([], [64], [1, 8, 8, 1], [1, 1, 8, 8, 1], [8, 8, 2], [8, 8, 5], [8, 8, 0], [0, 8],
                            [-8, -8], [8, 8, 3, 1])]
    cases += [_tensor(u8, shape, bytes(16)) for shape in ([1 << 62, 1 << 62], [1 << 40, 4], [2, 1 << 62],
                                                         [(1 << 63) - 1, 2], [4, 4, 1 << 62])]
    cases += [_tensor(u8, shape, b"") for shape in ([1 << 32, 1 << 32], [1 << 33, 1 << 31, 1], [1 << 62, 4])]  # wrap
    cases += [_tensor(u8, [1, 2_000_000], bytes(2_000_000 // 4)), _tensor(u8, [1500, 1000], bytes(16))]
    # Elongated but within the pixel limit: scaling the short side to `resize` must not build a giant image.
    cases += [pb.ClassifyRequest(model="rgb", tensor=pb.Tensor(dtype=u8, shape=[1, 900_000], data=bytes(900_000))),
              pb.ClassifyRequest(model="rgb", image=_encode(np.zeros((1, 900_000), np.uint8), "L", "PNG"))]
    for bad in (np.nan, np.inf, -np.inf):
        for _ in range(5):
            array = rng.random((8, 8), dtype=np.float32)
            array.flat[int(rng.integers(0, 64))] = bad
            cases.append(tensor_request(array))
    cases.append(tensor_request(rng.random((9, 8), dtype=np.float32)))  # float tensors must be the input size
    zeros = np.zeros((8, 8), np.uint8)
    names = ["nope", "DIGITS", "digits ", " ", "../digits", "digits/1", "\x00", "模型", "a" * 10_000, "😀" * 300]
    cases += [tensor_request(zeros, model=name) for name in names]
    cases += [tensor_request(zeros, top_k=k) for k in (-(1 << 31), -1, 11, 1000, (1 << 31) - 1)]
    cases += [tensor_request(zeros, version=v) for v in (-(1 << 63), -1, 2, 1 << 40, (1 << 63) - 1)]
    cases += [pb.ClassifyRequest(), pb.ClassifyRequest(model="digits", top_k=3)]
    for size in (MAX_MESSAGE + 1, 2 * MAX_MESSAGE):  # over the message limit: gRPC itself refuses
        cases += [pb.ClassifyRequest(image=rng.bytes(size)), _tensor(u8, [size, 1], bytes(size))]
    return cases


# ----- sending


async def _send(stub: pb_grpc.ClassifierStub, request: pb.ClassifyRequest,
                limit: asyncio.Semaphore) -> tuple[grpc.StatusCode, str, pb.ClassifyResponse | None]:
    async with limit:
        try:
            response = await stub.Classify(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", None
        return grpc.StatusCode.OK, "", response


async def _send_all(target: str, bad: list[pb.ClassifyRequest], good: list[pb.ClassifyRequest]) -> tuple[list, list]:
    options = [("grpc.max_send_message_length", 4 * MAX_MESSAGE)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        limit = asyncio.Semaphore(CONCURRENCY)
        tasks = [asyncio.ensure_future(_send(stub, r, limit)) for r in bad]
        good_tasks = [asyncio.ensure_future(_send(stub, r, limit)) for r in good]  # interleaved in flight
        return list(await asyncio.gather(*tasks)), list(await asyncio.gather(*good_tasks))


def check_outcomes(bad: list[pb.ClassifyRequest], outcomes: list, good_outcomes: list, truth: list[int]) -> None:
    for request, (code, details, _) in zip(bad, outcomes, strict=True):
        described = f"{request.model!r:.40} {request.WhichOneof('input')} → {code.name}: {details[:200]}"
        assert code in ALLOWED, described
        assert code is grpc.StatusCode.OK or details.strip(), described
    for (code, details, response), _ in zip(good_outcomes, truth, strict=True):
        assert code is grpc.StatusCode.OK, f"a well-formed request failed: {code.name}: {details}"
        assert response.model == "digits"
    correct = sum(r.predictions[0].index == t for (_, _, r), t in zip(good_outcomes, truth, strict=True))
    assert correct >= 0.9 * len(truth)


def good_requests(count: int, offset: int = 0) -> tuple[list[pb.ClassifyRequest], list[int]]:
    images, truth = held_out_digits()
    chosen = [(offset + n) % len(images) for n in range(count)]
    requests = [image_request(png_bytes(images[i])) if n % 2 else tensor_request(images[i])
                for n, i in enumerate(chosen)]
    return requests, [truth[i] for i in chosen]


# ----- the tests


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(REPO / "models" / "digits", root / "digits")
    write_model(root, "rgb", manifest={"input": {"color": "RGB", "size": 16, "resize": 256},
                                       "model_args": {"width": 8}})
    workdir = tmp_path_factory.mktemp("daemon")
    with DaemonProcess(root, workdir, "--no-watch", "--max-pixels", str(MAX_PIXELS), "--max-message-bytes",
                       str(MAX_MESSAGE), "--max-queue", "100000", "--log-level", "WARNING") as process:
        yield process


def test_generated_corpus_of_bad_input(daemon: DaemonProcess) -> None:
    rng = np.random.default_rng(6)
    bad = image_cases(rng, valid_images(rng)) + tensor_and_field_cases(rng)
    assert len(bad) > 1500
    good, truth = good_requests(len(bad) // 4)
    first = len(bad) // 3  # a first round, after which memory is measured, so allocator warm-up does not count
    outcomes, good_outcomes = asyncio.run(_send_all(daemon.target, bad[:first], good[:len(good) // 3]))
    check_outcomes(bad[:first], outcomes, good_outcomes, truth[:len(good) // 3])
    rss_before = daemon.rss_bytes()
    outcomes, good_outcomes = asyncio.run(_send_all(daemon.target, bad[first:], good[len(good) // 3:]))
    check_outcomes(bad[first:], outcomes, good_outcomes, truth[len(good) // 3:])
    codes = {code for code, _, _ in outcomes}
    assert {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED} <= codes
    assert daemon.rss_bytes() - rss_before < RSS_GROWTH_LIMIT
    assert_still_serving(daemon)


def assert_still_serving(daemon: DaemonProcess) -> None:
    assert daemon.alive(), daemon.log()
    with grpc.insecure_channel(daemon.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


VALID = valid_images(np.random.default_rng(7))


@st.composite
def mutated_image(draw: st.DrawFn) -> pb.ClassifyRequest:
    data = bytearray(draw(st.sampled_from(VALID)))
    data = data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
    for _ in range(draw(st.integers(0, 8))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return pb.ClassifyRequest(model=draw(st.sampled_from(["", "digits", "rgb"])), image=bytes(data))


@st.composite
def fuzzed_tensor(draw: st.DrawFn) -> pb.ClassifyRequest:
    dtype = draw(st.sampled_from([0, 1, 1, 1, 2, 2, 2, 3, 1000]))
    shape = draw(st.lists(st.integers(-2, 40) | st.integers(-(1 << 63), (1 << 63) - 1), max_size=5))
    count = math.prod(shape) if shape and all(0 <= d <= 40 for d in shape) else -1
    if 0 <= count <= 20_000 and draw(st.booleans()):  # the right size, or nearly: the content is what is fuzzed
        rng = np.random.default_rng(draw(st.integers(0, (1 << 32) - 1)))
        array = rng.random(count, dtype=np.float32)
        for _ in range(draw(st.integers(0, 3)) if count else 0):
            array[draw(st.integers(0, count - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -5.0]))
        data = array.tobytes() if dtype == 2 else rng.bytes(count)
        data = data[:max(0, len(data) + draw(st.integers(-2, 0)))] + bytes(draw(st.integers(0, 2)))
    else:
        data = draw(st.binary(max_size=2048))
    return pb.ClassifyRequest(tensor=pb.Tensor(dtype=dtype, shape=shape, data=data),
                              top_k=draw(st.integers(-(1 << 31), (1 << 31) - 1) | st.integers(-1, 11)),
                              version=draw(st.integers(-(1 << 63), (1 << 63) - 1) | st.integers(-1, 2)),
                              model=draw(st.sampled_from(["", "digits", "rgb"]) | st.text(max_size=300)))


# No shrinking: a failing example is printed whole, and shrinking would replay it against the daemon for
# minutes.
@settings(max_examples=20, deadline=None, derandomize=True, database=None, phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(st.lists(mutated_image() | fuzzed_tensor() | st.binary(max_size=512).map(lambda b: pb.ClassifyRequest(image=b)),
                min_size=40, max_size=60))
def test_hypothesis_bad_input(daemon: DaemonProcess, bad: list[pb.ClassifyRequest]) -> None:
    good, truth = good_requests(10, offset=len(bad))
    outcomes, good_outcomes = asyncio.run(_send_all(daemon.target, bad, good))
    check_outcomes(bad, outcomes, good_outcomes, truth)
    assert daemon.alive(), daemon.log()
