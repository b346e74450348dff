"""Shadow and canary rollouts on a real daemon (kit) with two real versions of ``classifyd:test_shade`` whose
answers differ on a known share of the test images (tests/support/rollout_models.py)."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from classifier.v1 import classifier_pb2 as pb
from safetensors.torch import save_file

from client.__main__ import main as client_main
from client.api import ClassifierClient
from server.core.rollout import DECISION_FILE
from tests.support.kit import DaemonThread, encode, local_config, running_daemon, to_toml, write_model
from tests.support.rollout_models import shade_images, shade_labels, shade_manifest

IMAGES = shade_images(100)
SHADOW = {"mode": "shadow", "min_requests": 100, "min_agreement": 0.95, "max_compute_ratio": 1000.0}
"""The compute ratio's limit is out of the way: on a loaded test machine it measures noise (docs/rollout.md)."""


def expected_label(index: int, flip_below: float) -> str:
    """What a test_shade version with ``flip_below`` answers for ``IMAGES[index]``."""
    mean = round((index + 0.5) / len(IMAGES) * 255) / 255
    label = min(math.floor(mean * 10), 9)
    return f"shade{(label + 1) % 10 if mean < flip_below else label}"


def publish(root: Path, number: int, flip_below: float, **rollout: Any) -> Path:
    """Version ``number`` of model ``shade``: its own model.toml (model_args, a stricter [rollout]) and weights."""
    version_dir = root / "shade" / str(number)
    version_dir.mkdir(parents=True)
    own: dict[str, Any] = {"model_args": {"flip_below": flip_below}}
    if rollout:
        own["rollout"] = rollout
    (version_dir / "model.toml").write_text(to_toml(own), encoding="utf-8")
    save_file({"scale": torch.ones(1)}, str(version_dir / "model.safetensors"))
    return version_dir


def shade_model(root: Path, extra: dict[str, Any] | None = None, **rollout: Any) -> Path:
    """Model ``shade`` with version 1 (flip_below 0), a model-level ``[rollout]`` and ``extra`` manifest keys."""
    write_model(root, "shade", architecture="classifyd:test_shade", labels=shade_labels(),
                manifest={**shade_manifest(**rollout), **(extra or {})})
    shutil.rmtree(root / "shade" / "1")
    return publish(root, 1, 0.0)


def load_version(daemon: DaemonThread, root: Path, number: int, flip_below: float) -> None:
    """:func:`publish` version ``number``, and have the daemon (``watch=False``) take it now."""
    publish(root, number, flip_below)
    assert daemon.daemon is not None
    daemon.call(daemon.daemon.manager.reconcile("shade"))


class Load:
    """``threads`` clients classifying IMAGES round and round; every answer checked against ``flips`` (version →
    its flip_below) and recorded; failures counted."""

    def __init__(self, target: str, flips: dict[int, float], threads: int = 4) -> None:
        self.flips = flips
        self.answers: list[tuple[float, int, bool]] = []  # (time, version, label as expected)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(target, n), daemon=True) for n in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, target: str, offset: int) -> None:
        with ClassifierClient(target) as client:
            i = offset * 25
            while not self._stop.is_set():
                index = i % len(IMAGES)
                try:
                    response = client.classify(IMAGES[index], model="shade", top_k=1, timeout=30)
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code()}: {exc.details()}")
                    continue
                flip = self.flips.get(response.version)
                good = flip is not None and response.predictions[0].label == expected_label(index, flip)
                self.answers.append((time.monotonic(), response.version, good))
                i += 1


