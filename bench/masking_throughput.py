"""Random masking: peak RSS and tokens/s of tunelab's sparse implementation against the dense "naive" one and LoRA.

    python bench/masking_throughput.py [--steps N] [--only NAME,NAME] [--out results.json]

Same set-up as ``train_throughput.py`` (whose data preparation, probes, step statistics and LoRA worker are
reused): the embedded model, batch 8 x 128 tokens (64 prompt + 64 response), every configuration in a fresh child
process, tunelab's one training loop for all of them (bf16 frozen weights, fp32 trainable, bf16 autocast).

    tunelab-mask-0.01%   random-mask, fraction 1e-4 of the model, all linear layers (sparse values + indices)
    tunelab-mask-0.1%    random-mask, fraction 1e-3
    naive-mask-0.1%      the authors' naive version: dense Δ (fp32) and dense bool mask per target (bench/masking_naive.py)
    tunelab-lora         LoRA r=8, alpha 16, all linear (train_throughput.py's worker)

Targets (issue 6): mask peak RSS <= LoRA's and <= 0.5x the naive version's; mask tokens/s >= 0.9x LoRA's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness as tt
from harness import (
    RESULT_PREFIX,
    add_common_args,
    environment,
    load_average,
    median,
    ratio,
    rounded,
    run_child_process,
    train_tunelab,
    wait_for_idle,
    write_result,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "tunelab-mask-0.01%": {"method": {"name": "random-mask", "fraction": 1e-4}, "lr": 1e-2},
    "tunelab-mask-0.1%": {"method": {"name": "random-mask", "fraction": 1e-3}, "lr": 3e-3},
    "naive-mask-0.1%": {"method": {"name": "random-mask-naive", "fraction": 1e-3}, "lr": 3e-3},
    "tunelab-lora": {"method": {"name": "lora", "r": 8, "alpha": 16, "targets": "all-linear"}, "lr": 2e-4},
}
TARGETS = {"mask_peak_rss_vs_lora_max": 1.0, "mask_peak_rss_vs_naive_max": 0.5, "mask_tokens_per_s_vs_lora_min": 0.9}


# ============================================================================================================
# Worker (child process)
# ============================================================================================================


def worker_mask(name: str, workdir: Path, steps: int) -> dict[str, Any]:
    """tunelab's loop with a masking method on the shared data (harness.train_tunelab)."""
    if name == "prepare":  # the shared data of every configuration (harness.worker_prepare)
        return tt.worker_prepare(workdir, steps)
    from tunelab.methods import REGISTRY

    REGISTRY.setdefault("random-mask-naive", "masking_naive")  # bench-only method (this folder is on sys.path)
    spec = CONFIGS[name]
    return train_tunelab(workdir, name.replace("%", "pct"), spec["method"], steps=steps, lr=spec["lr"])


# ============================================================================================================
# Parent (standard library only: see harness.py)
# ============================================================================================================


def run_mask_child(name: str, workdir: Path, steps: int, timeout: float) -> dict[str, Any]:
    """``--worker NAME`` of this script in a fresh interpreter; its output passed through, its result parsed."""
    return run_child_process(__file__, ["--worker", name, "--workdir", str(workdir), "--steps", str(steps)], timeout=timeout)


def run_one(args: argparse.Namespace, name: str, workdir: Path) -> dict[str, Any]:
    idle = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
    tt.log(f"{name}: {args.steps} steps (idle check {idle})")
    res = run_mask_child(name, workdir, args.steps, args.timeout)
    res["idle_wait"] = idle
    return res


def summarise(res: dict[str, Any], warmup: int) -> dict[str, Any]:
    if res["status"] != "ok":
        return res
    m = tt.measure(res, warmup)
    keys = ("peak_rss_mib", "peak_rss_train_mib", "rss_before_training_mib", "trainable_params", "total_params",
            "process_wall_s", "idle_wait")
    return {"status": "ok", **{k: res.get(k) for k in keys}, "tokens_per_s": m["tokens_per_s"],
            "tokens_per_s_clean_steps": m["tokens_per_s_clean_steps"], "clean_steps": m["clean_steps"],
            "step_s": m["step_s"], "measured_steps": m["measured_steps"], "all_step_s": res["step_s"],
            "foreign_cpu_cores": m["foreign_cpu_cores"], "loss_first_last": [res["loss"][0], res["loss"][-1]]}


def ratios(configs: dict[str, Any]) -> dict[str, Any]:
    """Each sparse mask against LoRA (speed, memory) and against the naive version (memory)."""
    def get(name: str, key: str) -> float | None:
        c = configs.get(name, {})
        return c.get(key) if c.get("status") == "ok" else None

    out = {}
    for mask in ("tunelab-mask-0.01%", "tunelab-mask-0.1%"):
        r = {"tokens_per_s_vs_lora": ratio(get(mask, "tokens_per_s"), get("tunelab-lora", "tokens_per_s")),
             "peak_rss_vs_lora": ratio(get(mask, "peak_rss_mib"), get("tunelab-lora", "peak_rss_mib")),
             "peak_rss_vs_naive": ratio(get(mask, "peak_rss_mib"), get("naive-mask-0.1%", "peak_rss_mib")),
             "peak_rss_train_vs_naive": ratio(get(mask, "peak_rss_train_mib"),
                                              get("naive-mask-0.1%", "peak_rss_train_mib"))}
        r["target_met"] = {
            "peak_rss <= lora": None if r["peak_rss_vs_lora"] is None
            else r["peak_rss_vs_lora"] <= TARGETS["mask_peak_rss_vs_lora_max"],
            "peak_rss <= 0.5x naive": None if r["peak_rss_vs_naive"] is None
            else r["peak_rss_vs_naive"] <= TARGETS["mask_peak_rss_vs_naive_max"],
            "tokens_per_s >= 0.9x lora": None if r["tokens_per_s_vs_lora"] is None
            else r["tokens_per_s_vs_lora"] >= TARGETS["mask_tokens_per_s_vs_lora_min"]}
        out[mask] = r
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, list(CONFIGS), "masking-throughput", steps=12, warmup=2, wait_idle=120)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker_mask(args.worker, args.workdir, args.steps)), flush=True)
        return 0
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    env = {**environment(tt.REPO), "load_average_before": load_average()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-mask-") as tmp:
        prep = run_mask_child("prepare", Path(tmp), args.steps, args.timeout)
        if prep["status"] != "ok":
            raise SystemExit(f"data preparation failed: {prep}")
        configs = {n: summarise(run_one(args, n, Path(tmp)), args.warmup) for n in names}
    env.update(load_average_after=load_average(), bench_wall_s=round(time.perf_counter() - t0, 1))
    result = rounded({
        "benchmark": "masking_throughput",
        "settings": {"model": tt.MODEL, "batch": tt.BATCH, "seq_len": tt.SEQ_LEN, "steps": args.steps,
                     "warmup_steps_excluded": args.warmup, "configs": CONFIGS},
        "environment": env, "configs": configs, "ratios": ratios(configs), "targets": TARGETS,
        "tokens_per_s_median_of_masks": median([c["tokens_per_s"] for n, c in configs.items()
                                                if n.startswith("tunelab-mask") and c.get("status") == "ok"]),
    })
    write_result("masking-throughput", result, args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
