"""Tokenisation with loss masks: ``input_ids = prompt + output + EOS``, labels only on ``output + EOS``.

The prompt and the response are tokenised separately and their ids concatenated, so the boundary between the
tokens we do not train on and the ones we do is exact (tokenising the joined text could merge the last prompt
characters with the first response characters into one token). The EOS token is appended to every response: the
model must learn to stop.

Label convention is Hugging Face's: ``labels[t]`` is the target *at* position ``t``; the model shifts them by one
inside its loss, and ``IGNORE_INDEX`` (-100) positions are left out of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.records import DataError, Record
from tunelab.data.templates import check_template, render_prompt

IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenised example; ``labels`` is ``IGNORE_INDEX`` where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    line: int = 0
    source: str = ""


@dataclass
class TokenizeStats:
    """Counts from :func:`tokenize_records`; ``dropped_lines`` are the lines of rows skipped for length.

    ``n_target_tokens`` counts the positions that carry a loss (labels after the shift, so never ``labels[0]``).
    """

    n_examples: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_target_tokens: int = 0
    n_tokens: int = 0
    dropped_lines: list[int] = field(default_factory=list)


def tokenize_records(
    records: Iterable[Record],
    tokenizer: Any,
    *,
    template: str = "alpaca",
    max_length: int = 512,
    train_on_prompt: bool = False,
    skip_bad_rows: bool = False,
) -> tuple[list[Example], TokenizeStats]:
    """Tokenise records into :class:`Example` s with the prompt masked out of the labels.

    Sequences longer than ``max_length`` are cut from the right. A row left with no response token is an error
    naming its ``source:line`` (or is skipped and counted in ``stats.n_dropped`` when ``skip_bad_rows``).
    With ``train_on_prompt`` the prompt tokens are targets too.
    """
    if max_length < 1:
        raise DataError(f"data.max_length must be a positive number of tokens, got {max_length}.")
    eos_id = _eos_id(tokenizer)
    records = list(records)
    chats = [r for r in records if r.messages]
    if chats:
        if len(chats) < len(records):
            raise DataError(f"{chats[0].source or '<records>'}: chat-format rows (messages) and instruction rows are "
                            f"mixed in one data set; give each kind its own file", source=chats[0].source)
        return _tokenize_chats(chats, tokenizer, max_length, train_on_prompt, skip_bad_rows)
    prompt_ids = encode_prompts(records, tokenizer, template=template)
    response_ids = encode_responses([r.output for r in records], tokenizer)
    examples: list[Example] = []
    stats = TokenizeStats()
    for record, p_ids, r_ids in zip(records, prompt_ids, response_ids, strict=True):
        example = _build_example(record, p_ids, r_ids + [eos_id], max_length, train_on_prompt)
        if example is None:
            if not skip_bad_rows:
                raise _too_long_error(record, len(p_ids), max_length)
            stats.n_dropped += 1
            stats.dropped_lines.append(record.line)
            continue
        stats.n_truncated += len(p_ids) + len(r_ids) + 1 > max_length
        examples.append(example)
    _count(examples, stats)
    return examples, stats


def _tokenize_chats(records: list[Record], tokenizer: Any, max_length: int, train_on_prompt: bool,
                    skip_bad_rows: bool) -> tuple[list[Example], TokenizeStats]:
    """Chat-format records through the tokenizer's chat template; the loss on the assistant turns only (each
    turn's content and the end-of-turn tokens the template puts after it).

    The tokens of assistant turn i are those the template adds between the conversation up to turn i with the
    assistant prompt (``add_generation_prompt``) and the conversation through turn i; the template must render a
    conversation as the prefix of its continuation, which the row's error says when it does not."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{records[0].source or '<records>'}: chat-format rows (messages) need a tokenizer with a "
                        f"chat template; this model's tokenizer has none (use instruction/output rows and a "
                        f"template such as alpaca)", source=records[0].source)
    examples, stats = [], TokenizeStats()
    for record in records:
        ids, labels = _chat_ids(record, tokenizer, train_on_prompt)
        n_truncated = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        if all(t == IGNORE_INDEX for t in labels[1:]):
            if not skip_bad_rows:
                raise DataError(f"{record.source or '<records>'}:{record.line}: no assistant token is left after "
                                f"truncation to data.max_length ({max_length}); raise data.max_length or pass "
                                f"--skip-bad-rows", source=record.source, line=record.line, field="max_length")
            stats.n_dropped += 1
            stats.dropped_lines.append(record.line)
            continue
        stats.n_truncated += n_truncated
        examples.append(Example(input_ids=ids, labels=labels, line=record.line, source=record.source))
    _count(examples, stats)
    return examples, stats


