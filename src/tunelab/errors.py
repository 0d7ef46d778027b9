"""The error types that are the user's to fix, in one leaf module (it imports nothing of tunelab's).

Each is raised with a message that names the file, key or module and says what would work; the CLI prints them as
one clear line (exit code 2) instead of a traceback. The modules that raise them re-export them under their old
homes (``tunelab.config.ConfigError``, ``tunelab.data.DataError``, …).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the config."""


class DataError(ValueError):
    """A data problem, written for the person running the command.

    The message names the file, the line and the field, and says what would work. ``source``, ``line`` and
    ``field`` repeat those for programs (``None`` where they do not apply).
    """

    def __init__(
        self, message: str, *, source: str | None = None, line: int | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.source = source
        self.line = line
        self.field = field


class MethodError(ValueError):
    """A method cannot be applied as configured (message says what would work)."""


class QuantError(MethodError):
    """Quantization cannot be applied as configured (message says what would work)."""


class ModelError(ValueError):
    """A model spec, dtype or model folder that tunelab cannot use; the message says what would work."""


class RunError(ValueError):
    """A run directory is missing, incomplete or does not fit the base model."""


class TrainingDiverged(RuntimeError):
    """A loss, the gradient norm or a trained weight became NaN or infinite (the run's status is ``diverged``)."""


class StoreError(ValueError):
    """The study store is missing or unusable (the message says which file and what would work)."""


class AnalysisError(ValueError):
    """The study has too few finished runs to fit (the message says which axis lacks what)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, MethodError, ModelError, RunError, TrainingDiverged, StoreError, AnalysisError,
)


def suggest(name: str, options: Iterable[str]) -> str:
    """' Did you mean X?' for the closest option, or a list of the valid ones."""
    options = list(options)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{close[0]}'?"
    return f" Valid keys: {', '.join(options)}."
