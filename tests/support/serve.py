"""``python -m tests.support.serve``: the real ``python -m server`` with the test architectures of
tests/support/kit.py and
tests/support/faults.py registered, for tests that need the daemon in its own process."""

from __future__ import annotations

import sys

import tests.support.faults  # registers classifyd:test_slow and classifyd:test_fussy
import tests.support.kit  # noqa: F401 - registers classifyd:test_gated
from server.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
