"""Model control (--model-control poll | explicit | none) end to end: a real daemon over a temporary repository,
tritonclient's own repository, configuration and statistics calls over HTTP (in this process) and gRPC (in its own,
tests/support/tritonclient_control_probe.py), classifier.v1 clients, and real files dropped into the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.http as triton_http
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from client import tensor_request
from client.__main__ import main as client_main
from tests.models.test_hot_swap import biased_module
from tests.support.kit import GATE, REPO, DaemonThread, running_daemon, write_model

pytestmark = pytest.mark.timeout(300)

SMALL = {"model_args": {"width": 8}, "input": {"color": "L", "size": 8, "resize": 8}, "batching": {"max_batch_size": 8}}
GATED = {"input": {"color": "L", "size": 8, "resize": 8}, "batching": {"max_batch_size": 2}}
PIXELS = np.arange(64, dtype=np.uint8).reshape(8, 8)


def repository(root: Path) -> Path:
    """Two models: ``small`` (predicts class 1) and ``gated`` (its forward waits on tests.support.kit.GATE)."""
    root.mkdir()
    write_model(root, "small", manifest=SMALL, module=biased_module(1))
    write_model(root, "gated", architecture="classifyd:test_gated", manifest=GATED)
    return root


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def http_client(daemon: DaemonThread) -> triton_http.InferenceServerClient:
    assert daemon.daemon is not None
    return triton_http.InferenceServerClient(f"127.0.0.1:{daemon.daemon.http_port}")


def ready_index(daemon: DaemonThread) -> list[dict[str, Any]]:
    """``POST /v2/repository/index`` with ``{"ready": true}`` (tritonclient sends an empty body)."""
    assert daemon.daemon is not None
    request = urllib.request.Request(f"http://127.0.0.1:{daemon.daemon.http_port}/v2/repository/index",
                                     data=b'{"ready": true}', method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def grpc_probe(daemon: DaemonThread, steps: list[list[str]], token: str | None = None) -> list[Any]:
    """tritonclient's gRPC calls, made in their own process: what each step returned."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    script = REPO / "tests" / "support" / "tritonclient_control_probe.py"
    done = subprocess.run([sys.executable, str(script), daemon.target, json.dumps(steps), *([token] if token else [])],
                          env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def states(index: list[dict[str, Any]], name: str) -> dict[str, str]:
    """Version → state of model ``name`` in a repository index."""
    return {row.get("version", ""): row.get("state", "") for row in index if row["name"] == name}


def states_of(client: triton_http.InferenceServerClient) -> set[str]:
    """The names of the models in the repository index."""
    return {row["name"] for row in client.get_model_repository_index()}


def classify(stub: pb_grpc.ClassifierStub, model: str) -> pb.ClassifyResponse:
    return stub.Classify(tensor_request(PIXELS, model=model, top_k=1), timeout=30)


@pytest.fixture
def explicit(tmp_path: Path) -> Iterator[DaemonThread]:
    with running_daemon(repository(tmp_path / "models"), model_control="explicit", http_port=0,
                        settle_s=0.2) as daemon:
        yield daemon


@pytest.fixture
def stub(explicit: DaemonThread) -> Iterator[pb_grpc.ClassifierStub]:
    with grpc.insecure_channel(explicit.target) as channel:
        yield pb_grpc.ClassifierStub(channel)


def test_explicit_mode_lists_the_catalogue_and_loads_on_request_over_http(explicit: DaemonThread,
                                                                          stub: pb_grpc.ClassifierStub) -> None:
    client = http_client(explicit)
    index = client.get_model_repository_index()
    assert states(index, "small") == {"1": "AVAILABLE"} and states(index, "gated") == {"1": "AVAILABLE"}
    assert not client.is_model_ready("small")
    with pytest.raises(grpc.RpcError) as refused:
        classify(stub, "small")
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE and "not loaded" in refused.value.details()
    info = stub.GetModel(pb.GetModelRequest(model="small"), timeout=10)
    assert [v.state for v in info.versions] == [pb.VersionInfo.AVAILABLE]

    client.load_model("small")
    assert client.is_model_ready("small")
    assert states(client.get_model_repository_index(), "small") == {"1": "READY"}
    assert {row["name"] for row in ready_index(explicit)} == {"small"}
    assert classify(stub, "small").predictions[0].index == 1
    config = client.get_model_config("small")
    assert config["max_batch_size"] == 8 and config["output"][0]["dims"] == [4]
    assert config["input"][0]["name"] == "image"
    (stats,) = client.get_inference_statistics("small")["model_stats"]
    assert stats["version"] == "1" and stats["inference_stats"]["success"]["count"] == 1
    assert stats["execution_count"] >= 1 and stats["inference_stats"]["compute_infer"]["ns"] > 0

    client.unload_model("small")
    assert states(client.get_model_repository_index(), "small") == {"1": "AVAILABLE"}
    with pytest.raises(grpc.RpcError) as gone:
        classify(stub, "small")
    assert gone.value.code() is grpc.StatusCode.UNAVAILABLE and "load it first" in gone.value.details()


def test_tritonclient_grpc_repository_config_and_statistics_calls(explicit: DaemonThread) -> None:
    index, loaded, config, stats, unknown, unloaded, after = grpc_probe(explicit, [
        ["index"], ["load", "small"], ["config", "small"], ["stats", "small"], ["load", "nosuch"],
        ["unload", "small"], ["index"]])
    assert {(m["name"], m["state"]) for m in index["models"]} == {("small", "AVAILABLE"), ("gated", "AVAILABLE")}
    assert loaded == "loaded"
    assert config["config"]["max_batch_size"] == 8
    assert config["config"]["input"][0]["data_type"] == "TYPE_STRING"
    assert config["config"]["output"][0] == {"name": "probabilities", "data_type": "TYPE_FP32", "dims": ["4"],
                                             "label_filename": "labels.txt"}
    assert stats["model_stats"][0]["name"] == "small" and stats["model_stats"][0]["version"] == "1"
    assert unknown["error"]["status"] == "StatusCode.NOT_FOUND" and "no directory nosuch" in unknown["error"]["message"]
    assert unloaded == "unloaded"
    assert {(m["name"], m["state"]) for m in after["models"]} == {("small", "AVAILABLE"), ("gated", "AVAILABLE")}


def test_a_loaded_model_hot_swaps_a_new_version_in_explicit_mode(explicit: DaemonThread,
                                                                  stub: pb_grpc.ClassifierStub) -> None:
    stub.LoadModel(pb.LoadModelRequest(model="small"), timeout=60)
    assert classify(stub, "small").predictions[0].index == 1
    write_model(explicit.config.models.models_dir, "small", version=2, manifest=SMALL, module=biased_module(3))
    wait_for(lambda: stub.GetModel(pb.GetModelRequest(model="small"), timeout=10).serving_version == 2)
    assert classify(stub, "small").predictions[0].index == 3
    # a model nobody loaded only gains a catalogue entry
    write_model(explicit.config.models.models_dir, "gated", version=2, architecture="classifyd:test_gated",
                manifest=GATED)
    wait_for(lambda: len(stub.GetModel(pb.GetModelRequest(model="gated"), timeout=10).versions) == 2)
    gated = stub.GetModel(pb.GetModelRequest(model="gated"), timeout=10)
    assert {v.state for v in gated.versions} == {pb.VersionInfo.AVAILABLE} and gated.serving_version == 0


def test_unload_lets_requests_in_flight_finish_and_refuses_new_ones(explicit: DaemonThread,
                                                                     stub: pb_grpc.ClassifierStub) -> None:
    stub.LoadModel(pb.LoadModelRequest(model="gated"), timeout=60)
    request = tensor_request(PIXELS, model="gated")
    GATE.close()
    unloading = None
    try:
        in_flight = [stub.Classify.future(request, timeout=60) for _ in range(3)]
        assert GATE.entered.acquire(timeout=20)
        service = explicit.daemon.service if explicit.daemon else None
        assert service is not None  # every request is in: computing, or queued behind the batch
        wait_for(lambda: sum(GATE.batches) + service.batcher_depth("gated") == 3)
        unloading = stub.UnloadModel.future(pb.UnloadModelRequest(model="gated"), timeout=60)
        wait_for(lambda: stub.GetModel(pb.GetModelRequest(model="gated"), timeout=10).versions[0].state
                 == pb.VersionInfo.UNLOADING)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Classify(request, timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "gated is not loaded" in refused.value.details()
        assert not unloading.done()
    finally:
        GATE.open.set()
    assert all(f.result().predictions for f in in_flight)
    assert unloading is not None
    info = unloading.result()
    assert [v.state for v in info.versions] == [pb.VersionInfo.AVAILABLE] and info.serving_version == 0


def test_a_load_that_fails_is_failed_precondition_and_its_errors_are_named(explicit: DaemonThread,
                                                                          stub: pb_grpc.ClassifierStub) -> None:
    broken = write_model(explicit.config.models.models_dir, "broken", manifest=SMALL)
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file")
    client = http_client(explicit)
    wait_for(lambda: "broken" in states_of(client))
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("broken")
    assert refused.value.status() == "409" and "model broken did not load: version 1:" in refused.value.message()
    index = client.get_model_repository_index()
    (row,) = [r for r in index if r["name"] == "broken"]
    assert row["state"] == "UNAVAILABLE" and row["reason"]
    with pytest.raises(InferenceServerException) as unloaded:
        client.get_model_config("gated")
    assert unloaded.value.status() == "503" and "no configuration yet" in unloaded.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        client.get_inference_statistics("gated", "7")
    assert unknown.value.status() == "404"


def test_watch_models_tells_the_unload_then_the_catalogue_entry(explicit: DaemonThread,
                                                               stub: pb_grpc.ClassifierStub) -> None:
    stub.LoadModel(pb.LoadModelRequest(model="small"), timeout=60)
    events = stub.WatchModels(pb.WatchModelsRequest(model="small"))
    stub.UnloadModel(pb.UnloadModelRequest(model="small"), timeout=60)
    kinds = []
    for event in events:
        kinds.append((event.kind, event.serving))
        if event.kind == pb.ModelEvent.AVAILABLE:
            break
    events.cancel()
    assert kinds == [(pb.ModelEvent.UNLOADED, False), (pb.ModelEvent.AVAILABLE, False)]


def test_python_m_client_loads_and_unloads(explicit: DaemonThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert client_main(["--target", explicit.target, "load", "small"]) == 0
    assert "small: serving version 1" in capsys.readouterr().out
    assert client_main(["--target", explicit.target, "unload", "small"]) == 0
    assert "version 1: AVAILABLE" in capsys.readouterr().out
    assert client_main(["--target", explicit.target, "load", "nosuch"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_load_and_unload_follow_the_operator_rule(tmp_path: Path) -> None:
    (tmp_path / "clients").write_text("client-token\n")
    (tmp_path / "admins").write_text("admin-token\n")
    with running_daemon(repository(tmp_path / "models"), model_control="explicit", http_port=0,
                        auth_token_file=tmp_path / "clients", admin_token_file=tmp_path / "admins") as daemon:
        client = http_client(daemon)
        for token, status, message in (("client-token", "403", "client tokens (--auth-token-file) do not suffice"),
                                       ("other", "401", "invalid bearer token")):
            with pytest.raises(InferenceServerException) as refused:
                client.load_model("small", headers={"Authorization": f"Bearer {token}"})
            assert refused.value.status() == status and message in refused.value.message()
        anonymous, as_client, as_admin = grpc_probe(daemon, [["load", "small"]]), \
            grpc_probe(daemon, [["load", "small"]], "client-token"), grpc_probe(daemon, [["load", "small"]],
                                                                               "admin-token")
        assert anonymous[0]["error"]["status"] == "StatusCode.UNAUTHENTICATED"
        assert as_client[0]["error"]["status"] == "StatusCode.PERMISSION_DENIED"
        assert as_admin == ["loaded"]
        assert states(client.get_model_repository_index(headers={"Authorization": "Bearer client-token"}),
                      "small") == {"1": "READY"}
        client.unload_model("small", headers={"Authorization": "Bearer admin-token"})


def test_none_mode_loads_at_start_and_never_reloads(tmp_path: Path) -> None:
    root = repository(tmp_path / "models")
    with running_daemon(root, model_control="none", settle_s=0.1) as daemon, \
            grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        assert daemon.daemon is not None and daemon.daemon.watcher is None
        assert classify(stub, "small").predictions[0].index == 1
        write_model(root, "small", version=2, manifest=SMALL, module=biased_module(3))
        for call in (lambda: stub.ReloadModel(pb.ReloadModelRequest(model="small"), timeout=10),
                     lambda: stub.LoadModel(pb.LoadModelRequest(model="small"), timeout=10)):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "--model-control none" in refused.value.details()
        time.sleep(1.0)  # ten settle periods: a watcher would have loaded version 2 by now
        info = stub.GetModel(pb.GetModelRequest(model="small"), timeout=10)
        assert info.serving_version == 1 and [v.version for v in info.versions] == [1]


def test_poll_mode_is_unchanged_and_refuses_explicit_loads(tmp_path: Path) -> None:
    with running_daemon(repository(tmp_path / "models"), http_port=0) as daemon:
        client = http_client(daemon)
        index = client.get_model_repository_index()
        assert states(index, "small") == {"1": "READY"} and states(index, "gated") == {"1": "READY"}
        with pytest.raises(InferenceServerException) as refused:
            client.unload_model("small")
        assert refused.value.status() == "409" and "--model-control poll" in refused.value.message()
        assert client.is_model_ready("small")


def test_concurrent_loads_both_succeed_and_an_unloaded_model_removed_from_disk_leaves_the_catalogue(
        explicit: DaemonThread, stub: pb_grpc.ClassifierStub) -> None:
    loads = [stub.LoadModel.future(pb.LoadModelRequest(model="small"), timeout=60) for _ in range(2)]
    assert [f.result().serving_version for f in loads] == [1, 1]
    assert [v.generation for v in stub.GetModel(pb.GetModelRequest(model="small"), timeout=10).versions] == [1]
    info = stub.UnloadModel(pb.UnloadModelRequest(model="small"), timeout=60)
    assert [v.state for v in info.versions] == [pb.VersionInfo.AVAILABLE]
    shutil.rmtree(explicit.config.models.models_dir / "small")
    wait_for(lambda: "small" not in {m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models})
