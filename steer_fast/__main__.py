"""``python -m steer_fast bench ...``: the same as the ``steer-fast`` console script."""

import sys

from .cli import main

sys.exit(main())
