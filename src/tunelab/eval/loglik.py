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

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.eval.choices import MCItem
from tunelab.eval.generate import progress
from tunelab.eval.generate import run_model as _run_body
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


def _sliding_window(model: Any) -> int:
    """The attention window of a model whose (some) layers attend to the last W keys only; else a huge number."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if (not isinstance(window, int) or getattr(config, "use_sliding_window", True) is False
            or (layer_types is not None and "sliding_attention" not in layer_types)):
        return 1 << 62
    return window


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
        out, _, is_hidden = _run_body(model, ids.to(device), mask.to(device), use_cache=False)
    picked = out[torch.tensor(row_idx, device=device), torch.tensor(pos_idx, device=device)]
    return _sums_per_row(_token_logprobs(model, picked, is_hidden, targets), owner, [len(c) for _, c in rows])


def _sums_per_row(token_lp: torch.Tensor, owner: list[int], per_row: list[int]) -> list[list[float]]:
    """Σ of each continuation's token log-probabilities (``owner``: the continuation of each scored token, in
    order), split into the rows' lists (``per_row``: how many continuations each row has)."""
    sums = torch.zeros(sum(per_row), dtype=torch.float64, device=token_lp.device)
    sums.index_add_(0, torch.tensor(owner, device=token_lp.device), token_lp.double())
    flat, out = sums.tolist(), []
    for n in per_row:
        out.append(flat[:n])
        flat = flat[n:]
    return out


def _token_logprobs(model: Any, picked: torch.Tensor, is_hidden: bool, targets: list[int]) -> torch.Tensor:
    """log p(target) at each picked position (hidden states go through the head in fp32; soft-capping applied)."""
    logits = _head_fp32(model.get_output_embeddings(), picked) if is_hidden else picked
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    target = torch.tensor(targets, device=picked.device)[:, None]
    return logits.float().log_softmax(-1).gather(-1, target)[:, 0]


