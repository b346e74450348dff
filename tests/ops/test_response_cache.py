"""The response cache on its own: the key rule, LRU eviction by bytes, versions freed, the figures."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from server.core.manifest import ManifestError, parse_manifest
from server.core.types import ClassifyResult, Prediction, RawTensor
from server.ops.response_cache import ResponseCache, entry_bytes


class Version:
    """Stands for a loaded version object: the cache only needs its identity."""


def result(label: str = "cat", version: int = 1) -> ClassifyResult:
    return ClassifyResult([Prediction(0, label, 0.9)], "m", version, batch_size=3, queue_s=0.1, compute_s=0.2,
                          preprocess_s=0.3)


def key(cache: ResponseCache, version: object, payload: bytes | RawTensor = b"image", *, top_k: int = 1,
        lang: str = "", return_tiles: bool = False) -> bytes:
    return cache.key(version, payload, top_k=top_k, lang=lang, return_tiles=return_tiles)


def test_a_stored_answer_comes_back_marked_as_a_hit_with_zero_timings() -> None:
    cache, version = ResponseCache(1 << 20), Version()
    k = key(cache, version)
    assert cache.get("m", k) is None
    cache.put(k, version, result())
    hit = cache.get("m", k)
    assert hit is not None and hit.cache_hit
    assert (hit.predictions, hit.batch_size) == ([Prediction(0, "cat", 0.9)], 3)
    assert (hit.queue_s, hit.compute_s, hit.preprocess_s) == (0.0, 0.0, 0.0)
    stats = cache.stats()
    assert (stats.models["m"].hits, stats.models["m"].misses, stats.hit_rate("m")) == (1, 1, 0.5)
    assert stats.entries == 1 and stats.bytes == entry_bytes(result())


def test_every_option_that_changes_the_answer_changes_the_key() -> None:
    cache, version = ResponseCache(1 << 20), Version()
    base = key(cache, version)
    assert key(cache, version) == base  # deterministic within the process
    variants = [key(cache, Version()), key(cache, version, b"imagf"), key(cache, version, top_k=2),
                key(cache, version, lang="zh"), key(cache, version, return_tiles=True)]
    assert len({base, *variants}) == 1 + len(variants)


class _Runtime:
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_runtime_switch_of_the_same_version_object_changes_the_key() -> None:
    """runtime = "auto" swaps the runtime on the same LoadedVersion (runtime_choice._swap): the torch answers
    stored before the switch must not answer for ONNX Runtime."""
    cache, version = ResponseCache(1 << 20), Version()
    version.runtime = _Runtime("torch")  # type: ignore[attr-defined]
    before = key(cache, version)
    cache.put(before, version, result())
    version.runtime = _Runtime("onnxruntime")  # type: ignore[attr-defined]
    after = key(cache, version)
    assert after != before and cache.get("m", after) is None


def test_crafted_look_alike_payloads_do_not_collide() -> None:
    cache, version = ResponseCache(1 << 20), Version()
    data = bytes(range(24))
    keys = {
        key(cache, version, data),  # an encoded image with the tensor's bytes
        key(cache, version, RawTensor("uint8", (4, 6), data)),
        key(cache, version, RawTensor("uint8", (6, 4), data)),  # same buffer, another shape
        key(cache, version, RawTensor("uint8", (2, 3, 4), data)),
        key(cache, version, RawTensor("float32", (2, 3), data)),  # same bytes read as floats
        # the lang field cannot absorb bytes moved out of the payload: every field is length-prefixed
        key(cache, version, data[:-2], lang=data[-2:].decode()),
    }
    assert len(keys) == 6


def test_the_key_depends_on_a_per_process_secret() -> None:
    version = Version()
    assert key(ResponseCache(1 << 20, secret=b"a" * 32), version) != key(ResponseCache(1 << 20, secret=b"b" * 32),
                                                                         version)
    assert key(ResponseCache(1 << 20), version) != key(ResponseCache(1 << 20), version)  # random by default


def test_least_recently_used_answers_go_first_to_stay_within_the_budget() -> None:
    size = entry_bytes(result())
    cache, version = ResponseCache(3 * size), Version()
    keys = [key(cache, version, f"image {n}".encode()) for n in range(4)]
    for k in keys[:3]:
        cache.put(k, version, result())
    assert cache.get("m", keys[0]) is not None  # 0 is now the most recently used; 1 the least
    cache.put(keys[3], version, result())
    assert cache.get("m", keys[1]) is None
    assert all(cache.get("m", k) is not None for k in (keys[0], keys[2], keys[3]))
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (3, 3 * size, 1)
    assert stats.bytes <= stats.budget_bytes


def test_an_answer_larger_than_the_budget_is_not_stored() -> None:
    cache, version = ResponseCache(100), Version()
    k = key(cache, version)
    cache.put(k, version, result("x" * 200))
    assert cache.get("m", k) is None and cache.stats().bytes == 0


def test_a_freed_version_gives_its_bytes_back_and_its_serial_is_never_reused() -> None:
    cache = ResponseCache(1 << 20)
    old, other = Version(), Version()
    old_serial = cache.serial(old)
    cache.put(key(cache, old), old, result())
    cache.put(key(cache, other), other, result())
    del old
    gc.collect()
    stats = cache.stats()
    assert (stats.entries, stats.bytes) == (1, entry_bytes(result()))
    assert cache.serial(Version()) > max(old_serial, cache.serial(other))


@pytest.mark.parametrize("budget, enabled, active", [(1 << 20, True, True), (1 << 20, False, False),
                                                     (0, False, False), (0, True, False)])
def test_active_only_for_enabled_models_with_a_budget(budget: int, enabled: bool, active: bool,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    cache = ResponseCache(budget)
    assert cache.active_for("m", enabled) is active
    cache.active_for("m", enabled)
    warnings = [r for r in caplog.records if "--cache-bytes is 0" in r.getMessage()]
    assert len(warnings) == (1 if enabled and not budget else 0)  # once per model


@pytest.mark.parametrize("table, key, words", [
    ({"enabled": "yes"}, "cache.enabled", "must be true or false, got 'yes'"),
    ({"enabled": True, "bytes": 10}, "cache.bytes", "unknown key (known: enabled)"),
])
def test_manifest_cache_table_is_validated(table: dict[str, object], key: str, words: str, tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as refused:
        parse_manifest({"architecture": "classifyd:small_cnn", "cache": table}, tmp_path / "model.toml", ("a", "b"))
    assert refused.value.key == key and words in str(refused.value)


def test_manifest_cache_is_off_unless_enabled(tmp_path: Path) -> None:
    labels = ("a", "b")
    assert not parse_manifest({"architecture": "x"}, tmp_path / "model.toml", labels).cache.enabled
    assert parse_manifest({"architecture": "x", "cache": {"enabled": True}}, tmp_path / "model.toml",
                          labels).cache.enabled
    with pytest.raises(ManifestError, match="must be a table"):
        parse_manifest({"architecture": "x", "cache": True}, tmp_path / "model.toml", labels)
