"""`tunelab lr-search`: every method at a grid of rates (compare rows), the best kept on the dev split."""

from __future__ import annotations

import json

import pytest
import yaml

from tunelab.config import ConfigError
from tunelab.study.lr_search import load_search, point_label, search, select_best


def _cfg(tmp_path, methods, select="eval_loss", eval_fraction=0.2):
    cfg = {
        "name": "tiny sweep",
        "base": {"model": {"name": "tiny-llama", "dtype": "fp32"},
                 "data": {"train": "synthetic:reverse:train:40", "template": "plain", "max_length": 48,
                          "eval_fraction": eval_fraction},
                 "train": {"max_steps": 2, "batch_size": 4, "seed": 0, "threads": 1}},
        "methods": methods,
        "select": select,
        "eval": {"tasks": ["synth-reverse"], "limit": 4, "batch_size": 4},
        "output_dir": str(tmp_path / "sweep"),
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sweep_trains_every_rate_and_keeps_the_lowest_dev_loss(tmp_path):
    path = _cfg(tmp_path, [
        {"label": "mask", "method": {"name": "random-mask", "fraction": 0.05}, "lrs": [1e-3, 3e-2]},
    ])
    best = search(path)
    out = tmp_path / "sweep"
    points = {r["label"]: r for r in json.loads((out / "grid" / "results.json").read_text())}
    assert set(points) == {"mask@lr=0.001", "mask@lr=0.03"}
    losses = {lr: points[point_label("mask", lr)]["eval_loss"] for lr in (1e-3, 3e-2)}
    assert best[0]["label"] == "mask" and best[0]["lr"] == min(losses, key=losses.get)
    assert "error" not in best[0] and best[0]["tasks"]["synth-reverse"]["n"] == 4
    table = (out / "best.md").read_text()
    assert "| lr | dev eval_loss |" in table and "| random-mask | mask |" in table
    assert (out / "lr.png").stat().st_size > 1000 and (out / "grid" / "table.md").is_file()


def test_selection_by_task_accuracy_and_ties_take_the_lower_rate():
    from tunelab.study.lr_search import SearchConfig, SearchRow

    c = SearchConfig(name="x", base={}, methods=[SearchRow("a", {"name": "lora"}, [1e-3, 1e-2, 1e-1])],
                    select="t")
    acc = {1e-3: 0.5, 1e-2: 0.7, 1e-1: 0.7}
    results = {point_label("a", lr): {"label": point_label("a", lr), "tasks": {"t": {"accuracy": a}}}
               for lr, a in acc.items()}
    assert select_best(c, results)[0]["lr"] == 1e-2
    results[point_label("a", 1e-2)] = {"label": "a@lr=0.01", "error": "boom"}
    assert select_best(c, results)[0]["lr"] == 1e-1


@pytest.mark.parametrize(("methods", "kw", "match"), [
    ([{"label": "a", "method": {"name": "lora"}, "lrs": []}], {}, "non-empty list"),
    ([{"label": "a", "method": {"name": "lora"}, "lrs": [1e-3], "train": {"lr": 1e-3}}], {}, "sets train.lr"),
    ([{"label": "a", "method": {"name": "lora"}, "lrs": [1e-3], "train": {"max_steps": 9}}], {}, "shared"),
    ([{"label": "a", "method": {"name": "lora"}, "lrs": [1e-3]}], {"eval_fraction": 0.0}, "needs a dev split"),
    ([{"label": "a", "method": {"name": "lora"}, "lrs": [1e-3]}], {"select": "gsm8k"}, "neither"),
    ([{"label": "a", "method": {"name": "random-mask", "fraction": 2.0}, "lrs": [1e-3]}], {}, "fraction"),
    ([{"label": "a", "method": {"name": "lora"}, "lrs": [1e-3]},
      {"label": "a", "method": {"name": "full"}, "lrs": [1e-4]}], {}, "labels must be unique"),
])
def test_bad_sweep_configs_say_what_would_work(tmp_path, methods, kw, match):
    with pytest.raises(ConfigError, match=match):
        load_search(_cfg(tmp_path, methods, **kw))
