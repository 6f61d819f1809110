"""The `hubmix` command: click parsing only; each command calls one library function."""

from hubmix.cli import hub, jobs, loras, merge, models, render, ui  # noqa: F401  (register the commands)
from hubmix.cli.app import cli, main, run

__all__ = ["cli", "main", "run"]
