"""A version's model.toml merged over its model's, key by key; and the comparison of two versions' preprocessing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from server.core.input_changes import PreprocessingChanged, check_preprocessing, input_changes
from server.core.layering import merge_layers
from server.core.manifest import InputSpec, ManifestError, load_manifest, parse_manifest

MODEL = '''architecture = "timm:resnet18"
top_k = 2

[model_args]
drop_rate = 0.1

[input]
size = 64
interpolation = "bicubic"

[batching]
max_batch_size = 8
'''


def model_dir(tmp_path: Path, model: str | None = MODEL, version: str | None = None) -> Path:
    version_dir = tmp_path / "m" / "1"
    version_dir.mkdir(parents=True)
    (tmp_path / "m" / "labels.txt").write_text("a\nb\nc\n", encoding="utf-8")
    if model is not None:
        (tmp_path / "m" / "model.toml").write_text(model, encoding="utf-8")
    if version is not None:
        (version_dir / "model.toml").write_text(version, encoding="utf-8")
    return version_dir


def test_a_version_manifest_overrides_the_model_keys_it_sets_and_keeps_the_others(tmp_path: Path) -> None:
    version_dir = model_dir(tmp_path, version='top_k = 3\n[input]\nmean = [0.5, 0.5, 0.5]\n')
    manifest = load_manifest(version_dir)
    assert manifest.architecture == "timm:resnet18" and manifest.top_k == 3
    assert manifest.model_args == {"drop_rate": 0.1}
    assert (manifest.input.height, manifest.input.interpolation) == (64, "bicubic")  # [input] merged key by key
    assert manifest.input.mean == (0.5, 0.5, 0.5)
    assert manifest.input.explicit == {"size", "interpolation", "mean"}
    assert manifest.batching.max_batch_size == 8
    assert manifest.path == version_dir / "model.toml"
    assert manifest.origins["architecture"] == tmp_path / "m" / "model.toml"
    assert manifest.origins["input.mean"] == version_dir / "model.toml"
    assert manifest.origins["input.size"] == tmp_path / "m" / "model.toml"


def test_a_version_that_changes_the_architecture_does_not_inherit_the_model_args(tmp_path: Path) -> None:
    version_dir = model_dir(tmp_path, version='architecture = "torchscript"\n')
    manifest = load_manifest(version_dir)
    assert manifest.architecture == "torchscript" and manifest.model_args == {}
    assert manifest.input.interpolation == "bicubic"  # the model's [input] still applies
    same = model_dir(tmp_path / "same", version='architecture = "timm:resnet18"\n')
    assert load_manifest(same).model_args == {"drop_rate": 0.1}


def test_either_layer_alone_is_the_manifest(tmp_path: Path) -> None:
    only_version = model_dir(tmp_path, model=None, version='architecture = "classifyd:small_cnn"\n')
    assert load_manifest(only_version).architecture == "classifyd:small_cnn"
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(model_dir(tmp_path / "none", model=None))


def test_an_error_names_the_file_that_set_the_key_and_the_layering(tmp_path: Path) -> None:
    version_dir = model_dir(tmp_path, version='[batching]\nautotune = true\n')
    with pytest.raises(ManifestError) as caught:
        load_manifest(version_dir)
    message = str(caught.value)
    assert message.startswith(f"{version_dir / 'model.toml'}: key 'batching.autotune'")
    assert f"merged over {tmp_path / 'm' / 'model.toml'}, key by key" in message
    bad_model = model_dir(tmp_path / "b", model=MODEL.replace("top_k = 2", "top_k = 9"), version="")
    with pytest.raises(ManifestError) as caught:
        load_manifest(bad_model)
    assert str(caught.value).startswith(f"{tmp_path / 'b' / 'm' / 'model.toml'}: key 'top_k'")


def test_preprocessing_changed_is_a_version_s_own_acknowledgement(tmp_path: Path) -> None:
    version_dir = model_dir(tmp_path, version="preprocessing_changed = true\n")
    assert load_manifest(version_dir).preprocessing_changed is True
    assert load_manifest(model_dir(tmp_path / "x")).preprocessing_changed is False
    shared = model_dir(tmp_path / "s", model="preprocessing_changed = true\n" + MODEL)
    with pytest.raises(ManifestError, match="key 'preprocessing_changed': acknowledges one version's"):
        load_manifest(shared)
    with pytest.raises(ManifestError, match="must be of type bool"):
        load_manifest(model_dir(tmp_path / "t", version='preprocessing_changed = "yes"\n'))


def test_merge_layers_replaces_values_and_merges_tables() -> None:
    model, version = Path("m/model.toml"), Path("m/1/model.toml")
    merged, origins = merge_layers([(model, {"a": 1, "t": {"x": 1, "y": 2}, "l": [1, 2]}),
                                    (version, {"t": {"y": 3}, "l": [3]})])
    assert merged == {"a": 1, "t": {"x": 1, "y": 3}, "l": [3]}
    assert (origins["a"], origins["t.x"], origins["t.y"], origins["l"]) == (model, model, version, version)


def spec(**changes: object) -> InputSpec:
    return dataclasses.replace(InputSpec(), **changes)


def test_input_changes_spell_out_each_difference() -> None:
    timm = spec(resize=248, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert input_changes(timm, timm) == []
    assert input_changes(timm, InputSpec()) == [
        "resize 248 → 256", "interpolation bicubic → bilinear", "mean [0.5, 0.5, 0.5] → [0.485, 0.456, 0.406]",
        "std [0.5, 0.5, 0.5] → [0.229, 0.224, 0.225]"]
    assert input_changes(InputSpec(), spec(height=240, width=320)) == ["size 224x224 → 240x320"]
    assert input_changes(spec(color="L", mean=(0.5,), std=(0.5,)), spec(color="RGB")) == [
        "color L → RGB", "mean [0.5] → [0.485, 0.456, 0.406]", "std [0.5] → [0.229, 0.224, 0.225]"]
    uncropped = spec(crop="none")
    assert input_changes(uncropped, dataclasses.replace(uncropped, resize=300)) == []  # resize unused there


def test_check_preprocessing_refuses_unless_acknowledged() -> None:
    old = parse_manifest({"architecture": "x"}, Path("m/1/model.toml"), ("a", "b"))
    new = parse_manifest({"architecture": "x", "input": {"interpolation": "bicubic"}}, Path("m/2/model.toml"),
                         ("a", "b"))
    assert check_preprocessing(1, old, old) == []
    with pytest.raises(PreprocessingChanged) as caught:
        check_preprocessing(1, old, new)
    assert str(caught.value) == ("preprocessing differs from serving version 1: interpolation bilinear → bicubic; "
                                 "set preprocessing_changed = true in the new version's own model.toml if this is "
                                 "intended")
    acknowledged = dataclasses.replace(new, preprocessing_changed=True)
    assert check_preprocessing(1, old, acknowledged) == ["interpolation bilinear → bicubic"]
