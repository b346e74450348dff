"""Fuzzing the HTTP edge: /v1 classify (JSON, multipart, raw bodies, query fields) and the Open Inference
Protocol's REST binding (documents, binary data, headers, version paths), against a real in-thread daemon.

Property (tests/edges/fuzzing.py): every case gets 200 or a 4xx JSON error with a message, never a 5xx, and
nothing is logged at ERROR. Cases are derandomized, so CI runs the same ones every time.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.edges.common.oip_codec import join_bytes_elements
from tests.edges.fuzzing import (
    FUZZ_SETTINGS,
    HARD_LENGTHS,
    HARD_VERSIONS,
    PNGS,
    RAW_JSON,
    ErrorLog,
    HttpCase,
    KeepAlive,
    b64_images,
    fuzz_daemon,
    header_values,
    integers,
    json_bodies,
    json_values,
    path_segment,
    post_checked,
    raw_bytes_elements,
    shapes,
    versions,
    watching_errors,
)
from tests.support.kit import DaemonThread

pytestmark = pytest.mark.timeout(120)

V1_FIELDS = ["top_k", "version", "lang", "return_tiles", "request_id", "timeout_ms"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    with fuzz_daemon(tmp_path_factory.mktemp("models")) as running:
        yield running


@pytest.fixture(scope="module")
def client(daemon: DaemonThread) -> Iterator[KeepAlive]:
    assert daemon.daemon is not None
    connection = KeepAlive(daemon.daemon.http_port)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorLog]:
    with watching_errors() as handler:
        yield handler


# ----- /v1: a well-formed request, then one thing about it made wrong


def field_values() -> st.SearchStrategy[Any]:
    """What a /v1 field may be given: numbers and strings of every kind, booleans, nested JSON."""
    return st.one_of(integers(), st.text(max_size=20), st.sampled_from(["3", "-1", "1e400", "nan", "true", "0"]),
                     json_values(6))


V1_MUTATIONS = ["none", "field", "unknown-field", "image", "model", "body", "content-type", "form", "query"]


@st.composite
def v1_requests(draw: st.DrawFn) -> HttpCase:
    """A /v1 request (multipart, JSON or raw, fields in the body or the query) with one part of it wrong."""
    fields: dict[str, Any] = draw(st.fixed_dictionaries({}, optional={
        "top_k": st.integers(1, 10) | st.integers(1, 10).map(str), "version": st.just(1),
        "return_tiles": st.booleans(), "request_id": st.text(max_size=10), "timeout_ms": st.just(60_000)}))
    image, model, form = draw(st.sampled_from(PNGS)), "digits", draw(st.sampled_from(["multipart", "json", "raw"]))
    mutation = draw(st.sampled_from(V1_MUTATIONS))
    if mutation == "field":
        fields[draw(st.sampled_from(V1_FIELDS))] = draw(field_values())
    elif mutation == "unknown-field":
        fields[draw(st.text(max_size=8))] = draw(field_values())
    elif mutation == "image":
        image = draw(st.binary(max_size=100) | st.sampled_from(PNGS).map(lambda b: b[:len(b) // 2]))
    elif mutation == "model":
        model = draw(path_segment())
    path = "/v1/classify" if model == "digits" and draw(st.booleans()) else f"/v1/models/{model}/classify"
    if form == "raw" or mutation == "query":
        path += "?" + urllib.parse.urlencode({k: _text(v) for k, v in fields.items()})
        fields = {} if form == "raw" else fields
    body, content_type = _v1_body(draw, form, fields, image, mutation == "form")
    if mutation == "body":
        body = draw(st.sampled_from(RAW_JSON) | st.binary(max_size=64) | st.integers(0, len(body)).map(
            lambda n: body[:n]))
    if mutation == "content-type":
        content_type = draw(st.sampled_from(["", "text/plain", "application/json", "multipart/form-data",
                                             "image/png; charset=nonsense"]) | header_values())
    return path, body, {"Content-Type": content_type}


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _v1_body(draw: st.DrawFn, form: str, fields: dict[str, Any], image: bytes, garble: bool) -> tuple[bytes, str]:
    if form == "json":
        document = {**fields, "image_b64": _b64(image)}
        return json.dumps(document).encode() if not garble else draw(json_bodies(json_values())), "application/json"
    if form == "raw":
        return image, draw(st.sampled_from(["image/png", "application/octet-stream", "image/x-anything"]))
    parts = [("image", image), *((name, _text(value).encode()) for name, value in fields.items())]
    if not garble:
        return _form(parts, "b0und4ry", ""), "multipart/form-data; boundary=b0und4ry"
    return draw(garbled_forms(parts))


def _form(parts: list[tuple[str | None, bytes]], boundary: str, headers: str) -> bytes:
    body = b"".join(f"--{boundary}\r\n".encode()
                    + (f'Content-Disposition: form-data; name="{name}"\r\n' if name is not None else "").encode()
                    + f"{headers}\r\n".encode() + data + b"\r\n" for name, data in parts)
    return body + f"--{boundary}--\r\n".encode()


@st.composite
def garbled_forms(draw: st.DrawFn, parts: list[tuple[str | None, bytes]]) -> tuple[bytes, str]:
    """The form with its structure wrong: parts repeated, unnamed or unknown, odd part headers, a boundary missing,
    wrong or too long, the body cut short."""
    parts = list(parts)
    for _ in range(draw(st.integers(0, 3))):
        parts.insert(draw(st.integers(0, len(parts))), (draw(st.sampled_from(["image", "top_k", None, "other"])
                                                              | st.text(max_size=10)), draw(st.binary(max_size=20))))
    parts *= draw(st.sampled_from([1, 1, 2, 5]))
    boundary = draw(st.sampled_from(["b0und4ry", "x" * 71, "a b", "---"]))
    headers = draw(st.sampled_from(["", "Content-Type: image/png\r\n", "Content-Transfer-Encoding: base64\r\n",
                                    "Content-Type: multipart/mixed; boundary=in\r\n", "X: " + "y" * 9000 + "\r\n",
                                    "Content-Encoding: gzip\r\n", "X: y\r\n" * 130]))
    body = _form(parts, boundary, headers)
    body = body[:draw(st.integers(0, len(body)))] if draw(st.booleans()) else body
    content_type = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}", "multipart/form-data",
                                         "multipart/form-data; boundary=other", "multipart/mixed; boundary=b0und4ry",
                                         f'multipart/form-data; boundary="{boundary}"']))
    return body, content_type


@FUZZ_SETTINGS
@given(v1_requests())
def test_v1_bad_input_is_a_4xx_with_a_message(client: KeepAlive, errors: ErrorLog, case: HttpCase) -> None:
    post_checked(client, errors, case)


# ----- the Open Inference Protocol over REST: a well-formed request, then one thing about it made wrong


@dataclass
class OipCase:
    """An inference request before it is sent: its document, binary data, model, version and headers."""

    document: dict[str, Any]
    binary: bytes = b""
    model: str = "digits"
    version: str = ""
    length: str | None = None
    """Inference-Header-Content-Length as sent: None for the right one."""
    body: bytes | None = None
    """The JSON as sent: None for the document's."""


