"""Long sequences (issue 18 item 2): LoRA and full tuning at 512, 1024 and 2048 tokens per row, with and without
activation checkpointing, against peft LoRA and a plain transformers loop at the same shapes.

    python bench/long_sequences.py [--shapes 2x512,2x1024,2x2048] [--steps N] [--only NAME,...] [--out FILE]

Each shape is one ``bench/train_throughput.py --shape BxL`` run (every configuration in a fresh process, its peak
RSS its own; the rows are random vocabulary words, half prompt, half response). The rows per step stay fixed, so
the tokens per step grow with the length and the memory of a configuration whose activations are linear in the
length grows linearly. Reported per configuration and shape: tokens/s (median step after the warm-up), peak RSS
(the whole process, loading included, and during training);
per shape: tunelab against the faster peer variant (fp32 or bf16 autocast), and what checkpointing saves and costs;
per configuration: ``growth`` = (RSS(2048) − RSS(1024)) / (RSS(1024) − RSS(512)), 2.0 for memory linear in the
length and 4.0 for quadratic (``linear`` is growth ≤ 2.5, or a peak that grows by ≤ 32 MiB). JSON on stdout and in bench/results/.
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
CONFIGS = ["tunelab-lora", "tunelab-lora-ckpt", "peft-lora-fp32", "peft-lora-bf16",
           "tunelab-full", "tunelab-full-ckpt", "plain-full-fp32", "plain-full-bf16autocast"]
PEERS = {"tunelab-lora": ("peft-lora-fp32", "peft-lora-bf16"),
         "tunelab-full": ("plain-full-fp32", "plain-full-bf16autocast")}
LINEAR_GROWTH_MAX = 2.5  # between linear (2.0) and quadratic (4.0) growth over 512 -> 1024 -> 2048
FLAT_MIB = 32  # an increment this small is noise: the peak does not grow with the length


def run_shape(shape: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{shape}.json"
    cmd = [sys.executable, str(HERE / "train_throughput.py"), "--shape", shape, "--only", ",".join(args.only),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--wait-idle", str(args.wait_idle), "--timeout", str(args.timeout), "--out", str(out)]
    h.log(f"shape {shape}: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, env={**os.environ, "TUNELAB_BENCH_SHAPE": shape})
    if proc.returncode != 0 or not out.is_file():
        return {"status": "failed", "returncode": proc.returncode}
    return json.loads(out.read_text())


def summarise(shapes: list[str], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per shape: tokens/s and peak RSS per configuration, the peer ratios, checkpointing's saving and cost; per
    configuration: how its peak RSS grows with the length."""
    table: dict[str, Any] = {}
    for shape in shapes:
        configs = runs[shape].get("configs", {})
        row: dict[str, Any] = {"configs": {n: {"tokens_per_s": c.get("tokens_per_s"),
                                               "peak_rss_mib": c.get("peak_rss_mib"),
                                               "peak_rss_train_mib": c.get("peak_rss_train_mib"),
                                               "mfu": c.get("mfu"), "compute_dtype": c.get("compute_dtype"),
                                               "status": c.get("status")}
                                           for n, c in configs.items()}}
        ok = {n: c for n, c in configs.items() if c.get("status") == "ok"}
        for mine, peers in PEERS.items():
            done = [p for p in peers if p in ok]
            if mine in ok and done:
                best = max(done, key=lambda p: ok[p]["tokens_per_s"])
                row[f"{mine} vs {best}"] = {
                    "tokens_per_s_ratio": h.ratio(ok[mine]["tokens_per_s"], ok[best]["tokens_per_s"]),
                    "peak_rss_ratio": h.ratio(ok[mine]["peak_rss_mib"], ok[best]["peak_rss_mib"])}
            ckpt = f"{mine}-ckpt"
            if mine in ok and ckpt in ok:
                row[f"{ckpt} vs {mine}"] = {
                    "tokens_per_s_ratio": h.ratio(ok[ckpt]["tokens_per_s"], ok[mine]["tokens_per_s"]),
                    "peak_rss_ratio": h.ratio(ok[ckpt]["peak_rss_mib"], ok[mine]["peak_rss_mib"]),
                    "peak_rss_saved_mib": ok[mine]["peak_rss_mib"] - ok[ckpt]["peak_rss_mib"]}
        table[shape] = row
    growth: dict[str, Any] = {}
    if len(shapes) == 3:
        for name in sorted({n for s in shapes for n in table[s]["configs"]}):
            rss = [table[s]["configs"].get(name, {}).get("peak_rss_mib") for s in shapes]
            if None in rss:
                continue
            first, second = rss[1] - rss[0], rss[2] - rss[1]
            if second <= FLAT_MIB:  # the peak is set by something the length does not change (e.g. loading)
                g, linear = None, True
            else:
                g = second / first if first > FLAT_MIB else None
                linear = None if g is None else g <= LINEAR_GROWTH_MAX
            growth[name] = {"peak_rss_mib": rss, "increments_mib": [first, second], "growth": g, "linear": linear}
    # flat views for bench/tables.py (one row per result file: configurations, ratios, summary)
    flat = {f"{shape} {n}": c for shape in shapes for n, c in table[shape]["configs"].items()}
    ratios = {f"{shape} {k}": v for shape in shapes for k, v in table[shape].items() if k != "configs"}
    summary = {f"RSS growth {n}": {"growth": g["growth"], "linear": g["linear"]} for n, g in growth.items()}
    return {"shapes": table, "memory_growth": growth, "configs": flat, "ratios": ratios, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="2x512,2x1024,2x2048", help="rows x tokens per step, comma-separated")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the median (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats per shape (default 1)")
    p.add_argument("--only", default=",".join(CONFIGS), help="configurations (default: " + ", ".join(CONFIGS) + ")")
    p.add_argument("--wait-idle", type=float, default=60, help="seconds to wait for an idle machine per run")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration run")
    p.add_argument("--out", type=Path, help="result file (default bench/results/long-sequences-DATE-COMMIT.json)")
    p.add_argument("--resummarise", type=Path, metavar="FILE",
                   help="recompute the summary of an earlier result FILE from its stored runs (no training) and "
                        "rewrite it in place")
    args = p.parse_args(argv)
    if args.resummarise:
        data = json.loads(args.resummarise.read_text())
        data.update(h.rounded(summarise(data["settings"]["shapes"], data["runs"])))
        data.setdefault("notes", []).append(f"summary recomputed from the stored runs on {time.strftime('%Y-%m-%d')} "
                                            f"by bench/long_sequences.py at {h.git_state(h.REPO)}")
        h.write_result("long-sequences", data, args.resummarise)
        return 0
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    env = h.environment(h.REPO)
    env["load_average_before"] = h.load_average()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tunelab-long-") as tmp:
        runs = {s: run_shape(s, args, Path(tmp)) for s in shapes}
    env["load_average_after"] = h.load_average()
    env["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    result = {"settings": {"shapes": shapes, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                           "configs": args.only, "model": h.MODEL, "linear_growth_max": LINEAR_GROWTH_MAX},
              "environment": env, **summarise(shapes, runs),
              "runs": {s: {k: v for k, v in r.items() if k != "environment"} for s, r in runs.items()}}
    h.write_result("long-sequences", h.rounded(result), args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
