"""Sweeps on a Ray cluster: the driver owns the store, the nodes only train.

The driver (the ``tunelab sweep --executor ray`` process) claims runs from the study's SQLite store, sends each
claimed run's config to a Ray task, and commits the metrics the task returns. No process but the driver opens the
store, so it need not be on storage the nodes share, and SQLite never sees writers on other machines. While a task
runs, the driver refreshes its claim's heartbeat; if the driver dies, Ray ends the job's tasks with it and the next
sweep recovers the claims (by pid on this host, by heartbeat age elsewhere).

A task whose worker process or node dies is retried by Ray on a node that is alive (``max_retries``); when the
retries are spent the run is recorded as failed with the reason, and ``--retry-failed`` runs it again. An exception
raised by the training itself (a diverged run, bad data) is not retried: it is recorded with its traceback.

Every node needs the same tunelab installation and the run configs' paths (data, local model folders); the run
folders (``OUTPUT_DIR/runs/KEY``) are written on the node that trains the run. Each result records the node id and
host that produced it.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.scaling.store import Claim, Heartbeat, Store

TASK_RETRIES = 3  # attempts after a worker or node death, on top of the first


def train_on_node(config: dict[str, Any], run_dir: str, threads: int) -> dict[str, Any]:
    """The body of one Ray task: train the run on this node and return its metrics plus where it ran."""
    import ray
    import torch

    from tunelab.scaling.execute import execute_run

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    metrics = execute_run(config, Path(run_dir), threads)
    metrics["node"] = ray.get_runtime_context().get_node_id()
    metrics["host"] = socket.gethostname()
    return metrics


def connect(address: str | None, local_cpus: int) -> bool:
    """Join the cluster at ``address`` (else RAY_ADDRESS, else a local instance of ``local_cpus`` CPUs).
    Returns whether this call started the connection (and so should end it)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'tunelab[ray]' (or use --executor local)") from None
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address, num_cpus=None if address else local_cpus, include_dashboard=False,
                 log_to_driver=False, logging_level="WARNING")
    except ConnectionError as e:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({e}); start one with "
                          "`ray start --head --port=6379` and pass HEAD_IP:6379") from None
    return True


def sweep_ray(store_path: str, runs_dir: str, slots: int, threads: int, address: str | None = None,
              on_finish: Any = None) -> dict[str, Any]:
    """Keep ``slots`` runs in flight on the cluster until none is pending; returns how the runs were spread.
    ``on_finish(force=True)`` is called after each run is recorded (the sweep's progress: RunReporter.poll)."""
    import ray
    from ray.exceptions import RayTaskError

    started = connect(address, slots * threads)
    task = ray.remote(num_cpus=threads, max_retries=TASK_RETRIES, retry_exceptions=False)(train_on_node)
    store = Store(store_path)
    inflight: dict[Any, tuple[Claim, Heartbeat, float]] = {}
    nodes: dict[str, int] = {}
    try:
        while True:
            while len(inflight) < slots and (claim := store.claim()) is not None:
                beat = Heartbeat(store, claim).__enter__()
                ref = task.options(scheduling_strategy="SPREAD").remote(
                    claim.config, str(Path(runs_dir) / claim.key), threads)
                inflight[ref] = (claim, beat, time.perf_counter())
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                claim, beat, t0 = inflight.pop(ref)
                beat.__exit__(None, None, None)
                seconds = time.perf_counter() - t0
                try:
                    metrics = ray.get(ref)
                except RayTaskError as e:  # the training raised: its own traceback, no retry
                    store.fail(claim, re.sub(r"\x1b\[[0-9;]*m", "", str(e)), seconds)  # no colour codes
                except ray.exceptions.RayError as e:  # worker or node lost more often than the retries allow
                    store.fail(claim, f"lost its Ray worker {TASK_RETRIES + 1} times: {type(e).__name__}: {e}",
                               seconds)
                else:
                    store.commit(claim, metrics, seconds)
                    nodes[metrics["node"]] = nodes.get(metrics["node"], 0) + 1
                if on_finish is not None:
                    on_finish(force=True)
    finally:
        for _claim, beat, _ in inflight.values():  # interrupted: the claims go back to pending at the next sweep
            beat.__exit__(None, None, None)
        if started:
            ray.shutdown()
    return {"nodes": nodes}
