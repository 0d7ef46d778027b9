"""Executing a study: worker processes that claim runs from the store, train them with the one loop, commit.

``sweep(spec, workers=N)`` adds the grid to the store and starts N worker processes (spawned, so each has its own
torch) with T = max(1, cores // N) torch threads each, so that N·T never exceeds the cores. A worker repeats
claim → train → commit until no run is pending. If a worker dies (killed, out of memory) the run it held is
recovered by the next claim and the sweep starts a replacement worker; a sweep that is itself killed resumes with
the same command — finished runs are not repeated. ``executor="ray"`` trains the runs as tasks on a Ray cluster
while this process alone reads and writes the store (``tunelab.scaling.rayexec``).

A run is the tunelab training loop (``tunelab.train.loop.Trainer``) on the run's config; its metric is the
held-out NLL per target token, computed by the loop's evaluation with the training objective
(``tunelab.train.objective.nll_sum``), optionally plus greedy exact match on some test examples.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.scaling.execute import execute_run
from tunelab.scaling.ledger import Ledger
from tunelab.scaling.spec import SweepSpec, expand
from tunelab.scaling.store import Claim, Heartbeat, Store


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """T = max(1, cores // workers): workers × threads fit the cores (one thread each when workers ≥ cores)."""
    return max(1, (cores or available_cores()) // max(1, workers))


# --------------------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------------------


def watch_parent(interval: float = 1.0) -> bool:
    """In a worker process started by ``multiprocessing``: exit at once when the parent (the sweep) dies, so that
    no worker trains unsupervised after a kill of the sweep alone; the run it held is recovered by the next claim.
    Returns whether a watch was started (False in a process without a multiprocessing parent, e.g. a Ray task)."""
    import threading

    parent = mp.parent_process()
    if parent is None:
        return False

    def watch() -> None:
        while parent.is_alive():
            time.sleep(interval)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()
    return True


def worker_loop(store_path: str, runs_dir: str, threads: int, max_runs: int | None = None,
                watch: bool = False) -> int:
    """Claim, execute and commit runs until none is pending (or ``max_runs`` were done); returns runs done.
    ``watch``: exit when the parent process dies (the local executor's workers)."""
    import torch

    if watch:
        watch_parent()

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    store = Store(store_path)
    done = 0
    while max_runs is None or done < max_runs:
        claim = store.claim()
        if claim is None:
            break
        _execute_claim(store, claim, Path(runs_dir) / claim.key, threads)
        done += 1
    return done


def _execute_claim(store: Store, claim: Claim, run_dir: Path, threads: int) -> None:
    t0 = time.perf_counter()
    with Heartbeat(store, claim):
        try:
            metrics = execute_run(claim.config, run_dir, threads)
        except Exception:  # a failed run is recorded with its traceback; KeyboardInterrupt leaves it to recovery
            store.fail(claim, traceback.format_exc(), time.perf_counter() - t0)
            return
    store.commit(claim, metrics, time.perf_counter() - t0)


class RunReporter:
    """A sweep's progress over its runs: a bar on a terminal; elsewhere one line per run as it finishes
    (tunelab.progress). ``poll`` reads the store at most every ``every`` seconds."""

    def __init__(self, store: Store, every: float = 2.0, ledger: Ledger | None = None) -> None:
        from tunelab import progress

        self.store, self.every, self.last, self.ledger = store, every, 0.0, ledger
        rows = store.rows()
        self.seen = {r.key for r in rows if r.status in ("done", "failed")}
        self.bar = progress.bar(total=len(rows), initial=len(self.seen), desc="sweep", unit="run")

    def poll(self, force: bool = False) -> None:
        from tunelab import progress

        if not force and time.monotonic() - self.last < self.every:
            return
        self.last = time.monotonic()
        for r in self.store.rows():
            if r.status in ("done", "failed") and r.key not in self.seen:
                self.seen.add(r.key)
                self.bar.update(1)
                if self.ledger is not None and r.status == "done":
                    self.ledger.record(r)
                progress.summary(run_line(r))

    def close(self) -> None:
        self.poll(force=True)
        self.bar.close()


def run_line(r: Any) -> str:
    """One line for a finished run: its factors, its metric or its error's last line, its time."""
    factors = " ".join(f"{k}={v}" for k, v in r.factors.items() if k != "axes")
    if r.status == "done":
        nll = (r.metrics or {}).get("test_nll")
        what = f"test NLL {nll:.4f}" if isinstance(nll, float) else "done"
    else:
        what = "FAILED: " + (r.error.strip().splitlines() or [""])[-1][:200] if r.error else "FAILED"
    return f"[sweep] {r.key} {factors}: {what} ({r.seconds or 0:.0f} s, attempt {r.attempts})"


@dataclass
class SweepResult:
    counts: dict[str, int]
    seconds: float
    workers: int
    threads: int
    replaced_workers: int
    nodes: dict[str, int] | None = None  # Ray: runs finished per node id


def prepare(spec: SweepSpec, retry_failed: bool = False, ledger: str | Path | None = None) -> Store:
    """Create/open the study store and add the spec's grid (finished runs stay finished); with a ``ledger``
    folder (``tunelab.scaling.ledger``), take the runs it has finished and record the store's."""
    store = Store(spec.store_path)
    runs = expand(spec)
    store.add_runs([(r.key, r.config, r.factors) for r in runs])
    store.set_grid([r.key for r in runs])  # runs an earlier spec had and this one lacks are retired, not fitted
    store.set_info("spec", _spec_dict(spec))
    if ledger is not None:
        imported, recorded = sweep_ledger(spec, ledger).sync(store)
        if imported or recorded:
            print(f"[sweep] ledger {ledger}: {imported} finished runs taken from it, {recorded} written to it",
                  flush=True)
    if retry_failed:
        store.reset_failed()
    return store


def sweep_ledger(spec: SweepSpec, folder: str | Path) -> Ledger:
    """A sweep's ledger. A run's key is the hash of its whole config, so the study's name is all its fingerprint
    needs: an entry whose config this spec no longer makes is kept, retired, never fitted."""
    return Ledger(folder, {"sweep": spec.name})


def _spec_dict(spec: SweepSpec) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(spec)


def sweep(spec: SweepSpec, *, workers: int = 1, executor: str = "local", retry_failed: bool = False,
          max_restarts: int | None = None, threads: int | None = None, address: str | None = None,
          ledger: str | Path | None = None) -> SweepResult:
    """Run every pending run of the study (see the module docstring). ``threads``: torch threads per run (default
    cores // workers); ``address``: the Ray cluster to join (executor "ray"; default RAY_ADDRESS, else local)."""
    t0 = time.perf_counter()
    live = Store(spec.store_path).live_holders() if spec.store_path.is_file() else []
    if live:
        from tunelab.errors import StoreError

        key, host, pid = live[0]
        raise StoreError(f"{spec.store_path}: this study is being run: pid {pid} on {host} holds run {key} "
                         f"({len(live)} run(s) in progress). A second sweep would train beside it: wait for that sweep to "
                         "finish, or stop it (Ctrl-C, or kill its process group); its runs are recovered by the next "
                         "sweep")
    if executor not in ("local", "ray"):
        from tunelab.errors import ConfigError

        raise ConfigError(f"unknown executor {executor!r}; use 'local' (worker processes) or 'ray'")
    store = prepare(spec, retry_failed, ledger)
    threads = threads or threads_per_worker(workers)
    runs_dir = str(Path(spec.output_dir) / "runs")
    nodes = None
    reporter = RunReporter(store, ledger=None if ledger is None else sweep_ledger(spec, ledger))
    try:
        if executor == "ray":
            from tunelab.scaling.rayexec import sweep_ray

            spread = sweep_ray(str(store.path), runs_dir, workers, threads, address, on_finish=reporter.poll)
            replaced, nodes = 0, spread["nodes"]
        else:
            replaced = _sweep_local(str(store.path), runs_dir, workers, threads, max_restarts, reporter.poll)
    finally:
        reporter.close()
    return SweepResult(store.counts(), time.perf_counter() - t0, workers, threads, replaced, nodes)


def _sweep_local(store_path: str, runs_dir: str, workers: int, threads: int, max_restarts: int | None,
                 on_poll: Any = None) -> int:
    ctx = mp.get_context("spawn")
    store = Store(store_path)
    budget = 3 * workers if max_restarts is None else max_restarts
    procs = [_start(ctx, store_path, runs_dir, threads) for _ in range(workers)]
    replaced = 0
    while procs:
        time.sleep(0.5)
        if on_poll is not None:
            on_poll()
        for p in [p for p in procs if not p.is_alive()]:
            p.join()
            procs.remove(p)
            died = p.exitcode != 0
            if died and replaced < budget and store.counts()["pending"] + store.recover() > 0:
                procs.append(_start(ctx, store_path, runs_dir, threads))
                replaced += 1
    return replaced


def _start(ctx: Any, store_path: str, runs_dir: str, threads: int) -> Any:
    p = ctx.Process(target=worker_loop, args=(store_path, runs_dir, threads, None, True), daemon=False)
    p.start()
    return p
