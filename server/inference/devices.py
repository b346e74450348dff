"""One inference thread per device: the registry every forward pass finds its thread in.

A version's forward passes, warm-up, validation, batch-curve measurement and release run on the
:class:`~server.inference.runtime.InferenceThread` of its device (``version.device``), so two GPUs compute at the
same time while the versions of one device still take turns on one thread (torch pays when a device's work hops
between threads). Every CPU version shares the one CPU thread: torch's intra-op threads already spread a CPU
forward pass over the cores (:mod:`server.inference.threads`).
"""

from __future__ import annotations

import threading

import torch

from server.inference.runtime import InferenceThread, LoadedVersion
from server.inference.threads import remember_process_threads


def device_key(device: torch.device) -> str:
    """The name of ``device``'s thread: ``cpu`` or ``cuda:N`` (``cuda`` alone is torch's current device)."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device) if device.type == "cuda" else device.type


class InferenceThreads:
    """Creates an :class:`InferenceThread` per device on first use; :meth:`shutdown` stops them all."""

    def __init__(self) -> None:
        """No thread yet. Records the process's torch thread count (:mod:`server.inference.threads`): create it
        after ``--torch-threads`` was applied."""
        remember_process_threads()
        self._threads: dict[str, InferenceThread] = {}
        self._lock = threading.Lock()  # the loader and check may ask from other threads than the event loop's
        self._closed = False

    def for_device(self, device: torch.device) -> InferenceThread:
        """``device``'s thread, created now if it has none. Raises RuntimeError once :meth:`shutdown` ran (as
        a stopped thread's ``run`` does)."""
        key = device_key(device)
        with self._lock:
            if self._closed:
                raise RuntimeError("the inference threads were shut down")
            thread = self._threads.get(key)
            if thread is None:
                thread = self._threads[key] = InferenceThread()
            return thread

    def for_version(self, version: LoadedVersion) -> InferenceThread:
        """The thread of ``version``'s device. Raises RuntimeError once shut down."""
        return self.for_device(version.device)

    def devices(self) -> list[str]:
        """The devices that have a thread, sorted (``cpu``, ``cuda:0``...)."""
        with self._lock:
            return sorted(self._threads)

    def shutdown(self) -> None:
        """Wait for each thread's running call, then stop every thread; later calls of :meth:`for_device` raise.
        Blocks: call it off the event loop."""
        with self._lock:
            self._closed = True
            threads = list(self._threads.values())
        for thread in threads:
            thread.shutdown()