def _cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A cache holding rows ``rows`` of ``cache``, which stays as it is (its layers are copied, not their tensors:
    selecting rows makes new tensors). Everything else the cache carries is kept (e.g. prefix tuning's mark)."""
    part = copy.copy(cache)
    part.layers = [copy.copy(layer) for layer in cache.layers]
    part.batch_select_indices(rows)
    return part


# A model call's fixed cost in token positions: the Python and kernel-launch overhead of one pass through every
# layer plus the lower matmul efficiency of few rows, against which a chunk's padded positions are weighed when the
# contexts are batched and the options split into cached passes (see _padded_chunks; calibrated with
# bench/loglik_vs_lm_eval.py --overheads).
CALL_OVERHEAD_POSITIONS = 64
# A pass over the options holds a copy of the context cache per row: at most this many context positions in all
# (rows × the batch's context width), or one row per context when the contexts are longer than that allows.
CACHE_ROW_POSITIONS = 8192


def _padded_chunks(spans: Sequence[int], overhead: int | None = None,
                   max_rows: int | None = None) -> list[tuple[int, int]]:
    """Split rows sorted longest first (``spans``: the positions each needs; options, or contexts) into consecutive
    chunks, each run as one padded pass: [(start, stop)], minimising Σ (overhead + rows × the chunk's longest span)
    exactly (dynamic programming over the split points), with at most ``max_rows`` rows per chunk (an option row
    holds a copy of its context's cache). Few long rows and many short ones give few chunks with little padding;
    one chunk holding all is the answer when the spans are alike. ``overhead``: default :data:`CALL_OVERHEAD_POSITIONS` (read
    at call time)."""
    overhead = CALL_OVERHEAD_POSITIONS if overhead is None else overhead
    n = len(spans)
    max_rows = n if max_rows is None else max(1, max_rows)
    if any(spans[i] < spans[i + 1] for i in range(n - 1)):
        raise ValueError("spans must be sorted longest first")
    best = [0.0] + [float("inf")] * n  # best[j]: the cheapest split of the first j rows
    cut = [0] * (n + 1)
    for stop in range(1, n + 1):
        for start in range(max(0, stop - max_rows), stop):
            cost = best[start] + overhead + (stop - start) * spans[start]
            if cost < best[stop]:
                best[stop], cut[stop] = cost, start
    chunks, stop = [], n
    while stop:
        chunks.append((cut[stop], stop))
        stop = cut[stop]
    return chunks[::-1]


def _shared_context_logprobs(model: Any, items: list[tuple[list[int], list[list[int]]]],
                             pad_id: int) -> list[list[float]]:
    """Σ log p(continuation) for every continuation of every (context ids, continuations) item: each context
    runs once.

    The contexts run left-padded (each ends at the last column, as in ``generate``'s prefill) and fill the KV
    cache; the last context position scores every continuation's first token. The continuations of two or more
    tokens are then sorted by length and run, their tokens but the last, in right-padded chunks (split where a
    call's fixed cost outweighs the padding saved: :func:`_padded_chunks`), each on a copy of the cache with one
    row per continuation (like a decode step of several tokens: position-aware methods edit the context only,
    prefix and prompt tuning keep their prefix). Only the scored positions go through the head.
    """
    device = next(model.parameters()).device
    lengths = torch.tensor([len(ctx) for ctx, _ in items])
    width = int(lengths.max())
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for b, (ctx, _) in enumerate(items):
        ids[b, width - len(ctx):] = torch.tensor(ctx)
        mask[b, width - len(ctx):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with prompt_lengths(lengths.to(device)):
        out, cache, is_hidden = _run_body(model, ids.to(device), mask.to(device), position_ids.to(device))
    return options_after_prefill(model, out, cache, is_hidden, mask.cpu(), [cs for _, cs in items], pad_id)


def options_after_prefill(model: Any, out: torch.Tensor, cache: Any, is_hidden: bool, mask: torch.Tensor,
                          continuations: list[list[list[int]]], pad_id: int) -> list[list[float]]:
    """Σ log p(continuation) for the continuations of each row of a left-padded context batch that has just run
    (``out``: its hidden states or logits, ``cache``: its KV cache, which stays as it is; ``mask``: its attention
    mask): what :func:`_shared_context_logprobs` does after its context pass, and what generation can do after its
    prefill of the same contexts (``tunelab.eval.harness``: a generation task and a log-likelihood task on the same
    prompts share that pass)."""
    device = out.device
    mask = mask.cpu()
    lengths = mask.sum(-1)
    width = mask.shape[1]
    conts = [(b, cont) for b, cs in enumerate(continuations) for cont in cs]
    picked = [out[torch.tensor([b for b, _ in conts], device=device), -1]]
    targets = [cont[0] for _, cont in conts]
    owner = list(range(len(conts)))
    longer = sorted(((k, b, cont) for k, (b, cont) in enumerate(conts) if len(cont) > 1), key=lambda x: -len(x[2]))
    # rows per pass: the cache copies of at most CACHE_ROW_POSITIONS context positions, or as many rows as contexts
    max_rows = max(len(continuations), CACHE_ROW_POSITIONS // width)
    for start, stop in _padded_chunks([len(cont) - 1 for _, _, cont in longer], max_rows=max_rows):
        chunk = longer[start:stop]
        rows = torch.tensor([b for _, b, _ in chunk])
        span = len(chunk[0][2]) - 1
        cont_ids = torch.full((len(chunk), span), pad_id, dtype=torch.long)
        cont_mask = torch.zeros((len(chunk), span), dtype=torch.long)
        row_idx, pos_idx = [], []
        for r, (k, _, cont) in enumerate(chunk):
            cont_ids[r, : len(cont) - 1] = torch.tensor(cont[:-1])
            cont_mask[r, : len(cont) - 1] = 1
            row_idx += [r] * (len(cont) - 1)
            pos_idx += range(len(cont) - 1)
            targets += cont[1:]
            owner += [k] * (len(cont) - 1)
        full_mask = torch.cat([mask[rows], cont_mask], dim=1)
        cont_pos = lengths[rows][:, None] + torch.arange(span)[None, :]
        part, _, _ = _run_body(model, cont_ids.to(device), full_mask.to(device), cont_pos.to(device),
                               _cache_rows(cache, rows.to(device)))
        picked.append(part[torch.tensor(row_idx, device=device), torch.tensor(pos_idx, device=device)])
    return _sums_per_row(_token_logprobs(model, torch.cat(picked), is_hidden, targets), owner,
                         [len(cs) for cs in continuations])


def _plan(encoded: list[tuple[list[int], list[int]]], max_length: int, share_context: bool) -> tuple[
        dict[tuple[int, ...], list[int]], dict[tuple[tuple[int, ...], int], list[int]],
        dict[int, tuple[list[int], list[int]]]]:
    """Which pairs share their context's pass: ({context: pair indices}, {(input, continuation length): pair
    indices} for the pairs that run as one sequence, {pair index: (input, continuation)} of those)."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(encoded):
        by_context.setdefault(tuple(ctx), []).append(i)
    shared: dict[tuple[int, ...], list[int]] = {}
    single: dict[tuple[tuple[int, ...], int], list[int]] = {}
    rows: dict[int, tuple[list[int], list[int]]] = {}
    for ctx, members in by_context.items():
        conts = {tuple(encoded[i][1]) for i in members}
        if share_context and len(conts) > 1 and all(len(ctx) + len(c) - 1 <= max_length for c in conts):
            shared[ctx] = members
            continue
        for i in members:
            rows[i] = inp, cont = _window(*encoded[i], max_length)
            single.setdefault((tuple(inp), len(cont)), []).append(i)
    return shared, single, rows


def _context_batches(contexts: list[tuple[int, ...]], batch_size: int, *,
                     equal_lengths: bool) -> list[list[tuple[int, ...]]]:
    """Batches of at most ``batch_size`` contexts (sorted longest first), split where a model call's fixed cost
    outweighs the padding saved (:func:`_padded_chunks`: a long tail of long contexts gets batches of its own
    instead of widening a full batch). With ``equal_lengths`` only contexts of one length share a batch. That is
    for sliding-window models: left padding moves a prefix's keys (prefix / prompt tuning) further from the tokens,
    so they would fall out of the window earlier than in the unpadded sequence."""
    groups: list[list[tuple[int, ...]]] = [contexts]
    if equal_lengths:
        by_length: dict[int, list[tuple[int, ...]]] = {}
        for ctx in contexts:
            by_length.setdefault(len(ctx), []).append(ctx)
        groups = list(by_length.values())
    return [group[a:b] for group in groups
            for a, b in _padded_chunks([len(c) for c in group], max_rows=batch_size)]


@torch.no_grad()
def continuation_logprobs(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str] | tuple[Sequence[int], Sequence[int]]], *,
    batch_size: int = 16, share_context: bool = True,
) -> list[tuple[float, int]]:
    """For each (context, continuation): (Σ_j log p(y_j | context, y_<j), number of continuation tokens).

    Pairs of texts are tokenised with :func:`encode_pair`; pairs of token ids are scored as given. A context scored with several continuations (the options of a
    multiple-choice item) runs once, its KV cache shared by all of them (:func:`_shared_context_logprobs`,
    ``batch_size`` contexts per batch). A context with one continuation runs as one sequence, context and
    continuation together, right-padded (``batch_size`` inputs per batch); pairs whose inputs are identical share
    that pass. Inputs that do not fit the model's positions are cut from the left and run alone as well. Batches
    are sorted longest first (equal lengths share batches, and an out-of-memory error shows on the first batch);
    everything runs in eval mode and results come back in input order. ``share_context=False`` runs every pair
    as one sequence (the same numbers to rounding; ``bench/loglik_vs_lm_eval.py`` measures what sharing saves).
    """
    max_length = _max_length(model)
    encoded = [encode_pair(tokenizer, ctx, cont) if isinstance(ctx, str) else (list(ctx), list(cont))
               for ctx, cont in pairs]
    shared, single, rows = _plan(encoded, max_length, share_context)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    batches = _context_batches(sorted(shared, key=len, reverse=True), batch_size,
                               equal_lengths=_sliding_window(model) < max_length)
    inputs = sorted(single, key=lambda k: -len(k[0]))
    was_training = model.training
    model.eval()
    try:
        for b in progress(range(len(batches)), "loglik"):
            batch = batches[b]
            unique = [list(dict.fromkeys(tuple(encoded[i][1]) for i in shared[ctx])) for ctx in batch]
            items = [(list(ctx), [list(c) for c in cs]) for ctx, cs in zip(batch, unique, strict=True)]
            for ctx, cs, lps in zip(batch, unique, _shared_context_logprobs(model, items, pad_id), strict=True):
                lp_of = dict(zip(cs, lps, strict=True))
                for i in shared[ctx]:
                    scores[i] = (lp_of[tuple(encoded[i][1])], len(encoded[i][1]))
        for start in progress(range(0, len(inputs), batch_size), "loglik"):
            batch_keys = inputs[start : start + batch_size]
            batch_rows = [(list(key[0]), [rows[i][1] for i in single[key]]) for key in batch_keys]
            for key, lps in zip(batch_keys, _batch_logprobs(model, batch_rows, pad_id), strict=True):
                for i, lp in zip(single[key], lps, strict=True):
                    scores[i] = (lp, len(rows[i][1]))
    finally:
        model.train(was_training)
    return scores


def score_multiple_choice(
    model: Any, tokenizer: Any, items: Sequence[MCItem], *, batch_size: int = 16, share_context: bool = True
) -> list[MCResult]:
    """Answer each item by the log-likelihood of its options (acc) and per UTF-8 byte (acc_norm).

    Identical (context, continuation) pairs across items are scored once (BoolQ's " yes"/" no" after the
    same question, duplicated questions). Ties go to the lowest option index, as ``argmax`` does.
    """
    unique = list(dict.fromkeys(pair for item in items for pair in item.pairs))
    scored = dict(
        zip(unique, continuation_logprobs(model, tokenizer, unique, batch_size=batch_size,
                                          share_context=share_context), strict=True)
    )
    return [mc_result(item, [scored[pair][0] for pair in item.pairs]) for item in items]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))


def mc_result(item: MCItem, logprobs: list[float]) -> MCResult:
    """The answer to ``item`` from its options' log-likelihoods (acc: the largest; acc_norm: per UTF-8 byte)."""
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
