"""Model control, with Triton's names: which models of the repository are loaded, and who decides.

- ``poll`` (the default): the watched directory decides; every model directory is loaded and hot-swapped.
- ``explicit``: the directory is the catalogue. A model loads only when asked (:meth:`ModelControl.load`: OIP
  ``RepositoryModelLoad``, ``classifier.v1`` ``LoadModel``); until then its versions are listed ``AVAILABLE``. A loaded
  model still hot-swaps the versions dropped into its directory. :meth:`ModelControl.unload` retires it as a swap
  retires a version (requests in flight finish; new ones are UNAVAILABLE, "not loaded") and lists it AVAILABLE again.
- ``none``: every model loads at start-up and never again: no watcher, and reloads are refused.

The manager keeps the records and states (:mod:`server.models.manager`); this module only decides which models it
is to load (``ModelManager.wanted``) and carries out the operator's calls. Runs on the event loop; the waits are for
the loads and drains themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from server.core import errors
from server.core.config import DEFAULT_MODEL_CONTROL, MODEL_CONTROL_MODES
from server.core.lifecycle import VersionState
from server.models.manager import ModelManager, ModelRecord
from server.models.source.repository import model_present

log = logging.getLogger("classifyd.models")
POLL, EXPLICIT, NONE = MODEL_CONTROL_MODES
NAME_MAX_BYTES = 255
"""The longest file name Linux filesystems take: a model is a directory named after it."""


def check_model_name(name: str) -> None:
    """Raise InvalidInput unless ``name`` can name a model directory of the repository."""
    if not name or not name.isprintable() or "/" in name or name.startswith("."):
        raise errors.InvalidInput(f"invalid model name {name[:100]!r}: non-empty, printable, no '/', not starting "
                                  "with '.'")
    if len(name.encode()) > NAME_MAX_BYTES:
        raise errors.InvalidInput(f"invalid model name: {len(name.encode())} bytes long; a model is a directory "
                                  f"and its name has at most {NAME_MAX_BYTES} bytes")


class ModelControl:
    """The ``--model-control`` mode over a manager. Construct it before the repository loads: in explicit mode it
    tells the manager to load no model until asked."""

    def __init__(self, manager: ModelManager, mode: str = DEFAULT_MODEL_CONTROL) -> None:
        if mode not in MODEL_CONTROL_MODES:
            raise ValueError(f"model control must be one of {', '.join(MODEL_CONTROL_MODES)}, got {mode!r}")
        self.mode = mode
        self._manager = manager
        self._asked: set[str] = set()
        """Explicit mode: the models asked to load and not unloaded since (forgotten when the directory goes)."""
        self._turns: dict[str, asyncio.Lock] = {}
        """Per model: loads and unloads take turns, so a load never sees an unload half done."""
        self._calls: set[asyncio.Task[ModelRecord]] = set()
        manager.memory.on_stop(self.aclose)
        if mode == EXPLICIT:
            manager.wanted = self._asked.__contains__
            manager.on_removed = self._asked.discard

    @property
    def watches(self) -> bool:
        """Whether the repository is watched for changes (not in mode none)."""
        return self.mode != NONE

    def check_reload(self, name: str) -> None:
        """Raise PreconditionFailed when a reload of ``name`` is refused (mode none)."""
        if self.mode == NONE:
            raise errors.PreconditionFailed(f"cannot reload model {name}: the daemon runs with --model-control none "
                                            "(models load at start-up and never again); restart it to load new files")

    async def load(self, name: str) -> ModelRecord:
        """Load model ``name`` of the catalogue now (its newest loadable versions) and keep it loaded until
        :meth:`unload`; a model already loaded takes its changed files. Blocks the calling task until the load is
        done. Raises InvalidInput for a bad name, PreconditionFailed outside explicit mode or when no version
        could be loaded (the versions' errors say why; fixed files load once they settle), ModelNotFound when the
        repository has no such directory, ModelUnavailable when the repository cannot be read."""
        check_model_name(name)
        self._require_explicit(f"load model {name}")
        if not await self._present(name):  # before a turn is made for it: only directories get one
            raise errors.ModelNotFound(f"cannot load model {name}: the repository has no directory {name} "
                                       f"(known models: {', '.join(self._manager.model_names()) or 'none'})")
        return await self._owned(name, self._load)

    async def _load(self, name: str) -> ModelRecord:
        await self._manager.retired(name)  # an unload or eviction draining now ends first: never load beside it
        self._asked.add(name)
        log.info("model %s: load requested", name)
        await self._reconcile(name)
        if name not in self._asked:
            raise errors.ModelUnavailable(f"model {name} was unloaded while it loaded")
        record = self._manager.get(name)
        if record.serving() is None:
            failed = [f"version {v.version}: {v.error}" for v in record.versions.values()
                      if v.state is VersionState.FAILED]
            raise errors.PreconditionFailed(f"model {name} did not load: " + ("; ".join(failed) or
                                                                             "it has no version directories"))
        return record

    async def unload(self, name: str) -> ModelRecord:
        """Unload model ``name``: new requests for it are UNAVAILABLE at once, requests in flight finish, then its
        versions are released and listed AVAILABLE. Blocks the calling task until then. Raises InvalidInput,
        PreconditionFailed outside explicit mode, ModelNotFound for an unknown model, ModelUnavailable when the
        repository cannot be read (the model is unloaded once it can)."""
        check_model_name(name)
        self._require_explicit(f"unload model {name}")
        self._manager.get(name)  # NOT_FOUND for a model the daemon does not know
        return await self._owned(name, self._unload)

    async def _unload(self, name: str) -> ModelRecord:
        record = self._manager.get(name)
        self._asked.discard(name)
        log.info("model %s: unload requested; in-flight requests finish first", name)
        await self._reconcile(name)  # retires the loaded versions
        await self._manager.retired(name)
        await self._reconcile(name)  # lists the released versions AVAILABLE
        try:
            return self._manager.get(name)
        except errors.ModelNotFound:  # its directory was removed meanwhile: unloaded all the same
            return record

    async def _owned(self, name: str, work: Callable[[str], Awaitable[ModelRecord]]) -> ModelRecord:
        """Run ``work(name)`` (a load or unload) in a task of this control, after the model's earlier calls,
        and wait for it: a caller that gives up (its deadline, a cancelled call) leaves the work to finish, so no
        version is left half loaded or half released."""
        turn = self._turns.setdefault(name, asyncio.Lock())

        async def in_turn() -> ModelRecord:
            async with turn:
                return await work(name)

        task = asyncio.get_running_loop().create_task(in_turn(), name=f"model control {name}")
        self._calls.add(task)
        task.add_done_callback(_done)
        task.add_done_callback(self._calls.discard)
        return await asyncio.shield(task)

    async def aclose(self) -> None:
        """Cancel the loads and unloads under way (shutdown) and wait for them to stop."""
        for task in list(self._calls):
            task.cancel()
        await asyncio.gather(*list(self._calls), return_exceptions=True)

    def forget(self, name: str) -> None:
        """Explicit mode: ``name`` is no longer asked to be loaded (the memory budget evicted it); the next
        reconcile lists it AVAILABLE. Other modes: nothing."""
        self._asked.discard(name)

    def _require_explicit(self, what: str) -> None:
        if self.mode != EXPLICIT:
            decides = "the watched directory decides what is loaded" if self.mode == POLL else \
                "models load at start-up and never again"
            raise errors.PreconditionFailed(f"cannot {what}: the daemon runs with --model-control {self.mode} "
                                            f"({decides}); explicit load and unload need --model-control explicit")

    async def _present(self, name: str) -> bool:
        try:
            return await asyncio.to_thread(model_present, self._manager.settings.models_dir, name)
        except OSError as exc:
            raise _unreachable(name, exc) from exc

    async def _reconcile(self, name: str) -> None:
        try:
            await self._manager.reconcile(name)
        except OSError as exc:
            raise _unreachable(name, exc) from exc


def _done(task: asyncio.Task[ModelRecord]) -> None:
    """Retrieve a finished call's exception: its caller got it, or was gone."""
    if not task.cancelled():
        task.exception()


def _unreachable(name: str, exc: OSError) -> errors.ModelUnavailable:
    return errors.ModelUnavailable(f"model {name}: the model repository cannot be read ({exc.strerror or exc}); "
                                   "retry once it is back")
