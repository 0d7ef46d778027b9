"""Batched greedy generation with left padding and the KV cache, on a base model or with a method applied."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
             batch_size: int = 8, stop: Sequence[str] = (), add_special_tokens: bool = True) -> list[str]:
    """Greedy continuations of ``prompts`` (already rendered with a template), decoded without the prompt.

    Prompts are sorted by length and batched with left padding so that every row's last prompt token is at the
    end of the row; outputs come back in the input order. Text after the first stop string is cut.
    """
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for i, row in zip(idx, new, strict=True):
                outputs[i] = cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return outputs


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text before the earliest stop string."""
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if s and pos != -1:
            cut = min(cut, pos)
    return text[:cut]
