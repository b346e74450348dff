"""The response cache: answers of models whose manifest sets ``[cache] enabled = true``, under one byte budget.

:class:`~server.service.ClassifierService` looks every request of such a model up here before admitting it; a hit
is answered at once (no queue, no preprocessing, no forward pass), a computed answer is stored. Every edge (gRPC,
HTTP ``/v1``, both Open Inference Protocol bindings) reaches the cache through the service, so :meth:`ResponseCache.key`
below is the one key rule.

The key is BLAKE2b-256, keyed with a random secret drawn once per process (a client cannot compute keys, so it
cannot craft a collision that poisons another client's answer), over these fields, each length-prefixed so that no
two different requests encode alike:

* the payload: an encoded image's exact bytes, or a pixel tensor's dtype, shape and bytes (the kind is hashed too,
  so an image and a tensor with the same bytes differ, and so do two tensors of one buffer in different shapes);
* the version's *serial*: a number this cache gives each loaded version object. A new version or a new generation
  of the same version (changed files, a reload) is a new object, so answers of a version that was replaced are
  never found again; they age out, or go at once when the object is freed;
* the name of the runtime the version runs on now: a runtime switch (``runtime = "auto"``,
  :mod:`server.models.loader.runtime_choice`) changes it on the same object, and the new runtime's answers may
  differ in the last digits, so a switch starts the version's answers afresh;
* the effective ``top_k`` (the model's default when the request gives 0);
* the effective label language (the ``labels.<lang>.txt`` the version picks for the request's ``lang``);
* ``return_tiles``.

Not in the key, because they do not change the answer: the model name and a pinned version (the version object
stands for both), the request id, deadlines and timeouts. An OIP request's ``classification`` count arrives as
``top_k``; its other parameters only shape how the edge renders the answer.

Eviction: least recently used first, until the entries' estimated bytes fit the budget. Thread-safe (one lock):
the event loop looks up and stores, the metrics exporter reads :meth:`stats`, and the garbage collector may free a
version from any thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
import struct
import threading
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from server.core.types import ClassifyResult, RawTensor

log = logging.getLogger("classifyd.cache")
HASH_OFF_LOOP_BYTES = 64 * 1024
"""Payloads at least this large are hashed in a worker thread: BLAKE2b runs at 0.3 to 1 GB/s, so a large image
would hold the event loop for a millisecond; below this the thread hop costs more than the hash."""
_ENTRY_BYTES = 256
"""Estimated fixed cost of one entry: key, record, dictionary slots."""
_PREDICTION_BYTES = 96
"""Estimated cost of one prediction besides its label's text."""
_IMAGE, _TENSOR = b"I", b"T"


@dataclass
class ModelCounts:
    """One model's lookups since the daemon started."""

    hits: int = 0
    misses: int = 0


@dataclass(frozen=True)
class CacheStats:
    """A consistent copy of the cache's figures."""

    budget_bytes: int
    bytes: int
    entries: int
    evictions: int
    models: dict[str, ModelCounts] = field(default_factory=dict)

    def hit_rate(self, model: str) -> float | None:
        """Hits / lookups of ``model``; None before its first lookup."""
        counts = self.models.get(model)
        lookups = counts.hits + counts.misses if counts else 0
        return counts.hits / lookups if counts and lookups else None


@dataclass(frozen=True)
class _Entry:
    result: ClassifyResult
    serial: int
    size: int


def runtime_name(version: object) -> str:
    """The name of the runtime ``version`` runs on now ("" when it has none: a test double)."""
    return str(getattr(getattr(version, "runtime", None), "name", ""))


