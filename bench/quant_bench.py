"""Quantized bases on the embedded model: LoftQ initialisation time, weight memory, QLoRA training throughput.

    python bench/quant_bench.py [--steps N] [--only NAME,NAME] [--rank R] [--out results.json]

Every configuration runs in a fresh child process (``--worker NAME``), so its wall time and peak RSS are its own;
the parent imports only the standard library (see bench/common.py). Measured:

* ``loftq-init-T1`` / ``loftq-init-T5``: LoftQ NF4 (r = --rank, α = r) over every linear layer of the decoder,
  T = 1 and 5 alternations — wall time of ``quantize_model`` (fp32, torch.linalg.svd on the CPU);
* ``memory``: weight bytes at NF4, NF4 + double quantization and NF2 against the same layers in bf16, and of the
  whole model (every weight; norms and unquantized tables counted in bf16) with the token embedding / tied head
  left in bf16 (the QLoRA default) and quantized too (``quantize.embeddings``; labels ``*-emb``; at NF2 the
  table is also measured at 4 bits, ``nf2-emb4``);
* ``train-lora-bf16`` / ``train-qlora-nf4``: tokens/s and peak RSS of LoRA (r=8, α=16, all-linear) on the bf16
  base vs on the NF4 base, batch 8 × 128 tokens, the data of bench/train_throughput.py (its helpers are reused).

Targets (issue 7): weights ≤ 0.3× bf16 at 4 bits (quantized layers, and the whole model with embeddings); QLoRA tokens/s ≥ 0.9× bf16 LoRA (issue 18; 0.7× in issue 7); LoftQ T=5 ≤ 120 s.
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

from harness import (
    BATCH,
    MODEL,
    RESULT_PREFIX,
    SEQ_LEN,
    add_common_args,
    environment,
    load_average,
    log,
    measure,
    ratio,
    rounded,
    run_child_process,
    train_tunelab,
    wait_for_idle,
    worker_prepare,
    write_result,
)

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {
    "loftq-init-T1": "LoftQ NF4 init, T=1, every decoder linear layer",
    "loftq-init-T5": "LoftQ NF4 init, T=5, every decoder linear layer",
    "memory": "weight bytes of the quantized layers and of the whole model at NF4, NF4+dq, NF2 vs bf16, "
              "embedding table in bf16 or quantized",
    "train-lora-bf16": "tunelab LoRA r=8 alpha=16 all-linear, bf16 base, batch 8 x 128",
    "train-qlora-nf4": "tunelab LoRA r=8 alpha=16 all-linear on an NF4 base (block 64), batch 8 x 128",
}
TARGETS = {"weights_4bit_vs_bf16_max": 0.3, "qlora_tokens_per_s_vs_bf16_lora_min": 0.9, "loftq_T5_s_max": 120.0}


# ============================================================================================================
# Workers (child processes; these import torch)
# ============================================================================================================


def worker_loftq(iters: int, rank: int) -> dict[str, Any]:
    from tunelab.config import QuantizeSection
    from tunelab.methods import lora
    from tunelab.models import load_model
    from tunelab.quant.model import memory_report as quant_memory
    from tunelab.quant.model import quantize_model

    model, _ = load_model(MODEL, "fp32")
    state = quantize_model(model, QuantizeSection(bits=4, init="loftq", iters=iters), lora.low_rank(lora.Config(r=rank, alpha=rank)))
    errs = [(r.qlora_error, r.loftq_error) for r in state.report]
    return {"seconds": state.seconds, "layers": len(state.report), "rank": rank, "iters": iters,
            "mean_qlora_error": sum(e[0] for e in errs) / len(errs),
            "mean_loftq_error": sum(e[1] for e in errs) / len(errs),
            "layers_loftq_below_qlora": sum(e[1] < e[0] for e in errs), "memory": quant_memory(model)}


def worker_memory() -> dict[str, Any]:
    from tunelab.config import QuantizeSection
    from tunelab.models import load_model
    from tunelab.quant.model import memory_report as quant_memory
    from tunelab.quant.model import quantize_model

    out = {}
    sections = {"nf4": QuantizeSection(bits=4), "nf4-dq": QuantizeSection(bits=4, double_quant=True),
                "nf2": QuantizeSection(bits=2), "nf2-dq": QuantizeSection(bits=2, double_quant=True),
                "nf4-emb": QuantizeSection(bits=4, embeddings=True),
                "nf4-dq-emb": QuantizeSection(bits=4, double_quant=True, embeddings=True),
                "nf2-emb4": QuantizeSection(bits=2, embeddings=True, embedding_bits=4)}
    for label, section in sections.items():
        model, _ = load_model(MODEL, "fp32")
        t0 = time.perf_counter()
        state = quantize_model(model, section)
        tables = {r.name: {"kind": r.kind, "bits": r.bits, "rel_error": r.qlora_error}
                  for r in state.report if r.kind != "linear"}
        out[label] = {**quant_memory(model), "quantize_s": time.perf_counter() - t0, "tables": tables}
    return out


LORA = {"r": 8, "alpha": 16, "targets": "all-linear"}  # bench/train_throughput.py's LoRA row
LORA_LR = 2e-4


def worker_train(name: str, workdir: Path, steps: int) -> dict[str, Any]:
    """tunelab's loop, LoRA on the bf16 base or on an NF4 base (harness.train_tunelab)."""
    quantize = {"bits": 4, "quant": "nf", "init": "qlora"} if name == "train-qlora-nf4" else None
    return train_tunelab(workdir, name, {"name": "lora", **LORA}, steps=steps, lr=LORA_LR, quantize=quantize)


