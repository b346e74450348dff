"""How the runtime job's subprocess starts (:mod:`server.models.loader.runtime_choice`): at the lowest priority
before it imports anything, so even importing torch and exporting use only what serving leaves idle, and (on Linux)
killed when the daemon dies, so a crashed or SIGKILLed daemon leaves no orphaned export or measurement behind.

:func:`job_process_setup` runs in the forked child before ``exec`` (``preexec_fn``): it only makes system calls
prepared here in the parent, never imports or allocates much. Never raises: a host without ``prctl`` (not Linux)
runs the job niced only, and one that refuses ``nice`` runs it at the daemon's priority.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

NICENESS = 19
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, looked up now (in the parent: not after the fork); None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def job_process_setup() -> None:
    """In the child, before ``exec``: lower the priority to :data:`NICENESS` and ask for SIGKILL when the parent's
    forking thread (the daemon's event loop) ends. Never raises."""
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
