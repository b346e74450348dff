"""``python -m tests.serve``: the real ``python -m server`` with the test architectures of tests/kit.py and
tests/faults.py registered, for tests that need the daemon in its own process."""

from __future__ import annotations

import sys

import tests.faults  # registers classifyd:test_slow and classifyd:test_fussy
import tests.kit  # noqa: F401 - registers classifyd:test_gated
from server.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
