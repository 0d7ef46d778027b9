"""Generation throughput on the embedded model: batched vs one prompt at a time (same prompts, same outputs).

    python bench/eval_throughput.py [--prompts 64] [--max-new-tokens 32] [--batch-size 16] [--dtype fp32]

Writes JSON (bench/results/eval-throughput-DATE-COMMIT.json, and stdout): generated tokens/s for each mode, the ratio, and whether the batched outputs equal the
one-at-a-time outputs (they must in fp32).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from harness import REPO, environment, write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, help="default: bench/results/eval-throughput-DATE-COMMIT.json")
    args = ap.parse_args()

    from tunelab.data import encode_prompts, generate
    from tunelab.eval.generate import GenerationSettings, generate_ids
    from tunelab.models import load_model

    model, tok = load_model(args.model, args.dtype)
    records = [r for task in ("arith", "date-format", "reverse", "sort-words")
               for r in generate(task, "test", args.prompts // 4, seed=0)]
    prompts = encode_prompts(records, tok, template="chat")
    results = {}
    outputs = {}
    for mode, bs in (("batched", args.batch_size), ("one_at_a_time", 1)):
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=bs)
        generate_ids(model, tok, prompts[:2], settings)  # warm-up
        t0 = time.perf_counter()
        gens = generate_ids(model, tok, prompts, settings)
        dt = time.perf_counter() - t0
        n = sum(g.n_tokens for g in gens)
        outputs[mode] = [g.text for g in gens]
        results[mode] = {"batch_size": bs, "seconds": round(dt, 2), "generated_tokens": n,
                         "tokens_per_s": round(n / dt, 1)}
        print(f"{mode}: {n} tokens in {dt:.1f} s", file=sys.stderr)
    same = sum(a == b for a, b in zip(outputs["batched"], outputs["one_at_a_time"], strict=True))
    report = {
        "benchmark": "eval_throughput", "model": args.model, "dtype": args.dtype, "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens, **results,
        "speedup_batched": round(results["batched"]["tokens_per_s"] / results["one_at_a_time"]["tokens_per_s"], 2),
        "identical_outputs": f"{same}/{len(prompts)}",
        "environment": {**environment(REPO), "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()},
    }
    write_result("eval-throughput", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
