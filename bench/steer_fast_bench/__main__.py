"""``python -m steer_fast_bench bench ...``: the same as the ``steer-fast`` console script."""

import sys

from .cli import main

sys.exit(main())
