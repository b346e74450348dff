"""The benchmark scripts end to end, at their smallest, so they cannot rot unnoticed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import abuse, cache_bench, cpu_bench, gil_contention, loop_work, runtime_bench, swap_bench
from benchmarks.support import manifest_text


@pytest.mark.slow
@pytest.mark.process
def test_swap_bench_publishes_a_version_under_load_without_failed_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "swap.json"
    markdown = tmp_path / "bench.md"
    code = swap_bench.main(["--model", "digits", "--versions", "1", "--concurrency", "2", "--warmup", "0.3",
                            "--steady", "0.7", "--interval", "0.2", "--settle-seconds", "0.3", "--json", str(out),
                            "--markdown", str(markdown)])
    assert code == 0
    record = json.loads(out.read_text(encoding="utf-8"))
    assert record["failures"] == {}
    assert [s["version"] for s in record["swaps"]] == [2]
    for swap in record["swaps"]:
        # publish < LOADING (after the settle period) <= READY <= old version UNLOADED
        assert swap["published"] + 0.3 <= swap["loading"] <= swap["ready"] <= swap["unloaded"]
        assert swap["first_response"] is not None and swap["first_response"] >= swap["published"]
    assert record["windows"]["steady"]["requests"] > 0
    text = markdown.read_text(encoding="utf-8")
    assert "| steady |" in text and "| during swaps |" in text and "Failed requests over the whole run: 0" in text
    assert "publish → ready" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.process
def test_cpu_bench_at_its_smallest_runs_the_model_as_the_manifest_settings_say(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cpu.json"
    code = cpu_bench.main(["--models", "mobilenet_v3_small", "--payloads", "2", "--size", "64x48",
                           "--batch-sizes", "1,2", "--inproc-seconds", "0.2", "--inproc-warmup", "0.1",
                           "--concurrency", "2", "--setups", "batching", "--warmup", "0.2", "--duration", "0.5",
                           "--manifest", "channels_last=true", "--manifest", "input.resize=64",
                           "--manifest", "input.size=[56, 56]", "--json", str(out)])
    assert code == 0
    record = json.loads(out.read_text(encoding="utf-8"))
    (model,) = record["models"]
    assert set(model["in_process"]["pipeline"]) == {"1", "2"}
    (level,) = model["daemon"]["batching"]
    assert level["requests"] > 0 and level["errors"] == {}
    # runtime auto: the in-process limit ran on the runtime the job chose, the daemon was measured after its choice
    assert model["runtime"] in ("torch", "onnxruntime") and level["runtime"] in ("torch", "onnxruntime")
    assert (model["eager_limit"] is None) == (model["runtime"] == "torch")
    assert "mobilenet_v3_small" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.process
def test_runtime_bench_quick_measures_every_runtime_against_eager(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    markdown = tmp_path / "bench.md"
    code = runtime_bench.main(["--quick", "--models", "mobilenet_v3_small", "--runtimes", "eager,onnxruntime",
                               "--markdown", str(markdown)])
    assert code == 0
    text = markdown.read_text(encoding="utf-8")
    assert "| mobilenet_v3_small | 1 |" in text and "| mobilenet_v3_small | 2 |" in text
    assert "| mobilenet_v3_small | eager |" in text and "| 1.00 | 1.00 |" in text
    assert "| mobilenet_v3_small | onnxruntime |" in text
    assert "best vs eager" in capsys.readouterr().out


def test_manifest_settings_from_the_command_line_parse_as_toml_values() -> None:
    assert cpu_bench.manifest_tables(['precision="bf16"', "channels_last=true", "input.decode=device",
                                      "input.size=[56, 56]", "batching.max_batch_size=8"]) == {
        "top": {"precision": "bf16", "channels_last": True},
        "input_table": {"decode": "device", "size": [56, 56]},
        "batching": {"max_batch_size": 8},
    }
    # a key of a table the benchmark cannot write is refused, not written as a top-level key of the same name
    with pytest.raises(SystemExit):
        cpu_bench.parse_args(["--manifest", 'rollout.mode="shadow"'])
    written = manifest_text("torchvision:resnet18", **cpu_bench.manifest_tables(["batching.max_batch_size=8"]))
    assert "[batching]\nmax_batch_size = 8" in written


@pytest.mark.slow
@pytest.mark.process
def test_abuse_bench_refuses_two_attacks_and_the_good_client_keeps_being_answered(
    capsys: pytest.CaptureFixture[str]
) -> None:
    code = abuse.main(["--seconds-per-attack", "0.3", "--only", "REST shape wraps int64", "JSON nested 1000 deep"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| REST") or line.startswith("| JSON")]
    assert len(rows) == 2 and all("HTTP 400" in row and "0 failed" in row and row.endswith("| yes |") for row in rows)
    assert "2 attacks; daemon alive at the end: True" in out


@pytest.mark.slow
@pytest.mark.process
def test_cache_bench_at_its_smallest_answers_the_repeats_from_the_cache(capsys: pytest.CaptureFixture[str]) -> None:
    assert cache_bench.main(["--model", "digits", "--size", "64x48", "--requests", "3", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 1 |" in out and "median ratio" in out  # it raises if a repeat was not a hit


@pytest.mark.slow
def test_gil_contention_times_both_forwards_and_restores_the_process_settings(tmp_path: Path) -> None:
    import torch

    before, threads = sys.getswitchinterval(), torch.get_num_threads()
    markdown = tmp_path / "gil.md"
    assert gil_contention.main(["--batch", "1", "--seconds", "0.05", "--rounds", "1", "--intervals", "0.001",
                                "--markdown", str(markdown)]) == 0
    text = markdown.read_text(encoding="utf-8")
    assert "| 1 | eager |" in text and "| 1 | torchscript |" in text
    assert sys.getswitchinterval() == before
    assert torch.get_num_threads() == threads


@pytest.mark.slow
def test_loop_work_files_the_loops_callbacks_per_request_and_sees_the_daemons_settled_heap(tmp_path: Path) -> None:
    markdown = tmp_path / "loop.md"
    assert loop_work.main(["--start-s", "1", "--warmup-s", "1", "--seconds", "1.5", "--concurrency", "4",
                           "--max-batch-size", "4", "--markdown", str(markdown)]) == 0
    text = markdown.read_text(encoding="utf-8")
    per_request = {row.split(" | ")[0].lstrip("| "): float(row.split(" | ")[1])
                   for row in text.splitlines() if row.startswith("| task _handle_exceptions until")}
    assert per_request["task _handle_exceptions until done"] == 1.0  # the requests are counted by this row
    # requests under way at the window's edges count in one row and not the other
    assert abs(per_request["task _handle_exceptions until the request is read (the first step: grpc, the "
                           "interceptors)"] - 1.0) <= 0.1
    # two awaits in classifyd's code per request: preprocessing, then the batch
    assert 1.5 < per_request["task _handle_exceptions until an await in the handler (classifyd: preprocessing, "
                             "the batch)"] < 2.5
    frozen = int(text.split("objects frozen out of the collector: ")[1].split()[0])
    assert frozen > 10_000  # python -m server settled its heap after the initial load (server/ops/heap.py)
