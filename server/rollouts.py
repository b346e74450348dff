"""Rollouts on live traffic: which requests a candidate answers (canary), which it also computes (shadow), and
the running comparison that decides it.

The service calls :meth:`Rollouts.route` when a request is resolved (a canary share of the unpinned requests is
answered by the candidate) and :meth:`Rollouts.compare_later` once the serving version answered (a sampled share
is copied to the candidate through the low-priority shadow lane, :mod:`server.inference.shadow`). Each comparison
(:mod:`server.inference.agreement`) updates the candidate's figures on its record, and once the rule of
:func:`server.core.rollout.verdict` speaks, the manager promotes or rejects it
(:meth:`server.models.rollout.RolloutSteps.decide`). Knows the manager and the inference side, not the edges.
Runs on the event loop and never blocks it; a comparison that cannot be made is skipped, never a live request
failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from server.core.errors import ClassifydError, InvalidInput, PreconditionFailed
from server.core.outputs import reduce_tiles
from server.core.rollout import RolloutSpec, verdict
from server.core.types import ClassifyCall
from server.inference.agreement import LabelMap, ScoreBoard
from server.inference.device_decode import DeviceJpeg
from server.inference.devices import InferenceThreads
from server.inference.prepare import InputPreparer
from server.inference.runtime import LoadedVersion
from server.inference.shadow import ShadowJob, ShadowLane
from server.models.manager import ModelManager

log = logging.getLogger("classifyd.rollout")

Inputs = Sequence[np.ndarray | DeviceJpeg]
REFERENCE_EVERY = 5
"""Every 5th shadowed request is also computed by the serving version on the shadow lane: the reference of the
compute ratio, measured as the candidate is (the forward pass alone, not the queue before it)."""
PREPARE_DEADLINE_S = 1.0
"""How long a shadow copy prepared again for a candidate with other preprocessing may wait for the decode budget:
shadow work never waits long for what live requests need."""


class Sampler:
    """Says yes to exactly ``percent`` % of calls, evenly spread (error diffusion, no randomness: a test or an
    operator sees the share the manifest asks for)."""

    def __init__(self) -> None:
        self._credit = 0.0

    def take(self, percent: float) -> bool:
        self._credit += percent / 100.0
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            return True
        return False


@dataclass(eq=False)
class _Rollout:
    """One candidate's live rollout."""

    candidate: LoadedVersion
    spec: RolloutSpec
    labels: LabelMap
    board: ScoreBoard
    canary: Sampler = field(default_factory=Sampler)
    shadow: Sampler = field(default_factory=Sampler)
    deciding: bool = False
    canary_answered: int = 0
    offered: int = 0


