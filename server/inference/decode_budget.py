"""The process-wide decode budget (``--max-decode-bytes``): the bytes the inputs being decoded at once may hold.

The pixel cap bounds one image; without a budget, every preprocessing thread could hold a 100-megapixel image
at the same time. Each decode reserves its estimated peak (:mod:`server.inference.decode_cost`, known from the
header before any pixel is decoded) and gives it back when its thread is done with it. A reservation that does
not fit waits on the event loop, first come first served, until its deadline; one larger than the whole budget,
or still waiting when its deadline passes, is refused with :class:`~server.core.errors.Overloaded`
(RESOURCE_EXHAUSTED). ``try_reserve`` and ``release`` are thread-safe (the preprocessing threads call them);
``reserve`` runs on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from server.core.errors import Overloaded

MIB = 1 << 20


@dataclass(eq=False)
class _Waiter:
    nbytes: int
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop
    granted: bool = False


class DecodeBudget:
    """A byte budget shared by the decodes of one process."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1:
            raise ValueError(f"the decode budget must be at least 1 byte, got {limit}")
        self.limit = limit
        self._clock = clock  # the clock of the deadlines: time.monotonic(), as ClassifyCall.deadline
        self._lock = threading.Lock()
        self._used = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def in_use(self) -> int:
        """Bytes reserved now."""
        return self._used

    @property
    def waiting(self) -> int:
        """Reservations waiting for bytes to be given back."""
        return len(self._waiters)

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit now and nobody waits before them. Never blocks (any thread).
        Raises Overloaded if ``nbytes`` alone exceed the budget."""
        self._check_size(nbytes)
        with self._lock:
            if self._waiters or self._used + nbytes > self.limit:
                return False
            self._used += nbytes
            return True

    async def reserve(self, nbytes: int, deadline: float | None = None) -> None:
        """Reserve ``nbytes``, waiting (this task only) behind earlier reservations until they fit.

        Raises Overloaded if ``nbytes`` alone exceed the budget, or if ``deadline`` (``clock()`` seconds; None:
        none) passes first. Cancelled while waiting, it reserves nothing."""
        self._check_size(nbytes)
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._waiters and self._used + nbytes <= self.limit:
                self._used += nbytes
                return
            waiter = _Waiter(nbytes, loop.create_future(), loop)
            self._waiters.append(waiter)
        timeout = None if deadline is None else deadline - self._clock()
        try:
            if timeout is not None and timeout <= 0:
                raise TimeoutError
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except TimeoutError:
            if self._withdraw(waiter):
                raise Overloaded(self._busy_message(nbytes)) from None
            # granted as the deadline came: the request keeps its bytes and goes on
        except asyncio.CancelledError:
            if not self._withdraw(waiter):
                self.release(nbytes)  # granted, but nobody will use it
            raise

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` reserved earlier, and grant the waiting reservations that now fit (any thread)."""
        with self._lock:
            if nbytes > self._used:
                raise ValueError(f"releasing {nbytes} bytes of the decode budget, but only {self._used} are reserved")
            self._used -= nbytes
            self._grant_waiting()

    def _withdraw(self, waiter: _Waiter) -> bool:
        """Take a waiting reservation out of the queue; False if it was granted in the meantime."""
        with self._lock:
            if waiter.granted:
                return False
            self._waiters.remove(waiter)
            self._grant_waiting()  # it may have been the first in line, holding back smaller ones that fit
            return True

    def _grant_waiting(self) -> None:
        """Grant the waiting reservations that fit, in order (called with the lock held)."""
        while self._waiters and self._used + self._waiters[0].nbytes <= self.limit:
            waiter = self._waiters.popleft()
            self._used += waiter.nbytes
            waiter.granted = True
            try:
                waiter.loop.call_soon_threadsafe(_resolve, waiter.future)
            except RuntimeError:  # its loop is closed: nobody is left to wait, nothing to hand over
                self._used -= waiter.nbytes

    def _check_size(self, nbytes: int) -> None:
        if nbytes > self.limit:
            raise Overloaded(f"decoding this input needs about {_mib(nbytes)} MiB, more than the whole decode "
                             f"budget of {_mib(self.limit)} MiB (--max-decode-bytes); send a smaller image")

    def _busy_message(self, nbytes: int) -> str:
        return (f"the decode budget of {_mib(self.limit)} MiB (--max-decode-bytes) was in use by other requests' "
                f"inputs ({_mib(self._used)} MiB) until this request's deadline; decoding it needs about "
                f"{_mib(nbytes)} MiB; retry later")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.1f}" if nbytes < 10 * MIB else f"{nbytes // MIB}"