def wait_for(check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def version_state(client: ClassifierClient, number: int) -> tuple[int, str]:
    info = client.get_model("shade")
    found = [v for v in info.versions if v.version == number]
    return (found[0].state, found[0].error) if found else (0, "")


def test_the_expected_labels_differ_on_the_flipped_share_exactly() -> None:
    assert sum(expected_label(i, 0.12) != expected_label(i, 0.0) for i in range(100)) == 12
    assert sum(expected_label(i, 0.02) != expected_label(i, 0.0) for i in range(100)) == 2


def test_shadow_rejects_below_min_agreement_and_promotes_above_under_load(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shade_model(models, **SHADOW)
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client, \
            Load(daemon.target, {1: 0.0, 3: 0.02}) as load:
        load_version(daemon, models, 2, 0.12)  # a fine-tune that disagrees on 12 % of the images
        assert version_state(client, 2)[0] == pb.VersionInfo.CANDIDATE
        assert client.get_model("shade").rollout.candidate_version == 2
        _, error = wait_for(lambda: (s := version_state(client, 2))[0] == pb.VersionInfo.REJECTED and s)
        assert "agreement 0.8" in error and "< min_agreement 0.95" in error, error
        decision = json.loads((models / "shade" / "2" / DECISION_FILE).read_text())
        assert decision["promoted"] is False and decision["by"] == "rollout"

        load_version(daemon, models, 3, 0.02)  # one that disagrees on 2 %
        wait_for(lambda: client.get_model("shade").serving_version == 3)
        promoted_at = time.monotonic()
        assert version_state(client, 3)[0] == pb.VersionInfo.READY
        wait_for(lambda: any(t > promoted_at and v == 3 for t, v, _ in list(load.answers)))
        wait_for(lambda: version_state(client, 1)[0] == 0)  # keep_versions = 1: the old version is unloaded
    assert load.failures == []
    assert len(load.answers) > 200
    assert all(good for _, _, good in load.answers), "an answer did not match the version that gave it"
    assert {v for _, v, _ in load.answers} <= {1, 3}  # never the candidates (2 was rejected, 3 only once promoted)
    assert all(t < promoted_at + 1.0 for t, v, _ in load.answers if v == 1)
    first_from_3 = min(t for t, v, _ in load.answers if v == 3)
    assert first_from_3 > promoted_at - 1.0


def test_a_restart_does_not_serve_a_rejected_version_again_and_new_files_clear_it(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shade_model(models, **{**SHADOW, "min_requests": 20})
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        load_version(daemon, models, 2, 0.5)
        for index in range(40):
            client.classify(IMAGES[index], model="shade")
        wait_for(lambda: version_state(client, 2)[0] == pb.VersionInfo.REJECTED)
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        info = client.get_model("shade")
        assert info.serving_version == 1
        state, error = version_state(client, 2)
        assert state == pb.VersionInfo.REJECTED and "agreement" in error
        assert client.classify(IMAGES[0], model="shade").version == 1
        # published again (new files): the recorded decision no longer applies and it is a candidate again
        (models / "shade" / "2" / "model.toml").write_text(to_toml({"model_args": {"flip_below": 0.0}}))
        assert daemon.daemon is not None
        daemon.call(daemon.daemon.manager.reconcile("shade"))
        assert version_state(client, 2)[0] == pb.VersionInfo.CANDIDATE


def test_canary_answers_its_share_from_the_candidate(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shade_model(models, mode="canary", canary_percent=25.0, min_requests=10_000)
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        load_version(daemon, models, 2, 0.12)
        answers = [(i, client.classify(IMAGES[i], model="shade", top_k=1)) for i in range(100)]
        pinned = client.classify(IMAGES[0], model="shade", version=1)
        assert pinned.version == 1  # a request that pins a version is never redirected
        info = client.get_model("shade")
    by_version = [r.version for _, r in answers]
    assert by_version.count(2) == 25 and by_version.count(1) == 75
    flips = {1: 0.0, 2: 0.12}
    assert all(r.predictions[0].label == expected_label(i, flips[r.version]) for i, r in answers)
    assert info.rollout.mode == "canary" and info.rollout.candidate_version == 2


def test_manual_decision_waits_for_an_operator_and_the_calls_need_the_admin_token(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shade_model(models, **{**SHADOW, "min_requests": 5, "decision": "manual"})
    admins = tmp_path / "admins"
    admins.write_text("operator-secret\n")
    config = local_config(models, watch=False, admin_token_file=admins, http_port=0)
    daemon = DaemonThread(config).start()
    try:
        load_version(daemon, models, 2, 0.0)
        with ClassifierClient(daemon.target) as anyone, \
                ClassifierClient(daemon.target, token="operator-secret") as operator:
            for index in range(20):
                anyone.classify(IMAGES[index], model="shade")
            info = wait_for(lambda: (i := anyone.get_model("shade")).rollout.compared >= 5 and i)
            assert info.rollout.agreement == 1.0 and info.rollout.decision == "manual"
            assert version_state(anyone, 2)[0] == pb.VersionInfo.CANDIDATE  # figures fine, still waiting
            assert daemon.daemon is not None
            page = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{daemon.daemon.http_port}/status.json",
                                                     timeout=10).read())
            row = next(m for m in page["models"] if m["name"] == "shade")["rollout"]
            assert row["candidate_version"] == 2 and row["compared"] >= 5 and row["agreement"] == 1.0
            metric = daemon.daemon.metrics.rollouts.labels("shade", "candidate")
            assert metric._value.get() == 1  # prometheus_client keeps the count there
            for call in (lambda: anyone.promote_version("shade", 2), lambda: anyone.reject_version("shade", 2),
                         lambda: anyone.rollback_model("shade")):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as wrong:
                operator.promote_version("shade", 1)
            assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert operator.promote_version("shade", 2).serving_version == 2
            decision = json.loads((models / "shade" / "2" / DECISION_FILE).read_text())
            assert decision == {**decision, "promoted": True, "by": "operator"}
            assert client_main(["--target", daemon.target, "rollback", "shade"]) == 1  # no token: refused
            token = tmp_path / "token"
            token.write_text("operator-secret\n")
            assert client_main(["--target", daemon.target, "--token-file", str(token), "rollback", "shade",
                                "--reason", "bad on tuesdays"]) == 0
            assert version_state(anyone, 2)[0] == pb.VersionInfo.REJECTED
            assert wait_for(lambda: anyone.get_model("shade").serving_version == 1)
            assert anyone.classify(IMAGES[0], model="shade").version == 1
            assert "bad on tuesdays" in version_state(anyone, 2)[1]
            with pytest.raises(grpc.RpcError) as nothing_older:
                operator.rollback_model("shade")
            assert nothing_older.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        daemon.stop()


def test_an_undecided_candidate_is_a_candidate_again_after_a_restart(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shade_model(models, **{**SHADOW, "min_requests": 10_000})
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        load_version(daemon, models, 2, 0.0)
        assert version_state(client, 2)[0] == pb.VersionInfo.CANDIDATE
        wait_for(lambda: (models / "shade" / "2" / DECISION_FILE).exists())
        reloaded = client.reload_model("shade")  # a forced reload: loaded again, a candidate again
        assert [(v.state, v.generation) for v in reloaded.versions if v.version == 2] == \
            [(pb.VersionInfo.CANDIDATE, 2)]
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        # loaded newest first, as at every start, but recorded as an undecided candidate: it does not serve
        assert client.get_model("shade").serving_version == 1
        assert version_state(client, 2)[0] == pb.VersionInfo.CANDIDATE
        assert client.classify(IMAGES[0], model="shade").version == 1


def test_a_candidate_with_other_labels_waits_for_an_operator(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shade_model(models, **{**SHADOW, "min_requests": 5})
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        version_dir = publish(models, 2, 0.0)
        (version_dir / "labels.txt").write_text("\n".join(f"grey{i}" for i in range(10)) + "\n")
        assert daemon.daemon is not None
        daemon.call(daemon.daemon.manager.reconcile("shade"))
        for index in range(20):
            assert client.classify(IMAGES[index], model="shade").version == 1
        info = client.get_model("shade")
    assert info.rollout.labels_differ and info.rollout.compared == 0
    assert [v.state for v in info.versions if v.version == 2] == [pb.VersionInfo.CANDIDATE]


def test_a_tiled_model_is_compared_on_its_reduced_answer(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shade_model(models, {"tiling": {"tile": [8, 8], "stride": [8, 8], "reduce": "max"}},
                **{**SHADOW, "min_requests": 10})
    image = encode(np.full((16, 16), 100, dtype=np.uint8))  # four tiles, all of mean 100/255: label shade3
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        load_version(daemon, models, 2, 1.0)  # flips every answer
        for _ in range(12):
            answer = client.classify(image, model="shade", top_k=1)
            assert (answer.version, answer.predictions[0].label, answer.tile_count) == (1, "shade3", 4)
        _, error = wait_for(lambda: (s := version_state(client, 2))[0] == pb.VersionInfo.REJECTED and s)
    assert "agreement 0.000" in error
