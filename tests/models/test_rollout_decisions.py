"""Rollout decisions on disk (server/models/rollout.py): the first final decision wins across processes, a
process follows a decision another one recorded, start-ups and restarts keep a rollout, a rollback only goes to
a version that can serve. Real daemons (kit) with ``classifyd:test_shade`` versions (tests/support)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
from classifier.v1 import classifier_pb2 as pb

from client.api import ClassifierClient
from server.core.errors import PreconditionFailed
from server.core.rollout import DECISION_FILE
from server.models.rollout import Decision, files_digest, read_decision, record_decision
from server.models.source.repository import fingerprint
from tests.models.test_rollout import IMAGES, SHADOW, load_version, publish, shade_model, version_state
from tests.support.kit import running_daemon, to_toml

UNDECIDED = {**SHADOW, "min_requests": 10_000}


def decision(version_dir: Path, promoted: bool, reason: str = "by the other worker", *,
             pending: bool = False) -> Decision:
    return Decision(promoted, reason, "rollout", files_digest(fingerprint(version_dir)), time.time(), pending)


def test_the_first_final_decision_wins_and_a_rollback_overrules_a_promotion(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shade_model(models, **UNDECIDED)
    version_dir = publish(models, 2, 0.0)
    assert record_decision(version_dir, decision(version_dir, False, pending=True)).pending
    first = record_decision(version_dir, decision(version_dir, True, "worker A"))
    assert first.promoted and not first.pending  # a final decision replaces a pending record
    assert record_decision(version_dir, decision(version_dir, False, "worker B")) == first  # B loses
    assert record_decision(version_dir, decision(version_dir, False, pending=True)) == first
    rolled_back = record_decision(version_dir, decision(version_dir, False, "rollback"), over_promotion=True)
    assert not rolled_back.promoted and read_decision(version_dir, fingerprint(version_dir)) == rolled_back
    assert record_decision(version_dir, decision(version_dir, True, "late"), over_promotion=True) == rolled_back
    assert not list(version_dir.glob("*.tmp"))


def test_the_digest_covers_the_version_directory_only(tmp_path: Path) -> None:
    models = tmp_path / "models"
    version_dir = shade_model(models)
    before = files_digest(fingerprint(version_dir))
    (models / "shade" / "model.toml").write_text((models / "shade" / "model.toml").read_text() + "\n# edited\n")
    (models / "shade" / "labels.de.txt").write_text("\n".join(f"Grau{i}" for i in range(10)) + "\n")
    assert files_digest(fingerprint(version_dir)) == before  # model-level files void no decision
    (version_dir / "model.toml").write_text(to_toml({"model_args": {"flip_below": 0.5}}))
    assert files_digest(fingerprint(version_dir)) != before  # the version published again does


@pytest.mark.parametrize("promoted", [True, False])
def test_a_decision_recorded_by_another_process_is_followed(tmp_path: Path, promoted: bool) -> None:
    models = tmp_path / "models"
    shade_model(models, **UNDECIDED)
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        load_version(daemon, models, 2, 0.0)
        assert version_state(client, 2)[0] == pb.VersionInfo.CANDIDATE
        version_dir = models / "shade" / "2"
        record_decision(version_dir, decision(version_dir, promoted))  # another --workers process decided
        assert daemon.daemon is not None
        daemon.call(daemon.daemon.manager.reconcile("shade"))  # what its watcher does on the file's event
        info = client.get_model("shade")
        assert info.serving_version == (2 if promoted else 1)
        assert version_state(client, 2)[0] == (pb.VersionInfo.READY if promoted else pb.VersionInfo.REJECTED)
        assert client.classify(IMAGES[0], model="shade").version == info.serving_version
    assert read_decision(version_dir, fingerprint(version_dir)).reason == "by the other worker"  # type: ignore[union-attr]


def test_a_start_with_a_newer_undecided_version_rolls_it_out(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shade_model(models, **UNDECIDED)
    publish(models, 2, 0.5)  # copied in while the daemon was down: never scored
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        assert client.get_model("shade").serving_version == 1
        assert version_state(client, 2)[0] == pb.VersionInfo.CANDIDATE
        assert client.classify(IMAGES[0], model="shade").version == 1
        assert daemon.daemon is not None
        with pytest.raises(PreconditionFailed):  # decisions are for that loaded object, not the number
            daemon.call(daemon.daemon.manager.decide("shade", 2, True, "stale", loaded=object()))


def test_a_candidate_with_nothing_else_to_serve_serves(tmp_path: Path) -> None:
    models = tmp_path / "models"
    first = shade_model(models, **UNDECIDED)
    record_decision(first, decision(first, False, "rejected before"))
    publish(models, 2, 0.0)
    with running_daemon(models, watch=False) as _daemon, ClassifierClient(_daemon.target) as client:
        assert client.get_model("shade").serving_version == 2  # not unavailable for ever
        assert version_state(client, 1)[0] == pb.VersionInfo.REJECTED


def test_a_replaced_candidate_is_recorded_and_not_a_candidate_again_after_a_restart(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shade_model(models, **UNDECIDED)
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        load_version(daemon, models, 2, 0.0)
        load_version(daemon, models, 3, 0.0)
        assert version_state(client, 3)[0] == pb.VersionInfo.CANDIDATE
        path = models / "shade" / "2" / DECISION_FILE
        deadline = time.monotonic() + 30
        while not (path.exists() and "replaced" in path.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
    recorded = json.loads(path.read_text())
    assert (recorded["promoted"], recorded["pending"]) == (False, False) and "replaced" in recorded["reason"]
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        assert client.get_model("shade").serving_version == 1
        assert version_state(client, 2)[0] == pb.VersionInfo.REJECTED
        assert version_state(client, 3)[0] == pb.VersionInfo.CANDIDATE


def test_a_rollback_goes_only_to_a_version_that_can_serve(tmp_path: Path) -> None:
    models = tmp_path / "models"
    first = shade_model(models)  # immediate: keep_versions 1, so the older versions are not loaded
    record_decision(first, decision(first, False, "rejected before"))
    broken = publish(models, 2, 0.0)
    (broken / "model.safetensors").write_bytes(b"not weights")
    publish(models, 3, 0.0)
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        assert client.get_model("shade").serving_version == 3
        assert daemon.daemon is not None
        manager = daemon.daemon.manager
        with pytest.raises(PreconditionFailed):  # 1 rejected on disk, 2 fails to load: nothing older can serve
            daemon.call(manager.reject_serving("shade", "bad"))
        assert client.get_model("shade").serving_version == 3  # still serving
        assert client.classify(IMAGES[0], model="shade").version == 3
        publish(models, 4, 0.0)
        daemon.call(manager.reconcile("shade"))
        assert client.get_model("shade").serving_version == 4
        with pytest.raises(PreconditionFailed):  # RejectVersion(3) after 4 took over rejects nothing
            daemon.call(manager.reject_serving("shade", "stale", expected=3))
        assert daemon.call(manager.reject_serving("shade", "bad", expected=4)) == 4
        assert client.get_model("shade").serving_version == 3  # loaded again before 4 was rejected
        assert client.classify(IMAGES[0], model="shade").version == 3


def test_a_canary_with_its_labels_in_another_order_answers_nobody(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shade_model(models, mode="canary", canary_percent=100.0, min_requests=10_000)
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        version_dir = publish(models, 2, 0.0)
        (version_dir / "labels.txt").write_text("\n".join(f"shade{i}" for i in reversed(range(10))) + "\n")
        assert daemon.daemon is not None
        daemon.call(daemon.daemon.manager.reconcile("shade"))
        assert version_state(client, 2)[0] == pb.VersionInfo.CANDIDATE
        assert {client.classify(IMAGES[i], model="shade").version for i in range(10)} == {1}


def test_a_scored_mode_on_a_read_only_repository_is_logged_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    shade_model(models, **UNDECIDED)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if mode == os.W_OK and
                        Path(path).parent == models / "shade" else real_access(path, mode, **kw))
    caplog.set_level(logging.ERROR, logger="classifyd.rollout")
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        assert client.get_model("shade").serving_version == 1
    assert any("is read-only: no rollout decision can be recorded" in r.getMessage() for r in caplog.records)
