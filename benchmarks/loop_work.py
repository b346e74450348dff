"""What the daemon's event loop does per request, callback by callback, and how long the garbage collector stops it.

The daemon runs in a subprocess with a probe installed before ``python -m server`` starts: every callback the event
loop runs (``asyncio.Handle._run``) is timed with the loop thread's CPU clock and filed under what it is (a task's
coroutine; for grpc's handler tasks, where the step ended: the request read, an await in classifyd's code, the
answer sent), and ``gc.callbacks`` time each collection. After ``--warmup-s`` of closed-loop load from
``python -m client bench`` the probe measures ``--seconds`` and writes what it saw; this script prints it per
request. The probe's own timing adds about 1 µs per callback; read the figures side by side (two commits, two
settings), not as absolutes.

    python -m benchmarks.loop_work                                        # mobilenet_v3_small, torch, c=32
    python -m benchmarks.loop_work --runtime onnxruntime --max-batch-size 8
    python -m benchmarks.loop_work --seconds 3 --warmup-s 3               # smoke
"""

from __future__ import annotations

import argparse
import asyncio.events
import collections
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.support import (
    DaemonProcess,
    copy_digits,
    emit,
    facts_block,
    markdown_table,
    run_facts,
    write_torchvision_model,
)

HANDLER_TASK = "_handle_exceptions"  # grpc.aio's task around each call's handler (one per request)


def _coroutine(callback: Any) -> tuple[Any, str] | None:
    """The coroutine of the task a callback steps and its name, else None (read before the step: a finished
    Cython coroutine loses its name)."""
    owner = getattr(callback, "__self__", None)
    if owner is None or not hasattr(owner, "get_coro"):
        return None
    coro = owner.get_coro()
    return coro, str(getattr(coro, "__qualname__", type(coro).__name__))


def _label(callback: Any, task: tuple[Any, str] | None) -> str:
    """What a loop callback was, after it ran: a task's coroutine (for a handler task also where its step ended),
    else its name."""
    if task is not None:
        coro, name = task
        return f"task {name}" + (f" until {_awaiting(coro)}" if name == HANDLER_TASK else "")
    if type(callback).__name__ == "partial":
        return "partial " + getattr(callback.func, "__qualname__", repr(callback.func))
    return getattr(callback, "__qualname__", type(callback).__name__)


def _awaiting(coro: Any) -> str:
    """Where a grpc handler task's step ended: what its chain of coroutines waits for now (grpc's Cython coroutines
    carry names, not lines; classifyd's own code is behind grpc's ``coroutine_wrapper``)."""
    names = []
    while coro is not None and len(names) < 20:
        names.append(getattr(coro, "__qualname__", type(coro).__name__))
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    if len(names) < 2:
        return "done"
    if "coroutine_wrapper" in names:
        return "an await in the handler (classifyd: preprocessing, the batch)"
    if "_receive_message" in names:
        return "the request is read (the first step: grpc, the interceptors)"
    if "_finish_handler_with_unary_response" in names:
        return "the answer is sent (the handler's last part, grpc's reply)"
    return " > ".join(names[-3:-1])


class LoopProbe:
    """Installed in the daemon process: CPU time per kind of loop callback and the collector's pauses."""

    def __init__(self) -> None:
        self.cpu: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.gc_pauses: list[tuple[int, float]] = []
        self._gc_started = 0.0
        self.measuring = False

    def install(self) -> None:
        original, clock, probe = asyncio.events.Handle._run, time.thread_time_ns, self

        def timed(handle: asyncio.events.Handle) -> None:
            if not probe.measuring:
                original(handle)
                return
            callback = handle._callback  # type: ignore[attr-defined]  # before: a run may clear it
            coro = _coroutine(callback)
            started = clock()
            original(handle)
            spent = clock() - started
            label = _label(callback, coro)  # after: a task's step is filed under where it ended
            probe.cpu[label] += spent
            probe.calls[label] += 1

        asyncio.events.Handle._run = timed  # type: ignore[method-assign]
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self.measuring:
            self.gc_pauses.append((info["generation"], time.perf_counter() - self._gc_started))

    def measure(self, go: Path, seconds: float, out: Path) -> None:
        """From another thread: once the file ``go`` exists, measure ``seconds``, write the figures to ``out``."""
        while not go.exists():
            time.sleep(0.05)
        main = Path(f"/proc/self/task/{threading.main_thread().native_id}/stat")
        before = _thread_cpu_s(main)
        self.measuring = True
        time.sleep(seconds)
        self.measuring = False
        loop_cpu_s = _thread_cpu_s(main) - before
        out.write_text(json.dumps({"seconds": seconds, "loop_cpu_s": loop_cpu_s, "cpu_ns": dict(self.cpu),
                                   "calls": dict(self.calls), "gc": self.gc_pauses,
                                   "frozen": gc.get_freeze_count()}))


