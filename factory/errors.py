"""The factory's errors: what the user wrote is wrong, or the run cannot go on."""
from __future__ import annotations

from pathlib import Path


class CampaignError(ValueError):
    """A campaign the user wrote is wrong; the message names the file, the line and the path."""

    def __init__(self, message: str, file: str | Path | None = None, line: int | None = None,
                 path: str | None = None):
        self.file, self.line, self.path, self.reason = (str(file) if file else None), line, path, message
        where = str(file) if file else "<campaign>"
        if line is not None:
            where += f":{line}"
        if path:
            where += f": {path}"
        super().__init__(f"{where}: {message}")


class FactoryError(ValueError):
    """A setting the user gave cannot work (output folder, missing campaign, ...)."""


class FactoryRunError(RuntimeError):
    """The run cannot go on (a unit failed on every retry, or no actor can take a checkpoint)."""
