"""The training objective, defined once: token-level negative log-likelihood on target tokens.

For a batch with labels y (IGNORE_INDEX on prompt and padding positions) the causal-LM loss is

    L = Σ_{b,t: y[b,t+1] ≠ ignore} −log p(y[b,t+1] | x[b,≤t])  /  N_target

where N_target is the number of target tokens over **all** micro-batches of one optimizer step (and all processes),
not a mean of per-batch means: every target token weighs the same whatever batch it falls in (torchtune#2307).
The vocabulary projection is applied only at positions that carry a target, which saves most of its cost when the
prompt is long. Evaluation uses the same function, so reported losses and trained losses are the same quantity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.methods.core import prompt_lengths

__all__ = ["IGNORE_INDEX", "count_targets", "mean_nll", "nll_sum", "prompt_lengths_from_labels"]


def count_targets(labels: torch.Tensor) -> int:
    """Number of positions that carry a loss (the shifted labels that are not IGNORE_INDEX)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def _decoder(model: nn.Module) -> nn.Module:
    """The transformer body (LlamaModel, GPT2Model, ...) of a *ForCausalLM model."""
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise TypeError(f"{type(model).__name__} has no separate decoder body (base_model); expected a "
                        f"transformers *ForCausalLM model")
    return body


def prompt_lengths_from_labels(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Per row, the number of real tokens before the first target: the prompt of a prompt-masked example.

    Real tokens are those of ``attention_mask`` (all when None), on either padding side. A row whose first real
    token already carries a label (``data.train_on_prompt``, plain language modelling) or that has no target at
    all shows no prompt/response split: its whole real length is returned, as for a bare prompt.
    """
    real = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    start = real.int().argmax(dim=1)
    n_real = real.sum(dim=1)
    is_target = (labels != IGNORE_INDEX) & real
    first = is_target.int().argmax(dim=1)
    split = is_target.any(dim=1) & (first > start)
    return torch.where(split, first - start, n_real)


def nll_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(Σ token NLL over target positions, number of target positions) for one micro-batch.

    ``batch`` holds input_ids and labels, and attention_mask or position_ids (packed rows). The sum is in fp32.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with prompt_lengths(prompt_lengths_from_labels(labels, batch.get("attention_mask"))):
        hidden = _decoder(model)(**inputs, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]
    logits = model.get_output_embeddings()(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    total = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return total, int(keep.sum())


def mean_nll(total: float, count: int) -> float:
    """Per-token NLL (the loss every report and the scaling-law fits use); nan when there are no targets."""
    return total / count if count else float("nan")
