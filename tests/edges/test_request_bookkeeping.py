"""Every edge reports its requests the same way: a request id (the caller's or a generated one) carried into the
service, one record in the request log and one count in the request metrics, for gRPC classifier.v1, HTTP ``/v1``
and both Open Inference Protocol bindings."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc
from prometheus_client.parser import text_string_to_metric_families

from client import tensor_request
from server.edges.common.oip_codec import join_bytes_elements
from tests.support.digits_data import held_out_digits, png_bytes
from tests.support.kit import REPO, DaemonThread, running_daemon

pytestmark = pytest.mark.timeout(120)
PNG = png_bytes(held_out_digits()[0][0])
GENERATED = re.compile(r"[0-9a-f]{16}")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(REPO / "models" / "digits", root / "digits")
    with running_daemon(root, watch=False, http_port=0, metrics_port=0) as running:
        yield running


def post(daemon: DaemonThread, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    assert daemon.daemon is not None
    request = urllib.request.Request(f"http://127.0.0.1:{daemon.daemon.http_port}{path}", data=body,
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def requests_total(daemon: DaemonThread) -> dict[tuple[str, str, str], float]:
    assert daemon.daemon is not None and daemon.daemon.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.daemon.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.labels["model"], s.labels["version"], s.labels["code"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "classifyd_requests_total"}


def oip_request(request_id: str = "", model: str = "digits") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(join_bytes_elements([PNG]))
    return request


def oip_json(request_id: str | None) -> bytes:
    document: dict[str, Any] = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                            "data": [base64.b64encode(PNG).decode()]}]}
    if request_id is not None:
        document["id"] = request_id
    return json.dumps(document).encode()


def test_every_edge_logs_and_counts_its_requests_with_an_id(daemon: DaemonThread,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="classifyd.requests")
    before = requests_total(daemon)
    with grpc.insecure_channel(daemon.target) as channel:
        pb_grpc.ClassifierStub(channel).Classify(tensor_request(np.zeros((8, 8), np.uint8), request_id="c1"))
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelInfer(oip_request("g1")).id == "g1"
        stub.ModelInfer(oip_request())
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(oip_request("g-missing", model="nope"))
        streamed = list(stub.ModelStreamInfer(iter([oip_request("s1")]), timeout=30))
        assert [s.infer_response.id for s in streamed] == ["s1"]
    png = {"Content-Type": "image/png"}
    status, named = post(daemon, "/v1/classify?request_id=h1", PNG, png)
    assert status == 200 and named["request_id"] == "h1"
    status, anonymous = post(daemon, "/v1/classify", PNG, png)
    assert status == 200 and GENERATED.fullmatch(anonymous["request_id"])  # echoed: the id the log names
    status, refused = post(daemon, "/v1/classify?request_id=h-bad", b"not an image", png)
    assert status == 400 and refused["error"]["code"] == "INVALID_ARGUMENT"
    json_type = {"Content-Type": "application/json"}
    status, answer = post(daemon, "/v2/models/digits/infer", oip_json("r1"), json_type)
    assert status == 200 and answer["id"] == "r1"
    assert post(daemon, "/v2/models/digits/infer", oip_json(None), json_type)[0] == 200
    assert post(daemon, "/v2/models/digits/versions/%C2%B2/infer", oip_json("r-bad"), json_type)[0] == 400

    records = [r for r in caplog.records if r.name == "classifyd.requests"]
    by_id = {r.request_id: r for r in records}  # type: ignore[attr-defined]
    for request_id in ("c1", "g1", "s1", "h1", "r1", anonymous["request_id"]):
        assert by_id[request_id].code == "OK", request_id  # type: ignore[attr-defined]
    assert by_id["h-bad"].code == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
    assert by_id["r-bad"].code == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
    assert by_id["g-missing"].code == "NOT_FOUND"  # type: ignore[attr-defined]
    generated = [r for r in records if GENERATED.fullmatch(r.request_id)]  # type: ignore[attr-defined]
    assert len(generated) == 3  # the OIP gRPC, OIP REST and /v1 requests that brought no id
    assert len(records) == 11

    after = requests_total(daemon)
    counted = {key: after[key] - before.get(key, 0.0) for key in after}
    assert counted[("digits", "1", "OK")] == 8
    assert counted[("digits", "", "INVALID_ARGUMENT")] == 2
    assert counted[("(unknown)", "", "NOT_FOUND")] == 1
