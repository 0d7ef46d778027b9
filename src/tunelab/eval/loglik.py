"""Log-likelihood scoring of continuations and multiple-choice items (lm-evaluation-harness style).

For a context c and a continuation y = (y_1..y_m) (tokens), the score is

    ℓ(y | c) = Σ_{j=1..m} log p(y_j | c, y_<j)          (fp32 log-softmax over the vocabulary)

and a multiple-choice item with options y^(1..K) is answered by

    acc:       argmax_k ℓ(y^(k) | c_k)
    acc_norm:  argmax_k ℓ(y^(k) | c_k) / bytes(y^(k))     (UTF-8 bytes of the scored continuation)

acc_norm removes the bias towards short options. lm-eval's ``acc_norm`` divides by the number of characters
of the option without its leading space; dividing by the bytes of the continuation as scored (leading space
included) is the same for ASCII text up to that constant +1, which can only flip near-ties. Byte length does
not depend on the tokenizer, so it compares models with different vocabularies fairly (lm-eval's
``acc_bytes`` argument).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.eval.choices import MCItem
from tunelab.eval.generate import progress
from tunelab.methods.core import prompt_lengths

__all__ = ["MCResult", "continuation_logprobs", "encode_pair", "score_multiple_choice", "summarize"]


@dataclass(frozen=True)
class MCResult:
    """Scores of one item: log-likelihood per option, the acc and acc_norm predictions, and whether right."""

    logprobs: list[float]
    pred: int
    pred_norm: int
    correct: bool
    correct_norm: bool


# --------------------------------------------------------------------------------------------- tokenisation


def _prefix_ids(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer adds BOS by itself (Llama-2 style), else [] (SmolLM2, GPT-2, tiny models)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-eval tokenises a pair.

    Trailing whitespace of the context moves to the front of the continuation (``"A: " + "x"`` is scored as
    ``"A:" + " x"``, the split BPE vocabularies expect). The continuation ids are the tail of
    encode(context + continuation) after encode(context); where the boundary merges into one token (the
    whole encoding does not start with the context's ids) the continuation is encoded on its own instead.
    BOS is prepended when the tokenizer uses one; an empty context becomes [bos or eos] so that the first
    continuation token has something to be conditioned on.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not continuation:
        raise ValueError(f"empty continuation after context {context[-60:]!r}: there is nothing to score")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ctx = encode(context) if context else []
    whole = encode(context + continuation)
    cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else encode(continuation)
    prefix = _prefix_ids(tokenizer)
    if not prefix and not ctx:
        prefix = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    return prefix + ctx, cont


def _max_length(model: Any) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _window(ctx: list[int], cont: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """(model input, continuation ids): input = (ctx + cont)[:-1], cut from the left to max_length tokens.

    The last len(cont) input positions predict the continuation, so it must fit in the window.
    """
    if len(cont) > max_length:
        raise ValueError(
            f"continuation of {len(cont)} tokens does not fit the model's {max_length} positions"
        )
    return (ctx + cont)[:-1][-max_length:], cont


# --------------------------------------------------------------------------------------------- scoring


def _decoder_hidden(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(hidden states, True) from the decoder body when the model has one, else (full logits, False)."""
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is not None and body is not model and head is not None:
        return body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state, True
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits, False


