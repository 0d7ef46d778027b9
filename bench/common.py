"""Helpers shared by the benchmarks: statistics, memory readings, environment, FLOP accounting.

Standard library only. The parent process of a benchmark must stay small: on Linux a child started with
fork/vfork + exec inherits the parent's ``ru_maxrss`` (the kernel carries the old address space's high-water mark
across exec), so a parent that imported torch would raise every child's reported peak RSS to its own size.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "  # a worker prints exactly one line starting with this, then its JSON

MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """median, min and max of ``values`` (None when empty)."""
    return {
        "median": median(values),
        "min": min(values) if values else None,
        "max": max(values) if values else None,
    }


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or not den:
        return None
    return num / den


def rounded(obj: Any, digits: int = 4) -> Any:
    """Round floats recursively to ``digits`` significant digits (for readable JSON)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------- memory


def ru_maxrss_mib() -> float:
    """getrusage(RUSAGE_SELF).ru_maxrss in MiB (Linux reports KiB); includes a parent's peak inherited at exec."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM, ...) in MiB; None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------------------------------- CPU load


def cpu_busy_seconds() -> tuple[float, float]:
    """(busy, steal) CPU-seconds of the whole machine since boot, summed over cores, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / hz, steal / hz


def foreign_cpu(start: tuple[float, float, float], end: tuple[float, float, float]) -> float | None:
    """Cores used by *other* processes between two ``(wall, machine busy, own CPU)`` samples."""
    wall = end[0] - start[0]
    if wall <= 0:
        return None
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / wall)


def cpu_sample() -> tuple[float, float, float]:
    """(wall clock, machine busy CPU-seconds, this process's CPU-seconds): see ``foreign_cpu``."""
    return time.perf_counter(), cpu_busy_seconds()[0], time.process_time()


def wait_for_idle(max_wait: float, threshold: float = 0.3, sample_s: float = 2.0) -> dict[str, Any]:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` cores over ``sample_s``."""
    t0 = time.perf_counter()
    while True:
        a = cpu_sample()
        time.sleep(sample_s)
        busy = foreign_cpu(a, cpu_sample()) or 0.0
        waited = time.perf_counter() - t0
        if busy < threshold or waited >= max_wait:
            return {"waited_s": round(waited, 1), "foreign_cpu_cores_at_start": round(busy, 2)}


# --------------------------------------------------------------------------------------------------- environment


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_info() -> dict[str, Any]:
    """CPU model name and the bf16-relevant ISA flags from /proc/cpuinfo."""
    name, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name in ("unknown", "", platform.machine()):
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")
    return {"model_name": name, "logical_cpus": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_state(repo: Path) -> dict[str, Any]:
    """Commit and whether src/ has uncommitted changes (results depend on the working tree)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "src_dirty": bool(git("status", "--porcelain", "--", "src"))}


def environment(repo: Path) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "tunelab": package_version("tunelab"),
        "cpu": cpu_info(),
        "git": git_state(repo),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_CACHE_DIR",
                                           "ONEDNN_MAX_CPU_ISA") if k in os.environ},
    }


# --------------------------------------------------------------------------------------------------- FLOPs


def model_flops(shapes: dict[str, Any], *, full: bool, loss_positions: int, tokens: int,
                lora_params: int = 0) -> dict[str, Any]:
    """Matmul FLOPs of one training step, term by term.

    ``shapes`` comes from the model (see ``describe_model`` in train_throughput.py): ``body_matmul_params`` (the
    linear layers of the decoder blocks), ``lm_head_params``, ``layers``, ``hidden``, ``seq_len``.

    * decoder linears: forward 2·N·T; backward 2·N·T for the input gradient plus 2·N·T for the weight gradient
      when the weights are trained (full: 6·N·T), none when frozen (LoRA: 4·N·T);
    * lm_head (tied to the embedding here): the same factors, on the ``loss_positions`` rows where logits are
      computed — tunelab only on target positions, Hugging Face on every position;
    * LoRA adapters: 6·N_lora·T (their A and B are trained);
    * attention scores and values: 12·L·d·S per token (PaLM's convention: the whole S×S square, not halved for the
      causal mask, forward 4 + backward 8); the softmax, norms and element-wise ops are not counted.
    """
    n_body, n_head = shapes["body_matmul_params"], shapes["lm_head_params"]
    factor = 6 if full else 4
    terms = {
        "decoder_linears": factor * n_body * tokens,
        "lm_head": factor * n_head * loss_positions,
        "lora_adapters": 6 * lora_params * tokens,
        "attention": 12 * shapes["layers"] * shapes["hidden"] * shapes["seq_len"] * tokens,
    }
    return {"total": sum(terms.values()), "terms": terms,
            "lm_head_positions": loss_positions, "weight_grad_factor": factor}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_child_process(script: str | Path, args: Sequence[str], *, timeout: float | None = None,
               python: str | None = None, env: dict[str, str] | None = None, echo: bool = True,
               cwd: Path | None = None) -> dict[str, Any]:
    """Run ``python script *args`` (a benchmark's ``--worker`` child) in a fresh interpreter.

    The child's output is passed through to stderr (``echo``) except its result line (``RESULT_PREFIX`` + JSON),
    which is parsed. Returns ``{"status": "ok", **result, "process_wall_s"}`` or ``{"status": "failed",
    "returncode", "error_tail"}`` (the last 8 lines) when the child fails, times out or prints no result.
    """
    import collections

    cmd = [python or sys.executable, str(Path(script).resolve()), *args]
    tail: collections.deque[str] = collections.deque(maxlen=20)
    result, t0 = None, time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=cwd or Path(script).resolve().parent.parent,
                          env={**os.environ, **(env or {})}) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
                continue
            tail.append(line.rstrip())
            if echo:
                print(f"    {line}", end="", file=sys.stderr, flush=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0 or result is None:
        return {"status": "failed", "returncode": rc, "error_tail": list(tail)[-8:], "process_wall_s": wall}
    return {"status": "ok", **result, "process_wall_s": wall}
