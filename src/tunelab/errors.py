"""The error types that are the user's to fix: the CLI prints them as one clear line instead of a traceback."""

from __future__ import annotations


def _user_errors() -> tuple[type[BaseException], ...]:
    from tunelab.config import ConfigError
    from tunelab.data import DataError
    from tunelab.methods.core import MethodError
    from tunelab.models import ModelError
    from tunelab.runs import RunError
    from tunelab.scaling import AnalysisError
    from tunelab.scaling.store import StoreError
    from tunelab.train.loop import TrainingDiverged

    return (ConfigError, DataError, MethodError, ModelError, RunError, TrainingDiverged, StoreError, AnalysisError)


USER_ERRORS = _user_errors()
