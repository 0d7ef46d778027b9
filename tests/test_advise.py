"""`tunelab advise`: the decision logic on studies whose runs follow known laws exactly (no training)."""

from __future__ import annotations

import json
import math

import pytest
from scipy.optimize import brentq

from tunelab.scaling import AnalysisError
from tunelab.scaling.advise import advise, check, render, render_check
from tunelab.scaling.store import Store

D_F = [50, 100, 200, 400, 800, 1600, 3200]
BUDGET = {"epochs": 2.0, "min_steps": 10, "max_steps": 400, "batch_size": 8}


def full_loss(d: float) -> float:  # gains fast from data
    return 1.0 + 3.0 * (d / 100) ** -0.6


def lora_loss(r: int, d: float) -> float:  # a better start, a higher floor; rank helps a little
    return 1.5 + 1.2 * (r / 4) ** -0.1 * (d / 100) ** -0.3


def crossing(r: int) -> float:
    return math.exp(brentq(lambda u: full_loss(math.exp(u)) - lora_loss(r, math.exp(u)), math.log(10), math.log(1e6)))


def _study(tmp_path, *, d_f=D_F, methods=("full", "lora"), nan_run=False, exact_match=False,
           noise=0.0) -> Store:
    store = Store(tmp_path / "study.sqlite")
    spec = {"name": "synthetic", "pet_model": "m", "budget": BUDGET, "fit": {"bootstrap": 4, "heldout": False},
            "methods": [{"label": "full"}, {"label": "lora", "pet": {"key": "r", "sizes": [4, 16]}}]}
    store.set_info("spec", spec)
    runs, metrics = [], {}
    for d in d_f:
        for seed in (0, 1):
            jitter = 1 + noise * (1 if (seed + D_F.index(d)) % 2 else -1)  # seed-to-seed spread
            base = {"d_f": d, "seed": seed, "model": "m", "params": 1_000_000, "tokens": 10_000_000}
            steps = int(min(400, max(10, math.ceil(2 * d / 8))))
            if "full" in methods:
                key = f"full-{d}-{seed}"
                runs.append((key, {}, base | {"axes": ["model"], "method": "full", "method_name": "full",
                                              "pet_size": None}))
                metrics[key] = {"test_nll": full_loss(d) * jitter, "steps": steps, "train_seconds": 2.0 * steps,
                                "peak_rss_mb": 3 * 1024, "trainable_params": 1_000_000, "tokens": 100 * steps}
                if exact_match:
                    metrics[key]["exact_match"] = min(1.0, d / 3200)
            if "lora" in methods:
                for r in (4, 16):
                    key = f"lora-r{r}-{d}-{seed}"
                    runs.append((key, {}, base | {"axes": ["pet"], "method": "lora", "method_name": "lora",
                                                  "pet_size": r}))
                    metrics[key] = {"test_nll": lora_loss(r, d) / jitter, "steps": steps, "train_seconds": 0.5 * steps,
                                    "peak_rss_mb": 1024, "trainable_params": 1000 * r, "tokens": 100 * steps}
    if nan_run:
        runs.append(("full-nan", {}, {"d_f": 100, "seed": 9, "model": "m", "params": 1_000_000, "axes": ["model"],
                                      "method": "full", "method_name": "full", "pet_size": None}))
        metrics["full-nan"] = {"test_nll": float("nan"), "steps": 10, "train_seconds": 1.0}
    store.add_runs(runs)
    while (claim := store.claim()) is not None:
        store.commit(claim, metrics[claim.key], 1.0)
    return store


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Store:
    return _study(tmp_path_factory.mktemp("study"))


def test_advice_follows_the_laws_and_their_crossing(study):
    store = study
    small = advise(store, 120)
    assert small.best.name == "lora r=16" and small.runner_up.name == "full"
    assert small.best.loss == pytest.approx(lora_loss(16, 120), rel=2e-3)
    assert small.runner_up.loss == pytest.approx(full_loss(120), rel=2e-3)
    # the predicted crossing of the two laws is the true one, and full tuning is ahead above it
    assert small.crossing["d_f"] == pytest.approx(crossing(16), rel=0.02)
    assert small.crossing["first"] == "full"
    assert not small.warnings  # inside the measured range, clearly separated, every cost measured
    large = advise(store, 3000)
    assert large.best.name == "full" and large.runner_up.name == "lora r=16"
    assert large.difference[0] == pytest.approx(full_loss(3000) - lora_loss(16, 3000), abs=5e-3)
    assert large.difference[2] < 0  # separated: the whole interval is below 0
    # expected time = the study's step budget at N × measured seconds per step
    assert large.best.steps == 400 and large.best.hours == pytest.approx(400 * 2.0 / 3600)
    assert small.best.steps == 30 and small.best.hours == pytest.approx(30 * 0.5 / 3600)
    assert large.best.peak_rss_gib == pytest.approx(3.0) and large.best.trainable_params == 1_000_000
    text = render(large)
    assert "→ full" in text and "runner-up: lora r=16" in text and "cross at D_f ≈" in text


