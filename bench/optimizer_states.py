"""Full tuning with fp32 AdamW against torchao's 8-bit and 4-bit AdamW: speed, memory and loss (issue 18 item 4).

    python bench/optimizer_states.py [--steps N] [--repeats R] [--data FILE --eval FILE] [--out results.json]

Each configuration is ``tunelab train`` in a fresh process (its peak RSS is its own): full tuning of the embedded
model, ``train.optimizer`` adamw / adamw-8bit / adamw-4bit, the same data, seed, steps, batch and learning rate
(5e-5, not tuned per optimizer: a quantized update at its own best rate could do better). The data are real: MAWPS
equations (``--data``, default the shared LLM-Adapters copy's train set, ``--eval`` its validation set) in the math
suite's format; without the shared data the synthetic workload of harness.py is used and the loss columns say so.
Numbers from the run folder: tokens/s (median step after the warm-up; the first steps of the quantized optimizers
include torch.compile of their update), peak RSS, the bytes of optimizer states (meta.json), the last-5-step mean
training loss and the eval loss on the held-out set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness as h

OPTIMIZERS = ["adamw", "adamw-8bit", "adamw-4bit"]
SHARED = h.REPO.parent / "shared" / "data" / "llm-adapters" / "mawps"
LR = 5e-5


def run_config(name: str, workdir: Path, args: argparse.Namespace, repeat: int) -> dict[str, Any]:
    run_dir = workdir / f"{name}-{repeat}"
    real = args.data is not None
    data = ({"train": str(args.data), "eval": str(args.eval), "format": "mawps", "template": "alpaca",
             "max_length": 256, "eval_max_examples": 64, "skip_bad_rows": True} if real else
            {"train": str(workdir / "records.jsonl"), "template": "plain", "max_length": h.SEQ_LEN,
             "group_by_length": False, "eval_fraction": 0.1})
    cfg = {"model": {"name": h.MODEL, "dtype": "auto"}, "method": {"name": "full"}, "data": data,
           "train": {"max_steps": args.steps, "batch_size": h.BATCH, "lr": LR, "warmup_steps": 2, "threads": 2,
                     "optimizer": name, "progress": False, "log_every": 1, "seed": 0},
           "output_dir": str(run_dir)}
    path = workdir / f"{name}-{repeat}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(path)], cwd=h.REPO, capture_output=True,
                         text=True, timeout=args.timeout, env={**os.environ, "TUNELAB_PROGRESS": "0"})
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        return {"status": "failed", "returncode": out.returncode, "error_tail": (out.stdout + out.stderr)[-2000:]}
    rows = h.read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "step_s" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    meta = json.loads((run_dir / "meta.json").read_text())
    state = meta["distributed"]["state_bytes_rank0"]
    timed = steps[args.warmup:]
    step_s = h.median([r["step_s"] for r in timed])
    return {"status": "ok", "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_s"] for r in timed),
            "median_step_s": step_s, "first_step_s": steps[0]["step_s"], "peak_rss_mib": meta["metrics"]["peak_rss_mb"],
            "optimizer_state_mib": state["optimizer_states"] / h.MIB, "trained_param_mib": state["trained_params"] / h.MIB,
            "train_loss_last5": sum(r["loss"] for r in steps[-5:]) / len(steps[-5:]),
            "eval_loss": evals[-1] if evals else None, "loss": [r["loss"] for r in steps], "process_wall_s": wall}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return {"status": "failed", "runs": runs}
    keys = ("tokens_per_s", "peak_rss_mib", "optimizer_state_mib", "train_loss_last5", "eval_loss")
    return {"status": "ok", **{k: h.median([r[k] for r in ok if r[k] is not None]) for k in keys},
            "tokens_per_s_repeats": [r["tokens_per_s"] for r in ok], "runs": runs}


def ratios(configs: dict[str, Any]) -> dict[str, Any]:
    base = configs.get("adamw", {})
    if base.get("status") != "ok":
        return {}
    out = {}
    for name in OPTIMIZERS[1:]:
        c = configs.get(name, {})
        if c.get("status") == "ok":
            out[name] = {"tokens_per_s_vs_adamw": h.ratio(c["tokens_per_s"], base["tokens_per_s"]),
                         "peak_rss_vs_adamw": h.ratio(c["peak_rss_mib"], base["peak_rss_mib"]),
                         "optimizer_state_vs_adamw": h.ratio(c["optimizer_state_mib"], base["optimizer_state_mib"]),
                         "eval_loss_minus_adamw": (c["eval_loss"] - base["eval_loss"]
                                                   if c.get("eval_loss") is not None and base.get("eval_loss")
                                                   is not None else None)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    h.add_common_args(p, OPTIMIZERS, "optimizer-states", steps=40, warmup=5, wait_idle=60)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every configuration")
    p.add_argument("--data", type=Path, help="MAWPS-format training file (default: the shared data's, if present)")
    p.add_argument("--eval", type=Path, help="its held-out file (default: the shared validation set)")
    args = p.parse_args(argv)
    if args.worker == "prepare":
        print(h.RESULT_PREFIX + json.dumps(h.worker_prepare(args.workdir, args.steps)), flush=True)
        return 0
    if args.data is None and (SHARED / "trainset.json").is_file():
        args.data, args.eval = SHARED / "trainset.json", SHARED / "validset.json"
    names = [n for n in OPTIMIZERS if not args.only or n in args.only.split(",")]
    env = {**h.environment(h.REPO), "load_average_before": h.load_average()}
    runs, prep, wall = h.interleaved_runs(__file__, args, names,
                                          lambda name, workdir, repeat: run_config(name, workdir, args, repeat))
    configs = {n: summarise(r) for n, r in runs.items()}
    env.update(load_average_after=h.load_average(), bench_wall_s=round(wall, 1))
    result = h.rounded({
        "benchmark": "optimizer-states",
        "settings": {"model": h.MODEL, "method": "full", "batch": h.BATCH, "steps": args.steps, "lr": LR,
                     "warmup_steps_excluded": args.warmup, "repeats": args.repeats,
                     "data": str(args.data) if args.data else "synthetic (harness.py)", "eval": str(args.eval)},
        "environment": env, "configs": configs, "ratios": ratios(configs), "prepare": prep.get("model"),
    })
    h.write_result("optimizer-states", result, args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