def _thread_cpu_s(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_with_probe(go: str, seconds: float, out: str) -> None:
    """The daemon subprocess's entry point: the probe (measuring ``seconds`` once the file ``go`` exists, its
    figures written to ``out``), then ``python -m server`` with this process's arguments."""
    import runpy

    probe = LoopProbe()
    probe.install()
    threading.Thread(target=probe.measure, daemon=True, args=(Path(go), seconds, Path(out))).start()
    runpy.run_module("server", run_name="__main__", alter_sys=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One probed daemon under closed-loop load; returns the probe's figures and the client's throughput."""
    work = Path(tempfile.mkdtemp(prefix="loop-work-"))
    models = work / "models"
    models.mkdir()
    if args.model == "digits":  # the default model as shipped (its manifest pins its own cap)
        copy_digits(models)
    else:
        write_torchvision_model(models, args.model, seed=0, batching={"max_batch_size": args.max_batch_size},
                                top={"runtime": args.runtime})
    out, go = work / "probe.json", work / "go"
    daemon = DaemonProcess(models, work / "daemon.log", "--device", "cpu", "--no-watch", "--default-runtime",
                           args.runtime)
    daemon.command[1:3] = ["-c", "from benchmarks.loop_work import serve_with_probe; "
                           f"serve_with_probe({str(go)!r}, {args.seconds!r}, {str(out)!r})"]
    with daemon:
        time.sleep(args.start_s)
        bench = subprocess.Popen([sys.executable, "-m", "client", "--target", daemon.target, "bench", "--model",
                                  args.model, "--concurrency", str(args.concurrency), "--warmup", "0", "--duration",
                                  str(args.warmup_s + args.seconds + 1), "--no-progress", "--json"],
                                 stdout=subprocess.PIPE, text=True)
        time.sleep(args.warmup_s)
        go.touch()
        text, _ = bench.communicate(timeout=args.seconds + 120)
        if bench.returncode:
            raise RuntimeError(f"the load generator failed:\n{text}\n{daemon.log_tail()}")
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline:  # the probe writes once its window is over
            time.sleep(0.05)
    figures = json.loads(out.read_text())
    figures["throughput"] = json.JSONDecoder().raw_decode(text[text.index("{"):])[0]["levels"][0]["throughput"]
    return figures


def report(figures: dict[str, Any], args: argparse.Namespace) -> str:
    requests = figures["calls"].get(f"task {HANDLER_TASK} until done", 0) or 1
    rows = [[label, f"{figures['calls'][label] / requests:.2f}", f"{ns / figures['calls'][label] / 1e3:.1f}",
             f"{ns / requests / 1e3:.1f}"]
            for label, ns in sorted(figures["cpu_ns"].items(), key=lambda kv: -kv[1])[:args.rows]]
    callbacks_us = sum(figures["cpu_ns"].values()) / requests / 1e3
    pauses = collections.defaultdict(list)
    for generation, seconds in figures["gc"]:
        pauses[generation].append(seconds * 1000)
    gc_rows = [[str(g), str(len(p)), f"{sum(p):.1f}", f"{max(p):.2f}"] for g, p in sorted(pauses.items())]
    return "\n".join([
        f"{args.model}, runtime {args.runtime}, "
        f"{'its own batching' if args.model == 'digits' else f'max_batch_size {args.max_batch_size}'}, concurrency "
        f"{args.concurrency}: {requests} requests in {figures['seconds']:g} s (client: "
        f"{figures['throughput']:.1f} images/s); the loop thread's CPU {figures['loop_cpu_s'] * 1e6 / requests:.0f} "
        f"µs per request, its timed callbacks {callbacks_us:.0f} µs; objects frozen out of the collector: "
        f"{figures['frozen']}", "",
        markdown_table(["loop callback", "per request", "µs per call", "µs per request"], rows), "",
        markdown_table(["gc generation", "collections", "total ms", "longest ms"], gc_rows or [["-", "0", "0", "0"]]),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--runtime", default="torch")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--start-s", type=float, default=8.0, help="after the daemon serves, before the load")
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rows", type=int, default=14)
    parser.add_argument("--markdown", type=Path, help="also append the results to this file")
    args = parser.parse_args(argv)
    facts = facts_block(run_facts("benchmarks.loop_work"))
    emit("\n".join([facts, "", report(run(args), args)]), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
