"""``[rollout]`` in the manifest (server/core/rollout.py): parsing, the model's table governing the version's, and
the decision rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.core.manifest import ManifestError, load_manifest
from server.core.rollout import RolloutSpec, Scores, parse_rollout, verdict
from tests.support.kit import to_toml


def version_with(tmp_path: Path, model: dict[str, Any] | None, version: dict[str, Any] | None = None) -> Path:
    (tmp_path / "labels.txt").write_text("a\nb\n")
    (tmp_path / "model.toml").write_text(to_toml({"architecture": "classifyd:small_cnn",
                                                  **({"rollout": model} if model else {})}))
    version_dir = tmp_path / "1"
    version_dir.mkdir()
    if version is not None:
        (version_dir / "model.toml").write_text(to_toml({"rollout": version}))
    return version_dir


def test_the_defaults_go_live_at_once() -> None:
    spec = parse_rollout(None)
    assert spec == RolloutSpec() and not spec.scored
    assert (spec.shadow_percent, spec.shadow_max_share, spec.max_error_rate, spec.max_compute_ratio) == \
        (100.0, 0.2, 0.01, 1.5)


def test_a_version_may_make_the_rollout_stricter(tmp_path: Path) -> None:
    version_dir = version_with(tmp_path, {"mode": "canary", "canary_percent": 10, "min_agreement": 0.9},
                               {"mode": "shadow", "min_agreement": 0.97, "decision": "manual"})
    spec = load_manifest(version_dir).rollout
    assert (spec.mode, spec.min_agreement, spec.decision) == ("shadow", 0.97, "manual")


@pytest.mark.parametrize(("model", "version", "key"), [
    ({"mode": "shadow"}, {"mode": "immediate"}, "rollout.mode"),
    ({"mode": "shadow"}, {"mode": "canary", "canary_percent": 5}, "rollout.mode"),
    ({"mode": "shadow", "decision": "manual"}, {"decision": "auto"}, "rollout.decision"),
    ({"mode": "shadow", "min_agreement": 0.99}, {"min_agreement": 0.5}, "rollout.min_agreement"),
    ({"mode": "shadow", "max_error_rate": 0.01}, {"max_error_rate": 0.2}, "rollout.max_error_rate"),
    ({"mode": "shadow", "min_requests": 1000}, {"min_requests": 10}, "rollout.min_requests"),
    ({"mode": "canary", "canary_percent": 5}, {"canary_percent": 50}, "rollout.canary_percent"),
])
def test_a_version_may_not_skip_or_weaken_the_models_rollout(tmp_path: Path, model: dict[str, Any],
                                                            version: dict[str, Any], key: str) -> None:
    with pytest.raises(ManifestError, match=r"stricter, never weaker|may not make it automatic") as raised:
        load_manifest(version_with(tmp_path, model, version))
    assert raised.value.key == key
    assert raised.value.path == tmp_path / "1" / "model.toml"


@pytest.mark.parametrize(("table", "key", "message"), [
    ({"mode": "blue-green"}, "rollout.mode", "must be one of immediate, shadow, canary"),
    ({"mode": "canary"}, "rollout.canary_percent", "needs canary_percent > 0"),
    ({"min_agreement": 1.5}, "rollout.min_agreement", "between 0 and 1"),
    ({"min_requests": 2.5}, "rollout.min_requests", "an integer"),
    ({"shadow_max_share": True}, "rollout.shadow_max_share", "a number"),
    ({"mode": "shadow", "shadow_percent": 0}, "rollout.shadow_percent", "could never be decided"),
    ({"speed": "fast"}, "rollout.speed", "unknown key"),
])
def test_bad_rollout_tables_name_the_key(tmp_path: Path, table: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message) as raised:
        load_manifest(version_with(tmp_path, table))
    assert raised.value.key == key and raised.value.path == tmp_path / "model.toml"


def scores(compared: int = 500, agreement: float = 0.99, errors: int = 0, ratio: float | None = 1.0,
           labels_differ: bool = False) -> Scores:
    return Scores(compared, agreement, 1.0, 0.01, errors, ratio, labels_differ)


def test_the_decision_rule() -> None:
    spec = RolloutSpec(mode="shadow", min_requests=500, min_agreement=0.95)
    assert verdict(spec, scores(compared=499)) is None  # too few
    assert verdict(spec, scores())[0] is True  # type: ignore[index]
    promote, why = verdict(spec, scores(agreement=0.88))  # type: ignore[misc]
    assert promote is False and "agreement 0.880 < min_agreement 0.95" in why
    promote, why = verdict(spec, scores(errors=10))  # type: ignore[misc]
    assert promote is False and "error rate 0.0196 > max_error_rate 0.01" in why
    promote, why = verdict(spec, scores(ratio=1.6))  # type: ignore[misc]
    assert promote is False and "compute ratio 1.60 > max_compute_ratio 1.5" in why
    assert verdict(spec, scores(ratio=None))[0] is True  # type: ignore[index]
    assert verdict(RolloutSpec(mode="shadow", decision="manual"), scores()) is None
    assert verdict(spec, scores(labels_differ=True)) is None  # an operator decides
