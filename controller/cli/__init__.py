"""The `mineops` command line: one module per subcommand, listed in `controller.cli.main`."""

from controller.cli.main import main

__all__ = ["main"]
