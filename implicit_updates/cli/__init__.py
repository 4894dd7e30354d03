"""The ``implicit-updates`` command line (:func:`main`)."""

from implicit_updates.cli.commands import main

__all__ = ["main"]
