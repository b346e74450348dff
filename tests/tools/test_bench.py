"""``python -m client bench`` against a real daemon serving the digits model (about a second per run)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from classifier.v1 import classifier_pb2 as pb

from client import bench
from client.__main__ import main as client_main
from tests.support.kit import REPO, DaemonThread, running_daemon

RUN = ["--warmup", "0.3", "--duration", "1", "--no-progress"]
TENSORS = ("--tensor", "8x8x1")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(REPO / "models" / "digits", root / "digits")
    with running_daemon(root, watch=False) as running:
        yield running


def run_cli(daemon: DaemonThread, capsys: pytest.CaptureFixture[str], *flags: str,
            payload: tuple[str, ...] = TENSORS) -> dict[str, Any]:
    assert client_main(["--target", daemon.target, "bench", *RUN, *payload, *flags, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_closed_loop_report_has_throughput_percentiles_and_batch_sizes(
    daemon: DaemonThread, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "report.json"
    assert client_main(["--target", daemon.target, "bench", *RUN, *TENSORS, "--concurrency", "4",
                        "--json", str(path)]) == 0
    table = capsys.readouterr().out
    assert "req/s" in table and "p99.9 ms" in table and "requests by batch size" in table
    report = json.loads(path.read_text(encoding="utf-8"))
    assert (report["rpc"], report["mode"], report["target"]) == ("Classify", "closed loop", daemon.target)
    assert report["payload"]["count"] == 16 and "8x8x1" in report["payload"]["description"]
    assert report["client"]["cores"] >= 1 and report["date"] and report["command"]
    (level,) = report["levels"]
    assert level["concurrency"] == 4 and level["rate"] is None and level["window_s"] == 1.0
    assert level["requests"] > 0 and level["throughput"] == pytest.approx(level["requests"] / 1.0)
    latency = level["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"] <= latency["max"]
    assert level["errors"] == {}
    assert sum(level["batch_sizes"].values()) == level["requests"]
    assert all(1 <= int(size) <= 4 for size in level["batch_sizes"])  # 4 in flight: a batch holds at most 4
    assert 1.0 <= level["mean_batch_size"] <= 4.0
    assert level["versions"] == {"1": level["requests"]}
    assert set(level["server_mean_us"]) == {"preprocess", "queue", "compute"}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_errors_are_counted_by_status_code(daemon: DaemonThread, capsys: pytest.CaptureFixture[str],
                                           stream: bool) -> None:
    report = run_cli(daemon, capsys, "--model", "no-such-model", "--concurrency", "2",
                     *(["--stream"] if stream else []))
    (level,) = report["levels"]
    assert report["rpc"] == ("ClassifyStream" if stream else "Classify")
    assert level["requests"] == 0 and level["throughput"] == 0.0
    assert set(level["errors"]) == {"NOT_FOUND"} and level["errors"]["NOT_FOUND"] > 0
    assert "unknown model 'no-such-model'" in level["error_examples"]["NOT_FOUND"]
    assert level["latency_ms"]["p50"] is None


def test_sweep_over_a_stream(daemon: DaemonThread, capsys: pytest.CaptureFixture[str]) -> None:
    report = run_cli(daemon, capsys, "--concurrency", "1,3", "--stream")
    assert [level["concurrency"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["requests"] > 0 and level["errors"] == {}
        assert all(int(size) <= level["concurrency"] for size in level["batch_sizes"])


def test_open_loop_sends_at_most_its_schedule(daemon: DaemonThread, capsys: pytest.CaptureFixture[str]) -> None:
    report = run_cli(daemon, capsys, "--rate", "40", payload=("--generate", "32x24"))
    (level,) = report["levels"]
    assert report["mode"] == "open loop" and level["rate"] == 40.0 and level["concurrency"] is None
    assert "32x24 JPEGs" in report["payload"]["description"]
    assert 0 < level["requests"] <= 40 * 1.3 + 1  # scheduled sends over warm-up and window bound completions
    assert level["errors"] == {}


def test_several_client_processes_merge_their_samples(daemon: DaemonThread,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    report = run_cli(daemon, capsys, "--concurrency", "2", "--processes", "2")
    (level,) = report["levels"]
    assert report["options"]["processes"] == 2
    assert level["requests"] > 0 and level["errors"] == {}
    assert all(int(size) <= 2 for size in level["batch_sizes"])


def test_bad_flags_are_refused(daemon: DaemonThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert client_main(["--target", daemon.target, "bench", "--concurrency", "0"]) == 2
    assert client_main(["--target", daemon.target, "bench", "--tensor", "8x8"]) == 2
    assert "error:" in capsys.readouterr().err


def test_load_is_split_over_processes_without_losing_any() -> None:
    shares = bench.split("concurrency", 7, 3)
    assert [s.amount for s in shares] == [3, 2, 2] and [s.index for s in shares] == [0, 1, 2]
    assert [s.amount for s in bench.split("concurrency", 1, 4)] == [1]
    assert sum(s.amount for s in bench.split("rate", 90.0, 4)) == pytest.approx(90.0)


def test_request_id_appended_to_serialised_bytes_is_one_message() -> None:
    serialised = pb.ClassifyRequest(model="digits", top_k=1, image=b"\xff\xd8").SerializeToString()
    merged = pb.ClassifyRequest.FromString(serialised + b"\x32\x02" + b"1f")
    assert (merged.model, merged.top_k, merged.image, merged.request_id) == ("digits", 1, b"\xff\xd8", "1f")
