"""Logging set-up: plain text or JSON lines, and the per-request log.

``--log-format json`` writes one JSON object per line with ``time``,
``level``, ``logger`` and ``message``, plus every ``extra`` field of the
record (``request_id``, ``model``, ``version``, ``code``, ``latency_ms``, …)
and ``exception`` when there is a traceback. Nothing here blocks beyond
writing to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from server.core.errors import Status
from server.core.types import RequestReport

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

# Load-related outcomes are counted by the metrics; logging each at INFO would add work exactly when the
# server is overloaded. A client's mistakes are worth a line; a server fault always is.
_LEVEL_FOR_CODE = {
    Status.OK: logging.DEBUG,
    Status.RESOURCE_EXHAUSTED: logging.DEBUG,
    Status.DEADLINE_EXCEEDED: logging.DEBUG,
    Status.CANCELLED: logging.DEBUG,
    Status.UNAVAILABLE: logging.DEBUG,
    Status.INTERNAL: logging.ERROR,
}
request_log = logging.getLogger("classifyd.requests")
CLIENT_TEXT_LIMIT = 200
"""Characters of a client-supplied string (request id, model name) that go into a log record."""


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,  # tells the processes of --workers apart
        }
        data.update((k, v) for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_"))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send the root logger's records to stderr as ``fmt`` ('text' or 'json'). Raises ValueError otherwise."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_request(report: RequestReport) -> None:
    """One record per classification request on ``classifyd.requests``, with its request id."""
    level = _LEVEL_FOR_CODE.get(report.code, logging.INFO)
    if not request_log.isEnabledFor(level):
        return
    result = report.result
    model = result.model if result else report.model
    version = result.version if result else report.version
    latency_ms = round(report.seconds * 1000, 3)
    fields: dict[str, object] = {"request_id": report.request_id[:CLIENT_TEXT_LIMIT],
                                 "model": model[:CLIENT_TEXT_LIMIT], "version": version, "code": report.code.name,
                                 "latency_ms": latency_ms}
    if result:
        fields.update(batch_size=result.batch_size, queue_ms=round(result.queue_s * 1000, 3),
                      compute_ms=round(result.compute_s * 1000, 3), cache_hit=result.cache_hit,
                      cold_start=result.cold_start)
    outcome = report.code.name + (f": {report.message}" if report.message else "")
    # Client-supplied strings go into text logs as capped reprs: a newline must not forge a log line.
    request_log.log(level, "request %s model %s version %s: %s (%.1f ms%s)", client_text(report.request_id),
                    client_text(model) if model else "(default)", version, outcome, latency_ms,
                    (", cache hit" if result and result.cache_hit else "")
                    + (", cold start" if result and result.cold_start else ""), extra=fields)


def client_text(value: str, limit: int = CLIENT_TEXT_LIMIT) -> str:
    """A client-supplied string (a request id, a model name) as it goes into a log message: its repr, so control
    characters and line separators are escaped and a newline cannot forge a log line, cut to ``limit``
    characters ("…" marks the cut). The one rule for client strings in logs; bounded work for any length."""
    text = repr(value[:limit])
    return text if len(text) <= limit and len(value) <= limit else text[:limit] + "…"
