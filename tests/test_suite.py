"""`tunelab suite`: the protocol's rules, the intervals, and a whole suite on a tiny model that resumes from its store."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from tunelab.config import ConfigError
from tunelab.errors import StoreError
from tunelab.eval.metrics import bootstrap_ci, seed_item_ci, stratified_paired_diff
from tunelab.study.protocol import at_edge, best_rate, grid_problems, label_shares, shape_shares

# ------------------------------------------------------------------------------------------------- protocol


def test_grid_rules_and_rate_choice():
    assert grid_problems([1e-4, 4.6e-4, 2.2e-3, 1e-2]) == []
    assert any("3 rates" in p for p in grid_problems([1e-4, 1e-3, 1e-2]))
    assert any("1.5 decades" in p for p in grid_problems([1e-4, 3e-4, 1e-3, 3e-3]))
    assert best_rate({1e-4: 0.5, 1e-3: 0.3, 1e-2: math.nan, 3e-2: None}) == 1e-3
    assert best_rate({1e-4: 0.3, 1e-3: 0.3}) == 1e-4 and best_rate({1e-3: None}) is None
    assert at_edge([1e-4, 1e-3, 1e-2], 1e-2) and not at_edge([1e-4, 1e-3, 1e-2], 1e-3)


def test_label_shares_flag_the_collapse():
    gold = [0, 1, 2, 3] * 25
    assert not label_shares(gold, gold)["collapsed"]
    collapsed = label_shares([1] * 90 + [0, 2, 3] * 3 + [None], gold)  # 'answer2' everywhere
    assert collapsed["collapsed"] and collapsed["top"][0] == 1 and collapsed["max_ratio"] > 3
    assert label_shares([0, 1, 2] * 33 + [0], gold)["missing"] == [3]
    spread = shape_shares(["x=1+2", "x=3-1", "x=4*2", "x=9/3", "7"], [3, 2, 8, 3, 7])
    assert spread["parsed"] == 1.0 and not spread["collapsed"]
    assert shape_shares(["x=1+2"] * 5, [3] * 5)["collapsed"]  # one shape for every problem
    assert shape_shares(["?"] * 10, [None] * 9 + [1])["collapsed"]  # 10% parsed


def test_seed_item_interval_widens_with_seed_spread():
    rng = np.random.default_rng(0)
    same = (rng.random((1, 400)) < 0.6).astype(float)
    # one seed: exactly the item bootstrap's width
    _, lo, hi = seed_item_ci(same, seed=3)
    lo1, hi1 = bootstrap_ci(same[0], seed=3)
    assert abs((hi - lo) - (hi1 - lo1)) < 0.02
    agree = np.repeat(same, 3, axis=0)
    disagree = np.stack([same[0], (rng.random(400) < 0.3).astype(float), (rng.random(400) < 0.9).astype(float)])
    w_agree = np.subtract(*seed_item_ci(agree)[2:0:-1])
    w_disagree = np.subtract(*seed_item_ci(disagree)[2:0:-1])
    assert w_disagree > 2 * w_agree
    with pytest.raises(ValueError, match="matrix"):
        seed_item_ci([1.0, 0.0])


def test_stratified_paired_difference():
    a, b = np.ones(50), np.zeros(50)
    diff, lo, hi = stratified_paired_diff([(a, b), (b, b)])
    assert diff == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    x = (rng.random(300) < 0.5).astype(float)
    d, lo, hi = stratified_paired_diff([(x, x)])
    assert d == 0 and lo == 0 and hi == 0  # identical predictions: no difference at all
    with pytest.raises(ValueError, match="same, non-empty items"):
        stratified_paired_diff([(np.ones(3), np.ones(4))])


# ------------------------------------------------------------------------------------------------- a whole suite


def _data_dir(tmp_path):
    """A data folder in the LLM-Adapters layout: raw MAWPS train/valid, a test set overlapping the train file."""
    root = tmp_path / "data"
    (root / "mawps").mkdir(parents=True)
    (root / "AddSub").mkdir()
    train = [{"original_text": f"Tom has {a} apples and gets {b} more . How many now ?", "equation": f"X={a}+{b}",
              "ans": a + b} for a in range(2, 14) for b in (1, 2)]
    valid = [{"original_text": f"Ann has {a} pears and eats {b} . How many left ?", "equation": f"x={a}-{b}",
              "ans": a - b} for a in range(5, 11) for b in (1, 2)]
    (root / "mawps" / "trainset.json").write_text(json.dumps(train))
    (root / "mawps" / "validset.json").write_text(json.dumps(valid))
    test = [{"instruction": f"Tom has {a} apples and gets {b} more. How many now?", "input": "", "output": "",
             "answer": str(a + b)} for a, b in ((2, 1), (3, 2))]  # both are training problems
    test += [{"instruction": f"Sam has {a} cards and gets {b} more . How many now ?", "input": "", "output": "",
              "answer": str(a + b)} for a, b in ((20, 3), (30, 4), (40, 5), (50, 6))]
    (root / "AddSub" / "test.json").write_text(json.dumps(test))
    return root


def _suite(tmp_path, **scale):
    cfg = {
        "name": "tiny math suite",
        "model": {"name": "tiny-llama", "dtype": "fp32"},
        "data": {"train": [{"path": "mawps/trainset.json", "format": "mawps"}],
                 "dev": {"path": "mawps/validset.json", "format": "mawps"}, "template": "plain", "max_length": 160},
        "train": {"batch_size": 4, "threads": 1},
        "rows": [{"label": "lora", "method": {"name": "lora", "r": 2}, "lrs": [1e-3, 1e-2]}],
        "eval": {"sets": [{"name": "addsub", "generate": "addsub-eq", "group": "math"}],
                 "baselines": ["first-two-sum"], "batch_size": 4, "dtype": "fp32"},
        "scales": {"small": {"max_steps": 2, "seeds": [0, 1], **scale}},
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_suite_end_to_end_and_resume(tmp_path, capsys):
    from tunelab.scaling.store import Store
    from tunelab.study.suite import open_suite, run_suite

    run = open_suite(_suite(tmp_path), _data_dir(tmp_path), "small", tmp_path / "out")
    report = run_suite(run, ledger=tmp_path / "ledger")
    info = json.loads((run.out / "data" / "info.json").read_text())
    assert (info["train"], info["dev"]) == (24, 12)
    store = Store(run.out / "study.sqlite", create=False)
    rows = store.rows()
    assert all(r.status == "done" for r in rows)
    result = json.loads((report / "results.json").read_text())
    assert result["removed_overlap"] == {"addsub-eq": 2}
    [lora] = result["rows"]
    # base + the 2 configured search points + the grid's extensions past a winning edge + 2 seeds (the first seed's
    # training is the search run at the chosen rate)
    extended = lora["extended"]
    assert 1 <= len(extended) <= 2 and not set(extended) & {1e-3, 1e-2}  # 2 rates: the best is always at an edge
    phases = sorted(r.factors["phase"] for r in rows)
    assert phases == ["base", "final", "final"] + ["search"] * (2 + len(extended))
    scores = {float(k): v for k, v in lora["search"].items()}
    assert lora["lr"] == min(scores, key=scores.get) and lora["seeds"] == [0, 1] and lora["trainable"] > 0
    assert "grid extended" in (report / "table.md").read_text()
    stats = lora["tasks"]["addsub-eq"]
    assert stats["n"] == 4 and stats["seeds"] == 2 and 0 <= stats["ci_low"] <= stats["accuracy"] <= stats["ci_high"]
    # first-two-sum gets all four decontaminated problems (a + b): the base row is the better of it and the model
    assert result["baselines"]["first-two-sum"]["addsub"]["accuracy"] == 1.0
    assert result["base"]["best"]["addsub"] == ["first-two-sum", 1.0]
    # the paired difference to the base is the row's accuracy minus the baseline's, item by item
    assert lora["vs_base"]["math"][0] == pytest.approx(stats["accuracy"] - 1.0)
    table = (report / "table.md").read_text()
    assert "addsub-eq 2" in table and "| lora |" in table and "commit" in table
    assert "<table>" in (report / "report.html").read_text()
    # every unit records the commit of the code that ran it; the header counts units per commit
    from tunelab.study.provenance import commit

    assert {r.metrics.get("commit") for r in rows} == {commit()}
    assert result["meta"]["unit_commits"] == {commit() or "unrecorded": len(rows)}
    # ... and the compute dtypes it trained and evaluated in (`auto` differs between machines)
    assert result["meta"]["unit_dtypes"] == {"eval fp32": 1, "train fp32": 2 + len(extended),
                                             "train fp32 · eval fp32": 2}
    assert "compute dtypes of the units: eval fp32 (1)" in table
    # the header states the runtime: every finished unit's wall time, per phase
    rt = result["meta"]["runtime"]
    assert {k: v["units"] for k, v in rt["phases"].items()} == {"base": 1, "final": 2, "search": 2 + len(extended)}
    assert rt["pending"] == 0 and rt["hours"] == pytest.approx(sum(r.seconds for r in rows) / 3600, abs=0.02)
    assert "Runtime so far:" in table
    assert (report / "chart.png").stat().st_size > 1000
    # a second run trains and evaluates nothing: every unit is read from the store
    capsys.readouterr()
    run_suite(open_suite(_suite(tmp_path), tmp_path / "data", "small", tmp_path / "out"))
    assert "running" not in capsys.readouterr().out
    # every unit is in the ledger as it finished; a fresh folder (a new machine, a clone) with the same ledger
    # trains nothing and reports the same rows
    from tunelab.scaling.ledger import file_name

    assert sorted(p.name for p in (tmp_path / "ledger" / "runs").iterdir()) == sorted(file_name(r.key) for r in rows)
    again = run_suite(open_suite(_suite(tmp_path), tmp_path / "data", "small", tmp_path / "fresh"),
                      ledger=tmp_path / "ledger")
    assert "running" not in (out := capsys.readouterr().out) and f"{len(rows)} finished units taken from it" in out
    moved = json.loads((again / "results.json").read_text())
    assert moved["rows"] == result["rows"] and moved["base"] == result["base"] and moved["claims"] == result["claims"]
    assert moved["meta"]["unit_commits"] == result["meta"]["unit_commits"]
    base_entry = json.loads((tmp_path / "ledger" / "runs" / "base.json").read_text())
    assert "base/eval/summary.json" in base_entry["files"] and '"prompt"' not in json.dumps(base_entry["files"])
    # the CLI rebuilds the report from the ledger alone, in an empty folder, training nothing
    from tunelab.cli import main

    assert main(["suite", str(_suite(tmp_path)), "--data-dir", str(tmp_path / "data"), "--out",
                 str(tmp_path / "from-ledger"), "--report-only", "--ledger", str(tmp_path / "ledger")]) == 0
    assert "running" not in (out := capsys.readouterr().out) and "| lora |" in out
    assert json.loads((tmp_path / "from-ledger" / "report" / "results.json").read_text())["rows"] == result["rows"]
    # a scale that evaluates on another test limit would take these units by their keys: refused, folder named;
    # also for a store from before the settings were recorded (read from a unit's config)
    path = _suite(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["scales"]["wide"] = {"max_steps": 2, "seeds": [0, 1], "limit": 3}
    path.write_text(yaml.safe_dump(cfg))
    for recorded in (True, False):
        if not recorded:
            import sqlite3

            with sqlite3.connect(store.path) as db:
                db.execute("DELETE FROM study WHERE name = 'units'")
        with pytest.raises(ConfigError, match=r"out: this folder holds units of scale 'small' \(max_steps 2, test "
                                              r"limit all items\); scale 'wide'.*own --out"):
            run_suite(open_suite(path, tmp_path / "data", "wide", tmp_path / "out"))
    assert "running" not in capsys.readouterr().out
    # ... and so is the ledger, in a folder of its own: its units were made with other settings
    with pytest.raises(StoreError, match=r"ledger\.json: this ledger belongs to another study.*own --ledger"):
        run_suite(open_suite(path, tmp_path / "data", "wide", tmp_path / "wide"), ledger=tmp_path / "ledger")
    assert "running" not in capsys.readouterr().out


def test_jobs_share_the_units_with_a_helper_process(tmp_path):
    """--jobs 2: a helper process takes pending units while the driver walks the protocol; every unit runs once,
    in one process or the other, and is recorded in the store and the ledger; the helper is gone at the end."""
    from tunelab.scaling.store import Store
    from tunelab.study.suite import open_suite, run_suite

    run = open_suite(_suite(tmp_path), _data_dir(tmp_path), "small", tmp_path / "out")
    report = run_suite(run, ledger=tmp_path / "ledger", jobs=2)
    rows = Store(run.out / "study.sqlite", create=False).rows()
    assert rows and all(r.status == "done" and r.attempts == 1 for r in rows)
    assert {r.pid for r in rows} - {os.getpid()}, "no unit ran in the helper process"
    assert len(list((tmp_path / "ledger" / "runs").glob("*.json"))) == len(rows)
    [lora] = json.loads((report / "results.json").read_text())["rows"]
    assert lora["seeds"] == [0, 1] and lora["tasks"]["addsub-eq"]["seeds"] == 2
    threads = json.loads((report / "results.json").read_text())["meta"]["unit_threads"]
    assert threads == {"1": len(rows)} and "threads per unit: 1 (" in (report / "table.md").read_text()
    assert _helpers_of(os.getpid()) == []


def _helpers_of(pid):
    """Processes running with ``--worker-of pid`` (from /proc: no pgrep needed)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if b"--worker-of" in argv[:-1] and argv[argv.index(b"--worker-of") + 1] == str(pid).encode():
            found.append(int(proc.name))
    return found