def _head_fp32(head: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The vocabulary projection of the scored positions, in fp32 for a plain linear head whatever the model's dtype.

    A bf16 head rounds logits of magnitude 16-32 to multiples of 0.125 (0.25 above 32): options that differ by less
    than that tie, and the tie goes to the first option. The fp32 product of the bf16 hidden states and weights
    costs little, as only the scored positions go through it. Other heads (quantized, wrapped) run as they are."""
    if type(head) is nn.Linear and hidden.dtype != torch.float32:
        bias = head.bias.float() if head.bias is not None else None
        return F.linear(hidden.float(), head.weight.float(), bias)
    return head(hidden)


def _batch_logprobs(model: Any, rows: list[tuple[list[int], list[list[int]]]], pad_id: int) -> list[list[float]]:
    """Σ log p(continuation) for every continuation of every row of a right-padded batch.

    A row is (input ids, continuations of one length m): each continuation is scored on the last m positions of the
    one input (its ids but the last are the input's tail), so options that differ only in their last token
    (" answer1", " answer2", ...) cost one forward pass together. Only the scored positions go through the
    vocabulary projection and log-softmax.
    """
    width = max(len(inp) for inp, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    row_idx, pos_idx, targets, owner = [], [], [], []  # owner: which continuation a scored position belongs to
    n_conts = 0
    for r, (inp, conts) in enumerate(rows):
        ids[r, : len(inp)] = torch.tensor(inp)
        mask[r, : len(inp)] = 1
        for cont in conts:
            row_idx += [r] * len(cont)
            pos_idx += range(len(inp) - len(cont), len(inp))  # position t predicts token t + 1
            targets += cont
            owner += [n_conts] * len(cont)
            n_conts += 1
    device = next(model.parameters()).device
    context = torch.tensor([len(inp) - len(conts[0]) + 1 for inp, conts in rows], device=device)  # prompt span
    with prompt_lengths(context):
        out, is_hidden = _decoder_hidden(model, ids.to(device), mask.to(device))
    picked = out[torch.tensor(row_idx, device=device), torch.tensor(pos_idx, device=device)]
    logits = _head_fp32(model.get_output_embeddings(), picked) if is_hidden else picked
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    token_lp = logits.float().log_softmax(-1).gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
    sums = torch.zeros(n_conts, dtype=torch.float64, device=device)
    sums.index_add_(0, torch.tensor(owner, device=device), token_lp.double())
    flat, out_rows = sums.tolist(), []
    for _, conts in rows:
        out_rows.append(flat[: len(conts)])
        flat = flat[len(conts):]
    return out_rows


@torch.no_grad()
def continuation_logprobs(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16
) -> list[tuple[float, int]]:
    """For each (context, continuation): (Σ_j log p(y_j | context, y_<j), number of continuation tokens).

    Pairs are tokenised with :func:`encode_pair`. Pairs whose model inputs are identical (same context, and
    continuations of one length that differ only in their last token) share one forward pass. Inputs are sorted
    longest first (equal lengths share batches, and an out-of-memory error shows on the first batch),
    right-padded and scored in eval mode; results come back in input order. Inputs longer than the model's
    positions are cut from the left.
    """
    max_length = _max_length(model)
    rows = [_window(*encode_pair(tokenizer, ctx, cont), max_length) for ctx, cont in pairs]
    groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
    for i, (inp, cont) in enumerate(rows):
        groups.setdefault((tuple(inp), len(cont)), []).append(i)
    keys = sorted(groups, key=lambda k: -len(k[0]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for start in progress(range(0, len(keys), batch_size), "loglik"):
            batch = keys[start : start + batch_size]
            inputs = [(list(key[0]), [rows[i][1] for i in groups[key]]) for key in batch]
            for key, lps in zip(batch, _batch_logprobs(model, inputs, pad_id), strict=True):
                for i, lp in zip(groups[key], lps, strict=True):
                    scores[i] = (lp, len(rows[i][1]))
    finally:
        model.train(was_training)
    return scores


def score_multiple_choice(
    model: Any, tokenizer: Any, items: Sequence[MCItem], *, batch_size: int = 16
) -> list[MCResult]:
    """Answer each item by the log-likelihood of its options (acc) and per UTF-8 byte (acc_norm).

    Identical (context, continuation) pairs across items are scored once (BoolQ's " yes"/" no" after the
    same question, duplicated questions). Ties go to the lowest option index, as ``argmax`` does.
    """
    unique = list(dict.fromkeys(pair for item in items for pair in item.pairs))
    scored = dict(
        zip(unique, continuation_logprobs(model, tokenizer, unique, batch_size=batch_size), strict=True)
    )
    return [_result(item, [scored[pair][0] for pair in item.pairs]) for item in items]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))


def _result(item: MCItem, logprobs: list[float]) -> MCResult:
    per_byte = [lp / len(option.encode("utf-8")) for lp, option in zip(logprobs, item.options, strict=True)]
    pred, pred_norm = _argmax(logprobs), _argmax(per_byte)
    return MCResult(logprobs, pred, pred_norm, pred == item.gold, pred_norm == item.gold)


def summarize(results: Sequence[MCResult]) -> dict[str, float | int]:
    """{"n", "accuracy", "accuracy_norm"}: the fraction of items right by acc and by acc_norm (nan if empty).

    Confidence intervals are left to the harness (tunelab.eval.metrics.summarize_accuracy).
    """
    n = len(results)
    if n == 0:
        return {"n": 0, "accuracy": float("nan"), "accuracy_norm": float("nan")}
    return {
        "n": n,
        "accuracy": sum(r.correct for r in results) / n,
        "accuracy_norm": sum(r.correct_norm for r in results) / n,
    }
