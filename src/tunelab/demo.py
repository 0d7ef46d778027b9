"""`tunelab demo`: measure a synthetic task, fine-tune the embedded model with LoRA, measure again."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tunelab.config import config_from_dict
from tunelab.data import generate as synthetic
from tunelab.data import render_prompt

DEMO_TASK = "date-format"
DEMO_TEMPLATE = "chat"


def exact_match(output: str, gold: str) -> bool:
    """The first line of the output, stripped, equals the gold answer."""
    lines = output.strip().splitlines()
    return bool(lines) and lines[0].strip() == gold.strip()


def score(model: Any, tokenizer: Any, records: list, template: str, max_new_tokens: int = 16) -> tuple[float, list[str]]:
    from tunelab.eval.generate import generate

    prompts = [render_prompt(r, template, tokenizer) for r in records]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=16,
                       add_special_tokens=template != "chat")
    acc = sum(exact_match(o, r.output) for o, r in zip(outputs, records, strict=True)) / max(1, len(records))
    return acc, outputs


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
             n_test: int = 48, task: str = DEMO_TASK, show: int = 4) -> dict[str, Any]:
    """The main job end to end; returns the before/after scores."""
    from tunelab.models import load_model, resolve_dtype
    from tunelab.train.loop import train

    t0 = time.perf_counter()
    steps = steps or 120
    output_dir = output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[demo] loading {model} ...", flush=True)
    # Score in fp32 (greedy decoding in bf16 can depend on the batch composition), train in bf16 with fp32 LoRA.
    base, tokenizer = load_model(model, "fp32")
    test = synthetic(task, "test", n_test, seed=0)
    print(f"[demo] task '{task}': {n_test} held-out test problems, e.g. {test[0].instruction!r} -> {test[0].output!r}")
    before, before_out = score(base, tokenizer, test, DEMO_TEMPLATE)
    print(f"[demo] before fine-tuning: exact match {100 * before:.1f}%", flush=True)
    cfg = config_from_dict(demo_config(model, steps, output_dir, task))
    train_dtype = resolve_dtype("auto")
    result = train(cfg, model=base.to(train_dtype), tokenizer=tokenizer)
    after, after_out = score(base.float(), tokenizer, test, DEMO_TEMPLATE)
    print(f"[demo] after LoRA ({result.steps} steps, {result.tokens_per_s:.0f} tokens/s, "
          f"{result.trainable_params:,} trainable parameters): exact match {100 * after:.1f}%\n")
    for r, b, a in list(zip(test, before_out, after_out, strict=True))[:show]:
        print(f"  Q: {r.instruction}\n     gold: {r.output}\n     before: {b.strip()[:60]!r}\n     after:  {a.strip()[:60]!r}")
    elapsed = time.perf_counter() - t0
    print(f"\n[demo] exact match {100 * before:.1f}% -> {100 * after:.1f}% in {elapsed:.0f} s")
    print(f"[demo] run saved to {Path(output_dir).resolve()}")
    print("[demo] next:\n"
          f"  tunelab generate {output_dir} --prompt \"{test[1].instruction}\"\n"
          f"  tunelab train configs/lora-arith.yaml --set method.r=16\n"
          f"  tunelab methods")
    return {"before": before, "after": after, "seconds": elapsed, "run_dir": output_dir}