class ResponseCache:
    """Answers by key, least recently used evicted first once their bytes pass ``budget_bytes`` (0: off)."""

    def __init__(self, budget_bytes: int, secret: bytes | None = None) -> None:
        self.budget_bytes = budget_bytes
        self._secret = secret or secrets.token_bytes(32)  # BLAKE2b takes a key of up to 64 bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._by_serial: dict[int, set[bytes]] = {}
        self._serials: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._next_serial = 1
        self._bytes = 0
        self._evictions = 0
        self._counts: dict[str, ModelCounts] = {}
        self._warned: set[str] = set()
        self._freed: deque[int] = deque()  # serials of freed versions, purged under the lock by the next call

    def active_for(self, model: str, enabled: bool) -> bool:
        """Whether a request of ``model`` (whose manifest says ``enabled``) goes through the cache; warns once
        per model that enables it while the budget is 0."""
        if enabled and not self.budget_bytes and model not in self._warned:
            self._warned.add(model)
            log.warning("model %s sets [cache] enabled = true but --cache-bytes is 0: its answers are not cached",
                        model)
        return enabled and self.budget_bytes > 0

    def key(self, version: object, payload: bytes | RawTensor, *, top_k: int, lang: str, return_tiles: bool) -> bytes:
        """The key of a request: see the module docstring for what goes in and why. Costs a pass over the
        payload's bytes (call it off the event loop for large ones, :data:`HASH_OFF_LOOP_BYTES`)."""
        digest = hashlib.blake2b(key=self._secret, digest_size=32)
        if isinstance(payload, RawTensor):
            fields = [_TENSOR, payload.dtype.encode(), struct.pack(f"<{len(payload.shape)}q", *payload.shape),
                      payload.data]
        else:
            fields = [_IMAGE, payload]
        fields += [struct.pack("<qq?", self.serial(version), top_k, return_tiles), lang.encode(),
                   runtime_name(version).encode()]
        for value in fields:
            digest.update(struct.pack("<Q", len(value)))
            digest.update(value)
        return digest.digest()

    def serial(self, version: object) -> int:
        """The number of this loaded version object, given on first sight; its entries go when it is freed."""
        with self._lock:
            serial = self._serials.get(version)
            if serial is None:
                serial = self._serials[version] = self._next_serial
                self._next_serial += 1
                weakref.finalize(version, self._freed.append, serial)
            return serial

    def get(self, model: str, key: bytes) -> ClassifyResult | None:
        """The stored answer for ``key``, marked ``cache_hit`` with zero timings, or None; counts the lookup."""
        with self._lock:
            self._purge_freed()
            counts = self._counts.setdefault(model, ModelCounts())
            entry = self._entries.get(key)
            if entry is None:
                counts.misses += 1
                return None
            counts.hits += 1
            self._entries.move_to_end(key)
            return entry.result

    def put(self, key: bytes, version: object, result: ClassifyResult) -> None:
        """Store ``result`` (computed by ``version``) under ``key``, evicting the least recently used entries until
        the budget holds it; an answer larger than the whole budget is not stored."""
        size = entry_bytes(result)
        if size > self.budget_bytes:
            return
        serial = self.serial(version)
        stored = dataclasses.replace(result, cache_hit=True, queue_s=0.0, compute_s=0.0, preprocess_s=0.0)
        with self._lock:
            self._purge_freed()
            self._remove(key)
            while self._entries and self._bytes + size > self.budget_bytes:
                self._remove(next(iter(self._entries)))
                self._evictions += 1
            self._entries[key] = _Entry(stored, serial, size)
            self._by_serial.setdefault(serial, set()).add(key)
            self._bytes += size

    def stats(self) -> CacheStats:
        """A copy of the figures; safe from any thread."""
        with self._lock:
            self._purge_freed()
            return CacheStats(self.budget_bytes, self._bytes, len(self._entries), self._evictions,
                              {m: dataclasses.replace(c) for m, c in self._counts.items()})

    def _remove(self, key: bytes) -> None:
        """Drop one entry; call with the lock held."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._bytes -= entry.size
        keys = self._by_serial.get(entry.serial)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_serial[entry.serial]

    def _purge_freed(self) -> None:
        """Drop the entries of freed version objects (they can never be found again); call with the lock held.
        The finalizer only queues the serial: it may run in any thread, inside this lock's holder too."""
        while self._freed:
            for key in list(self._by_serial.get(self._freed.popleft(), ())):
                self._remove(key)


def entry_bytes(result: ClassifyResult) -> int:
    """The estimated memory of one stored answer: what the budget counts."""
    predictions = [*result.predictions, *(p for tile in result.tiles for p in tile.predictions)]
    return (_ENTRY_BYTES + len(result.model) + len(result.lang) + 64 * len(result.tiles)
            + sum(_PREDICTION_BYTES + len(p.label.encode()) for p in predictions))
