"""``python -m engine``: the ``probe-engine`` command line."""

import sys

from .cli import main

sys.exit(main())