@st.composite
def good_oip(draw: st.DrawFn) -> OipCase:
    """A request the daemon answers: encoded images or pixels, as JSON data or binary, maybe with outputs,
    parameters and an id."""
    kind, count, binary = draw(st.sampled_from(["BYTES", "UINT8", "FP32"])), draw(st.integers(1, 3)), b""
    tensor: dict[str, Any] = {"name": "image", "datatype": kind}
    as_binary = draw(st.booleans())
    if kind == "BYTES":
        images = draw(st.lists(st.sampled_from(PNGS), min_size=count, max_size=count))
        tensor["shape"] = [count] if draw(st.booleans()) else [count, 1]
        binary = join_bytes_elements(images) if as_binary else b""
        tensor["data"] = [_b64(i) for i in images]
    else:
        tensor["shape"] = [count, 8, 8, 1] if draw(st.booleans()) else [8, 8]
        pixels = np.full(tensor["shape"], draw(st.integers(0, 255)), np.uint8)
        values = pixels if kind == "UINT8" else (pixels / 255.0).astype("<f4")
        binary = values.tobytes() if as_binary else b""
        tensor["data"] = values.ravel().tolist()
    if as_binary:
        del tensor["data"]
        tensor["parameters"] = {"binary_data_size": len(binary)}
    document: dict[str, Any] = {"inputs": [tensor]}
    if draw(st.booleans()):
        document["outputs"] = [{"name": "probabilities", "parameters": {"classification": draw(st.integers(1, 10))}}]
    if draw(st.booleans()):
        document["parameters"] = {"timeout": 60_000_000}
    if draw(st.booleans()):
        document["id"] = draw(st.text(max_size=10))
    return OipCase(document, binary, version=draw(st.sampled_from(["", "1"])))


OIP_MUTATIONS = ["none", "version", "model", "length", "json", "shape", "datatype", "data", "outputs", "parameters",
                 "id", "binary-size", "inputs", "tensor-parameters", "binary"]