def _chat_ids(record: Record, tokenizer: Any, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    def render(turns: Sequence[tuple[str, str]], prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=True,
                                            add_generation_prompt=prompt)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    turns = list(record.messages)
    ids = render(turns, prompt=False)
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(ids)
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before, through = render(turns[:i], prompt=True), render(turns[: i + 1], prompt=False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise DataError(f"{record.source or '<records>'}:{record.line}: the tokenizer's chat template does not "
                            f"render this conversation as a prefix of its continuation (turn {i}), so the assistant "
                            f"tokens cannot be found; use instruction/output rows for this model", source=record.source,
                            line=record.line, field=f"messages[{i}]")
        labels[len(before): len(through)] = through[len(before):]
    return ids, labels


def encode_prompts(records: Sequence[Record], tokenizer: Any, *, template: str = "alpaca") -> list[list[int]]:
    """Prompt token ids exactly as training sees them; generation should start from these too.

    Named and custom templates get the tokenizer's leading special tokens (e.g. BOS) but never trailing ones:
    some tokenizers append EOS/SEP when ``add_special_tokens=True``, and an EOS between prompt and response would
    teach the model to stop before answering. Chat-template prompts already contain their special tokens.
    """
    check_template(template, tokenizer)
    prompts = [render_prompt(r, template, tokenizer) for r in records]
    if template == "chat":
        return _encode(tokenizer, prompts, add_special_tokens=False)
    ids = _encode(tokenizer, prompts, add_special_tokens=True)
    n_suffix = _special_suffix_len(tokenizer)
    return [seq[: len(seq) - n_suffix] for seq in ids] if n_suffix else ids


def encode_responses(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Response token ids exactly as training appends them after the prompt (encoded on their own, no special
    tokens; training then adds EOS): what scoring a response "in the training format" must score."""
    return _encode(tokenizer, texts, add_special_tokens=False)


def _encode(tokenizer: Any, texts: Sequence[str], *, add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]


def _special_suffix_len(tokenizer: Any) -> int:
    """How many special tokens the tokenizer appends after the text when ``add_special_tokens=True``."""
    with_specials = _encode(tokenizer, ["x"], add_special_tokens=True)[0]
    plain = _encode(tokenizer, ["x"], add_special_tokens=False)[0]
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start : start + len(plain)] == plain:
            return len(with_specials) - start - len(plain)
    return 0


def _eos_id(tokenizer: Any) -> int:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise DataError(
            "the tokenizer has no EOS token, and every response must end with one so the model learns to stop; "
            "set tokenizer.eos_token (e.g. to '</s>' or '<|endoftext|>') when loading the model."
        )
    return int(eos_id)


def _build_example(
    record: Record, prompt: list[int], response: list[int], max_length: int, train_on_prompt: bool
) -> Example | None:
    """Concatenate, cut to ``max_length`` from the right, mask the prompt; ``None`` if no response token is left."""
    n_response = min(len(response), max_length - len(prompt))
    if n_response <= 0:
        return None
    input_ids = prompt + response[:n_response]
    prompt_labels = list(prompt) if train_on_prompt else [IGNORE_INDEX] * len(prompt)
    labels = prompt_labels + response[:n_response]
    return Example(input_ids=input_ids, labels=labels, line=record.line, source=record.source)


def _too_long_error(record: Record, prompt_len: int, max_length: int) -> DataError:
    source = record.source or "<records>"
    return DataError(
        f"{source}:{record.line}: no response token is left after truncation to data.max_length: the prompt alone "
        f"has {prompt_len} tokens. Raise data.max_length (currently {max_length}) to at least {prompt_len + 1} "
        "(more to keep the whole response), shorten the prompt, or pass --skip-bad-rows to skip such rows.",
        source=record.source,
        line=record.line,
        field="max_length",
    )


def _count(examples: list[Example], stats: TokenizeStats) -> None:
    stats.n_examples = len(examples)
    stats.n_tokens = sum(len(e.input_ids) for e in examples)
    # Positions that carry a loss once the model shifts labels by one: labels[0] is never predicted.
    stats.n_target_tokens = sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in examples)
