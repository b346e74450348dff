"""``python -m server`` flags → :class:`ServerConfig`: the defaults are the config's, each flag lands in its section."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from server.cli.main import config_from_args, parse_args
from server.cli.workers import worker_config
from server.core.config import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_MAX_BATCH_SIZE,
    MAX_IMAGES_PER_REQUEST,
    MAX_JSON_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_PIXELS,
    MAX_STREAM_IN_FLIGHT,
    AutotuneDefaults,
    BatchingDefaults,
    LimitsConfig,
    ListenConfig,
    ModelsConfig,
    ObservabilityConfig,
    ProcessConfig,
    SecurityConfig,
    ServerConfig,
)
from server.ops.host import default_decode_bytes, default_pool_threads


def config(*argv: str) -> ServerConfig:
    return config_from_args(parse_args(list(argv)))


def test_no_flags_give_the_config_defaults() -> None:
    assert config() == ServerConfig()


def test_every_flag_lands_in_its_section() -> None:
    got = config("--host", "0.0.0.0", "--port", "7000", "--http-port", "7001", "--reuse-port",
                 "--max-connection-age-seconds", "30", "--models-dir", "repo", "--device", "cpu", "--no-watch",
                 "--poll", "--settle-seconds", "0.5", "--trust-code", "--torch-threads", "2",
                 "--autotune-budget-s", "1.5", "--autotune-max-batch-size", "16", "--max-delay-ms", "4",
                 "--max-queue", "99", "--max-message-bytes", "4096", "--max-pixels", "1000",
                 "--max-images-per-request", "8", "--max-json-bytes", "2048", "--max-stream-in-flight", "3",
                 "--max-decode-bytes", "5000000", "--cache-bytes", "4096",
                 "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem", "--auth-token-file", "t",
                 "--admin-token-file", "a", "--allow-remote-admin", "--reload-min-interval-seconds", "7",
                 "--cache-dir", "exports", "--default-runtime", "torch", "--model-control", "none",
                 "--max-loaded-bytes", "1000000", "--lazy-load",
                 "--log-level", "DEBUG", "--log-format", "json", "--metrics-port", "9100", "--metrics-host", "::",
                 "--metrics-port-file", "m", "--otlp-endpoint", "http://127.0.0.1:4317",
                 "--workers", "3", "--drain-seconds", "4", "--grace-seconds", "2", "--port-file", "p",
                 "--preprocess-nice", "5")
    assert got == ServerConfig(
        listen=ListenConfig(host="0.0.0.0", port=7000, http_port=7001, reuse_port=True, max_connection_age_s=30.0),
        batching=BatchingDefaults(max_batch_size=DEFAULT_MAX_BATCH_SIZE, max_delay_ms=4.0, max_queue=99,
                                  autotune=AutotuneDefaults(enabled=True, budget_s=1.5, max_batch_size=16)),
        models=ModelsConfig(models_dir=Path("repo"), device="cpu", watch=False, poll=True, settle_s=0.5,
                            trust_code=True, torch_threads=2, reload_min_interval_s=7.0,
                            cache_dir=Path("exports"), default_runtime="torch", model_control="none",
                            max_loaded_bytes=1_000_000, lazy_load=True),
        limits=LimitsConfig(max_message_bytes=4096, max_pixels=1000, max_images_per_request=8, max_json_bytes=2048,
                            max_stream_in_flight=3, max_decode_bytes=5_000_000, cache_bytes=4096),
        security=SecurityConfig(tls_cert=Path("c.pem"), tls_key=Path("k.pem"), tls_client_ca=Path("ca.pem"),
                                auth_token_file=Path("t"), admin_token_file=Path("a"), allow_remote_admin=True),
        observability=ObservabilityConfig(metrics_port=9100, metrics_host="::", metrics_port_file=Path("m"),
                                          log_level="DEBUG", log_format="json",
                                          otlp_endpoint="http://127.0.0.1:4317"),
        process=ProcessConfig(workers=3, drain_s=4.0, grace_s=2.0, port_file=Path("p"), preprocess_nice=5),
    )


def test_max_batch_size_turns_autotune_off_and_no_autotune_falls_back_to_the_default() -> None:
    explicit = config("--max-batch-size", "8").batching
    assert (explicit.max_batch_size, explicit.autotune.enabled) == (8, False)
    untuned = config("--no-autotune").batching
    assert (untuned.max_batch_size, untuned.autotune.enabled) == (DEFAULT_MAX_BATCH_SIZE, False)


def test_help_shows_the_config_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in (f"default: {MAX_MESSAGE_BYTES // 2**20} MiB", f"default: {MAX_PIXELS}",
                  f"default: {MAX_IMAGES_PER_REQUEST})", f"default: {MAX_JSON_BYTES // 2**20} MiB",
                  f"default: {MAX_STREAM_IN_FLIGHT})", f"default: {DEFAULT_CACHE_BYTES // 2**20} MiB)",
                  f"{DEFAULT_MAX_BATCH_SIZE} when autotune is off", "default: 50051", "default: 1024"):
        assert shown in text


@pytest.mark.parametrize("argv", [
    ["--http-port", "70000"], ["--max-connection-age-seconds", "-1"], ["--settle-seconds", "-1"],
    ["--torch-threads", "0"], ["--max-batch-size", "0"], ["--autotune-budget-s", "0"],
    ["--autotune-max-batch-size", "0"], ["--max-queue", "0"], ["--max-delay-ms", "-1"],
    ["--max-message-bytes", "1023"], ["--max-pixels", "0"], ["--max-images-per-request", "0"],
    ["--max-json-bytes", "1023"], ["--max-stream-in-flight", "0"], ["--max-decode-bytes", "1000"],
    ["--cache-bytes", "-1"], ["--tls-cert", "c.pem"], ["--tls-client-ca", "ca.pem"],
    ["--metrics-port", "-1"], ["--workers", "0"], ["--workers", "2", "--http-port", "0"],
    ["--workers", "2", "--model-control", "explicit"], ["--model-control", "sometimes"],
    ["--drain-seconds", "-1"], ["--grace-seconds", "-1"], ["--reload-min-interval-seconds", "-1"],
    ["--preprocess-nice", "-1"], ["--preprocess-nice", "20"],
    ["--max-loaded-bytes", "0"], ["--max-loaded-bytes", "1000000"],
    ["--max-loaded-bytes", "1000000", "--model-control", "none"],
])
def test_bad_values_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_each_worker_gets_the_shared_port_its_cores_and_a_private_metrics_port(tmp_path: Path) -> None:
    parent = config("--workers", "2", "--metrics-port", "9100", "--torch-threads", "3", "--port-file", "p")
    child = worker_config(parent, 1, 7000, tmp_path / "worker-1.port")
    assert (child.listen.port, child.listen.reuse_port) == (7000, True)
    assert (child.process.workers, child.process.port_file) == (1, tmp_path / "worker-1.port")
    # the parent serves 9100 for the whole daemon and merges what each worker serves on loopback
    assert (child.observability.metrics_port, child.observability.metrics_host) == (0, "127.0.0.1")
    assert child.observability.metrics_port_file == tmp_path / "worker-1.metrics"
    assert worker_config(config("--workers", "2"), 1, 7000, tmp_path / "w").observability.metrics_port is None
    assert child.models.torch_threads == 3
    # the host rules, resolved in the parent for each worker's share: its cores and its quarter of the memory
    assert child.process.preprocess_threads == default_pool_threads(2)
    assert child.limits == replace(parent.limits, max_decode_bytes=default_decode_bytes(2))
    assert (child.batching, child.security) == (parent.batching, parent.security)
    explicit = worker_config(config("--workers", "2", "--max-decode-bytes", "5000000"), 0, 7000, tmp_path / "w")
    assert explicit.limits.max_decode_bytes == 5_000_000  # per process, as given
