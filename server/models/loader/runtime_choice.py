"""``runtime = "auto"``: a version serves on PyTorch at once, and switches to ONNX Runtime between batches once a
background job has exported, verified and measured it faster.

The version goes live exactly as a ``torch`` one does. :class:`RuntimeChooser` then runs the job of
:mod:`server.models.loader.runtime_job` in a subprocess started niced and bound to the daemon's life
(:mod:`server.models.loader.job_process`; one at a time daemon-wide, its torch threads the host rule's), so the
export and the measurement neither hold the daemon's GIL nor take its inference thread. When the job chose ONNX
Runtime, the verified export is opened here (off the event loop), and one job on the inference thread swaps the
version's runtime and warms it up, so a batch runs wholly on one runtime or the other; the version keeps its
generation and state. Its batch curve is measured again on the new runtime (the TuneQueue; under load, once its
batches pause, while a fresh online tuner moves its cap), and the outcome,
switched or not and why, is reported to the manager's callback (an event, ModelInfo's runtime fields). A failed or
slower job, or one that cannot start, leaves the version on PyTorch, never unserved. The job runs, and its export is
switched to, only while the version's files are those it was loaded from (the manager's fingerprint, checked before
the job and again before the switch). A version that cannot run on ONNX Runtime (compiled, not fp32) gets no job at
all. A version retired or replaced while its job runs has the job cancelled (the subprocess killed) and never
switches; shutdown kills the subprocess too."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from server.core.config import DEFAULT_CACHE_DIR, BatchingDefaults
from server.inference.cap_tuning import tuner_for
from server.inference.devices import InferenceThreads
from server.inference.runtime import LoadedVersion
from server.inference.runtimes import Runtime
from server.inference.threads import process_threads
from server.models.loader import onnx
from server.models.loader.autotune import TuneQueue, plan_for
from server.models.loader.gate import warmup_images
from server.models.loader.job_process import job_process_setup
from server.models.loader.runtime_job import MEASURE_S, JobRequest, JobResult, RuntimeSpeed, not_exportable

log = logging.getLogger("classifyd.models")

JOB_MODULE = "server.models.loader.runtime_job"
PAUSE_S = 1.0
"""A version switched under load has its batch curve measured once its batches pause this long."""
STDERR_SHOWN = 600  # characters of a crashed job's stderr kept in the reason


@dataclass(frozen=True)
class RuntimeChoice:
    """What a version's runtime is and why: ModelInfo's ``runtime_reason`` and ``runtime_speeds``."""

    runtime: str
    reason: str
    speeds: tuple[RuntimeSpeed, ...] = ()


@dataclass(frozen=True)
class ChoiceSettings:
    """What the background job needs of the daemon's settings."""

    cache_dir: Path = DEFAULT_CACHE_DIR
    trust_code: bool = False
    batching: BatchingDefaults = field(default_factory=BatchingDefaults)  # to re-plan the batch curve
    measure_s: float = MEASURE_S


Reporter = Callable[[LoadedVersion, RuntimeChoice, str], None]
"""Called on the event loop with the version, its choice and a one-line headline for the event and the log."""
Command = Callable[[JobRequest], list[str]]
Files = Callable[[Path], Hashable]
"""What identifies the files a version loads from (the manager's fingerprint: paths, sizes, mtimes). Blocks."""


def job_command(request: JobRequest) -> list[str]:
    """``python -m server.models.loader.runtime_job ...`` with this interpreter."""
    return [sys.executable, "-m", JOB_MODULE, *request.argv()]


@dataclass(eq=False)
class _Job:
    version: LoadedVersion
    version_dir: Path
    files: Hashable
    """The files the version was loaded from: the job runs, and its export is switched to, only while they are."""
    cancelled: bool = False
    task: asyncio.Task[None] | None = None


