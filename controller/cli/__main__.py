"""`python -m controller.cli`: the same as the `mineops` command."""

import contextlib
import sys

from controller.cli.main import main

with contextlib.suppress(KeyboardInterrupt):
    sys.exit(main())