def run_worker(name: str, workdir: Path, steps: int, rank: int) -> dict[str, Any]:
    if name == "prepare":
        return worker_prepare(workdir, steps)
    if name.startswith("loftq-init-T"):
        return worker_loftq(int(name.rsplit("T", 1)[1]), rank)
    if name == "memory":
        return worker_memory()
    return worker_train(name, workdir, steps)


# ============================================================================================================
# Parent
# ============================================================================================================


def run_child(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    return run_child_process(__file__, ["--worker", name, "--workdir", str(workdir), "--steps", str(args.steps),
                                 "--rank", str(args.rank)], echo=False)


def summarise(results: dict[str, Any], warmup: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("train-lora-bf16", "train-qlora-nf4"):
        r = results.get(name)
        if r and r["status"] == "ok":
            r["measured"] = measure(r, warmup)
    bf16, q4 = results.get("train-lora-bf16", {}), results.get("train-qlora-nf4", {})
    if bf16.get("status") == q4.get("status") == "ok":
        tps = ratio(q4["measured"]["tokens_per_s"], bf16["measured"]["tokens_per_s"])
        out["qlora_nf4_vs_bf16_lora"] = {"tokens_per_s_ratio": tps, "peak_rss_ratio": ratio(
            q4["peak_rss_mib"], bf16["peak_rss_mib"]), "target_tokens_per_s_met": tps is not None and tps >= TARGETS["qlora_tokens_per_s_vs_bf16_lora_min"]}
    mem = results.get("memory", {})
    if mem.get("status") == "ok":
        out["weights_vs_bf16"] = {k: {"quantized_layers": v["quantized_ratio"], "linear_layers": v.get("linear_ratio"),
                                      "embedding": v.get("embedding_ratio"), "whole_model": v["model_ratio"]}
                                  for k, v in mem.items() if isinstance(v, dict) and "quantized_ratio" in v}
        out["target_weights_4bit_met"] = mem["nf4"]["quantized_ratio"] <= TARGETS["weights_4bit_vs_bf16_max"]
        if "nf4-emb" in mem:  # the whole embedded model, embedding and tied head quantized too
            out["target_whole_model_4bit_met"] = mem["nf4-emb"]["model_ratio"] <= TARGETS["weights_4bit_vs_bf16_max"]
    t5 = results.get("loftq-init-T5", {})
    if t5.get("status") == "ok":
        out["target_loftq_T5_met"] = t5["seconds"] <= TARGETS["loftq_T5_s_max"]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, list(CONFIGS), "quant", steps=12, warmup=2, wait_idle=60)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the LoftQ initialisation timing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(run_worker(args.worker, args.workdir, args.steps, args.rank)), flush=True)
        return 0
    names = [n.strip() for n in args.only.split(",")] if args.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    env, t0, results = environment(REPO), time.perf_counter(), {}
    env["load_average_before"] = load_average()
    with tempfile.TemporaryDirectory(prefix="tunelab-quant-bench-") as tmp:
        if any(n.startswith("train-") for n in names):
            log("preparing data")
            prep = run_child("prepare", args, Path(tmp))
            if prep["status"] != "ok":
                raise SystemExit(f"data preparation failed: {prep}")
        for name in names:
            log(f"{name}: {CONFIGS[name]}")
            results[name] = run_child(name, args, Path(tmp))
            log(f"  {name}: {results[name]['status']} in {results[name]['process_wall_s']:.1f} s")
    env["bench_wall_s"] = time.perf_counter() - t0
    summary = summarise(results, args.warmup)  # adds each training config's step statistics ("measured")
    report = {"benchmark": "quant_bench", "settings": {"model": MODEL, "batch": BATCH, "seq_len": SEQ_LEN,
                                                       "lora_train": LORA, "loftq_rank": args.rank,
                                                       "steps": args.steps, "warmup": args.warmup},
              "environment": env, "configs": {n: {"description": CONFIGS[n], **results[n]} for n in names},
              "summary": summary, "targets": TARGETS}
    write_result("quant", rounded(report), args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
