"""The pre-processing benchmarks of issue 16 item 7 at their smallest, so they cannot rot unnoticed."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import pixel_pipeline, preprocess_stages

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def test_preprocess_stages_times_both_paths_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    preprocess_stages.main(["--rounds", "1", "--photos", "1", "--no-parity", "--sizes", "640x480"])
    out = capsys.readouterr().out
    assert "| 640x480 | resize + crop + to-array |" in out and "| 640x480 | preprocess() |" in out


@pytest.mark.slow  # exports mobilenet_v3_small
def test_pixel_pipeline_measures_every_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    markdown = tmp_path / "bench.md"
    code = pixel_pipeline.main(["--models", "mobilenet_v3_small", "--batch-sizes", "2", "--seconds", "0.01",
                                "--photos", "2", "--cache-dir", str(tmp_path / "cache"), "--markdown", str(markdown)])
    assert code == 0
    rows = [line for line in markdown.read_text(encoding="utf-8").splitlines() if line.startswith("| mobilenet")]
    assert [row.split(" | ")[1:3] for row in rows] == [["pipeline", "2"], ["forward", "2"]]
    assert all(float(cell) > 0 for row in rows for cell in row.strip("| ").split(" | ")[3:7])