class RuntimeChooser:
    """Schedules the background job of every ``auto`` version, one at a time, and switches the versions it
    chose ONNX Runtime for. Call everything on the event loop; nothing here blocks it."""

    def __init__(self, settings: ChoiceSettings, inference: InferenceThreads, tuning: TuneQueue,
                 report: Reporter, files: Files) -> None:
        self.settings = settings
        self._files = files
        self.command: Command = job_command
        """What runs a job (tests put a slow stand-in here)."""
        self._inference = inference
        self._tuning = tuning
        self._report = report
        self._turn = asyncio.Lock()  # one job at a time, daemon-wide, in the order scheduled
        self._jobs: dict[LoadedVersion, _Job] = {}

    def schedule(self, version: LoadedVersion, version_dir: Path, files: Hashable) -> RuntimeChoice | None:
        """Queue ``version``'s job when its manifest says ``auto``, and return what it serves on meanwhile; None
        (nothing queued) for any other runtime. ``files``: what the version was loaded from (:data:`Files`). A
        version that cannot serve on ONNX Runtime (compiled, not fp32) stays on PyTorch with no job. Never blocks,
        never raises."""
        if version.manifest.runtime != "auto":
            return None
        blocker = not_exportable(version)
        if blocker:
            return RuntimeChoice("torch", f"auto: {blocker}")
        job = _Job(version, version_dir, files)
        job.task = asyncio.get_running_loop().create_task(self._run(job), name=f"runtime {version.name}")
        self._jobs[version] = job
        log.info("model %s version %d: serving on PyTorch; ONNX Runtime is exported, verified and measured in the "
                 "background", version.name, version.version)
        return RuntimeChoice("torch", "auto: serving on PyTorch while ONNX Runtime is exported, verified and "
                                      "measured in the background")

    def idle(self) -> bool:
        """Whether no job is queued or running."""
        return not self._jobs

    def cancel(self, version: LoadedVersion | None) -> None:
        """Stop ``version``'s job (its subprocess is killed) and never switch it: it is being retired."""
        job = self._jobs.pop(version, None) if version is not None else None
        if job is not None:
            job.cancelled = True
            if job.task is not None:
                job.task.cancel()

    async def aclose(self) -> None:
        """Cancel every job and wait for their subprocesses to be killed."""
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        for version in list(self._jobs):
            self.cancel(version)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, job: _Job) -> None:
        try:
            async with self._turn:
                if job.cancelled or job.version.released:
                    return
                result = await self._changed(job) or await self._subprocess(job)
            if job.cancelled:
                return
            await self._conclude(job, result)
        finally:
            if self._jobs.get(job.version) is job:
                del self._jobs[job.version]

    async def _changed(self, job: _Job) -> JobResult | None:
        """A result staying on torch when the version's files are no longer those it was loaded from (edited in
        place: the job would build, and the switch would serve, weights the version never loaded); else None."""
        if await asyncio.to_thread(self._files, job.version_dir) == job.files:
            return None
        return JobResult("torch", f"the files in {job.version_dir} changed after the version was loaded: ONNX "
                                  "Runtime is not tried on files it does not serve")

    async def _subprocess(self, job: _Job) -> JobResult:
        """Run the job's subprocess to its end (killed if this task is cancelled) and read its result. The job
        starts at the lowest priority and is killed if the daemon dies (:mod:`server.models.loader.job_process`)."""
        request = JobRequest(job.version_dir, self.settings.cache_dir, self.settings.trust_code,
                             process_threads(), self.settings.measure_s)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the daemon's own imports
        try:
            process = await asyncio.create_subprocess_exec(*self.command(request), stdout=asyncio.subprocess.PIPE,
                                                           stderr=asyncio.subprocess.PIPE, env=env,
                                                           preexec_fn=job_process_setup)
        except OSError as exc:  # no interpreter, no processes left, ...: torch serves on, and says why
            return JobResult("torch", f"the runtime job could not start: {exc}")
        try:
            out, err = await process.communicate()
        except BaseException:
            if process.returncode is None:
                process.kill()
            await asyncio.shield(process.wait())
            raise
        lines = out.decode(errors="replace").strip().splitlines()
        if process.returncode == 0 and lines:
            try:
                return JobResult.from_json(lines[-1])
            except ValueError:
                pass
        tail = err.decode(errors="replace").strip()[-STDERR_SHOWN:]
        return JobResult("torch", f"the runtime job failed (exit status {process.returncode}): {tail}")

    async def _conclude(self, job: _Job, result: JobResult) -> None:
        """Switch to ONNX Runtime when the job chose it, then report; any failure leaves PyTorch serving."""
        if result.runtime == "onnxruntime":  # the job built from the files on disk: are they still the loaded ones?
            result = await self._changed(job) or result
        version, choice = job.version, RuntimeChoice("torch", result.reason, result.speeds)
        headline = f"runtime stays torch: {result.reason}"
        if result.runtime == "onnxruntime":
            try:
                if not await self._switch(job, Path(result.onnx_path)):
                    return
                choice = RuntimeChoice("onnxruntime", result.reason, result.speeds)
                headline = f"runtime switched to onnxruntime ({speedup(result.speeds):.2g}× eager)"
            except Exception as exc:  # noqa: BLE001 -- the export would not open or warm up: torch serves on
                choice = RuntimeChoice("torch", f"ONNX Runtime did not take over: {exc}", result.speeds)
                headline = f"runtime stays torch: {choice.reason}"
        if job.cancelled or version.released:
            return
        (log.info if choice.runtime == "onnxruntime" or choice.speeds else log.warning)(
            "model %s version %d: %s", version.name, version.version, headline if choice.runtime == "torch"
            else f"{headline}: {choice.reason}")
        self._report(version, choice, headline)
        if choice.runtime == "onnxruntime":
            self._retune(version)

    async def _switch(self, job: _Job, path: Path) -> bool:
        """Open the verified export and swap it in on the inference thread; False when the job was cancelled
        meanwhile. Raises what opening or the warm-up raises (the version then stays on PyTorch)."""
        runtime = await asyncio.to_thread(onnx.open_export, path)
        images = await asyncio.to_thread(warmup_images, job.version.manifest, job.version_dir)
        return await self._inference.for_version(job.version).run(_swap, job, runtime, images)

    def _retune(self, version: LoadedVersion) -> None:
        """Measure the batch curve again, now on the runtime that serves: at once, or, when the version serves under
        load and its cap is tuned, once its batches pause. A ladder timed beside live batches ranks the sizes by
        luck (the short passes find the cores free more often): switched under load at concurrency 32, mobilenet
        measured ``1:577* 2:235 4:230`` and was capped at 1, where idle it measures ``1:834 2:961 4:1120 8:1227*``.
        Until then the version keeps its cap, and a fresh online tuner (no PyTorch figures, no torch widths)
        moves it by what the new runtime's batches take."""
        batching = self.settings.batching
        plan = plan_for(version.manifest.batching, batching.autotune, batching.max_batch_size, version.device.type)
        if not plan.measure:
            return
        tuner = version.tuner
        if plan.choose_cap and tuner is not None and tuner.under_load(PAUSE_S):
            version.tuner = None
            tuner_for(version)
            self._tuning.schedule(version, plan, after_pause_s=PAUSE_S)
        else:
            self._tuning.schedule(version, plan)


def speedup(speeds: tuple[RuntimeSpeed, ...]) -> float:
    """ONNX Runtime's best rate over eager PyTorch's; 0.0 when either was not measured."""
    best = {name: max((s.images_per_second for s in speeds if s.runtime == name), default=0.0)
            for name in ("torch", "onnxruntime")}
    return best["onnxruntime"] / best["torch"] if best["torch"] else 0.0


def _swap(job: _Job, runtime: Runtime, images: list) -> bool:
    """On the inference thread, between batches: serve ``job``'s version through ``runtime`` and warm it up; put
    PyTorch back if the warm-up raises (and raise). Drops the module once the new runtime serves."""
    version = job.version
    if job.cancelled or version.released:
        return False
    previous = version.runtime
    version.runtime = runtime
    try:
        version.warm_up(images)
    except BaseException:
        version.runtime = previous
        raise
    version.module = nn.Identity()  # its memory goes: ONNX Runtime serves the version now
    return True
