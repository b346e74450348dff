"""The serving process's Python heap: what the loads built is moved out of the cyclic collector's sight.

Why: a daemon process holds some 380,000 objects the collector tracks once torch and a model are loaded (modules,
functions, types, the model's layers), and they live as long as the process. CPython's full collection traverses
every one of them, and it runs whenever enough objects have survived the younger generations, which a loaded
daemon reaches every 30-60 s: measured in a daemon serving mobilenet_v3_small at concurrency 32, each full
collection held the GIL for 160-200 ms, stopping the event loop, the preprocessing threads' Python and the
forward pass's operators together (docs/benchmarks.md, "the event loop's work per request"). ``gc.freeze`` moves
the objects alive now into a permanent generation that no collection traverses; what requests allocate afterwards
is collected as before.

The cost is that garbage cycles among frozen objects are never collected by themselves. What the daemon retires
is what could leave such cycles (a model's module and runtime once a version is unloaded, rejected or refused by
the memory budget, or its load failed), so those places call :func:`collect_everything`, which collects the frozen
objects too and freezes what is left. That also freezes whatever else is alive at that moment (the requests in
flight: their tasks, futures, arrays); a cycle among those is collected at the next such moment, not before, which
bounds what can wait to one unload's worth of in-flight requests.
Only the daemon's own process settles its heap (``python -m server``, each ``--workers`` process); a process that
embeds the daemon (the tests) keeps CPython's defaults.
"""

from __future__ import annotations

import asyncio
import gc
import threading

_settling = threading.Lock()  # one settle at a time: a freeze between another's unfreeze and collect voids it
_settled = False  # a flag, not gc.get_freeze_count(): on Python 3.11 that walks every frozen object


def settle_heap() -> int:
    """Collect what is garbage now, then freeze every object still alive; returns how many are frozen.

    Call when the daemon's long-lived objects exist (after the initial load). Blocks for a full collection (about
    0.2 s with torch imported), holding the GIL, and for another thread's settle: run it off the event loop.
    Never raises."""
    global _settled
    with _settling:
        gc.unfreeze()  # what an earlier settle froze is collected too: a cycle left since then is not kept
        gc.collect()
        gc.freeze()
        _settled = True
        return gc.get_freeze_count()


def heap_settled() -> bool:
    """Whether this process has frozen its heap (:func:`settle_heap`). Never blocks."""
    return _settled


def unsettle_heap() -> None:
    """Back to CPython's defaults: nothing frozen (for processes that embed the daemon, such as the tests)."""
    global _settled
    with _settling:
        gc.unfreeze()
        _settled = False


def collect_everything() -> None:
    """A full collection that reaches frozen objects as well, when :func:`settle_heap` froze some (then what is
    left is frozen again); otherwise ``gc.collect()``. For the moments something long-lived was dropped (a
    released version). Blocks like :func:`settle_heap`; never raises."""
    if heap_settled():
        settle_heap()
    else:
        gc.collect()


async def collect_released() -> None:
    """After a version was released: on a settled heap, :func:`collect_everything` in a worker thread (what the
    version left in reference cycles was frozen with it); nothing otherwise, where the collector reaches it by
    itself. Blocks the calling task only."""
    if heap_settled():
        await asyncio.to_thread(collect_everything)
