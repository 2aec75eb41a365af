"""The `medsam2` command: one module per verb, parsing arguments and calling the engine."""

from .main import main

__all__ = ["main"]