@st.composite
def oip_requests(draw: st.DrawFn) -> HttpCase:
    """A well-formed inference request with one thing wrong: its path, its header, its JSON or a tensor's part."""
    case = draw(good_oip())
    mutate = draw(st.sampled_from(OIP_MUTATIONS))
    tensor = case.document["inputs"][0]
    if mutate == "version":
        case.version = draw(versions())
    elif mutate == "model":
        case.model = draw(st.text(max_size=20))
    elif mutate == "length":
        case.length = draw(st.sampled_from(["²", "-1", "1" * 40, "9" * 5000, "0x10", "", "0"]) | header_values())
    elif mutate == "json":
        case.body = draw(json_bodies(json_values()))
    elif mutate == "shape":
        tensor["shape"] = draw(shapes() | json_values(3))
    elif mutate == "datatype":
        tensor["datatype"] = draw(st.sampled_from(["INT32", "", "bytes", "BOOL"]) | json_values(2))
    elif mutate == "data":
        tensor.pop("parameters", None)
        case.binary = b""
        tensor["data"] = draw(json_values() | st.lists(b64_images(), max_size=4)
                              | st.lists(st.integers(-2, 300) | st.floats(-1, 2), max_size=70))
    elif mutate in ("outputs", "parameters", "id", "inputs"):
        case.document[mutate] = draw(_odd(mutate))
    elif mutate == "binary-size":
        tensor["parameters"] = {"binary_data_size": draw(integers())}
    elif mutate == "tensor-parameters":
        tensor["parameters"] = draw(json_values(3))
    elif mutate == "binary":
        case.binary = draw(raw_bytes_elements() | st.binary(max_size=80))
    return _oip_http(case)


def _odd(part: str) -> st.SearchStrategy[Any]:
    """Wrong values for a part of the document."""
    if part == "outputs":
        output = st.fixed_dictionaries({"name": st.sampled_from(["probabilities", "scores"]) | json_values(2)},
                                       optional={"parameters": st.fixed_dictionaries(
                                           {"classification": integers() | json_values(2)}) | json_values(3)})
        return st.lists(output, max_size=4) | json_values(3)
    if part == "parameters":
        return st.fixed_dictionaries({"timeout": timeouts()}) | json_values(3)
    if part == "inputs":
        return json_values(4) | st.just([])
    return json_values(3)


def timeouts() -> st.SearchStrategy[Any]:
    """``timeout`` parameters that are wrong or too long to expire: a 504 would be the request's own doing."""
    return st.one_of(st.integers(max_value=0), st.integers(min_value=60_000_000), st.text(max_size=5),
                     st.floats(allow_nan=False, allow_infinity=False), st.booleans(), json_values(4))


def _oip_http(case: OipCase) -> HttpCase:
    path = f"/v2/models/{urllib.parse.quote(case.model, safe='')}"
    path += f"/versions/{urllib.parse.quote(case.version, safe='')}/infer" if case.version else "/infer"
    header = case.body if case.body is not None else json.dumps(case.document).encode()
    headers = {"Content-Type": "application/json"}
    if case.binary or case.length is not None:
        headers["Inference-Header-Content-Length"] = case.length if case.length is not None else str(len(header))
    return path, header + case.binary, headers


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@FUZZ_SETTINGS
@given(oip_requests())
def test_oip_rest_bad_input_is_a_4xx_with_a_message(client: KeepAlive, errors: ErrorLog, case: HttpCase) -> None:
    post_checked(client, errors, case)


# ----- the known-hard inputs, every one of them (random generation reaches each only now and then)


def hard_cases() -> dict[str, HttpCase]:
    """Every hard JSON document on every JSON route; every hard version and header length."""
    binary = join_bytes_elements(PNGS[:1])
    document = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "parameters": {"binary_data_size": len(binary)}}]}
    header = json.dumps(document).encode()
    json_type = {"Content-Type": "application/json"}
    cases = {}
    for n, body in enumerate(RAW_JSON):
        cases[f"v1-json-{n}"] = ("/v1/classify", body, json_type)
        cases[f"oip-json-{n}"] = ("/v2/models/digits/infer", body, json_type)
        cases[f"oip-header-{n}"] = ("/v2/models/digits/infer", body + binary,
                                    {**json_type, "Inference-Header-Content-Length": str(len(body))})
    for n, version in enumerate(HARD_VERSIONS):
        quoted = urllib.parse.quote(version, safe="")
        cases[f"oip-version-{n}"] = (f"/v2/models/digits/versions/{quoted}/infer", header + binary,
                                     {**json_type, "Inference-Header-Content-Length": str(len(header))})
        cases[f"v1-version-{n}"] = (f"/v1/classify?version={quoted}", PNGS[0], {"Content-Type": "image/png"})
    for n, length in enumerate(HARD_LENGTHS):
        cases[f"oip-length-{n}"] = ("/v2/models/digits/infer", header + binary,
                                    {**json_type, "Inference-Header-Content-Length": length})
    return cases


HARD = hard_cases()


@pytest.mark.parametrize("name", list(HARD))
def test_hard_inputs_are_a_4xx_with_a_message(client: KeepAlive, errors: ErrorLog, name: str) -> None:
    answer = post_checked(client, errors, HARD[name], name)
    assert answer.status >= 400 or "version" in name, answer.body[:300]  # "01" and "+1" are versions


def test_well_formed_requests_still_succeed_after_the_fuzzing(client: KeepAlive) -> None:
    answer = client.send("POST", "/v1/classify", PNGS[0], {"Content-Type": "image/png"})
    assert answer.status == 200 and json.loads(answer.body)["predictions"]
