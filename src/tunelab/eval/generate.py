"""Batched generation with left padding and the KV cache, on a base model or with any method applied.

Prompts are given as token ids (``tunelab.data.encode_prompts`` gives exactly the ids training saw). Rows are
sorted by length and left-padded so every row's last prompt token sits at the end of the row; attention masks and
position ids keep the padding invisible, so a batched row decodes the same as the prompt alone (checked by tests
in fp32; in bf16 the matmul blocking can differ with the batch shape and flip near-ties).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    num_beams: int = 1  # 1 = greedy
    stop: list[str] = field(default_factory=list)  # cut the text at the first of these (and stop early)
    batch_size: int = 16


@dataclass
class Generation:
    text: str  # decoded continuation, cut at the first stop string
    n_tokens: int  # tokens generated (up to and including EOS, excluding padding)


def progress(batches: range, what: str) -> Any:
    """A progress bar over batches (tunelab.progress: on a terminal only; hidden for a single batch)."""
    from tunelab import progress as bars

    return bars.bar(batches, desc=what, unit="batch", enabled=len(batches) > 1, leave=False)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def _count_new(row: torch.Tensor, eos_ids: set[int], pad_id: int) -> int:
    n = 0
    for tok in row.tolist():
        n += 1
        if tok in eos_ids:
            return n
    # trailing pads after the model finished are not generated tokens
    while n and row[n - 1].item() == pad_id and pad_id not in eos_ids:
        n -= 1
    return n


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_ids(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]],
                 settings: GenerationSettings = GenerationSettings()) -> list[Generation]:
    """Greedy (or beam) continuations of each prompt, in input order."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[Generation | None] = [None] * len(prompt_ids)
    device = next(model.parameters()).device
    extra = {"stop_strings": list(settings.stop), "tokenizer": tokenizer} if settings.stop else {}
    try:
        for start in progress(range(0, len(order), settings.batch_size), "generate"):
            idx = order[start: start + settings.batch_size]
            ids, mask = _left_pad([prompt_ids[i] for i in idx], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                                 do_sample=False, num_beams=settings.num_beams, pad_token_id=pad_id, **extra)
            for i, row in zip(idx, out[:, ids.shape[1]:], strict=True):
                n = _count_new(row, eos_ids, pad_id)
                text = tokenizer.decode(row[:n], skip_special_tokens=True)
                results[i] = Generation(cut_at_stop(text, settings.stop), n)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
             batch_size: int = 8, stop: Sequence[str] = (), add_special_tokens: bool = True) -> list[str]:
    """Continuations of prompt strings (already rendered with a template)."""
    ids = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, stop=list(stop))
    return [g.text for g in generate_ids(model, tokenizer, ids, settings)]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text before the earliest stop string."""
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if s and pos != -1:
            cut = min(cut, pos)
    return text[:cut]
