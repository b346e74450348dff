"""``python -m server``: the daemon's entry point (see :mod:`server.cli.main`)."""

import sys

from server.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
