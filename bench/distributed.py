"""DDP against FSDP2 under torchrun (gloo, CPU): per-rank memory and tokens/s, with one process as the reference.

    python bench/distributed.py [--steps N] [--repeats R] [--only NAME,NAME] [--out results.json]

The shared workload of harness.py (the embedded model, 8 rows x 128 tokens per optimizer step). Every configuration
trains the same global batch: one process with 2 threads and gradient accumulation 2 x 4 rows, or 2 processes with
1 thread and 4 rows each (``train.distributed: ddp | fsdp``). Each is tunelab's own ``tunelab train`` under
``python -m torch.distributed.run``; the numbers come from the run's files: every rank's peak RSS during training
and rank 0's bytes of trained parameters and optimizer states (meta.json ``distributed``), the step times and
global token counts (metrics.jsonl).

    single-full / ddp-full / fsdp-full    full tuning
    single-lora / ddp-lora / fsdp-lora    LoRA r=8, alpha 16, all linear layers

What FSDP should show (issue 21): rank 0's trained parameters + optimizer states ~1/2 of DDP's for the sharded part
(the decoder blocks; the embeddings and final norm stay replicated), the loss curve of the single process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness as h

METHODS = {"full": ({"name": "full"}, 5e-5), "lora": ({"name": "lora", "r": 8, "alpha": 16, "targets": "all-linear"},
                                                     2e-4)}
LAYOUTS = {"single": (1, 2, "ddp"), "ddp": (2, 1, "ddp"), "fsdp": (2, 1, "fsdp")}  # processes, grad_accum, mode
CONFIGS = [f"{layout}-{method}" for method in METHODS for layout in LAYOUTS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(name: str, workdir: Path, steps: int, warmup: int, timeout: float, repeat: int) -> dict[str, Any]:
    """One configuration under torchrun in fresh processes; its numbers read back from the run folder."""
    layout, method = name.split("-")
    nproc, grad_accum, mode = LAYOUTS[layout]
    spec, lr = METHODS[method]
    run_dir = workdir / f"{name}-{repeat}"
    cfg = {"model": {"name": h.MODEL, "dtype": "auto"}, "method": spec,
           "data": {"train": str(workdir / "records.jsonl"), "template": "plain", "max_length": h.SEQ_LEN,
                    "group_by_length": False},
           "train": {"max_steps": steps, "batch_size": h.BATCH // 2, "grad_accum": grad_accum, "lr": lr,
                     "threads": 2 // nproc, "distributed": mode, "progress": False, "log_every": 1, "seed": 0},
           "output_dir": str(run_dir)}
    path = workdir / f"{name}-{repeat}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "tunelab.cli", "train", str(path)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=h.REPO, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": str(2 // nproc), "TUNELAB_PROGRESS": "0"})
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        return {"status": "failed", "returncode": out.returncode, "error_tail": (out.stdout + out.stderr)[-2000:]}
    rows = [r for r in h.read_jsonl(run_dir / "metrics.jsonl") if "step_s" in r]
    meta = json.loads((run_dir / "meta.json").read_text())
    dist = meta["distributed"]
    step_s = h.median([r["step_s"] for r in rows[warmup:]])
    tokens = h.median([r["tokens"] for r in rows[warmup:]])
    state = dist["state_bytes_rank0"]
    return {"status": "ok", "processes": nproc, "mode": dist["mode"], "step_s": step_s,
            "tokens_per_s": tokens / step_s if step_s else None, "all_step_s": [r["step_s"] for r in rows],
            "loss": [r["loss"] for r in rows], "peak_rss_mib_per_rank": dist["peak_rss_mb_per_rank"],
            "state_mib_rank0": {k: v / h.MIB for k, v in state.items()},
            "state_mib_rank0_total": sum(state.values()) / h.MIB, "process_wall_s": wall}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return {"status": "failed", "runs": runs}
    return {"status": "ok", "tokens_per_s": h.median([r["tokens_per_s"] for r in ok]),
            "tokens_per_s_repeats": [r["tokens_per_s"] for r in ok],
            "peak_rss_mib_max_rank": h.median([max(r["peak_rss_mib_per_rank"]) for r in ok]),
            "state_mib_rank0_total": ok[0]["state_mib_rank0_total"], "runs": runs}


def ratios(configs: dict[str, Any]) -> dict[str, Any]:
    """FSDP against DDP per method: rank 0's state, the largest rank's peak RSS, tokens/s; and the loss curves."""
    out = {}
    for method in METHODS:
        d, f, s = (configs.get(f"{x}-{method}", {}) for x in ("ddp", "fsdp", "single"))
        if d.get("status") != "ok" or f.get("status") != "ok":
            continue
        out[method] = {
            "fsdp_vs_ddp_state_rank0": h.ratio(f["state_mib_rank0_total"], d["state_mib_rank0_total"]),
            "fsdp_vs_ddp_peak_rss_max_rank": h.ratio(f["peak_rss_mib_max_rank"], d["peak_rss_mib_max_rank"]),
            "fsdp_vs_ddp_tokens_per_s": h.ratio(f["tokens_per_s"], d["tokens_per_s"]),
            "loss_max_abs_diff_fsdp_vs_single": None if s.get("status") != "ok" else max(
                abs(a - b) for a, b in zip(f["runs"][0]["loss"], s["runs"][0]["loss"], strict=True)),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    h.add_common_args(p, CONFIGS, "distributed", steps=8, warmup=2, wait_idle=60)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every configuration")
    args = p.parse_args(argv)
    if args.worker == "prepare":
        print(h.RESULT_PREFIX + json.dumps(h.worker_prepare(args.workdir, args.steps)), flush=True)
        return 0
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    env = {**h.environment(h.REPO), "load_average_before": h.load_average()}
    runs, prep, wall = h.interleaved_runs(__file__, args, names,
                                          lambda name, workdir, repeat: run_config(name, workdir, args.steps, args.warmup, args.timeout, repeat))
    configs = {n: summarise(r) for n, r in runs.items()}
    env.update(load_average_after=h.load_average(), bench_wall_s=round(wall, 1))
    result = h.rounded({
        "benchmark": "distributed",
        "settings": {"model": h.MODEL, "global_batch": h.BATCH, "seq_len": h.SEQ_LEN, "steps": args.steps,
                     "warmup_steps_excluded": args.warmup, "repeats": args.repeats, "methods": METHODS,
                     "layouts": {k: dict(zip(("processes", "grad_accum", "mode"), v, strict=True))
                                 for k, v in LAYOUTS.items()}, "backend": "gloo"},
        "environment": env, "configs": configs, "ratios": ratios(configs), "prepare": prep.get("model"),
    })
    h.write_result("distributed", result, args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
