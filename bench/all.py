"""`make bench`: every benchmark in one command, one JSON record, and the tables regenerated from it.

    python bench/all.py            # the whole set (hours on 2 cores: each benchmark at its own defaults)
    python bench/all.py --quick    # every training / evaluation benchmark at a few steps (~10 minutes on 2 cores)
    python bench/all.py --only train-throughput,eval-throughput

Each benchmark runs as its own script in a child process (which runs each of its configurations in a fresh process,
as always) and writes its JSON to a temporary file; this script gathers them into one record,
``bench/results/bench-all[-quick]-DATE-COMMIT.json``: the machine (CPU model and its bf16 units, torch, transformers,
peft), the load average before and after, every benchmark's full result, its wall time and exit status. Then it
rewrites the "All results" section of bench/README.md and the headline block of the README (``bench/tables.py``), so
the numbers a reader sees are the ones just measured. A benchmark that fails is recorded as failed; the others still
run. Standard library only in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness as h

HERE = Path(__file__).resolve().parent
# (name, script, arguments for the whole set, arguments for --quick or None when --quick leaves it out)
QUICK_TRAIN = ("tunelab-lora,peft-lora-fp32,peft-lora-bf16,trl-lora-fp32,trl-lora-bf16,tunelab-full,plain-full-fp32,"
               "plain-full-bf16autocast")
BENCHMARKS: list[tuple[str, str, list[str], list[str] | None]] = [
    ("train-throughput", "train_throughput.py", ["--repeats", "3", "--skip-emulated-bf16"],
     ["--steps", "4", "--warmup", "1", "--only", QUICK_TRAIN, "--wait-idle", "20", "--retry-noisy", "0",
      "--skip-emulated-bf16"]),
    ("reft-throughput", "reft_throughput.py", [], ["--steps", "4", "--warmup", "1", "--wait-idle", "20"]),
    ("masking-throughput", "masking_throughput.py", [],
     ["--steps", "4", "--warmup", "1", "--only", "tunelab-mask-0.1%,naive-mask-0.1%", "--wait-idle", "20"]),
    ("quant-bench", "quant_bench.py", [],
     ["--steps", "4", "--warmup", "1", "--only", "memory,train-lora-bf16,train-qlora-nf4", "--wait-idle", "20"]),
    ("eval-throughput", "eval_throughput.py", [], ["--prompts", "16", "--max-new-tokens", "16", "--no-one-at-a-time"]),
    ("loglik-vs-lm-eval", "loglik_vs_lm_eval.py", [], ["--items", "100", "--repeats", "1"]),
    ("long-sequences", "long_sequences.py", [], None),
    ("optimizer-states", "optimizer_states.py", [], None),
    ("distributed", "distributed.py", [], None),
]
NAMES = [b[0] for b in BENCHMARKS]


def run_one(name: str, script: str, extra: list[str], workdir: Path) -> dict[str, Any]:
    out = workdir / f"{name}.json"
    cmd = [sys.executable, str(HERE / script), *extra, "--out", str(out)]
    h.log(f"{name}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, cwd=h.REPO)
    wall = round(time.perf_counter() - t0, 1)
    entry: dict[str, Any] = {"command": " ".join(["python", f"bench/{script}", *extra]), "wall_s": wall,
                             "returncode": proc.returncode}
    if proc.returncode == 0 and out.is_file():
        entry["status"], entry["result"] = "ok", json.loads(out.read_text())
    else:
        entry["status"] = "failed"
    h.log(f"{name}: {entry['status']} in {wall:.0f} s")
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps of every training and evaluation benchmark")
    p.add_argument("--only", help="comma-separated subset of: " + ", ".join(NAMES))
    p.add_argument("--out", type=Path, help="the record (default bench/results/bench-all[-quick]-DATE-COMMIT.json)")
    p.add_argument("--no-tables", action="store_true", help="do not rewrite bench/README.md and README.md")
    args = p.parse_args(argv)
    only = [n.strip() for n in args.only.split(",")] if args.only else None
    unknown = [n for n in only or [] if n not in NAMES]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    env = h.environment(h.REPO)
    env["load_average_before"] = h.load_average()
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-all-") as tmp:
        for name, script, full, quick in BENCHMARKS:
            if only is not None and name not in only:
                continue
            if args.quick and quick is None:
                results[name] = {"status": "skipped", "note": "not part of --quick"}
                continue
            results[name] = run_one(name, script, quick if args.quick else full, Path(tmp))
    env["load_average_after"] = h.load_average()
    env["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    mode = "quick" if args.quick else "full"
    record = {"benchmark": "bench-all", "mode": mode, "environment": env, "benchmarks": results,
              "command": "python bench/all.py" + (" --quick" if args.quick else "")
              + (f" --only {args.only}" if args.only else "")}
    path = args.out or h.result_path("bench-all-quick" if args.quick else "bench-all", env)
    h.write_result("bench-all", record, path)
    if not args.no_tables:
        subprocess.run([sys.executable, str(HERE / "tables.py")], check=False)
    failed = [n for n, r in results.items() if r.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
