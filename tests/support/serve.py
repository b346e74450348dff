"""``python -m tests.support.serve``: the real ``python -m server`` with the test architectures registered
(tests/support/architectures.py), for tests that need the daemon in its own process."""

from __future__ import annotations

import sys

from server.cli.main import main
from tests.support.architectures import register_test_architectures

if __name__ == "__main__":
    register_test_architectures()
    sys.exit(main())
