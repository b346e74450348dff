"""Call a classifyd with tritonclient (``InferenceServerClient``, gRPC) and print what it saw, as JSON.

Run as its own process by tests/edges/test_oip.py: tritonclient's generated stubs and classifyd's
register the same protobuf names (``inference.*``) and one process's descriptor pool holds
only one of them. Usage: ``python tests/support/tritonclient_probe.py HOST:PORT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.digits_data import held_out_digits, png_bytes

COUNT = 24


def image_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def pixels_input(array: np.ndarray, datatype: str = "UINT8") -> triton.InferInput:
    tensor = triton.InferInput("image", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def failure(call: Any) -> dict[str, str]:
    """The status and message tritonclient raised, or 'no error'."""
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return {"status": "no error", "message": ""}


def top_k(client: triton.InferenceServerClient, images: list[bytes], k: int) -> list[list[str]]:
    result = client.infer("digits", [image_input(images)],
                          outputs=[triton.InferRequestedOutput("probabilities", class_count=k)])
    return [[cell.decode() for cell in row] for row in result.as_numpy("probabilities")]


def errors(client: triton.InferenceServerClient, png: bytes) -> dict[str, dict[str, str]]:
    good = image_input([png])
    return {
        "unknown_model": failure(lambda: client.infer("no-such-model", [good])),
        "unknown_version": failure(lambda: client.infer("digits", [good], model_version="7")),
        "bad_image": failure(lambda: client.infer("digits", [image_input([b"not an image"])])),
        "bad_shape": failure(lambda: client.infer("digits", [pixels_input(np.zeros((2, 3, 8, 8, 1), np.uint8))])),
        "bad_datatype": failure(lambda: client.infer("digits", [pixels_input(np.zeros((8, 8, 1), np.int32),
                                                                             "INT32")])),
        "too_many_classes": failure(lambda: client.infer(
            "digits", [good], outputs=[triton.InferRequestedOutput("probabilities", class_count=11)])),
        "unknown_metadata": failure(lambda: client.get_model_metadata("no-such-model")),
    }


def stream(client: triton.InferenceServerClient, pngs: list[bytes]) -> dict[str, Any]:
    """Three requests on ModelStreamInfer, the middle one bad: two results and one error come back."""
    seen: dict[str, Any] = {"results": {}, "errors": []}

    def callback(result: Any, error: Any) -> None:
        if error is not None:
            seen["errors"].append(str(error.message()))
        else:
            response = result.get_response()
            seen["results"][response.id] = result.as_numpy("probabilities").tolist()

    client.start_stream(callback=callback)
    client.async_stream_infer("digits", [image_input([pngs[0]])], request_id="a")
    client.async_stream_infer("digits", [image_input([b"garbage"])], request_id="b")
    client.async_stream_infer("digits", [image_input([pngs[1]])], request_id="c")
    client.stop_stream()
    return seen


def main(target: str) -> dict[str, Any]:
    images, labels = held_out_digits()
    pngs = [png_bytes(image) for image in images[:COUNT]]
    with triton.InferenceServerClient(target) as client:
        probabilities = client.infer("digits", [pixels_input(np.stack(images[:COUNT])[..., None])])
        return {
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready("digits"),
            "model_ready_v1": client.is_model_ready("digits", "1"),
            "unknown_model_ready": client.is_model_ready("no-such-model"),
            "server_metadata": client.get_server_metadata(as_json=True),
            "metadata": client.get_model_metadata("digits", as_json=True),
            "labels": labels[:COUNT],
            "top3": top_k(client, pngs, 3),
            "probabilities": probabilities.as_numpy("probabilities").tolist(),
            "probabilities_version": probabilities.get_response().model_version,
            "errors": errors(client, pngs[0]),
            "stream": stream(client, pngs),
        }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1]), ensure_ascii=False))
