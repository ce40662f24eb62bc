"""``python -m lapse``: the ``lapse`` command (see :mod:`lapse.cli`)."""

import sys

from lapse.cli import main

if __name__ == "__main__":
    sys.exit(main())
