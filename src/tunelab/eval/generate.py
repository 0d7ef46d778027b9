"""Batched generation with left padding and the KV cache, on a base model or with any method applied.

Prompts are given as token ids (``tunelab.data.encode_prompts`` gives exactly the ids training saw). Rows are
sorted by length and left-padded so every row's last prompt token sits at the end of the row; attention masks and
position ids keep the padding invisible, so a batched row decodes the same as the prompt alone (checked by tests
in fp32; in bf16 the matmul blocking can differ with the batch shape and flip near-ties).

Greedy decoding runs tunelab's own loop (:func:`_greedy`): the calls transformers' ``generate`` makes (a left-padded
prefill, then one token per row and step on the cache), with the rows that finished (EOS or a stop string) dropped
from the batch and the cache, and the vocabulary head applied to the last position only. It gives ``generate``'s
tokens (tested for every method and model family in fp32). A stop string ends a row at the token that completes it
in the generated text (``generate`` also matches stop strings that begin in the prompt). Beam search, and models
whose generation config asks for logit processing (a repetition penalty, banned words, a minimum length...), run
through ``generate``; ``GenerationSettings(engine="transformers")`` forces it.
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
    engine: str = "auto"  # "auto": tunelab's greedy loop where it applies, else transformers' generate


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


def run_model(model: Any, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor | None = None,
              cache: Any = None, *, use_cache: bool = True) -> tuple[torch.Tensor, Any, bool]:
    """One call of the model: (hidden states, the cache after the call, True) from the decoder body when the model
    has one (so that the caller sends only the positions it needs through the head), else (full logits, the cache,
    False)."""
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": use_cache}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if cache is not None:
        kwargs["cache"] = cache
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is not None and body is not model and head is not None:
        out = body(**kwargs)
        return out.last_hidden_state, getattr(out, "cache", None), True
    out = model(**kwargs)
    return out.logits, getattr(out, "cache", None), False


# generation-config fields that change greedy choices (logits processors of ``generate``), with their neutral values
_PROCESSING = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
               "bad_words_ids": None, "min_length": 0, "min_new_tokens": None, "suppress_tokens": None,
               "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
               "sequence_bias": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
               "watermarking_config": None, "max_time": None, "stop_strings": None}


def _own_loop_applies(model: Any, settings: GenerationSettings) -> bool:
    if settings.engine not in ("auto", "tunelab", "transformers"):
        raise ValueError(f"generation engine {settings.engine!r}: use 'auto', 'tunelab' or 'transformers'")
    if settings.engine == "transformers" or settings.num_beams != 1:
        if settings.engine == "tunelab":
            raise ValueError("engine 'tunelab' decodes greedily only; beam search runs with engine 'transformers'")
        return False
    config = getattr(model, "generation_config", None)
    active = [k for k, v in _PROCESSING.items() if config is not None and getattr(config, k, v) not in (v, None)]
    if settings.engine == "tunelab" and active:
        raise ValueError(f"engine 'tunelab' does not apply the generation config's logit processing ({', '.join(active)}):"
                         " use engine 'auto' or 'transformers'")
    return not active and not getattr(model.config, "is_encoder_decoder", False)


def _last_logits(model: Any, out: torch.Tensor, is_hidden: bool) -> torch.Tensor:
    """fp32 logits of each row's last position, as ``generate`` takes them (the head in the model's dtype, then
    soft-capping where the model has it)."""
    if not is_hidden:
        return out[:, -1].float()
    logits = model.get_output_embeddings()(out[:, -1])
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def _greedy(model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, settings: GenerationSettings,
            eos_ids: set[int], pad_id: int, on_prefill: Any = None) -> torch.Tensor | None:
    """[rows, max_new_tokens] greedy tokens of a left-padded batch, ``pad_id`` after a row's end (its EOS, or the
    token at which its generated text first contains a stop string); None when the model keeps no cache (the
    caller then runs ``generate``). ``on_prefill(hidden, cache, is_hidden, mask)`` is called once after the prompts'
    pass, before decoding (it must leave the cache as it is)."""
    rows, device = ids.shape[0], ids.device
    out = torch.full((rows, settings.max_new_tokens), pad_id, dtype=torch.long)
    alive = torch.arange(rows)  # the batch row of each row still decoding
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    next_pos = mask.sum(-1, keepdim=True)  # the position of each row's next token, counted from its first real one
    hidden, cache, is_hidden = run_model(model, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    if on_prefill is not None:
        on_prefill(hidden, cache, is_hidden, mask)
    for step in range(settings.max_new_tokens):
        token = _last_logits(model, hidden, is_hidden).argmax(-1)
        out[alive, step] = token.cpu()
        done = torch.isin(token, eos)
        if settings.stop:
            texts = tokenizer.batch_decode(out[alive, : step + 1], skip_special_tokens=True)
            done |= torch.tensor([any(s and s in t for s in settings.stop) for t in texts], device=device)
        if step + 1 == settings.max_new_tokens or bool(done.all()):
            break
        if bool(done.any()):  # finished rows leave the batch and the cache
            keep = (~done).nonzero()[:, 0]
            alive, token, mask, next_pos = alive[keep.cpu()], token[keep], mask[keep], next_pos[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        hidden, cache, is_hidden = run_model(model, token[:, None], mask, next_pos, cache)
        next_pos = next_pos + 1
    return out


@torch.no_grad()
def generate_ids(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]],
                 settings: GenerationSettings = GenerationSettings(), on_prefill: Any = None) -> list[Generation]:
    """Greedy (or beam) continuations of each prompt, in input order.

    ``on_prefill(indices, hidden, cache, is_hidden, mask)``: called for each batch after its prompts' pass (the
    prompts' indices in ``prompt_ids``, in batch-row order), before decoding — on batches that tunelab's own loop
    decodes only (a batch that ``generate`` runs, e.g. beam search, never calls it)."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[Generation | None] = [None] * len(prompt_ids)
    device = next(model.parameters()).device
    extra = {"stop_strings": list(settings.stop), "tokenizer": tokenizer} if settings.stop else {}
    own_loop = _own_loop_applies(model, settings)
    try:
        for start in progress(range(0, len(order), settings.batch_size), "generate"):
            idx = order[start: start + settings.batch_size]
            ids, mask = _left_pad([prompt_ids[i] for i in idx], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            hook = None if on_prefill is None else (lambda *a, idx=idx: on_prefill(idx, *a))
            new = _greedy(model, tokenizer, ids, mask, settings, eos_ids, pad_id, hook) if own_loop else None
            if new is None:
                new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                                     do_sample=False, num_beams=settings.num_beams, pad_token_id=pad_id,
                                     **extra)[:, ids.shape[1]:]
            for i, row in zip(idx, new.cpu(), strict=True):
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