def test_suite_config_errors(tmp_path):
    from tunelab.study.suite import load_suite, open_suite

    path = _suite(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["rows"][0]["train"] = {"max_steps": 5}
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="row 'lora' sets train.max_steps"):
        load_suite(path)
    cfg["rows"][0]["train"] = {}
    cfg["eval"]["sets"][0]["generate"] = "addsub-equ"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="Did you mean 'addsub-eq'"):
        load_suite(path)
    cfg["eval"]["sets"][0]["generate"] = "addsub-eq"
    cfg["scales"]["small"]["rows"] = ["lora", "nope"]
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"unknown rows \['nope'\]"):
        load_suite(path)
    with pytest.raises(ConfigError, match="no scale 'huge'"):
        open_suite(_suite(tmp_path), tmp_path, "huge")


def test_shipped_suites_validate():
    from tunelab.study.suite import load_suite

    from conftest import REPO

    for path in sorted((REPO / "configs" / "suites").glob("*.yaml")):
        cfg = load_suite(path)
        for row in cfg.rows:
            assert grid_problems(row.lrs) == [], f"{path.name}: row {row.label}"


def test_rows_run_in_the_order_the_scale_names_them(tmp_path):
    from tunelab.study.suite import open_suite

    from conftest import REPO

    run = open_suite(REPO / "configs" / "suites" / "math.yaml", tmp_path, "small", tmp_path / "out")
    assert [r.label for r in run.rows()][:3] == ["lora-r8", "loreft-r4", "random-mask-0.1%"]
    run.scale.rows = ["full", "lora-r8"]
    assert [r.label for r in run.rows()] == ["full", "lora-r8"]