def test_budget_and_memory_exclude_candidates(study):
    store = study
    # full tuning would win at 3000 examples but needs 400 × 2 s = 13.3 min and 3 GiB
    timed = advise(store, 3000, budget_hours=0.1)
    assert timed.best.name == "lora r=16" and timed.runner_up is None
    full = next(c for c in timed.candidates if c.name == "full")
    assert not full.fits_budget and full.over == ["time 0.22 h > 0.1 h"]
    assert any("Predicted lower but over the budget: full" in r for r in timed.reasons)
    assert advise(store, 3000, memory_gib=2).best.name == "lora r=16"
    none = advise(store, 3000, budget_hours=0.001)
    assert none.best is None and any("no candidate fits the budget" in w for w in none.warnings)
    assert "No candidate fits the budget." in render(none)


def test_out_of_range_and_unseparated_warnings(study, tmp_path):
    far = advise(study, 100_000)
    assert any("outside the measured D_f range [50, 3200]" in w for w in far.warnings)
    # near the crossing, with seed-to-seed noise, the two are not separated: said plainly
    near = advise(_study(tmp_path / "noisy", noise=0.05), int(crossing(16)), replicates=8)
    assert any("are not separated" in w for w in near.warnings)


def test_accuracy_is_interpolated_from_measured_exact_match(tmp_path):
    store = _study(tmp_path, exact_match=True)
    adv = advise(store, 3000)
    assert adv.best.name == "full"
    # between D_f 1600 (0.5) and 3200 (1.0), linear in log D_f
    assert adv.best.accuracy == pytest.approx(0.5 + 0.5 * math.log(3000 / 1600) / math.log(2))
    assert "interpolated" in adv.best.accuracy_note


def test_empty_unfitted_and_unknown_inputs_get_clear_errors(tmp_path):
    empty = Store(tmp_path / "empty" / "study.sqlite")
    with pytest.raises(AnalysisError, match=r"empty: no finished runs.*tunelab sweep"):
        advise(empty, 100)
    thin = _study(tmp_path / "thin", d_f=[100])
    with pytest.raises(AnalysisError, match=r"method 'full'.*1 D_f values"):
        advise(thin, 100)
    store = _study(tmp_path / "ok", d_f=[100, 200])
    with pytest.raises(AnalysisError, match=r"model 'xl' is not in the study; its models: m"):
        advise(store, 100, model="xl")
    with pytest.raises(AnalysisError, match="positive number"):
        advise(store, 0)


def test_non_finite_runs_are_never_points(tmp_path, capsys):
    store = _study(tmp_path, nan_run=True)
    adv = advise(store, 120)
    assert adv.best.name == "lora r=16" and math.isfinite(adv.runner_up.loss)
    assert "run full-nan: test_nll is nan; left out of the fit" in capsys.readouterr().err


def test_heldout_check_replays_the_advice(study):
    store = study
    entries = check(store)
    assert [e["d_f"] for e in entries] == [800, 1600, 3200]
    # exact laws extrapolate exactly: the advice is the measured best at every held-out D_f
    for e in entries:
        best = min(e["measured"], key=e["measured"].get)
        assert e["advised"] == e["measured_best"] == best and e["verdict"] == "best"
    assert "at 3 of 3 held-out D_f values" in render_check(entries, store.path.parent)
    with pytest.raises(AnalysisError, match="needs at least 2 left"):
        check(_study(study.path.parent / "short", d_f=[100, 200, 400]))


def test_cli_advise_json_and_errors(study, capsys):
    from tunelab.cli import main

    assert main(["advise", str(study.path.parent), "--examples", "3000", "--json", "--bootstrap", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["best"]["name"] == "full" and out["runner_up"]["name"] == "lora r=16" and out["replicates"] == 2
    assert main(["advise", str(study.path.parent)]) == 2
    assert "give --examples N" in capsys.readouterr().err
