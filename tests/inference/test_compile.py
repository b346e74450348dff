"""``compile`` / ``compile_batch_sizes``: manifest keys, the bucketed wrapper, and one real compiled daemon.

The wrapper's bucket choice, padding, slicing and chunking run on an eager stand-in for torch.compile (fast).
One test loads a tiny model with ``compile = "default"`` into a real daemon and compares its answers with the
same weights served eagerly; it compiles a single bucket because inductor needs 10-30 s per bucket on the
2-core development machine (gcc builds every kernel).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from torch import nn

from client import tensor_request
from server.core.manifest import ManifestError, parse_manifest
from server.inference.compiled import BucketedModule, default_batch_sizes, warm_up_sizes
from server.inference.runtime import LoadedVersion, WarmUpError
from tests.support.kit import running_daemon, write_model

pytestmark = pytest.mark.timeout(180)

LABELS = ("a", "b", "c", "d")


def parse(**keys: Any) -> Any:
    return parse_manifest({"architecture": "classifyd:small_cnn", **keys}, Path("model.toml"), LABELS)


# ----- manifest


def test_compile_is_off_by_default_and_takes_the_torch_compile_modes() -> None:
    assert (parse().compile, parse().compile_batch_sizes) == ("off", ())
    for mode in ("default", "reduce-overhead", "max-autotune"):
        assert parse(compile=mode).compile == mode
    assert parse(compile="default", compile_batch_sizes=[1, 4, 16]).compile_batch_sizes == (1, 4, 16)


@pytest.mark.parametrize(("keys", "key", "message"), [
    ({"compile": "fast"}, "compile", "must be one of off, default, reduce-overhead, max-autotune"),
    ({"compile": True}, "compile", "must be one of"),
    ({"compile": "default", "compile_batch_sizes": [4, 2]}, "compile_batch_sizes", "strictly increasing"),
    ({"compile": "default", "compile_batch_sizes": [2, 2]}, "compile_batch_sizes", "strictly increasing"),
    ({"compile": "default", "compile_batch_sizes": [0, 2]}, "compile_batch_sizes", "positive integers"),
    ({"compile": "default", "compile_batch_sizes": [1, 2.5]}, "compile_batch_sizes", "positive integers"),
    ({"compile": "default", "compile_batch_sizes": [True]}, "compile_batch_sizes", "positive integers"),
    ({"compile": "default", "compile_batch_sizes": []}, "compile_batch_sizes", "non-empty"),
    ({"compile": "default", "compile_batch_sizes": 8}, "compile_batch_sizes", "must be of type list"),
    ({"compile_batch_sizes": [1, 2]}, "compile_batch_sizes", 'only when compile is not "off"'),
])
def test_bad_compile_keys_are_rejected_naming_the_key(keys: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message) as caught:
        parse(**keys)
    assert caught.value.key == key


# ----- the wrapper, on an eager stand-in for torch.compile


class RowModel(nn.Module):
    """Output row i is (sum of input i, batch size seen): padding and slicing mistakes show in the answer."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, bool]] = []  # (batch size, channels-last) of every call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        self.seen.append((x.shape[0], channels_last))
        sums = x.flatten(1).sum(dim=1)
        return torch.stack([sums, torch.full_like(sums, x.shape[0])], dim=1)


