"""How many torch intra-op threads a version's forward passes use: chosen per version at warm-up, by measurement.

The process's count (``--torch-threads``, else cores ÷ workers: :mod:`server.ops.host`) is what torch's operators
may use. For a small model a team of threads costs more than it gives: the OpenMP team's threads fall asleep
between requests, and waking them costs more than the whole pass (measured on the 2-core VM, the digits model at
batch 1 after a 50 ms idle gap: 0.7 ms on one thread, 9.0 ms on two; docs/benchmarks.md). But under load a larger
model runs its batches back to back, where the team is awake and gives more throughput (resnet18, mobilenet). So
:func:`trial` decides from two measurements, each pass on the count it is recorded for: single images after a short
idle gap on one thread and on the process's count, interleaved; then, unless the team already won that, a batch
of the version's cap (at most :data:`THROUGHPUT_BATCH`) back to back on each. One thread is kept only when it is
not clearly slower for a single image after an idle gap **and** its throughput is at least
:data:`THROUGHPUT_SHARE` of the team's. Everything is measured within about :data:`MEASURE_BUDGET_S`; a model
whose single image takes more than half of that is not measured, and keeps the team.

Each pass is its own step: the loader runs each as a separate call on the shared inference thread and awaits the
idle gaps on the event loop (:func:`choose_threads_async`), so other models' batches wait at most one pass, never
the whole measurement; the runtime job and the benchmarks measure in one go (:func:`choose_threads`).

:func:`use_threads` switches the calling thread's count before a forward pass when it differs. One inference thread
runs every model of a device, so versions with different counts switch at their batches. The switch itself is
cheap: on the 2-core VM (torch 2.14, quiet) ``torch.set_num_threads`` alternating 1/2 took 0.1-0.5 µs, and a small
convolution net's pass right after a switch ran within noise of one without (216 against 215 µs on one thread,
159-163 against 157-158 µs on two; ``benchmarks/thread_switch.py``, docs/benchmarks.md). What a switch can cost is
the team's wake-up after a stretch on one thread, the same cost as after an idle gap, which the measurement
already weighs; so each version keeps its own count. Everything here that runs passes blocks: call it on the
inference thread.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass

import torch

MEASURE_BUDGET_S = 1.0
"""About how long the whole measurement may take (passes and idle gaps; each pass is a separate step)."""
IDLE_GAP_S = 0.02
"""The idle gap before each timed single image: long enough for the team's threads to go to sleep."""
RUNS = 4
"""Timed single images per thread count (interleaved)."""
BATCH_RUNS = 2
"""Timed back-to-back batches per thread count (interleaved); the fastest counts."""
TEAM_MARGIN = 0.1
"""For single images the team must be this much faster than one thread to be kept."""
THROUGHPUT_SHARE = 0.95
"""One thread must reach this share of the team's throughput on a batch to be kept."""
THROUGHPUT_BATCH = 8
"""The throughput batch: the version's cap, at most this (a pass stays short: other models wait on it)."""

_process_threads: int | None = None


def remember_process_threads() -> int:
    """Record the process's torch thread count (call once, after ``--torch-threads`` was applied, before any version
    switches it) and return it."""
    global _process_threads  # one value per process, like torch's own setting
    if _process_threads is None:
        _process_threads = torch.get_num_threads()
    return _process_threads


def without_team() -> None:
    """Make the calling thread run torch's operators by itself, with no OpenMP team of its own.

    Every thread that runs a parallel torch operator becomes the master of an OpenMP team, and libgomp counts the
    threads of all teams: once they outnumber the cores, every team's idle threads stop spinning almost at once
    (libgomp's throttled spin count) and each forward pass pays their wake-up. Measured on the 2-core VM (resnet18,
    single images on an inference thread, 2 threads): 27-31 ms per image when the model had been built on another
    thread with 2 torch threads, 19-23 ms when only the inference thread had a team (docs/benchmarks.md). So every
    thread that may touch torch besides the inference threads calls this first: the loader's and the
    preprocessing pool's threads (their initializer), and the daemon's main thread once the process count is
    recorded. The inference threads set their count before every pass (:func:`use_threads`)."""
    remember_process_threads()  # before the count changes: what the inference threads default to
    torch.set_num_threads(1)


