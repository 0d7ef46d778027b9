"""`tunelab demo`: measure a synthetic task, fine-tune the embedded model with LoRA, measure again."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tunelab.config import config_from_dict
from tunelab.data import generate as synthetic

DEMO_TASK = "date-format"
DEMO_TEMPLATE = "chat"


def score(model: Any, tokenizer: Any, task: str, limit: int, out_dir: Path) -> tuple[dict, list[dict]]:
    """Evaluate with the harness (same parser, metric and interval as `tunelab eval`); returns summary and rows."""
    from tunelab.eval.harness import EvalOptions, evaluate_task
    from tunelab.eval.tasks import discover_tasks

    spec = discover_tasks()[f"synth-{task}"]
    summary = evaluate_task(model, tokenizer, spec, EvalOptions(limit=limit, out_dir=str(out_dir)), DEMO_TEMPLATE)
    rows = [json.loads(line) for line in (out_dir / f"{spec.name}.jsonl").read_text().splitlines()]
    return summary, rows


def _pct(s: dict) -> str:
    return f"{100 * s['accuracy']:.1f}% [95% CI {100 * s['ci_low']:.1f}-{100 * s['ci_high']:.1f}]"


def demo_config(model: str, steps: int, output_dir: str, task: str = DEMO_TASK) -> dict[str, Any]:
    return {
        "model": {"name": model},
        "method": {"name": "lora", "r": 8, "alpha": 16, "targets": "all-linear"},
        "data": {"train": f"synthetic:{task}:train:{steps * 8}", "template": DEMO_TEMPLATE, "max_length": 128},
        "train": {"lr": 2e-3, "max_steps": steps, "batch_size": 8, "warmup_steps": 5, "schedule": "cosine",
                  "seed": 0},
        "output_dir": output_dir,
    }


def run_demo(model: str = "smollm2-135m", steps: int | None = None, output_dir: str | None = None,
             n_test: int = 64, task: str = DEMO_TASK, show: int = 4) -> dict[str, Any]:
    """The main job end to end; returns the before/after scores."""
    from tunelab.loading import load_base
    from tunelab.models import resolve_dtype
    from tunelab.train.loop import train

    t0 = time.perf_counter()
    steps = steps or 80
    output_dir = output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[demo] loading {model} ...", flush=True)
    # Score in fp32 (greedy decoding in bf16 can depend on the batch composition), train in bf16 with fp32 LoRA.
    base, tokenizer = load_base(model, "fp32")
    out = Path(output_dir)
    example = synthetic(task, "test", 1, seed=0)[0]
    print(f"[demo] task '{task}': {n_test} held-out test problems, e.g. {example.instruction!r} -> {example.output!r}")
    before, before_rows = score(base, tokenizer, task, n_test, out / "eval-before")
    print(f"[demo] before fine-tuning: exact match {_pct(before)}", flush=True)
    cfg = config_from_dict(demo_config(model, steps, output_dir, task))
    train_dtype = resolve_dtype("auto")
    result = train(cfg, model=base.to(train_dtype), tokenizer=tokenizer)
    after, after_rows = score(base.float(), tokenizer, task, n_test, out / "eval")
    print(f"[demo] after LoRA ({result.steps} steps, {result.tokens_per_s:.0f} tokens/s, "
          f"{result.trainable_params:,} trainable parameters): exact match {_pct(after)}\n")
    for b, a in list(zip(before_rows, after_rows, strict=True))[:show]:
        q = b["prompt"].split("user\n")[-1].split("<|im_end|>")[0].strip()
        print(f"  Q: {q}\n     gold:   {b['gold']}\n     before: {b['output'].strip()[:60]!r}"
              f"\n     after:  {a['output'].strip()[:60]!r}")
    elapsed = time.perf_counter() - t0
    print(f"\n[demo] exact match {100 * before['accuracy']:.1f}% -> {100 * after['accuracy']:.1f}% "
          f"in {elapsed:.0f} s (model load, two evaluations and training)")
    print(f"[demo] run saved to {Path(output_dir).resolve()}")
    print("[demo] next:\n"
          f"  tunelab generate {output_dir} --prompt \"{example.instruction}\"\n"
          f"  tunelab eval {output_dir} --task synth-{task} --task synth-arith\n"
          f"  tunelab train configs/lora-arith.yaml --set method.r=16\n"
          f"  tunelab methods")
    return {"before": before["accuracy"], "after": after["accuracy"], "seconds": elapsed, "run_dir": output_dir}