class EagerCompiler:
    """Records what torch.compile would have been asked for and returns the function unchanged."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_with = fail_with

    def __call__(self, fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        self.calls.append((fn.__code__.co_name, options))
        if self.fail_with is None:
            return fn

        def failing(*args: Any) -> Any:
            raise self.fail_with

        return failing


def batch(count: int, channels_last: bool = False) -> torch.Tensor:
    x = torch.arange(count * 3 * 2 * 2, dtype=torch.float32).reshape(count, 3, 2, 2) + 1
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def test_default_buckets_are_powers_of_two_and_the_cap() -> None:
    assert default_batch_sizes(1) == (1,)
    assert default_batch_sizes(8) == (1, 2, 4, 8)
    assert default_batch_sizes(12) == (1, 2, 4, 8, 12)
    wrapper = BucketedModule(RowModel(), compiler=EagerCompiler())
    assert wrapper.sizes_up_to(12) == (1, 2, 4, 8, 12)
    assert [wrapper.bucket_for(n) for n in (1, 3, 5, 9, 12, 13)] == [1, 4, 8, 12, 12, 12]


def test_explicit_buckets_warm_only_what_batches_up_to_the_cap_use() -> None:
    wrapper = BucketedModule(RowModel(), batch_sizes=[2, 8, 32], compiler=EagerCompiler())
    assert wrapper.sizes_up_to(8) == (2, 8)
    assert wrapper.sizes_up_to(5) == (2, 8)  # 5 pads to 8; 32 is never reached
    assert wrapper.sizes_up_to(64) == (2, 8, 32)  # 64 runs as chunks of 32


def test_batches_are_padded_to_their_bucket_and_sliced_back() -> None:
    model, compiler = RowModel(), EagerCompiler()
    wrapper = BucketedModule(model, "max-autotune", [2, 4], compiler=compiler)
    for count in (1, 2, 3, 4):
        x = batch(count)
        out = wrapper(x)
        assert out.shape == (count, 2)
        assert torch.equal(out[:, 0], x.flatten(1).sum(dim=1))  # each real row answers its own input
        assert set(out[:, 1].tolist()) == {wrapper.bucket_for(count)}  # the model saw the padded bucket
    assert [size for size, _ in model.seen] == [2, 2, 4, 4]
    # one compiled function per bucket, each with its own code object (its own dynamo cache)
    assert compiler.calls == [("classifyd_bucket_2", {"mode": "max-autotune", "dynamic": False}),
                              ("classifyd_bucket_4", {"mode": "max-autotune", "dynamic": False})]


def test_padding_is_zeros_and_keeps_dtype_device_and_channels_last() -> None:
    seen: list[torch.Tensor] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.clone(memory_format=torch.preserve_format))
            return x.flatten(1)[:, :2]

    wrapper = BucketedModule(Spy(), batch_sizes=[4], compiler=EagerCompiler())
    x = batch(3, channels_last=True).to(torch.float64)
    wrapper(x)
    (padded,) = seen
    assert padded.dtype == torch.float64 and padded.device == x.device
    assert padded.is_contiguous(memory_format=torch.channels_last) and not padded.is_contiguous()
    assert torch.equal(padded[:3], x) and not padded[3].any()


def test_batches_larger_than_the_largest_bucket_run_in_chunks() -> None:
    model = RowModel()
    wrapper = BucketedModule(model, batch_sizes=[1, 4], compiler=EagerCompiler())
    x = batch(10, channels_last=True)
    out = wrapper(x)
    assert torch.equal(out[:, 0], x.flatten(1).sum(dim=1))
    assert model.seen == [(4, True), (4, True), (4, True)]  # 4 + 4 + 2 padded to 4, layout kept


def test_outputs_are_copies_not_views_of_the_compiled_graphs_buffers() -> None:
    buffer = torch.zeros(2, 2)

    class StaticOutput(nn.Module):  # like a CUDA graph replay: the same output buffer every time
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            buffer.copy_(x.flatten(1)[:, :2])
            return buffer

    wrapper = BucketedModule(StaticOutput(), batch_sizes=[2], compiler=EagerCompiler())
    first = wrapper(batch(1))
    expected = first.clone()
    wrapper(batch(2) * 100)
    assert torch.equal(first, expected)


def loaded(module: nn.Module, max_batch_size: int) -> LoadedVersion:
    manifest = parse(input={"color": "RGB", "size": 2, "resize": 2}, compile="default")
    return LoadedVersion(name="m", version=1, manifest=manifest, module=module, device=torch.device("cpu"),
                         max_batch_size=max_batch_size, max_delay_ms=0.0)


class Logits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, len(LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def test_warm_up_runs_every_bucket_up_to_the_cap_once() -> None:
    compiler = EagerCompiler()
    wrapper = BucketedModule(Logits(), compiler=compiler)
    assert warm_up_sizes(wrapper, 6) == [1, 2, 4, 6]
    assert warm_up_sizes(Logits(), 6) == [6]  # not compiled: one batch of the cap, as before
    loaded(wrapper, 6).warm_up()
    assert [name for name, _ in compiler.calls] == [f"classifyd_bucket_{n}" for n in (1, 2, 4, 6)]


def test_a_failed_compile_fails_the_warm_up_with_a_clear_message() -> None:
    failure = RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore details")
    wrapper = BucketedModule(Logits(), batch_sizes=[2], compiler=EagerCompiler(fail_with=failure))
    with pytest.raises(WarmUpError, match=r"warm-up on a batch of 2 .* CompileError: torch.compile \(mode "
                                          r"'default'\) failed at batch size 2: RuntimeError: InvalidCxxCompiler: "
                                          r"No working C\+\+ compiler found$"):
        loaded(wrapper, 2).warm_up()


def test_out_of_memory_is_not_reported_as_a_compile_failure() -> None:
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory")
    wrapper = BucketedModule(Logits(), batch_sizes=[2], compiler=EagerCompiler(fail_with=oom))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        wrapper(batch(2))


def test_bad_wrapper_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="compile mode"):
        BucketedModule(Logits(), "off")
    with pytest.raises(ValueError, match="strictly increasing"):
        BucketedModule(Logits(), batch_sizes=[4, 2])


# ----- one real compile, in a real daemon


@pytest.mark.slow
def test_a_compiled_model_answers_like_the_same_weights_in_eager_mode(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Buckets [2] with max_batch_size 3: a lone request pads 1 → 2, a batch of 3 runs as 2 + (1 → 2).

    One graph only (see the module docstring for why); serving must not compile again."""
    base = {"model_args": {"width": 8}, "input": {"color": "RGB", "size": 8, "resize": 8}}
    batching = {"max_batch_size": 3, "max_delay_ms": 500}
    write_model(tmp_path, "eager", manifest={**base, "batching": batching}, seed=3)
    write_model(tmp_path, "compiled", manifest={**base, "batching": batching, "compile": "default",
                                                "compile_batch_sizes": [2], "channels_last": True}, seed=3)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(5)]
    with running_daemon(tmp_path, watch=False, http_port=0) as daemon, \
            grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.daemon.http_port}/v1/models", timeout=10) as reply:
            described = {m["name"]: m for m in json.load(reply)["models"]}
        assert (described["compiled"]["compile"], described["eager"]["compile"]) == ("default", "off")
        version = daemon.daemon.manager.resolve("compiled")
        assert isinstance(version.module, BucketedModule)
        # compiled at load, on the inference thread with the daemon's torch thread count (not the loader's 1)
        assert version.module.compiled_threads == {2: torch.get_num_threads()}
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # serving must not compile
        answers = {}
        for model in ("eager", "compiled"):
            lone = stub.Classify(tensor_request(images[0], model=model, top_k=4), timeout=30)
            together = list(stub.ClassifyStream(iter([tensor_request(image, model=model, top_k=4, request_id=str(i))
                                                      for i, image in enumerate(images)]), timeout=60))
            answers[model] = [lone, *sorted(together, key=lambda r: int(r.request_id))]
        assert answers["compiled"][0].batch_size == 1
        assert max(r.batch_size for r in answers["compiled"]) == 3  # 5 requests in 500 ms: a batch of 3 (chunked)
        for eager, compiled in zip(answers["eager"], answers["compiled"], strict=True):
            assert compiled.predictions[0].index == eager.predictions[0].index
            assert ({p.index: p.score for p in compiled.predictions}
                    == pytest.approx({p.index: p.score for p in eager.predictions}, abs=1e-4))
        assert set(version.module.compiled_threads) == {2}