def test_claim_verdicts_from_paired_differences():
    from types import SimpleNamespace

    from tunelab.study.report import _claim

    sets = [SimpleNamespace(name="s", generate="t", loglik=None, group="g")]
    good, bad = [1.0] * 40 + [0.0] * 10, [0.0] * 40 + [1.0] * 10

    def row(label, per_item):
        return {"label": label, "averages": {"g": float(np.mean(per_item))}, "tasks": {"t": {"per_item": per_item}}}

    result = {"rows": [row("a", good), row("b", bad), row("c", good)]}
    claim = SimpleNamespace(text="a beats b", a="a", b="b")
    assert _claim(result, sets, claim, "g")["verdict"] == "a better"
    assert _claim(result, sets, SimpleNamespace(text="", a="b", b="a"), "g")["verdict"] == "a better"
    same = _claim(result, sets, SimpleNamespace(text="", a="a", b="c"), "g")
    assert same["diff"] == [0.0, 0.0, 0.0] and same["verdict"].startswith("no difference")
    assert _claim(result, sets, SimpleNamespace(text="", a="a", b="zz"), "g")["verdict"] == "not measured yet"


def test_runs_table_lists_suite_units_and_unfinished_ones(tmp_path):
    """`tunelab runs` reads a suite's store: its units have no scaling factors, and pending ones no metrics."""
    from tunelab.scaling.report import runs_table
    from tunelab.scaling.store import Store

    store = Store(tmp_path / "study.sqlite")
    store.add_runs([("search/lora/lr=0.001/seed=0", {"kind": "train"}, {"phase": "search", "row": "lora", "seed": 0})])
    table = runs_table(store)
    assert "search/lora/lr=0.001/seed=0 pending" in table and "lora" in table and "pending: 1" in table


