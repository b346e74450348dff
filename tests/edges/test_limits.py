"""Every request's cost is bounded before work starts (issue 14): images per request, JSON size and shape,
multipart parts, and the requests one stream may hold. A real daemon with small limits, real clients."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from typing import Any

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc

from client import tensor_request
from server.core.errors import InvalidInput
from server.edges.common.oip_codec import BYTES, INLINE_ELEMENTS, InferTensor, is_large, join_bytes_elements
from server.edges.http.bodies import MAX_JSON_CONTAINERS, load_json
from server.edges.http.oip import Base64Elements
from tests.edges.test_http import PNG, Reply, http, url
from tests.support.digits_data import held_out_digits, png_bytes
from tests.support.kit import GATE, DaemonThread, encode, running_daemon, write_model
from tests.support.repository import build_test_repository

pytestmark = pytest.mark.timeout(120)

MAX_IMAGES = 4
MAX_BODY = 256 * 1024
MAX_JSON = 64 * 1024
STREAM_LIMIT = 4
PNGS = [png_bytes(image) for image in held_out_digits()[0][:MAX_IMAGES + 1]]
CAP_MESSAGE = f"more than the limit of {MAX_IMAGES} per request"


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    root = build_test_repository(tmp_path_factory.mktemp("models"))
    write_model(root, "tiled", manifest={"input": {"color": "L", "size": 8, "resize": 8},
                                         "tiling": {"tile": 8, "stride": 8, "max_tiles": 64}})
    with running_daemon(root, http_port=0, watch=False, max_images_per_request=MAX_IMAGES,
                        max_message_bytes=MAX_BODY, max_json_bytes=MAX_JSON,
                        max_stream_in_flight=STREAM_LIMIT) as running:
        yield running


@pytest.fixture(scope="module")
def stub(limited: DaemonThread) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(limited.target) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def grpc_infer(stub: oip_grpc.GRPCInferenceServiceStub, datatype: str, shape: list[int], *,
               raw: bytes | None = None, contents: Callable[[Any], None] | None = None,
               model: str = "digits") -> tuple[str, str]:
    """(status name, message) of one ModelInfer."""
    request = oip.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="image", datatype=datatype, shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    if contents is not None:
        contents(tensor.contents)
    try:
        stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()
    return "OK", ""


def rest_infer(daemon: DaemonThread, document: dict[str, Any], binary: bytes = b"", path: str = "digits",
               headers: dict[str, str] | None = None) -> Reply:
    header = json.dumps(document).encode()
    extra = {"Inference-Header-Content-Length": str(len(header))} if binary else {}
    return http("POST", url(daemon, f"/v2/models/{path}/infer"), data=header + binary,
                headers={"Content-Type": "application/json", **extra, **(headers or {})})


def tensor_json(datatype: str, shape: list[int], size: int | None = None, **fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "image", "datatype": datatype, "shape": shape, **fields}
    if size is not None:
        entry["parameters"] = {"binary_data_size": size}
    return {"inputs": [entry]}


def refused(reply: Reply, status: int, words: str) -> None:
    assert reply.status == status, reply.body[:300]
    body = reply.json()
    message = body["error"] if isinstance(body["error"], str) else body["error"]["message"]
    assert words in message, message


# ----- images per request


def test_images_per_request_are_capped_on_both_bindings(limited: DaemonThread,
                                                        stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    over, at = join_bytes_elements(PNGS), join_bytes_elements(PNGS[:MAX_IMAGES])
    code, message = grpc_infer(stub, "BYTES", [MAX_IMAGES + 1], raw=over)
    assert code == "INVALID_ARGUMENT" and f"holds {MAX_IMAGES + 1} images, {CAP_MESSAGE}" in message
    assert grpc_infer(stub, "BYTES", [MAX_IMAGES], raw=at) == ("OK", "")
    pixels = np.zeros((MAX_IMAGES + 1, 8, 8, 1), np.uint8)
    assert CAP_MESSAGE in grpc_infer(stub, "UINT8", list(pixels.shape), raw=pixels.tobytes())[1]
    assert grpc_infer(stub, "UINT8", [MAX_IMAGES, 8, 8, 1], raw=pixels[:MAX_IMAGES].tobytes()) == ("OK", "")
    refused(rest_infer(limited, tensor_json("BYTES", [MAX_IMAGES + 1], len(over)), over), 400, CAP_MESSAGE)
    assert rest_infer(limited, tensor_json("BYTES", [MAX_IMAGES], len(at)), at).status == 200
    refused(rest_infer(limited, tensor_json("UINT8", [5, 1, 1, 1], data=[0] * 5)), 400, CAP_MESSAGE)


def test_the_tiles_of_pixel_tensors_count_as_images(limited: DaemonThread,
                                                     stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    four_tiles, six_tiles = np.zeros((16, 16), np.uint8), np.zeros((24, 16), np.uint8)
    assert grpc_infer(stub, "UINT8", [16, 16], raw=four_tiles.tobytes(), model="tiled") == ("OK", "")
    code, message = grpc_infer(stub, "UINT8", [24, 16], raw=six_tiles.tobytes(), model="tiled")
    assert code == "INVALID_ARGUMENT" and "give 6 tiles of 8x8, more than the limit of 4 images" in message
    two = np.zeros((2, 16, 16, 1), np.uint8)
    refused(rest_infer(limited, tensor_json("UINT8", [2, 16, 16, 1], two.nbytes), two.tobytes(), path="tiled"), 400,
            "2 image(s) of 16x16 pixels give 8 tiles")
    # encoded images count once each before decoding (their tiles are capped by the model's max_tiles)
    pngs = join_bytes_elements([encode(np.zeros((16, 16), np.uint8))] * 2)
    assert grpc_infer(stub, "BYTES", [2], raw=pngs, model="tiled") == ("OK", "")


def test_a_hundred_thousand_empty_elements_are_refused_by_counting(limited: DaemonThread,
                                                                   stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    many, answered = 100_000, _answered_so_far(limited)

    def empty_elements(contents: Any) -> None:
        contents.bytes_contents.extend([b""] * many)

    code, message = grpc_infer(stub, "BYTES", [many], contents=empty_elements)
    assert code == "INVALID_ARGUMENT" and f"holds {many} images" in message
    code, message = grpc_infer(stub, "BYTES", [1], contents=empty_elements)
    assert code == "INVALID_ARGUMENT" and f"needs 1 element(s), got {many}" in message
    raw = struct.pack("<I", 0) * 60_000  # 60,000 empty raw elements: only the first two are split off
    assert "needs 1 element(s), got 2 or more" in grpc_infer(stub, "BYTES", [1], raw=raw)[1]
    refused(rest_infer(limited, tensor_json("BYTES", [1], len(raw)), raw), 400, "got 2 or more")
    assert CAP_MESSAGE in grpc_infer(stub, "UINT8", [200_000, 1, 1, 1], raw=bytes(200_000))[1]
    refused(rest_infer(limited, tensor_json("UINT8", [200_000, 1, 1, 1], 200_000), bytes(200_000)), 400,
            CAP_MESSAGE)
    assert _answered_so_far(limited) == answered  # refused before any call: not one image reached the service


def _answered_so_far(daemon: DaemonThread) -> int:
    """Images the digits model has answered."""
    assert daemon.daemon is not None
    return int(daemon.daemon.stats.snapshot("digits")["requests"])


# ----- JSON


def test_json_over_its_limit_is_413_naming_the_limit(limited: DaemonThread) -> None:
    padding = "x" * MAX_JSON
    refused(http("POST", url(limited, "/v1/classify"), json={"image_b64": padding}), 413,
            f"JSON body of {MAX_JSON + 17} bytes exceeds the limit of {MAX_JSON} bytes")
    refused(rest_infer(limited, {"id": padding, "inputs": []}), 413, f"exceeds the limit of {MAX_JSON} bytes")
    binary = join_bytes_elements(PNGS[:1])
    document = {"id": padding, **tensor_json("BYTES", [1], len(binary))}
    refused(rest_infer(limited, document, binary), 413,
            f"the JSON header (Inference-Header-Content-Length) of {len(json.dumps(document))} bytes exceeds")

    def chunks() -> Iterator[bytes]:  # no Content-Length: measured as it arrives
        yield b'{"image_b64": "'
        for _ in range(MAX_JSON // 1024 + 1):
            yield b"A" * 1024
        yield b'"}'

    status, body = _post_chunked(limited, "/v1/classify", chunks(), "application/json")
    assert status == 413 and f"JSON body exceeds the limit of {MAX_JSON} bytes" in body
    assert http("POST", url(limited, "/v1/classify"), data=PNGS[0] + bytes(MAX_JSON), headers=PNG).status != 413


def _post_chunked(daemon: DaemonThread, path: str, body: Iterator[bytes], content_type: str) -> tuple[int, str]:
    assert daemon.daemon is not None
    connection = HTTPConnection("127.0.0.1", daemon.daemon.http_port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type}, encode_chunked=True)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


BAD_JSON = {
    "nested-1000-deep": b'{"image_b64": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    "nested-40-deep": b'{"top_k": ' + b"[" * 40 + b"]" * 40 + b"}",
    "5000-digit-integer": b'{"top_k": ' + b"7" * 5000 + b"}",
    "nan": b'{"top_k": NaN}',
    "not-utf8": b'{"top_k": "\xff"}',
}


@pytest.mark.parametrize("body", list(BAD_JSON.values()), ids=list(BAD_JSON))
def test_json_python_cannot_take_is_400_on_every_json_route(limited: DaemonThread, body: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    refused(http("POST", url(limited, "/v1/classify"), data=body, headers=headers), 400, "JSON")
    refused(http("POST", url(limited, "/v2/models/digits/infer"), data=body, headers=headers), 400, "JSON")


def test_json_of_more_containers_than_the_limit_is_refused_before_parsing() -> None:
    with pytest.raises(InvalidInput, match=f"more than {MAX_JSON_CONTAINERS} arrays and objects"):
        load_json(b"[" + b"[]," * MAX_JSON_CONTAINERS + b"[]]")
    assert load_json(b'{"data": [' + b"0," * 100_000 + b'0], "name": "[[[["}')["name"] == "[[[["


# ----- the rest of the OIP REST body


def test_oip_rest_refuses_odd_numbers_and_ids(limited: DaemonThread) -> None:
    document = tensor_json("BYTES", [1], len(join_bytes_elements(PNGS[:1])))
    binary = join_bytes_elements(PNGS[:1])
    refused(rest_infer(limited, document, binary, path="digits/versions/²"), 400, "model_version must be")
    for header in ("²", "1" * 5000, "-5", ""):
        refused(rest_infer(limited, document, binary, headers={"Inference-Header-Content-Length": header}), 400,
                "Inference-Header-Content-Length must be a byte count")
    for shape in ([1 << 63], [-(1 << 63) - 1], [1, 10**40]):
        refused(rest_infer(limited, tensor_json("BYTES", shape, len(binary)), binary), 400, "64-bit integers")
    refused(rest_infer(limited, {"id": 7, **document}, binary), 400, "'id' must be a string")
    refused(rest_infer(limited, {"parameters": [], **document}, binary), 400, "'parameters' must be a JSON object")


# ----- multipart


def multipart(parts: list[tuple[str, bytes]], boundary: str = "b0und4ry", headers: str = "") -> bytes:
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n{headers}\r\n'.encode()
                    + data + b"\r\n" for name, data in parts)
    return body + f"--{boundary}--\r\n".encode()


def post_form(daemon: DaemonThread, body: bytes, content_type: str = "multipart/form-data; boundary=b0und4ry") \
        -> Reply:
    return http("POST", url(daemon, "/v1/classify"), data=body, headers={"Content-Type": content_type})


def test_multipart_parts_fields_and_headers_are_bounded(limited: DaemonThread) -> None:
    assert post_form(limited, multipart([("image", PNGS[0]), ("top_k", b"3")])).status == 200
    refused(post_form(limited, multipart([("top_k", b"3")] * 8 + [("image", PNGS[0])])), 400, "more than 8 parts")
    refused(post_form(limited, multipart([("image", PNGS[0]), ("colour", b"red")])), 400,
            "unknown form field ('colour')")
    # 100 headers of 3 KB around a small image: 300 KB that count against the 256 KiB limit (sent chunked, so no
    # Content-Length says so first)
    padding = "".join(f"X-Padding-{n}: {'p' * 3000}\r\n" for n in range(100))
    status, body = _post_chunked(limited, "/v1/classify", iter([multipart([("image", PNGS[0])], headers=padding)]),
                                 "multipart/form-data; boundary=b0und4ry")
    assert status == 413 and f"exceeds the limit of {MAX_BODY} bytes" in body

    def unknown_part_first() -> Iterator[bytes]:  # a part the form does not take, twice the body limit long
        yield b'--b0und4ry\r\nContent-Disposition: form-data; name="upload"\r\n\r\n'
        for _ in range(2 * MAX_BODY // 65536):
            yield bytes(65536)

    status, body = _post_chunked(limited, "/v1/classify", unknown_part_first(),
                                 "multipart/form-data; boundary=b0und4ry")
    assert status == 400 and "unknown form field ('upload')" in body  # refused before its data was read


GARBLED_FORMS = {
    "no-boundary": ("multipart/form-data", multipart([("image", PNGS[0])])),
    "other-boundary": ("multipart/form-data; boundary=elsewhere", multipart([("image", PNGS[0])])),
    "boundary-too-long": (f"multipart/form-data; boundary={'b' * 80}", multipart([("image", PNGS[0])], "b" * 80)),
    "no-closing-boundary": ("multipart/form-data; boundary=b0und4ry", multipart([("image", PNGS[0])])[:-14]),
    "garbage": ("multipart/form-data; boundary=b0und4ry", bytes(range(256)) * 4),
    "empty": ("multipart/form-data; boundary=b0und4ry", b""),
    "unnamed-part": ("multipart/form-data; boundary=b0und4ry",
                     b"--b0und4ry\r\nContent-Type: text/plain\r\n\r\nx\r\n--b0und4ry--\r\n"),
    "nested": ("multipart/form-data; boundary=b0und4ry",
               b"--b0und4ry\r\nContent-Type: multipart/mixed; boundary=inner\r\n\r\n--inner--\r\n--b0und4ry--\r\n"),
    "header-line-too-long": ("multipart/form-data; boundary=b0und4ry",
                             multipart([("image", PNGS[0])], headers=f"X-Long: {'l' * 9000}\r\n")),
}


@pytest.mark.parametrize(("content_type", "body"), list(GARBLED_FORMS.values()), ids=list(GARBLED_FORMS))
def test_garbled_multipart_is_400(limited: DaemonThread, content_type: str, body: bytes) -> None:
    reply = post_form(limited, body, content_type)
    assert reply.status == 400, reply.body[:300]
    assert reply.json()["error"]["code"] == "INVALID_ARGUMENT"


# ----- streams


def _gated(n: int) -> pb.ClassifyRequest:
    return tensor_request(np.zeros((8, 8), np.uint8), model="gated", request_id=f"g{n}")


def _gated_oip(n: int) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="gated", id=f"g{n}")
    request.inputs.add(name="image", datatype="UINT8", shape=[8, 8])
    request.raw_input_contents.append(bytes(64))
    return request


def _held_by_gated(daemon: DaemonThread) -> int:
    """Requests of the gated model in its queue or being preprocessed (one more is in its forward pass)."""
    assert daemon.daemon is not None
    return daemon.daemon.service.queue_depths().get("gated", (0, 0))[0]


@pytest.mark.parametrize("service", ["ClassifyStream", "ModelStreamInfer"])
def test_a_stream_holds_at_most_its_limit_while_its_answers_wait(limited: DaemonThread, service: str) -> None:
    count = 40
    GATE.close()
    with grpc.insecure_channel(limited.target) as channel:
        try:
            if service == "ClassifyStream":
                call = pb_grpc.ClassifierStub(channel).ClassifyStream(iter([_gated(n) for n in range(count)]),
                                                                      timeout=60)
            else:
                call = oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                    iter([_gated_oip(n) for n in range(count)]), timeout=60)
            assert GATE.entered.acquire(timeout=20)  # the first batch computes and blocks
            end, queued = time.monotonic() + 1.0, 0
            while time.monotonic() < end:  # what must not happen: the stream read past its limit
                queued = max(queued, _held_by_gated(limited))
                time.sleep(0.02)
            assert GATE.batches[0] + queued == STREAM_LIMIT  # in the forward pass + queued: the limit, no more
        finally:
            GATE.open.set()
        answers = list(call)
    assert len(answers) == count
    if service == "ClassifyStream":
        assert {a.request_id for a in answers} == {f"g{n}" for n in range(count)}
        assert not any(a.HasField("error") for a in answers)
    else:
        assert {a.infer_response.id for a in answers} == {f"g{n}" for n in range(count)}
        assert not any(a.error_message for a in answers)


def test_a_stream_whose_client_does_not_read_stops_being_answered(limited: DaemonThread) -> None:
    count, answered_before = 3000, _answered_so_far(limited)
    request = tensor_request(held_out_digits()[0][0], model="digits", top_k=10)
    # No BDP probing: the client's receive window stays at 64 KB, so unread answers fill it after a few hundred.
    with grpc.insecure_channel(limited.target, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        call = pb_grpc.ClassifierStub(channel).ClassifyStream(iter([request] * count), timeout=60)
        answered, end = -1, time.monotonic() + 30
        while time.monotonic() < end:  # until the daemon stops answering: its answers wait for the client
            time.sleep(0.5)
            now = _answered_so_far(limited) - answered_before
            if now == answered:
                break
            answered = now
        assert 0 < answered < count // 2
        answers = list(call)
    assert len(answers) == count and not any(a.HasField("error") for a in answers)
    assert _answered_so_far(limited) - answered_before == count


def test_one_huge_base64_element_is_decoded_off_the_event_loop() -> None:
    """REST's BYTES elements weigh their base64 text, not their count: one 16 MiB element is large."""
    one_huge = InferTensor("images", BYTES, (1,), contents=Base64Elements(["A" * (INLINE_ELEMENTS + 4)]))
    a_few_small = InferTensor("images", BYTES, (3,), contents=Base64Elements(["AAAA"] * 3))
    assert is_large(one_huge)
    assert not is_large(a_few_small)
    assert is_large(InferTensor("images", BYTES, (INLINE_ELEMENTS + 1,), contents=[b""] * (INLINE_ELEMENTS + 1)))
