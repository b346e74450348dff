"""Turning tracing on and off: ``--otlp-endpoint`` and the standard ``OTEL_*`` variables (server/ops/tracing.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks import tracing_bench
from server.ops import tracing


@pytest.fixture(autouse=True)
def off_afterwards() -> Iterator[None]:
    yield
    tracing.shutdown()


@pytest.mark.parametrize(("endpoint", "environ", "wanted"), [
    (None, {}, False),
    ("http://127.0.0.1:4317", {}, True),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
    (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
    (None, {"OTEL_TRACES_EXPORTER": "console"}, True),
    (None, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),
    ("http://127.0.0.1:4317", {"OTEL_SDK_DISABLED": "true"}, False),
])
def test_tracing_is_on_only_when_asked_for(endpoint: str | None, environ: dict[str, str], wanted: bool) -> None:
    assert tracing.wanted(endpoint, environ) is wanted


def test_off_by_default_and_every_entry_point_is_a_no_op() -> None:
    assert tracing.configure(None, {}) is False
    assert not tracing.enabled()
    assert tracing.start_request("classify", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) is None
    assert tracing.item_trace() is None
    with tracing.stage("classifyd.preprocess") as inside:
        assert inside is None


def test_console_exporter_names_the_service_classifyd_unless_otel_service_name_says(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert tracing.configure(None, {"OTEL_TRACES_EXPORTER": "console"}) is True
    span = tracing.start_request("POST /v1/classify", {})
    assert span is not None and span.is_recording()
    assert span.resource.attributes["service.name"] == "classifyd"  # type: ignore[attr-defined]
    span.end()
    tracing.shutdown()  # flushes the batch to stdout
    assert not tracing.enabled()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "classifyd-eu")
    tracing.configure(None, {"OTEL_TRACES_EXPORTER": "console"})
    named = tracing.start_request("x", None)
    assert named is not None and named.resource.attributes["service.name"] == "classifyd-eu"  # type: ignore


def test_otlp_endpoint_turns_on_the_grpc_exporter_and_bad_settings_are_start_up_errors() -> None:
    assert tracing.configure("http://127.0.0.1:4317", {}) is True
    assert tracing.enabled()
    with pytest.raises(ValueError, match="unknown exporter"):
        tracing.configure(None, {"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="not supported"):
        tracing.configure("http://127.0.0.1:4317", {"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


def test_the_overhead_benchmark_runs_at_its_smallest(capsys: pytest.CaptureFixture[str]) -> None:
    assert tracing_bench.main(["--requests", "16", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "tracing off, the tracing calls alone:" in out and "x off:" in out
    assert not tracing.enabled()  # the benchmark leaves tracing as it found it