def test_grid_extends_past_an_edge_that_wins():
    from tunelab.study.protocol import grid_extension

    grid = {1e-3: 0.9, 4.6e-3: 0.5, 2.2e-2: 0.3, 1e-1: 0.2}
    assert grid_extension(grid) == 0.46  # best at the top: one grid step (×4.6) up
    assert grid_extension({**grid, 0.46: float("nan")}) is None  # the step beyond diverged: 0.1 is interior now
    assert grid_extension({**grid, 0.46: 0.25}) is None
    assert grid_extension({**grid, 0.46: 0.1}) == 2.1  # still the edge: keep going (the driver caps the count)
    assert grid_extension({1e-4: 0.1, 1e-3: 0.2, 1e-2: 0.3}) == 1e-5  # best at the bottom
    assert grid_extension({1e-4: 0.3, 1e-3: 0.1, 1e-2: 0.2}) is None
    assert grid_extension({1e-4: None, 1e-3: None}) is None


def test_units_checkpoint_so_a_stopped_suite_loses_little(tmp_path):
    """Every unit's training checkpoints every CHECKPOINT_EVERY steps (one kept), unless the suite says otherwise."""
    from tunelab.study.suite import CHECKPOINT_EVERY, _unit, open_suite, prepare_data

    run = open_suite(_suite(tmp_path), _data_dir(tmp_path), "small", tmp_path / "out")
    prepare_data(run)
    train = _unit(run, run.cfg.rows[0], 1e-3, 0, [])["compare"]["base"]["train"]
    assert (train["save_every"], train["keep_checkpoints"]) == (CHECKPOINT_EVERY, 1)
    path = _suite(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["train"]["save_every"] = 7
    path.write_text(yaml.safe_dump(cfg))
    run = open_suite(path, tmp_path / "data", "small", tmp_path / "out")
    assert _unit(run, run.cfg.rows[0], 1e-3, 0, [])["compare"]["base"]["train"]["save_every"] == 7


def test_the_report_says_what_is_left_and_how_long_it_may_take(tmp_path):
    """Units left per phase (the base, each row's grid points, its seeds) and hours at the median unit time so far;
    no estimate while a phase with units left has none finished."""
    from tunelab.scaling.store import Store
    from tunelab.study.report import _remaining_line, remaining
    from tunelab.study.suite import open_suite

    run = open_suite(_suite(tmp_path), _data_dir(tmp_path), "small", tmp_path / "out")  # grid 1e-3, 1e-2; seeds 0, 1
    store = Store(tmp_path / "study.sqlite")

    def finish(key, factors, seconds):
        store.add_runs([(key, {"kind": "x"}, factors)])
        claim = store.claim()
        assert claim.key == key
        store.commit(claim, {}, seconds)

    left = remaining(run, store)
    assert left["units"] == {"base": 1, "search": 2, "final": 2} and left["hours"] is None
    assert "no estimate yet: no base or search or final unit has finished" in _remaining_line(left)
    finish("base", {"phase": "base", "row": "base"}, 600.0)
    finish("search/lora/lr=0.001/seed=0", {"phase": "search", "row": "lora", "lr": 1e-3, "seed": 0}, 1200.0)
    finish("search/lora/lr=0.01/seed=0", {"phase": "search", "row": "lora", "lr": 1e-2, "seed": 0}, 1800.0)
    left = remaining(run, store)
    assert left["units"] == {"base": 0, "search": 0, "final": 2} and left["hours"] is None
    finish("final/lora/lr=0.01/seed=0", {"phase": "final", "row": "lora", "lr": 1e-2, "seed": 0}, 3600.0)
    left = remaining(run, store)
    assert left["units"] == {"base": 0, "search": 0, "final": 1} and left["hours"] == 1.0
    assert left["median_s"] == {"base": 600, "search": 1500, "final": 3600}
    assert _remaining_line(left) == ("Left for this scale: 1 final units (a grid extension adds search units) ≈ "
                                     "1.0 h at the median unit wall time so far (final 60 min).")
    finish("final/lora/lr=0.01/seed=1", {"phase": "final", "row": "lora", "lr": 1e-2, "seed": 1}, 3000.0)
    assert _remaining_line(remaining(run, store)) == "Every unit of this scale has run."
