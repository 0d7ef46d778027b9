"""The results store and the sweep runner: transactions, stale-claim recovery, and real kills mid-run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tunelab.scaling.runner import sweep, threads_per_worker
from tunelab.scaling.spec import load_spec
from tunelab.scaling.store import Store, StoreError, open_study, process_alive, process_start

REPO = Path(__file__).resolve().parents[1]


def _store(tmp_path, n=3) -> Store:
    store = Store(tmp_path / "study.sqlite")
    store.add_runs([(f"k{i}", {"i": i}, {"axes": ["model"]}) for i in range(n)])
    return store


def test_claim_commit_fail_and_order(tmp_path):
    store = _store(tmp_path)
    a, b = store.claim(), store.claim()
    assert (a.key, b.key, a.attempt) == ("k0", "k1", 1) and a.config == {"i": 0}
    assert store.commit(a, {"test_nll": 1.5}, 2.0) and store.fail(b, "Traceback ... boom", 1.0)
    assert store.counts() == {"pending": 1, "running": 0, "done": 1, "failed": 1}
    assert not store.commit(a, {"test_nll": 9.9}, 1.0)  # no claim held any more: nothing written
    done = store.rows("done")[0]
    assert done.metrics == {"test_nll": 1.5} and done.seconds == 2.0 and done.finished >= done.started
    assert store.add_runs([("k0", {"i": 0}, {"axes": ["model", "pet"]}), ("k9", {"i": 9}, {"axes": []})]) == 1
    assert store.rows("done")[0].factors["axes"] == ["model", "pet"] and store.rows("done")[0].metrics
    assert store.reset_failed() == 1 and store.counts()["pending"] == 3


def test_claim_prefers_the_named_pending_run(tmp_path):
    store = _store(tmp_path, 4)
    assert store.claim(prefer="k2").key == "k2"  # the one a suite driver waits for, ahead of the queue
    assert store.claim(prefer="k2").key == "k0"  # no longer pending: the queue's order
    assert store.claim(prefer="nope").key == "k1" and store.claim().key == "k3" and store.claim() is None


def test_runs_outside_the_current_grid_are_retired_not_deleted(tmp_path):
    store = _store(tmp_path, 4)
    a = store.claim()
    store.commit(a, {"test_nll": 1.0}, 1.0)  # k0 done under the first grid
    assert store.retired_count() == 0 and len(store.rows()) == 4  # no grid set: every row is current
    store.set_grid(["k1", "k3"])  # a changed spec: k0 (done) and k2 (pending) are no longer in it
    assert [r.key for r in store.rows()] == ["k1", "k3"] and store.retired_count() == 2
    assert store.counts() == {"pending": 2, "running": 0, "done": 0, "failed": 0}
    assert {r.key for r in store.rows(retired=True)} == {"k0", "k1", "k2", "k3"}  # nothing lost
    assert [store.claim().key, store.claim().key, store.claim()] == ["k1", "k3", None]  # k2 is never claimed
    store.set_grid(["k0", "k1", "k3"])  # back in the grid: its finished result counts again, not rerun
    assert store.rows("done")[0].key == "k0" and store.rows("done")[0].metrics == {"test_nll": 1.0}


def test_a_changed_budget_retires_the_old_runs_of_a_study(tmp_path):
    """Raising max_steps changes the runs whose step count it clamps (new keys); those keep their old results in
    the file but leave the fit, and the unchanged runs are reused."""
    from tunelab.scaling.runner import prepare

    first = prepare(load_spec(_tiny_spec(tmp_path, d_f=(8, 64), steps=4)))
    for claim in iter(first.claim, None):
        first.commit(claim, {"test_nll": 2.0}, 1.0)
    path = _tiny_spec(tmp_path, d_f=(8, 64), steps=4)
    data = yaml.safe_load(path.read_text())
    data["budget"] = {"epochs": 1, "min_steps": 4, "max_steps": 12, "batch_size": 4}  # 64 examples: 4 -> 12 steps
    path.write_text(yaml.safe_dump(data))
    second = prepare(load_spec(path))
    assert second.counts() == {"pending": 1, "running": 0, "done": 1, "failed": 0} and second.retired_count() == 1
    assert second.rows("done")[0].factors["d_f"] == 8
    assert second.rows("pending")[0].config["train"]["max_steps"] == 12
    from tunelab.scaling.report import runs_table

    assert runs_table(second).splitlines()[-1].endswith("(+ 1 retired: runs of an earlier spec, kept, not fitted)")


def test_dead_worker_claim_is_recovered_and_its_late_commit_refused(tmp_path):
    store = _store(tmp_path, 1)
    code = ("import sys; from tunelab.scaling.store import Store; "
            "c = Store(sys.argv[1]).claim(); print(c.token, flush=True)")
    out = subprocess.run([sys.executable, "-c", code, str(store.path)], capture_output=True, text=True, check=True)
    row = store.rows()[0]
    assert row.status == "running" and not process_alive(row.pid, None)
    again = store.claim()  # recovery happens inside the claim transaction
    assert again.key == "k0" and again.attempt == 2 and again.token != out.stdout.strip()


def test_stale_heartbeat_is_recovered_for_other_hosts(tmp_path):
    store = _store(tmp_path, 1)
    store.claim()
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE runs SET host = 'elsewhere', heartbeat = 0")
    assert store.recover() == 1 and store.counts()["pending"] == 1
    assert process_alive(os.getpid(), process_start(os.getpid()))


def test_open_study_errors_name_the_file(tmp_path):
    with pytest.raises(StoreError, match="tunelab sweep"):
        open_study(tmp_path / "nothing")


def test_threads_fit_the_cores():
    assert threads_per_worker(2, cores=2) == 1 and threads_per_worker(1, cores=2) == 2
    assert threads_per_worker(4, cores=2) == 1 and threads_per_worker(3, cores=16) == 5


# --------------------------------------------------------------------------------------------------------------
# Real processes, real kills
# --------------------------------------------------------------------------------------------------------------


def _tiny_spec(tmp_path, d_f=(8, 16, 24), steps=40) -> Path:
    spec = {
        "name": "tiny", "output_dir": str(tmp_path / "study"),
        "task": {"train": "synthetic:reverse:train:64", "test": "synthetic:reverse:dev:16", "template": "plain",
                 "max_length": 64, "test_examples": 16},
        "models": {"sizes": [{"label": "tiny", "model": "tiny-llama", "params": 100}]},
        "methods": [{"label": "lora", "method": {"name": "lora", "r": 2, "alpha": 4}, "train": {"lr": 1e-2}}],
        "d_f": list(d_f), "budget": {"epochs": 1, "min_steps": steps, "max_steps": steps, "batch_size": 4},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "TUNELAB_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def _wait_for(store_path: Path, predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if store_path.exists():
            try:
                rows = Store(store_path).rows()
            except sqlite3.Error:
                rows = []
            if rows and predicate(rows):
                return rows
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the sweep")


def test_sweep_killed_mid_run_resumes_without_repeating_finished_runs(tmp_path):
    spec_path = _tiny_spec(tmp_path)
    spec = load_spec(spec_path)
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "sweep", str(spec_path), "--workers", "1"],
                            env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rows = _wait_for(spec.store_path, lambda rs: sum(r.status == "done" for r in rs) >= 1
                         and any(r.status == "running" for r in rs))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker, at once, mid-run
        proc.wait()
    time.sleep(0.2)
    rows = Store(spec.store_path).rows()
    done_before = {r.key: r.finished for r in rows if r.status == "done"}
    killed = [r.key for r in rows if r.status == "running"]
    assert done_before and killed
    result = sweep(spec, workers=1)
    assert result.counts == {"pending": 0, "running": 0, "done": 3, "failed": 0}
    after = {r.key: r for r in Store(spec.store_path).rows()}
    assert all(after[k].finished == t and after[k].attempts == 1 for k, t in done_before.items())
    assert all(after[k].attempts == 2 and after[k].metrics["test_nll"] > 0 for k in killed)


def test_killed_worker_is_replaced_and_its_run_redone(tmp_path):
    spec_path = _tiny_spec(tmp_path, d_f=(8, 16), steps=60)
    spec = load_spec(spec_path)
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "sweep", str(spec_path), "--workers", "1"],
                            env=_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        rows = _wait_for(spec.store_path, lambda rs: any(r.status == "running" for r in rs))
        victim = next(r for r in rows if r.status == "running")
        os.kill(victim.pid, signal.SIGKILL)  # only the worker process; the sweep notices and replaces it
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert "1 worker(s) replaced" in out
    lines = [x for x in out.splitlines() if x.startswith("[sweep] ")]  # one line per finished run in a log
    assert len(lines) == 2 and all("test NLL" in x and "d_f=" in x for x in lines), out
    final = {r.key: r for r in Store(spec.store_path).rows()}
    assert final[victim.key].status == "done" and final[victim.key].attempts == 2
    assert json.loads(json.dumps(final[victim.key].metrics))["steps"] == 60


@pytest.mark.slow
def test_ray_executor_on_a_local_ray_instance(tmp_path):
    """Runs as Ray tasks on a local Ray instance, committed by the driver; a run whose training raises (here: its
    loss turns NaN) is recorded as failed with its traceback and not retried (only where Ray is installed)."""
    pytest.importorskip("ray")
    path = _tiny_spec(tmp_path, d_f=(8, 16), steps=4)
    raw = yaml.safe_load(path.read_text())
    raw["methods"].append({"label": "diverges", "method": {"name": "lora", "r": 2, "alpha": 4}, "train": {"lr": 1e30}})
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path)
    result = sweep(spec, workers=2, executor="ray", threads=1)
    assert result.counts == {"pending": 0, "running": 0, "done": 2, "failed": 2}
    rows = Store(spec.store_path).rows()
    assert sum(result.nodes.values()) == 2 and all(r.pid == os.getpid() for r in rows)
    for r in rows:
        assert r.attempts == 1
        if r.status == "done":
            assert r.metrics["test_nll"] > 0 and r.metrics["node"] in result.nodes
        else:
            assert "train_on_node" in r.error and "Lower train.lr" in r.error and "\x1b[" not in r.error


def test_killing_only_the_sweep_stops_its_workers_and_a_second_sweep_is_refused(tmp_path):
    spec_path = _tiny_spec(tmp_path, steps=400)
    spec = load_spec(spec_path)
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "sweep", str(spec_path), "--workers", "1"],
                            env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rows = _wait_for(spec.store_path, lambda rs: any(r.status == "running" for r in rs))
        worker = next(r.pid for r in rows if r.status == "running")
        assert worker != proc.pid and process_alive(worker, None)
        # a second sweep on the live study says who runs it instead of training beside it
        with pytest.raises(StoreError, match=rf"being run: pid {worker} on .* holds run .* stop it"):
            sweep(spec, workers=1)
        proc.send_signal(signal.SIGKILL)  # the parent only: its worker must not train on unsupervised
        proc.wait(timeout=10)
        deadline = time.time() + 15
        while process_alive(worker, None) and time.time() < deadline:
            time.sleep(0.1)
        assert not process_alive(worker, None)
        assert Store(spec.store_path).live_holders() == []  # and the study is free for the next sweep
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        subprocess.run(["pkill", "-9", "-f", str(spec.store_path)], check=False)


# ------------------------------------------------------------------------------------------------- ledger


def test_ledger_file_names_are_distinct_and_portable():
    import re

    from tunelab.scaling.ledger import file_name

    keys = ["final/lora-r8/lr=0.0022/seed=0", "final/random-mask-0.1%/lr=0.01/seed=1", "a_/b", "a/_b", "a__b",
            "a/b", "a~2fb", "a b", "ä/ü", "base"]
    names = [file_name(k) for k in keys]
    assert len(set(names)) == len(keys)
    assert all(re.fullmatch(r"[A-Za-z0-9.=%+~_-]+\.json", n) for n in names)
    assert file_name("final/lora-r8/lr=0.0022/seed=0") == "final__lora-r8__lr=0.0022__seed=0.json"


def test_ledger_carries_finished_runs_to_a_new_store(tmp_path):
    from tunelab.scaling.ledger import Ledger

    old = Store(tmp_path / "old.sqlite")
    old.add_runs([("a/1", {"x": 1}, {"phase": "search"}), ("a/2", {"x": 2}, {}), ("a/3", {"x": 3}, {})])
    for metrics in ({"loss": 0.5}, {"loss": 0.25}):
        claim = old.claim()
        old.commit(claim, metrics, 12.0)
    ledger = Ledger(tmp_path / "ledger", {"suite": "s", "data": "abc"})
    assert ledger.sync(old) == (0, 2)  # the two finished runs are written, the pending one is not
    assert ledger.sync(old) == (0, 0)
    fresh = Store(tmp_path / "fresh.sqlite")
    fresh.add_runs([("a/2", {"x": 2}, {}), ("a/9", {"x": 9}, {})])
    claim = fresh.claim()  # a/2 is being run here: left to its worker
    assert claim.key == "a/2"
    ledger = Ledger(tmp_path / "ledger", {"data": "abc", "suite": "s"})  # same fingerprint, any key order
    assert ledger.sync(fresh) == (1, 0)
    done = {r.key: r for r in fresh.rows("done")}
    assert set(done) == {"a/1"} and done["a/1"].metrics == {"loss": 0.5} and done["a/1"].seconds == 12.0
    assert done["a/1"].config == {"x": 1} and done["a/1"].factors == {"phase": "search"}
    fresh.commit(claim, {"loss": 0.75}, 3.0)  # finished here: kept, and recorded in the ledger
    assert ledger.sync(fresh) == (0, 0)  # the ledger's a/2 does not replace the store's finished one...
    assert {r.key: r.metrics for r in fresh.rows("done")}["a/2"] == {"loss": 0.75}
    assert fresh.import_done("a/9", {}, {}, {"loss": 1.0}, 1.0)  # ...while a pending run takes a ledger's result
    assert fresh.counts() == {"pending": 0, "running": 0, "done": 3, "failed": 0}
    assert not fresh.import_done("a/9", {}, {}, {"loss": 2.0}, 1.0)
    with pytest.raises(StoreError, match=r"ledger\.json: this ledger belongs to another study.*own --ledger"):
        Ledger(tmp_path / "ledger", {"suite": "s", "data": "other"})
    (tmp_path / "ledger" / "runs" / "broken.json").write_text("{")
    with pytest.raises(StoreError, match=r"broken\.json: not a ledger entry.*delete it"):
        Ledger(tmp_path / "ledger", {"suite": "s", "data": "abc"}).entries()
    # a run's result files travel with it and are written back where the new study folder lacks them
    (tmp_path / "ledger" / "runs" / "broken.json").unlink()
    row = next(r for r in old.rows("done") if r.key == "a/1")
    ledger = Ledger(tmp_path / "ledger", {"suite": "s", "data": "abc"})
    ledger.record(row, {"eval/t.jsonl": '{"correct": true}\n'})
    newer = Store(tmp_path / "newer" / "study.sqlite")
    assert ledger.sync(newer, tmp_path / "newer") == (2, 0)
    assert (tmp_path / "newer" / "eval" / "t.jsonl").read_text() == '{"correct": true}\n'
    ledger.record(row, {"../outside.txt": "x"})
    with pytest.raises(StoreError, match=r"a__1\.json: file '\.\./outside\.txt' is not a relative path"):
        ledger.sync(newer, tmp_path / "newer")
    assert not (tmp_path / "outside.txt").exists()


def test_sweep_writes_its_ledger_and_a_fresh_folder_continues_from_it(tmp_path, capsys):
    from tunelab.cli import main

    spec = load_spec(_tiny_spec(tmp_path, d_f=(8, 16), steps=4))
    result = sweep(spec, workers=1, ledger=tmp_path / "ledger")
    assert result.counts["done"] == 2
    entries = sorted(p.name for p in (tmp_path / "ledger" / "runs").iterdir())
    assert entries == sorted(f"{r.key}.json" for r in Store(spec.store_path).rows())  # written as they finished
    # the same spec with its study folder elsewhere (a new machine): nothing is run again
    raw = yaml.safe_load((tmp_path / "spec.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "elsewhere")
    (tmp_path / "moved.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["sweep", str(tmp_path / "moved.yaml"), "--ledger", str(tmp_path / "ledger"), "--import-only"]) == 0
    assert "'done': 2" in capsys.readouterr().out
    moved = {r.key: r.metrics for r in Store(tmp_path / "elsewhere" / "study.sqlite").rows()}
    assert moved == {r.key: r.metrics for r in Store(spec.store_path).rows()}
    assert sweep(load_spec(tmp_path / "moved.yaml"), workers=1, ledger=tmp_path / "ledger").counts["done"] == 2
    capsys.readouterr()
    assert main(["sweep", str(tmp_path / "moved.yaml"), "--import-only"]) != 0
    assert "--import-only takes the runs of a ledger: add --ledger DIR" in capsys.readouterr().err


def test_a_ledger_under_docs_is_not_ignored_by_git():
    """`runs/` (local run folders) is git-ignored; a ledger's runs/ under docs/ must not be, or `git add` would leave
    the units out of the commit that should carry them."""
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    ledger = subprocess.run(["git", "check-ignore", "-q", "docs/compare/any-suite/units/runs/final__x.json"],
                            cwd=repo)
    local = subprocess.run(["git", "check-ignore", "-q", "runs/suite-x/study.sqlite"], cwd=repo)
    assert ledger.returncode == 1 and local.returncode == 0
