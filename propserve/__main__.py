"""``python -m propserve``: the same as the ``propserve`` command."""

import sys

from propserve.cli import main

sys.exit(main())
