"""The ``conservcheck`` command line (typer and rich are imported here only)."""

from conservcheck.cli.app import app, main

__all__ = ["app", "main"]
