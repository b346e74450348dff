"""``--workers``: the status document merged from every worker's (the live daemon is in tests/cli/test_workers.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from server.edges.http.worker_status import STALE_S, StatusShare, merge_status


def document(pid: int, requests: int, p99: float | None, depth: int, now_ms: int = 1_000_000) -> dict[str, Any]:
    stats = {"requests": requests, "requests_per_s": requests / 10, "latency_samples": requests,
             "latency_ms": {"p50": p99 and p99 / 2, "p90": p99, "p99": p99}, "batch_sizes": {"1": requests, "2": 0}}
    return {"pid": pid, "time_unix_ms": now_ms, "models": [{"name": "m", "queue_depth": depth, "serving_version": 3,
                                                             "stats": stats}],
            "cache": {"bytes": 10, "budget_bytes": 100, "entries": 1, "evictions": 0}, "events": [{"kind": "READY"}]}


def test_counts_add_up_and_latency_is_the_slowest_workers() -> None:
    merged = merge_status(document(1, 4, 20.0, 2), [document(2, 6, 35.0, 1), document(3, 0, None, 0)])
    model = merged["models"][0]
    assert model["stats"]["requests"] == 10
    assert model["stats"]["batch_sizes"] == {"1": 10, "2": 0}
    assert model["stats"]["latency_ms"] == {"p50": 17.5, "p90": 35.0, "p99": 35.0}
    assert model["queue_depth"] == 3
    assert model["serving_version"] == 3  # not added: every worker serves the same version
    assert merged["cache"] == {"bytes": 30, "budget_bytes": 300, "entries": 3, "evictions": 0}
    assert [(w["pid"], w["requests"]) for w in merged["workers"]] == [(1, 4), (2, 6), (3, 0)]
    assert merged["events"] == [{"kind": "READY"}]


def test_the_answering_workers_document_is_not_changed() -> None:
    own = document(1, 4, 20.0, 2)
    before = json.dumps(own, sort_keys=True)
    merge_status(own, [document(2, 6, 35.0, 1)])
    assert json.dumps(own, sort_keys=True) == before  # the next merge starts from this worker's own figures


def test_siblings_older_than_the_stale_limit_are_left_out(tmp_path: Path) -> None:
    now = 1000.0
    share = StatusShare(tmp_path / "worker-0.status.json", lambda: document(1, 1, 1.0, 0), clock=lambda: now)
    fresh, stale = document(2, 5, 1.0, 0, now_ms=int(now * 1000)), document(3, 7, 1.0, 0,
                                                                              now_ms=int((now - STALE_S - 1) * 1000))
    (tmp_path / "worker-1.status.json").write_text(json.dumps(fresh))
    (tmp_path / "worker-2.status.json").write_text(json.dumps(stale))
    (tmp_path / "worker-3.status.json").write_text("{half a docu")  # being replaced: skipped, not an error
    assert [d["pid"] for d in share.siblings()] == [2]
    merged = asyncio.run(share.merged(document(1, 1, 1.0, 0, now_ms=int(now * 1000))))
    assert merged["models"][0]["stats"]["requests"] == 6
