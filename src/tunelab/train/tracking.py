"""Experiment trackers: ``train.report_to: [tensorboard, mlflow, wandb]`` sends the rows of metrics.jsonl (every
logged step and evaluation) to each, with the resolved config and the parameter counts.

* ``tensorboard`` — event files under ``RUN/tensorboard/`` (``pip install 'tunelab[tensorboard]'``);
* ``mlflow`` — a local file store ``RUN/mlruns/`` (``tunelab[mlflow]``; no server, no database:
  ``MLFLOW_ALLOW_FILE_STORE`` is set, as MLflow 3 keeps the file store in maintenance mode; ``mlflow ui
  --backend-store-uri RUN/mlruns`` shows it); the run's id is kept in ``RUN/tracking.json`` so that ``--resume``
  continues the same MLflow run;
* ``wandb`` — offline mode under ``RUN/wandb/`` (``tunelab[wandb]``; ``wandb sync`` uploads it later), resumed by id.

metrics.jsonl stays the record of truth: a tracker that fails to write warns and is dropped, the run goes on.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.files import atomic_write_json, warn

TRACKERS = ("tensorboard", "mlflow", "wandb")
STATE_FILE = "tracking.json"
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"train.report_to: unknown tracker(s) {', '.join(map(repr, unknown))}; choose from "
                          f"{', '.join(TRACKERS)}")


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple) else str(v)
    return out


class Trackers:
    """The trackers of one run (main process only); ``log`` takes a metrics.jsonl row."""

    def __init__(self, names: list[str], run_dir: Path, name: str, config: dict[str, Any],
                 params: dict[str, int]) -> None:
        self.run_dir, self.active = Path(run_dir), {}
        state_path = self.run_dir / STATE_FILE
        self.state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        for tracker in names:
            try:
                importlib.import_module(_PACKAGES[tracker])
            except ImportError:
                raise ConfigError(f"train.report_to: {tracker} is not installed; pip install "
                                  f"'tunelab[{tracker}]' (or drop it from report_to)") from None
            self.active[tracker] = getattr(self, f"_open_{tracker}")(name, config, params)
        atomic_write_json(state_path, self.state)

    # -- opening --------------------------------------------------------------------------------------------
    def _open_tensorboard(self, name: str, config: dict[str, Any], params: dict[str, int]) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")
        for k, v in params.items():
            writer.add_scalar(f"params/{k}", v, 0)
        return writer

    def _open_mlflow(self, name: str, config: dict[str, Any], params: dict[str, int]) -> Any:
        import mlflow

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = mlflow.MlflowClient(tracking_uri=mlflow_uri(self.run_dir), registry_uri=mlflow_uri(self.run_dir))
        run_id = self.state.get("mlflow_run_id")
        if run_id is None:
            experiment = client.get_experiment_by_name("tunelab")
            exp_id = experiment.experiment_id if experiment else client.create_experiment("tunelab")
            run_id = client.create_run(exp_id, run_name=name).info.run_id
            self.state["mlflow_run_id"] = run_id
            for k, v in {**_flatten(config), **{f"params.{k}": str(v) for k, v in params.items()}}.items():
                client.log_param(run_id, k[:250], v[:6000])
        return client

    def _open_wandb(self, name: str, config: dict[str, Any], params: dict[str, int]) -> Any:
        import wandb

        run_id = self.state.setdefault("wandb_run_id", uuid.uuid4().hex[:12])
        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(project="tunelab", name=name, id=run_id, resume="allow", mode="offline",
                          dir=str(self.run_dir), config={**config, "params": params}, reinit="create_new")

    # -- logging --------------------------------------------------------------------------------------------
    def log(self, row: dict[str, Any]) -> None:
        step, scalars = int(row.get("step", 0)), _scalars(row)
        for tracker, handle in list(self.active.items()):
            try:
                if tracker == "tensorboard":
                    for k, v in scalars.items():
                        handle.add_scalar(k, v, step)
                elif tracker == "mlflow":
                    handle.log_batch(self.state["mlflow_run_id"], metrics=[
                        _mlflow_metric(k, v, step) for k, v in scalars.items()])
                else:
                    handle.log(scalars, step=step)
            except Exception as e:  # a tracker must never stop training: metrics.jsonl has the row
                warn(f"train.report_to: {tracker} failed to log step {step} ({type(e).__name__}: {e}); "
                     f"dropping it for this run (metrics.jsonl has every row)")
                del self.active[tracker]

    def close(self, status: str = "FINISHED") -> None:
        for tracker, handle in self.active.items():
            try:
                if tracker == "tensorboard":
                    handle.close()
                elif tracker == "mlflow":
                    handle.set_terminated(self.state["mlflow_run_id"], status=status)
                else:
                    handle.finish(exit_code=0 if status == "FINISHED" else 1)
            except Exception as e:
                warn(f"train.report_to: closing {tracker} failed ({type(e).__name__}: {e})")
        self.active = {}


def mlflow_uri(run_dir: Path) -> str:
    """The run's local MLflow store."""
    return (Path(run_dir) / "mlruns").resolve().as_uri()


def _mlflow_metric(key: str, value: float, step: int) -> Any:
    import time

    from mlflow.entities import Metric

    return Metric(key=key, value=value, timestamp=int(time.time() * 1000), step=step)
