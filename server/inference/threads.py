"""How many torch intra-op threads a version's forward passes use: chosen per version at warm-up, by measurement.

The process's count (``--torch-threads``, else cores ÷ workers: :mod:`server.ops.host`) is what torch's operators
may use. For a small model a team of threads costs more than it gives: the OpenMP team's threads fall asleep
between requests, and waking them costs more than the whole pass (measured on the 2-core VM, the digits model at
batch 1 after a 50 ms idle gap: 0.7 ms on one thread, 9.0 ms on two; docs/benchmarks.md). So at warm-up
:func:`choose_threads` times single images after a short idle gap on one thread and on the process's count,
interleaved, and keeps one thread unless the team is clearly faster. On a busy machine the team is much worse still
(resnet18, single images, load average 11 on 2 cores: 400-2000 ms on two threads, 82 ms on one), so larger models
are measured too, within :data:`MEASURE_BUDGET_S`; only a model whose single image takes more than half of that
is not, and keeps the team.

:func:`use_threads` switches the calling thread's count before a forward pass when it differs (a few microseconds;
one inference thread runs every model, so versions with different counts switch at their batches). Everything here
blocks: call it on the inference thread.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import torch

log = logging.getLogger("classifyd.models")

MEASURE_BUDGET_S = 1.0
"""About how long the measurement may take; a model whose single image takes over half of it keeps the team."""
IDLE_GAP_S = 0.02
"""The idle gap before each timed single image: long enough for the team's threads to go to sleep."""
RUNS = 4
"""Timed single images per thread count (interleaved)."""
TEAM_MARGIN = 0.1
"""The team must be this much faster than one thread to be kept (one thread also leaves a core to preprocessing)."""

_process_threads: int | None = None


def remember_process_threads() -> int:
    """Record the process's torch thread count (call once, after ``--torch-threads`` was applied, before any version
    switches it) and return it."""
    global _process_threads  # one value per process, like torch's own setting
    if _process_threads is None:
        _process_threads = torch.get_num_threads()
    return _process_threads


def process_threads() -> int:
    """The process's torch thread count (as recorded by :func:`remember_process_threads`)."""
    return _process_threads if _process_threads is not None else remember_process_threads()


def use_threads(count: int) -> None:
    """Make the calling thread's forward passes use ``count`` intra-op threads."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def choose_threads(run_single: Callable[[], None], team: int, *, sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.perf_counter) -> tuple[int, str]:
    """The thread count for one version, and why: 1 or ``team``. ``run_single()`` runs one forward pass of one
    image on the calling thread. Blocks for ``2 · RUNS · (IDLE_GAP_S + one pass)``, or about ``MEASURE_BUDGET_S``
    when that is less (at least one pass on each count)."""
    if team <= 1:
        return team, f"the process has {team} torch thread"
    use_threads(team)
    started = clock()
    run_single()
    if clock() - started > MEASURE_BUDGET_S / 2:
        return team, f"a single image takes over {MEASURE_BUDGET_S * 500:.0f} ms: not measured"
    times: dict[int, list[float]] = {1: [], team: []}
    for _ in range(RUNS):
        for count in (1, team):
            use_threads(count)
            sleep(IDLE_GAP_S)
            begin = clock()
            run_single()
            times[count].append(clock() - begin)
        if clock() - started > MEASURE_BUDGET_S:
            break
    one, many = statistics.median(times[1]), statistics.median(times[team])
    chosen = team if many < (1 - TEAM_MARGIN) * one else 1
    use_threads(process_threads())
    return chosen, (f"single image after an idle gap, median of {len(times[1])}: {one * 1000:.2f} ms on 1 thread, "
                    f"{many * 1000:.2f} ms on {team}")
