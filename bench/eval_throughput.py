"""Generation throughput on the embedded model: batch sizes and dtypes against the fp32 one-at-a-time reference.

    python bench/eval_throughput.py [--prompts 64] [--max-new-tokens 32] [--modes fp32:16,bf16:64,bf16:64:transformers]
                                    [--no-one-at-a-time]

Every mode decodes the same chat-template prompts (the four synthetic tasks) greedily with the KV cache through
``tunelab.eval.generate.generate_ids`` (prompts sorted by length and left-padded). A mode is DTYPE:BATCH[:ENGINE]:
ENGINE ``tunelab`` (the default: tunelab's greedy loop, finished rows dropped) or ``transformers`` (its
``generate``). The reference is transformers' ``generate`` in fp32, one prompt at a time (``--no-one-at-a-time``
skips it and takes the first fp32 transformers mode, else the first fp32 mode): fp32 outputs must equal it exactly; bf16 outputs are compared with it and their agreement
(identical texts) is reported, since bf16 rounding can flip a greedy choice and everything after it, with each mode's
accuracy on the tasks (the first line equals the gold: the ``exact`` parser), which says whether the flips matter. Writes JSON
(bench/results/eval-throughput-DATE-COMMIT.json, and stdout): generated tokens/s per mode, the ratios against fp32
at batch 16 (the issue-18 baseline, 52.8 tokens/s on 2026-11-28) and against one-at-a-time, the agreement, and the
machine's bf16 units (bf16 is emulated and slow on CPUs without them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from harness import REPO, environment, log, write_result

BASELINE_TOKENS_PER_S = 52.8  # fp32, batch 16, 64 prompts x 32 new tokens: bench/results/eval-throughput-2026-11-28-nocommit.json


def _modes(text: str) -> list[tuple[str, int, str]]:
    out = []
    for part in text.split(","):
        dtype, _, rest = part.strip().partition(":")
        bs, _, engine = rest.partition(":")
        engine = engine or "tunelab"
        if dtype not in ("fp32", "bf16") or not bs.isdigit() or engine not in ("tunelab", "transformers"):
            raise SystemExit(f"--modes: {part!r} is not DTYPE:BATCH[:ENGINE] (DTYPE fp32 or bf16, ENGINE tunelab or "
                             "transformers), e.g. bf16:64 or bf16:64:transformers")
        out.append((dtype, int(bs), engine))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--modes", default="fp32:16,fp32:64,bf16:16,bf16:64,fp32:64:transformers,bf16:64:transformers")
    ap.add_argument("--no-one-at-a-time", action="store_true", help="skip the fp32 one-prompt-at-a-time reference")
    ap.add_argument("--quant-bits", type=int, default=0,
                    help="quantize the model's linear layers to NF-k (2, 4 or 8) first: generation on a QLoRA base")
    ap.add_argument("--no-inference-weights", action="store_true",
                    help="with --quant-bits: dequantize per call as training does (the behaviour before "
                         "tunelab.quant.linear.inference_weights), to measure what keeping the weights saves")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, help="default: bench/results/eval-throughput-DATE-COMMIT.json")
    args = ap.parse_args()
    modes = _modes(args.modes)

    import torch

    from tunelab.data import encode_prompts, generate
    from tunelab.eval.generate import GenerationSettings, generate_ids
    from tunelab.eval.parsers import parse_exact
    from tunelab.models import load_model
    from tunelab.quant.linear import inference_weights

    plan = ([("one_at_a_time", "fp32", 1, "transformers")] if not args.no_one_at_a_time else [])
    plan += [(f"{d}-batch{b}" + ("" if e == "tunelab" else f"-{e}"), d, b, e) for d, b, e in modes]
    plan.sort(key=lambda p: p[1] != "fp32")  # one model in memory at a time: every fp32 mode first
    results, outputs, models = {}, {}, {}
    for name, dtype, bs, engine in plan:
        if dtype not in models:
            models.clear()  # one model in memory at a time
            models[dtype] = load_model(args.model, dtype)
            if args.quant_bits:
                from tunelab.config import QuantizeSection
                from tunelab.quant.model import quantize_model

                quantize_model(models[dtype][0], QuantizeSection(bits=args.quant_bits))
        model, tok = models[dtype]
        records = [r for task in ("arith", "date-format", "reverse", "sort-words")
                   for r in generate(task, "test", args.prompts // 4, seed=0)]
        prompts = encode_prompts(records, tok, template="chat")
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=bs, engine=engine)
        keep = inference_weights(model) if args.quant_bits and not args.no_inference_weights else contextlib.nullcontext()
        with keep:  # as tunelab.eval.harness.evaluate runs
            generate_ids(model, tok, prompts[:2], settings)  # warm-up
            t0 = time.perf_counter()
            gens = generate_ids(model, tok, prompts, settings)
            dt = time.perf_counter() - t0
        n = sum(g.n_tokens for g in gens)
        outputs[name] = [g.text for g in gens]
        right = sum(parse_exact(g.text) == r.output.strip() for g, r in zip(gens, records, strict=True))
        results[name] = {"dtype": dtype, "batch_size": bs, "engine": engine, "seconds": round(dt, 2),
                         "generated_tokens": n,
                         "tokens_per_s": round(n / dt, 1), "accuracy": round(right / len(records), 4)}
        log(f"{name}: {n} tokens in {dt:.1f} s ({n / dt:.1f} tokens/s)")
    reference = "one_at_a_time" if "one_at_a_time" in outputs else next(
        (n for n, d, _, e in plan if d == "fp32" and e == "transformers"),
        next((n for n, d, _, _ in plan if d == "fp32"), plan[0][0]))
    for name, row in results.items():
        same = sum(a == b for a, b in zip(outputs[name], outputs[reference], strict=True))
        row["identical_to_reference"] = f"{same}/{len(outputs[name])}"
        row["agreement"] = round(same / len(outputs[name]), 3)
    base = results.get("fp32-batch16", {}).get("tokens_per_s")
    best = max((r for n, r in results.items() if n != "one_at_a_time"), key=lambda r: r["tokens_per_s"])
    fp32_best = max((r for n, r in results.items() if r["dtype"] == "fp32" and n != "one_at_a_time"),
                    key=lambda r: r["tokens_per_s"], default=None)
    # tunelab's loop against transformers' generate at the same dtype and batch, where both ran
    engine_speedup = {f"{r['dtype']}-batch{r['batch_size']}": round(r["tokens_per_s"] / hf["tokens_per_s"], 2)
                      for r in results.values() if r["engine"] == "tunelab"
                      for hf in [results.get(f"{r['dtype']}-batch{r['batch_size']}-transformers")] if hf}
    report = {
        "benchmark": "eval_throughput", "model": args.model, "prompts": args.prompts,
        "quant_bits": args.quant_bits, "inference_weights": bool(args.quant_bits and not args.no_inference_weights),
        "max_new_tokens": args.max_new_tokens, "reference": reference, "modes": results,
        "accuracy_note": "each mode's accuracy is exact-match on the synthetic tasks; the untrained embedded model "
                         "scores ~0 on them, so with it the accuracy cannot show whether bf16 flips matter: read "
                         "agreement (identical texts) there",
        "speedup_vs_fp32_batch16": {n: round(r["tokens_per_s"] / base, 2) for n, r in results.items()} if base else None,
        "own_loop_vs_transformers_generate": engine_speedup,
        "best": {"mode": f"{best['dtype']}-batch{best['batch_size']}-{best['engine']}",
                 "tokens_per_s": best["tokens_per_s"],
                 "vs_issue_baseline_52.8": round(best["tokens_per_s"] / BASELINE_TOKENS_PER_S, 2),
                 "agreement": best["agreement"]},
        "best_fp32": ({"mode": f"fp32-batch{fp32_best['batch_size']}", "tokens_per_s": fp32_best["tokens_per_s"],
                       "vs_issue_baseline_52.8": round(fp32_best["tokens_per_s"] / BASELINE_TOKENS_PER_S, 2),
                       "agreement": fp32_best["agreement"]} if fp32_best else None),
        "environment": {**environment(REPO), "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()},
    }
    # the earlier layout, which bench/tables.py and the README headline read
    if "fp32-batch16" in results:
        report["batched"] = results["fp32-batch16"]
        report["dtype"] = "fp32"
    if "one_at_a_time" in results and base:
        report["one_at_a_time"] = results["one_at_a_time"]
        report["speedup_batched"] = round(base / results["one_at_a_time"]["tokens_per_s"], 2)
        report["identical_outputs"] = results["fp32-batch16"]["identical_to_reference"]
    write_result("eval-throughput", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
