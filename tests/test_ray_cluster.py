"""A sweep on a real two-node Ray cluster (``ray start --head`` plus one worker node on this machine): runs are
spread over the nodes, only the driver writes the store, and a worker node killed mid-run loses no finished run
while its run is trained again on the node that is left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_scaling_store import _env, _tiny_spec, _wait_for
from tunelab.scaling.spec import load_spec
from tunelab.scaling.store import Store

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).with_name("ray")


def _ray_env() -> dict[str, str]:
    """A local test cluster without Ray's token authentication (a token file that an earlier local ray.init left
    in ~/.ray would otherwise make the worker node's start fail with InvalidAuthToken)."""
    return {**_env(), "RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str) -> None:
    subprocess.run([str(RAY), *args, "--disable-usage-stats"] if args[0] == "start" else [str(RAY), *args],
                   check=True, env=_ray_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def _raylet(node_manager_port: int) -> tuple[int, str]:
    """(pid, node id) of the raylet started with ``--node_manager_port=PORT``."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if argv[0].endswith("raylet") and f"--node_manager_port={node_manager_port}" in argv:
            node = next(a.split("=", 1)[1] for a in argv if a.startswith("--node_id="))
            return int(pid), node
    raise AssertionError(f"no raylet with node manager port {node_manager_port}")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _training(pid: int) -> bool:
    """Whether a worker process under raylet ``pid`` is executing a tunelab run (Ray names it after the task)."""
    for child in _children(pid):
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"ray::train_on_node"):
                return True
        except OSError:
            pass
    return False


@pytest.fixture
def cluster():
    pytest.importorskip("ray")
    if not RAY.exists():
        pytest.skip("the ray command is not installed beside this Python")
    port, worker_port = _free_port(), _free_port()
    try:
        _ray("start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false")
        _ray("start", f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--node-manager-port={worker_port}")
        yield f"127.0.0.1:{port}", worker_port
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=_ray_env(), capture_output=True, timeout=120)


def test_two_node_sweep_survives_a_killed_worker_node(tmp_path, cluster):
    address, worker_port = cluster
    spec_path = _tiny_spec(tmp_path, d_f=(8, 16, 24, 32), steps=150)
    spec = load_spec(spec_path)
    raylet, worker_node = _raylet(worker_port)
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "sweep", str(spec_path), "--executor", "ray",
                             "--address", address, "--workers", "2", "--threads", "1"],
                            env=_ray_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # wait until the worker node has finished a run and is training its next one, then kill the whole node
        before = _wait_for(spec.store_path, lambda rs: any(r.status == "done" and r.metrics["node"] == worker_node
                                                           for r in rs) and _training(raylet), timeout=300)
        for pid in [raylet, *_children(raylet)]:
            os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    done_before = {r.key: r.finished for r in before if r.status == "done"}
    rows = {r.key: r for r in Store(spec.store_path).rows()}
    assert all(r.status == "done" and r.metrics["test_nll"] > 0 for r in rows.values()), out
    assert all(rows[k].finished == t for k, t in done_before.items())  # finished runs were not trained again
    on_worker = {k for k, r in rows.items() if r.metrics["node"] == worker_node}
    assert on_worker and on_worker <= set(done_before)  # nothing finished on the dead node after the kill
    assert len(on_worker) < len(rows)  # ... so its run in flight was trained again on the head node
    assert {r.metrics["node"] for r in rows.values()} - {worker_node}, "no run on the head node"
    assert all(r.pid == proc.pid for r in rows.values())  # every claim was held by the driver, no node wrote
    assert "runs finished per Ray node" in out
