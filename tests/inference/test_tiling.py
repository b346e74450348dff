"""Large images as overlapping tiles through the model's one dynamic batcher, reduced by max or mean."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from PIL import Image

from client import tensor_request
from server.core.errors import InvalidInput
from server.core.manifest import InputSpec, TilingSpec
from server.core.types import RawTensor
from server.inference import preprocess as preprocess_module
from server.inference.preprocess import preprocess_tiles, tile_boxes, tile_count
from tests.support.kit import GATE, DaemonThread, encode, running_daemon, write_model
from tests.support.probe_model import decode, probe_labels, probe_manifest

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    root = tmp_path_factory.mktemp("models")
    write_model(root, "tiled", architecture="classifyd:test_gated",
                manifest={"input": {"color": "RGB", "size": 16, "crop": "none"},
                          "tiling": {"tile": 1000, "stride": 500}, "batching": {"max_batch_size": 16}})
    for reduce in ("max", "mean"):
        write_model(root, f"probe_{reduce}", architecture="classifyd:test_probe", labels=probe_labels("L"),
                    manifest=probe_manifest("L", size=16, tiling={"tile": 100, "stride": 50, "reduce": reduce,
                                                                  "max_tiles": 8}))
    write_model(root, "short_queue", architecture="classifyd:test_probe", labels=probe_labels("L"),
                manifest=probe_manifest("L", size=16, tiling={"tile": 100}, batching={"max_queue": 4}))
    with running_daemon(root, watch=False) as running:
        yield running


def wait_for(condition: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_4000x3000_image_tiles_are_batched_with_each_other_and_other_requests(daemon: DaemonThread) -> None:
    y, x = np.mgrid[0:3000, 0:4000]
    image = np.stack([(x // 16) % 256, (y // 12) % 256, ((x + y) // 28) % 256], axis=2).astype(np.uint8)
    jpeg = encode(image, "JPEG", quality=80)
    assert daemon.daemon is not None
    service = daemon.daemon.service
    with grpc.insecure_channel(daemon.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        GATE.close()
        try:
            tiled = stub.Classify.future(pb.ClassifyRequest(model="tiled", image=jpeg, return_tiles=True),
                                         timeout=120)
            assert GATE.entered.acquire(timeout=60)  # the first tiles are computing; the model is busy
            small = tensor_request(np.zeros((16, 16, 3), np.uint8), model="tiled")
            plain = stub.Classify.future(small, timeout=120)
            waiting = 35 - GATE.batches[0] + 1  # every other tile and the plain request queue behind it
            wait_for(lambda: service.batcher_depth("tiled") == waiting)
        finally:
            GATE.open.set()
        response, other = tiled.result(), plain.result()
    assert response.tile_count == 35 and len(response.tiles) == 35  # 7 columns x 5 rows, 500 px apart
    corners = {(x, y) for x in range(0, 3001, 500) for y in range(0, 2001, 500)}
    assert {(t.x, t.y) for t in response.tiles} == corners
    assert {(t.width, t.height) for t in response.tiles} == {(1000, 1000)}
    assert sum(GATE.batches) == 36 and max(GATE.batches) == 16
    assert response.batch_size == 16 and max(t.batch_size for t in response.tiles) == 16
    assert other.batch_size > 1  # computed in one batch with tiles of the large image
    assert other.tile_count == 1 and not other.tiles  # smaller than a tile: one tile, the whole image


def test_tile_scores_are_reduced_by_max_or_mean(daemon: DaemonThread) -> None:
    pixels = np.zeros((100, 200), np.uint8)
    pixels[:, :100] = 255  # tiles at x = 0, 50, 100 see means 1.0, 0.5 and 0.0
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for reduce in ("max", "mean"):
            response = stub.Classify(pb.ClassifyRequest(model=f"probe_{reduce}", image=encode(pixels),
                                                        return_tiles=True), timeout=60)
            boxes = [(t.x, t.y, t.width, t.height) for t in response.tiles]
            assert boxes == [(0, 0, 100, 100), (50, 0, 100, 100), (100, 0, 100, 100)]
            assert [decode(t.predictions)["channel0"] for t in response.tiles] == pytest.approx([1.0, 0.5, 0.0],
                                                                                                abs=1e-4)
            # the tiles' probabilities (not their logits) are reduced, label by label
            labels = probe_labels("L")
            tile_scores = np.array([[{p.label: p.score for p in t.predictions}[label] for label in labels]
                                    for t in response.tiles])
            reduced = tile_scores.max(axis=0) if reduce == "max" else tile_scores.mean(axis=0)
            by_label = {p.label: p.score for p in response.predictions}
            assert [by_label[label] for label in labels] == pytest.approx(list(reduced), abs=1e-6)
            assert decode(response.predictions)["channel0"] == pytest.approx(1.0 if reduce == "max" else 0.4804,
                                                                             abs=1e-3)
        quiet = stub.Classify(pb.ClassifyRequest(model="probe_max", image=encode(pixels)), timeout=60)
        assert quiet.tile_count == 3 and not quiet.tiles  # tiles are listed only when asked for
        small = stub.Classify(pb.ClassifyRequest(model="probe_max", image=encode(pixels[:40, :60])), timeout=60)
        assert small.tile_count == 1  # smaller than a tile: classified whole


def test_an_image_with_too_many_tiles_is_invalid_argument(daemon: DaemonThread) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(pb.ClassifyRequest(model="probe_max", image=encode(np.zeros((100, 1000), np.uint8))),
                          timeout=60)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "gives 19 tiles of 100x100, more than the model's limit of 8" in caught.value.details()


def test_tiles_beyond_the_queue_limit_fail_the_request_and_leave_nothing_queued(daemon: DaemonThread) -> None:
    assert daemon.daemon is not None
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as caught:  # 6 tiles, 4 queue places
            stub.Classify(pb.ClassifyRequest(model="short_queue", image=encode(np.zeros((100, 600), np.uint8))),
                          timeout=60)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue=4" in caught.value.details()
        wait_for(lambda: daemon.daemon.service.batcher_depth("short_queue") == 0)  # the other tiles were withdrawn
        fits = stub.Classify(pb.ClassifyRequest(model="short_queue", image=encode(np.zeros((100, 400), np.uint8))),
                             timeout=60)
        assert fits.tile_count == 4


@pytest.mark.parametrize(("width", "height"), [(1, 1), (99, 100), (100, 100), (101, 100), (150, 260), (999, 1001),
                                               (4000, 3000)])
@pytest.mark.parametrize(("tile", "stride"), [((100, 100), (50, 50)), ((100, 60), (100, 7)), ((33, 100), (1, 99))])
def test_the_tile_count_is_the_number_of_boxes(width: int, height: int, tile: tuple[int, int],
                                               stride: tuple[int, int]) -> None:
    tiling = TilingSpec(tile=tile, stride=stride)
    assert tile_count(width, height, tiling) == len(tile_boxes(width, height, tiling))


def test_millions_of_tiles_are_refused_from_the_header_before_any_box_or_pixel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tiling = TilingSpec(tile=(2, 2), stride=(1, 1), max_tiles=256)
    assert tile_count(10_000, 10_000, tiling) == 9999 * 9999  # by arithmetic: no list of 10^8 boxes

    def forbidden(*args: object) -> None:
        raise AssertionError("listed boxes or decoded pixels of an image with too many tiles")

    monkeypatch.setattr(preprocess_module, "tile_boxes", forbidden)
    monkeypatch.setattr(preprocess_module, "decode_image", forbidden)
    monkeypatch.setattr(preprocess_module, "tensor_to_array", forbidden)
    spec = InputSpec(color="L", height=16, width=16, resize=16)
    huge = Image.new("L", (10_000, 10_000))
    buffer = io.BytesIO()
    huge.save(buffer, "PNG")
    with pytest.raises(InvalidInput, match="image of 10000x10000 pixels gives 99980001 tiles of 2x2, more than "
                                           "the model's limit of 256"):
        preprocess_tiles(buffer.getvalue(), spec, tiling)
    tensor = RawTensor("uint8", (3000, 2000), bytes(6_000_000))
    with pytest.raises(InvalidInput, match="image of 2000x3000 pixels gives 5995001 tiles"):
        preprocess_tiles(tensor, spec, tiling)
