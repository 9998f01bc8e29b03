"""``python -m villa_fast``: the command-line interface (see :mod:`villa_fast.cli`)."""

import sys

from villa_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
