"""Run tritonclient's gRPC model-repository, configuration and statistics calls against a classifyd and print what
each returned, as JSON: one entry per step, the call's answer (as JSON) or ``{"error": {"status", "message"}}``.

Its own process: tritonclient's generated stubs and classifyd's register the same protobuf names (``inference.*``),
and one process's descriptor pool holds only one of them (see tests/support/tritonclient_probe.py). Usage:
``python tests/support/tritonclient_control_probe.py HOST:PORT '[["index"], ["load", "m"], ...]' [TOKEN]``; steps:
``index``, ``load NAME``, ``unload NAME``, ``config NAME``, ``stats [NAME]``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def step(client: triton.InferenceServerClient, name: str, args: list[str], headers: dict[str, str] | None) -> Any:
    if name == "index":
        return client.get_model_repository_index(headers=headers, as_json=True)
    if name == "load":
        client.load_model(args[0], headers=headers)
        return "loaded"
    if name == "unload":
        client.unload_model(args[0], headers=headers)
        return "unloaded"
    if name == "config":
        return client.get_model_config(args[0], headers=headers, as_json=True)
    if name == "stats":
        return client.get_inference_statistics(args[0] if args else "", headers=headers, as_json=True)
    raise ValueError(f"unknown step {name}")


def main() -> None:
    target, steps = sys.argv[1], json.loads(sys.argv[2])
    headers = {"authorization": f"Bearer {sys.argv[3]}"} if len(sys.argv) > 3 else None
    client = triton.InferenceServerClient(target)
    answers = []
    for name, *args in steps:
        try:
            answers.append(step(client, name, args, headers))
        except InferenceServerException as exc:
            answers.append({"error": {"status": str(exc.status()), "message": str(exc.message())}})
    print(json.dumps(answers))


if __name__ == "__main__":
    main()
