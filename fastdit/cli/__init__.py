"""The `fastdit` command line: one module per subcommand, dispatched by ``commands.main``.

CLI modules parse flags and call the library (``fastdit.models``, ``fastdit.diffusion``, ...); they
do not borrow each other's helpers.
"""
from fastdit.cli.commands import main

__all__ = ["main"]