class Rollouts:
    """The live side of every model's rollout."""

    def __init__(self, manager: ModelManager, inference: InferenceThreads, inputs: InputPreparer) -> None:
        self._manager = manager
        self._inputs = inputs
        self.lane = ShadowLane(inference)
        self._live: dict[str, _Rollout] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _rollout(self, name: str, serving: LoadedVersion) -> _Rollout | None:
        """Model ``name``'s rollout, started afresh when its candidate changed; None without a candidate."""
        entry = self._manager.candidate(name)
        if entry is None or entry.loaded is None:
            self._live.pop(name, None)
            return None
        current = self._live.get(name)
        if current is None or current.candidate is not entry.loaded:
            labels = LabelMap(serving.manifest, entry.loaded.manifest)
            current = self._live[name] = _Rollout(entry.loaded, entry.loaded.manifest.rollout, labels,
                                                  ScoreBoard(labels_differ=labels.differ))
            if labels.differ:
                self._manager.report_scores(entry.loaded, current.board.scores())
                log.warning("model %s version %d has other labels than version %d: its rollout waits for an "
                            "operator (PromoteVersion or RejectVersion)", name, entry.version, serving.version)
        return current

    def route(self, call: ClassifyCall, serving: LoadedVersion) -> LoadedVersion:
        """The version that answers ``call``: the candidate for a ``canary_percent`` share of the requests that pin
        no version, else ``serving``. Only a candidate with the serving version's labels in the same order answers
        (the edges render an answer with the serving version's labels: Open Inference Protocol's output width)."""
        if call.version:
            return serving
        rollout = self._rollout(serving.name, serving)
        if rollout is None or rollout.spec.mode != "canary" or not rollout.labels.identical or \
                not rollout.canary.take(rollout.spec.canary_percent):
            return serving
        rollout.canary_answered += 1
        return rollout.candidate

    def is_candidate(self, version: LoadedVersion) -> bool:
        """Whether ``version`` is its model's rollout candidate (a canary request's items are computed by it
        alone)."""
        rollout = self._live.get(version.name)
        return rollout is not None and rollout.candidate is version

    def batching_version(self, version: LoadedVersion) -> LoadedVersion:
        """The version whose limits configure the model's batcher for a request admitted with ``version``: the
        serving version for a canary request, so the shared batcher is not reconfigured back and forth."""
        if not self.is_candidate(version):
            return version
        serving = self._manager.get(version.name).serving()
        return serving.loaded if serving is not None and serving.loaded is not None else version

    def compare_later(self, call: ClassifyCall, inputs: Inputs, prepared_for: LoadedVersion,
                      answered_by: LoadedVersion, row: np.ndarray) -> None:
        """Copy a sampled share of answered requests to the candidate and compare its answer with ``row`` (the
        serving version's full score row, reduced over the tiles of a tiled request) once it is computed.
        ``inputs`` were prepared for ``prepared_for``. Never raises."""
        if call.version or answered_by.released:
            return
        rollout = self._rollout(answered_by.name, answered_by)
        if rollout is None or answered_by is rollout.candidate or rollout.board.labels_differ or \
                not rollout.shadow.take(rollout.spec.shadow_percent):
            return
        candidate = rollout.candidate
        same = candidate.manifest.input == prepared_for.manifest.input and \
            candidate.manifest.tiling == prepared_for.manifest.tiling
        rollout.offered += 1
        if rollout.offered % REFERENCE_EVERY == 1:
            self.lane.offer(ShadowJob(prepared_for, inputs, rollout.spec.shadow_max_share,
                                      lambda rows, per_item_s, items: self._reference(rollout, rows, per_item_s,
                                                                                      items),
                                      lambda: self._current(rollout) and self._manager.in_use(prepared_for)))
        if same:
            self._offer(rollout, inputs, row)
        elif self.lane.reserve():  # other preprocessing: prepared again for the candidate, off the request's path
            task = asyncio.get_running_loop().create_task(self._prepare_and_offer(rollout, call, row))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _current(self, rollout: _Rollout) -> bool:
        """Whether ``rollout`` is still its model's (its candidate neither decided nor replaced): a shadow job of
        one that is not is skipped, and its version's lease given back."""
        return self._live.get(rollout.candidate.name) is rollout and self._manager.in_use(rollout.candidate)

    async def _prepare_and_offer(self, rollout: _Rollout, call: ClassifyCall, row: np.ndarray) -> None:
        """Prepare ``call``'s payload for the candidate within a place reserved in the lane (given back unless
        the job is offered), waiting at most :data:`PREPARE_DEADLINE_S` for the decode budget. An input the
        candidate cannot prepare is one of its errors; a full pool or budget is a sample not taken."""
        candidate = rollout.candidate
        deadline = time.monotonic() + PREPARE_DEADLINE_S
        try:
            if candidate.manifest.tiling is not None:
                tiles = await self._inputs.tiles(call.payload, candidate.manifest, deadline=deadline)
                inputs: Inputs = [array for _, array in tiles]
            else:
                inputs = [await self._inputs.prepare(call.payload, candidate, deadline=deadline)]
        except InvalidInput:
            self.lane.unreserve()
            self._failed(rollout)
            return
        except ClassifydError:  # Overloaded, DeadlineExpired: the pool or the decode budget is busy with live work
            self.lane.unreserve(dropped=True)
            return
        except BaseException:
            self.lane.unreserve()
            raise
        self._offer(rollout, inputs, row, reserved=True)

    def _offer(self, rollout: _Rollout, inputs: Inputs, row: np.ndarray, *, reserved: bool = False) -> None:
        def done(rows: list[np.ndarray] | BaseException, per_item_s: float, batch_items: int) -> None:
            if isinstance(rows, BaseException) or not rows:
                self._failed(rollout)
                return
            tiling = rollout.candidate.manifest.tiling
            mine = reduce_tiles(rows, tiling.reduce) if tiling is not None else rows[0]
            rollout.board.add(rollout.labels.compare(row, mine))
            rollout.board.candidate.add(per_item_s, batch_items)
            self._scored(rollout)

        self.lane.offer(ShadowJob(rollout.candidate, inputs, rollout.spec.shadow_max_share, done,
                                  lambda: self._current(rollout)), reserved=reserved)

    @staticmethod
    def _reference(rollout: _Rollout, rows: list[np.ndarray] | BaseException, per_item_s: float, items: int) -> None:
        if not isinstance(rows, BaseException):
            rollout.board.serving.add(per_item_s, items)

    def _failed(self, rollout: _Rollout) -> None:
        rollout.board.failed()
        self._scored(rollout)

    def _scored(self, rollout: _Rollout) -> None:
        """Publish the figures and, once the rule decides, have the manager promote or reject the candidate."""
        candidate = rollout.candidate
        scores = rollout.board.scores()
        self._manager.report_scores(candidate, scores)
        outcome = None if rollout.deciding else verdict(rollout.spec, scores)
        if outcome is None:
            return
        rollout.deciding = True
        task = asyncio.get_running_loop().create_task(self._decide(candidate, *outcome))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _decide(self, candidate: LoadedVersion, promote: bool, reason: str) -> None:
        try:
            await self._manager.decide(candidate.name, candidate.version, promote, reason, loaded=candidate)
        except PreconditionFailed as exc:  # decided meanwhile: an operator, or a newer version replaced it
            log.info("rollout of model %s version %d: %s", candidate.name, candidate.version, exc)
        except Exception:
            log.exception("rollout decision for model %s version %d failed", candidate.name, candidate.version)

    def canary_answered(self, name: str) -> int:
        """Requests the model's current candidate answered (canary mode)."""
        rollout = self._live.get(name)
        return rollout.canary_answered if rollout is not None else 0

    async def aclose(self) -> None:
        """Stop the shadow lane and the pending comparisons and decisions."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.lane.aclose()
