"""One run of a study: train a grid point from a fresh run folder with the one loop and return its metrics.

Used by both executors (``tunelab.scaling.runner``'s worker processes and ``tunelab.scaling.rayexec``'s Ray tasks).
Its metric is the held-out NLL per target token, computed by the loop's evaluation with the training objective
(``tunelab.train.objective.nll_sum``), optionally plus greedy exact match on some test examples.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any


def execute_run(config: dict[str, Any], run_dir: Path, threads: int) -> dict[str, Any]:
    """Train one grid point from a fresh run directory and return its metrics (test_nll is the law's L)."""
    from tunelab.config import config_from_dict
    from tunelab.train.loop import Trainer

    if run_dir.exists():  # a previous attempt was interrupted: start over (the run is short)
        shutil.rmtree(run_dir)
    extra = config.get("eval", {})
    run = {k: v for k, v in config.items() if k != "eval"}
    run["train"] = {**run["train"], "threads": threads}
    cfg = config_from_dict({**run, "output_dir": str(run_dir)})
    trainer = Trainer(cfg)
    result = trainer.run()
    if result.eval_loss is not None and not math.isfinite(result.eval_loss):  # never a point of the fit
        raise RuntimeError(f"run diverged: test NLL {result.eval_loss} after {result.steps} steps")
    metrics = {"test_nll": result.eval_loss, "train_loss": result.train_loss, "steps": result.steps,
               "train_seconds": result.seconds, "tokens": result.tokens, "target_tokens": result.target_tokens,
               "trainable_params": result.trainable_params, "peak_rss_mb": result.peak_rss_mb,
               "model_params": result.total_params - _embedding_params(trainer.model)}
    if extra.get("generation"):
        metrics["exact_match"] = exact_match(trainer, int(extra["generation"]), int(extra.get("max_new_tokens", 48)))
    for heavy in run_dir.glob("*.safetensors"):
        heavy.unlink()  # the study keeps numbers, not weights (a full-tuning run would store the whole model)
    return metrics


def _embedding_params(model: Any) -> int:
    """Token embedding and output projection parameters (counted once when tied)."""
    found = {id(p): p.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
             if m is not None for p in m.parameters(recurse=False)}
    return sum(found.values())


def exact_match(trainer: Any, n: int, max_new_tokens: int) -> float:
    """Share of the first ``n`` test examples whose greedy continuation equals the reference (whitespace-normalised)."""
    from tunelab.data import encode_prompts
    from tunelab.eval.generate import GenerationSettings, generate_ids
    from tunelab.train.batches import read_source

    records, _ = read_source(trainer.cfg.data.eval, trainer.cfg.data, trainer.cfg.train.seed)
    records = records[:n]
    ids = encode_prompts(records, trainer.tokenizer, template=trainer.cfg.data.template)
    out = generate_ids(trainer.model, trainer.tokenizer, ids, GenerationSettings(max_new_tokens=max_new_tokens))
    hits = sum(" ".join(g.text.split()) == " ".join(r.output.split()) for g, r in zip(out, records, strict=True))
    return hits / max(1, len(records))
