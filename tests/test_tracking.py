"""train.report_to: TensorBoard, MLflow (local file store) and W&B (offline) receive the same scalars as
metrics.jsonl, plus the config and parameter counts; read back with each library's own reader."""

from __future__ import annotations

import json

import pytest

from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.train.loop import train


def _run(tmp_path, trackers):
    cfg = load_config(None, ["model.name=tiny-llama", "method.name=lora", "data.train=synthetic:arith:train:24",
                             "data.eval=synthetic:arith:test:8", "train.max_steps=4", "train.batch_size=4",
                             "train.eval_every=2", "train.progress=false", f"output_dir={tmp_path / 'run'}",
                             f"train.report_to={json.dumps(trackers)}"])
    result = train(cfg)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result.run_dir, rows


def test_tensorboard_holds_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, rows = _run(tmp_path, ["tensorboard"])
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("loss")}
    assert loss == pytest.approx({r["step"]: r["loss"] for r in rows if "loss" in r}, rel=1e-6)
    assert {e.step for e in events.Scalars("eval_loss")} == {r["step"] for r in rows if "eval_loss" in r}
    assert events.Scalars("params/trainable")[0].value > 0


def test_mlflow_local_store_holds_the_metrics_and_the_config(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    run, rows = _run(tmp_path, ["mlflow"])
    from tunelab.train.tracking import mlflow_uri

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(run))
    run_id = json.loads((run / "tracking.json").read_text())["mlflow_run_id"]
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert history == pytest.approx({r["step"]: r["loss"] for r in rows if "loss" in r}, rel=1e-6)
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.data.params["method.name"] == "lora"
    assert int(info.data.params["params.trainable"]) > 0


def wandb_history(path):
    """The history rows of an offline W&B run file (LevelDB-style log of protobuf records, 32 KiB blocks)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run, rows = _run(tmp_path, ["wandb"])
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = {h["_step"]: h for h in wandb_history(files[0])}
    assert {s: h["loss"] for s, h in history.items()} == pytest.approx(
        {r["step"]: r["loss"] for r in rows if "loss" in r}, rel=1e-9)
    assert {s for s, h in history.items() if "eval_loss" in h} == {r["step"] for r in rows if "eval_loss" in r}


def test_unknown_or_missing_trackers_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown tracker.*'tensorbord'"):
        load_config(None, ['train.report_to=["tensorbord"]'])
    cfg = load_config(None, [])
    assert "report_to" not in cfg.to_dict()["train"]  # runs without trackers keep their config hash
