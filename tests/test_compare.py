"""`tunelab compare`: rows trained and evaluated in their own processes, failures in the table, reruns skip."""

from __future__ import annotations

import json

import pytest
import yaml

from tunelab.config import ConfigError
from tunelab.study.compare import compare, load_compare


def _cfg(tmp_path, methods):
    cfg = {
        "name": "tiny compare",
        "base": {"model": {"name": "tiny-llama", "dtype": "fp32"},
                 "data": {"train": "synthetic:reverse:train:32", "template": "plain", "max_length": 48},
                 "train": {"max_steps": 2, "batch_size": 4, "seed": 0, "threads": 1}},
        "methods": methods,
        "eval": {"tasks": ["synth-reverse"], "limit": 4, "batch_size": 4},
        "output_dir": str(tmp_path / "cmp"),
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_compare_table_with_a_failing_row_and_rerun_skips(tmp_path):
    path = _cfg(tmp_path, [
        {"label": "full", "method": {"name": "full"}, "train": {"lr": 1e-4}},
        {"label": "lora", "method": {"name": "lora", "r": 2, "alpha": 4}, "train": {"lr": 1e-2}},
        {"label": "bad", "method": {"name": "lora", "r": 2, "targets": ["nothing_matches"]}},
    ])
    results = compare(path)
    by = {r["label"]: r for r in results}
    assert "error" not in by["full"] and "error" not in by["lora"]
    assert "matched no linear layer" in by["bad"]["error"]
    assert by["lora"]["trainable_params"] < by["full"]["trainable_params"]
    assert by["lora"]["tasks"]["synth-reverse"]["n"] == 4 and by["lora"]["peak_rss_mb"] > 0
    out = tmp_path / "cmp"
    table = (out / "table.md").read_text()
    assert "| lora | lora |" in table and "matched no linear layer" in table
    assert (out / "table.csv").read_text().count("\n") == 4 and (out / "chart.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert "<table>" in page and "matched no linear layer" in page and "data:image/png;base64," in page
    stamp = (out / "lora" / "row.json").stat().st_mtime_ns
    again = compare(path)
    assert (out / "lora" / "row.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())[1]["label"] == "lora" and len(again) == 3


def test_rows_cannot_change_the_token_budget(tmp_path):
    path = _cfg(tmp_path, [{"label": "a", "method": {"name": "full"}, "train": {"max_steps": 9}},
                           {"label": "b", "method": {"name": "lora"}}])
    with pytest.raises(ConfigError, match="same token budget"):
        load_compare(path)


def test_a_diverged_row_is_reported_not_resumed(tmp_path):
    """A row whose run diverged is an error naming the run; resuming it would diverge again at the same step."""
    path = _cfg(tmp_path, [{"label": "hot", "method": {"name": "lora", "r": 2, "alpha": 4},
                            "train": {"lr": 1e39}}])
    [first] = compare(path)
    assert "training diverged at step" in first["error"]
    meta = tmp_path / "cmp" / "hot" / "run" / "meta.json"
    assert json.loads(meta.read_text())["status"] == "diverged"
    log = tmp_path / "cmp" / "hot" / "log.txt"
    size = log.stat().st_size
    [again] = compare(path)
    assert "training diverged at step" in again["error"] and "is kept: delete it" in again["error"]
    assert log.stat().st_size == size  # nothing was run again
