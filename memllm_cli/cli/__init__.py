"""The `memllm` command line: the only code that imports Typer or Rich."""

from . import bench, commands, serve  # noqa: F401  (they register their commands on the app)
from .app import app, run

__all__ = ["app", "run"]
