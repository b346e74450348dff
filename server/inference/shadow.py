"""The shadow lane: a rollout candidate's forward passes over sampled copies of live requests, at lower priority
than every live batch.

A shadow job waits until its version's inference thread (one per device, :mod:`server.inference.devices`) has no
live call queued or running (:meth:`server.inference.runtime.InferenceThread.run_when_quiet`), so it never
shrinks a live batch, or until the lane's *owed share* lets it go ahead of the next live call: while the lane has
work, it is owed ``share / (1 - share)`` × the thread's live busy time since then, less its own passes, so under
back-to-back live batches shadow work still progresses (a rollout decides under full load too) and delays live
work by at most that share. After each pass of ``t`` seconds the lane rests ``t * (1 - share) / share`` seconds,
so shadow work takes at most ``share`` (``[rollout] shadow_max_share``) of the thread's time even when live
traffic leaves it idle. Under full load shadow work shrinks first: the lane holds at most ``max_pending`` jobs
(reserved places included) and drops further samples (counted in :attr:`ShadowLane.dropped`); a dropped sample
is a comparison not made, never a live request lost. A job whose version left its rollout (decided, replaced,
retired) is skipped and its lease given back. Runs on the event loop; the forward passes run on the inference
threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from server.core.errors import InvalidInput
from server.inference.device_decode import DeviceJpeg, decode_batch
from server.inference.devices import InferenceThreads
from server.inference.runtime import LoadedVersion
from server.inference.staging import Pixels

log = logging.getLogger("classifyd.rollout")

SHADOW_MAX_PENDING = 256
"""Shadow jobs waiting at most; further samples are dropped (the rollout then compares fewer requests)."""

Done = Callable[[list[np.ndarray] | BaseException, float, int], None]
"""``done(rows or the error, seconds per item, items in the pass)``: called on the event loop once a job is
computed."""


@dataclass(eq=False)
class ShadowJob:
    """One sampled request for the candidate: its inputs (one per tile of a tiled request) and what to call."""

    version: LoadedVersion
    inputs: Sequence[np.ndarray | DeviceJpeg]
    max_share: float
    done: Done
    wanted: Callable[[], bool] = lambda: True
    """Whether the job is still worth computing (its version still in its rollout); checked before its pass."""


class ShadowLane:
    """Runs :class:`ShadowJob` s at low priority, batching the jobs of one version up to its ``max_batch_size``."""

    def __init__(self, inference: InferenceThreads, *, max_pending: int = SHADOW_MAX_PENDING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._inference = inference
        self._max_pending = max_pending
        self._clock = clock
        self._pending: deque[ShadowJob] = deque()
        self._task: asyncio.Task[None] | None = None
        self._rest_until = 0.0
        self._reserved = 0
        self._owed: dict[int, tuple[float, float, float]] = {}
        """Per inference thread (by id), since the lane last had work: (its live busy seconds then, the lane's
        seconds on it since, the last pass's seconds)."""
        self.dropped = 0
        self.busy_s = 0.0
        """Seconds of the inference thread the lane's passes took (metrics, the share check of the tests)."""

    def reserve(self) -> bool:
        """Hold a place for a job still being prepared (it counts towards ``max_pending``); False, and a sample
        dropped, when the lane is full. Give it back with :meth:`offer` (``reserved=True``) or :meth:`unreserve`."""
        if len(self._pending) + self._reserved >= self._max_pending:
            self.dropped += 1
            return False
        self._reserved += 1
        return True

    def unreserve(self, *, dropped: bool = False) -> None:
        """Give back a place held by :meth:`reserve` without a job (``dropped``: the sample was not taken)."""
        self._reserved -= 1
        self.dropped += dropped

    def offer(self, job: ShadowJob, *, reserved: bool = False) -> bool:
        """Queue ``job`` (its version stays leased until it is computed or skipped); False, and nothing queued, when
        the lane is full. ``reserved``: in the place held by :meth:`reserve`. Call on the event loop."""
        if reserved:
            self._reserved -= 1
        elif len(self._pending) + self._reserved >= self._max_pending:
            self.dropped += 1
            return False
        job.version.lease()
        self._pending.append(job)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="shadow lane")
        return True

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _skip_unwanted(self) -> None:
        """Drop the pending jobs no longer wanted (their versions' leases given back: a retired version is not
        kept loaded by shadow work that will never count)."""
        kept = [job for job in self._pending if job.wanted()]
        for job in self._pending:
            if job not in kept:
                job.version.unlease()
        self._pending = deque(kept)

    async def _drain(self) -> None:
        self._owed.clear()  # the owed share counts from now: live time while the lane had no work owes nothing
        while self._pending:
            rest = self._rest_until - self._clock()
            if rest > 0:
                await asyncio.sleep(rest)
            self._skip_unwanted()
            if not self._pending:
                return
            jobs = self._take()
            version = jobs[0].version
            inputs = [array for job in jobs for array in job.inputs]
            share = min(job.max_share for job in jobs)
            try:
                thread = self._inference.for_version(version)  # its device's: other devices' live work goes on
                rows, seconds = await thread.run_when_quiet(_compute, version, inputs,
                                                            may_overtake=self._credit(thread, share))
                self._spent(thread, seconds)
            except Exception as exc:  # noqa: BLE001 - the candidate's failure is a figure of its rollout
                rows, seconds = exc, 0.0
            finally:
                for job in jobs:
                    job.version.unlease()
            self.busy_s += seconds
            self._rest_until = self._clock() + seconds * (1.0 - share) / share
            self._deliver(jobs, rows, seconds / max(len(inputs), 1), len(inputs))

    def _credit(self, thread: object, share: float) -> Callable[[float], bool]:
        """Whether the lane's owed share on ``thread`` covers one more pass ahead of the next live call."""
        mark = self._owed.setdefault(id(thread), (getattr(thread, "live_busy_s", 0.0), 0.0, 0.0))
        ratio = share / max(1.0 - share, 1e-9)
        return lambda live_busy_s: ratio * (live_busy_s - mark[0]) > mark[1] + mark[2]

    def _spent(self, thread: object, seconds: float) -> None:
        live_then, spent, _ = self._owed.get(id(thread), (getattr(thread, "live_busy_s", 0.0), 0.0, 0.0))
        self._owed[id(thread)] = (live_then, spent + seconds, seconds)

    def _take(self) -> list[ShadowJob]:
        """The first pending job and those after it of the same version, up to the version's batch cap."""
        first = self._pending.popleft()
        jobs, size = [first], len(first.inputs)
        while self._pending and self._pending[0].version is first.version and \
                size + len(self._pending[0].inputs) <= first.version.max_batch_size:
            job = self._pending.popleft()
            jobs.append(job)
            size += len(job.inputs)
        return jobs

    @staticmethod
    def _deliver(jobs: list[ShadowJob], rows: list[np.ndarray | InvalidInput] | BaseException,
                 per_item_s: float, items: int) -> None:
        start = 0
        for job in jobs:
            mine: list[np.ndarray] | BaseException
            if isinstance(rows, BaseException):
                mine = rows
            else:
                part = rows[start:start + len(job.inputs)]
                bad = next((r for r in part if isinstance(r, BaseException)), None)
                mine = bad if bad is not None else [r for r in part if isinstance(r, np.ndarray)]
            start += len(job.inputs)
            try:
                job.done(mine, per_item_s, items)
            except Exception:
                log.exception("a shadow job's callback failed")

    async def aclose(self) -> None:
        """Drop the pending jobs (their leases given back) and stop."""
        while self._pending:
            self._pending.popleft().version.unlease()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _compute(version: LoadedVersion, inputs: list[np.ndarray | DeviceJpeg]) -> tuple[list[np.ndarray | InvalidInput],
                                                                                   float]:
    """The candidate's score rows for ``inputs`` (an input that fails to decode keeps its InvalidInput) and the
    seconds it took, in chunks of the version's batch cap. Blocks: runs on the inference thread."""
    started = time.perf_counter()
    pixels: list[Pixels | InvalidInput] = list(inputs)  # type: ignore[arg-type]
    jpegs = [i for i, item in enumerate(inputs) if isinstance(item, DeviceJpeg)]
    if jpegs:
        decoded = decode_batch([inputs[i] for i in jpegs], version.manifest.input, version.device)  # type: ignore[misc]
        for position, tensor in zip(jpegs, decoded, strict=True):
            pixels[position] = tensor if isinstance(tensor, InvalidInput) else tensor.permute(1, 2, 0)
    good = [p for p in pixels if not isinstance(p, InvalidInput)]
    rows: list[np.ndarray] = []
    cap = max(version.max_batch_size, 1)
    for start in range(0, len(good), cap):
        rows.extend(version.predict(good[start:start + cap]))
    computed = iter(rows)
    out = [p if isinstance(p, InvalidInput) else next(computed) for p in pixels]
    return out, time.perf_counter() - started