def process_threads() -> int:
    """The process's torch thread count (as recorded by :func:`remember_process_threads`)."""
    return _process_threads if _process_threads is not None else remember_process_threads()


def use_threads(count: int) -> None:
    """Make the calling thread's forward passes use ``count`` intra-op threads."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


@dataclass(frozen=True)
class Pass:
    """One timed forward pass the trial asks for: ``size`` images on ``count`` threads, after an idle gap or not."""

    count: int
    size: int
    idle_gap: bool


Trial = Generator[Pass, float, tuple[int, str]]
"""Yields the passes to time, is sent each pass's seconds, returns the count and why."""


def trial(team: int, batch: int, budget_s: float = MEASURE_BUDGET_S) -> Trial:
    """The measurement that chooses 1 or ``team`` threads for a version whose cap is ``batch`` (see the module
    docstring). Never blocks: the driver runs the passes."""
    if team <= 1:
        return team, f"the process has {team} torch thread"
    spent = probe = yield Pass(team, 1, False)
    if probe > budget_s / 2:
        return team, f"a single image takes over {budget_s * 500:.0f} ms: not measured"
    singles: dict[int, list[float]] = {1: [], team: []}
    for _ in range(RUNS):
        for count in (1, team):
            took = yield Pass(count, 1, True)
            singles[count].append(took)
            spent += took + IDLE_GAP_S
        if spent > budget_s / 2:
            break
    one, many = statistics.median(singles[1]), statistics.median(singles[team])
    why = (f"single image after an idle gap, median of {len(singles[1])}: {one * 1000:.2f} ms on 1 thread, "
           f"{many * 1000:.2f} ms on {team}")
    if many < (1 - TEAM_MARGIN) * one:
        return team, why
    size = max(1, min(batch, THROUGHPUT_BATCH))
    batches: dict[int, list[float]] = {1: [], team: []}
    for _ in range(BATCH_RUNS):
        for count in (1, team):
            took = yield Pass(count, size, False)
            batches[count].append(took)
            spent += took
        if spent > budget_s:
            break
    rates = {count: size / max(min(times), 1e-9) for count, times in batches.items()}
    why += f"; batch of {size} back to back: {rates[1]:.0f} images/s on 1 thread, {rates[team]:.0f} on {team}"
    return (1 if rates[1] >= THROUGHPUT_SHARE * rates[team] else team), why


def choose_threads(run_pass: Callable[[int, int], float], team: int, batch: int, *,
                   sleep: Callable[[float], None] = time.sleep) -> tuple[int, str]:
    """Run :func:`trial` here: ``run_pass(count, size)`` times one pass of ``size`` images on ``count`` threads.
    Blocks for about :data:`MEASURE_BUDGET_S` at most (at least one pass of each kind on each count)."""
    steps = trial(team, batch)
    try:
        step = next(steps)
        while True:
            if step.idle_gap:
                sleep(IDLE_GAP_S)
            step = steps.send(run_pass(step.count, step.size))
    except StopIteration as done:
        return done.value


async def choose_threads_async(run_pass: Callable[[int, int], Awaitable[float]], team: int, batch: int, *,
                               sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> tuple[int, str]:
    """:func:`choose_threads` with each pass awaited (the loader: one call on the inference thread each) and the
    idle gaps awaited on the event loop. Never blocks the loop."""
    steps = trial(team, batch)
    try:
        step = next(steps)
        while True:
            if step.idle_gap:
                await sleep(IDLE_GAP_S)
            step = steps.send(await run_pass(step.count, step.size))
    except StopIteration as done:
        return done.value
