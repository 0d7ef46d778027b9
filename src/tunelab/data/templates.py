"""Prompt templates: how a record's instruction and input become the text the model continues.

The response is never part of the prompt; :mod:`tunelab.data.tokenize` appends ``output + EOS`` after it.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from tunelab.data.records import DataError, Record

# The LLM-Adapters (Hu et al., 2023) / Alpaca prompts, byte for byte, so results stay comparable with theirs.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

TEMPLATES: dict[str, str] = {
    "alpaca": "the Alpaca / LLM-Adapters prompt (with and without '### Input:')",
    "plain": "'{instruction}\\n{input}\\n' (just '{instruction}\\n' when the input is empty)",
    "chat": "the tokenizer's chat template, one user turn, with the generation prompt",
}

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_CUSTOM_FIELDS = ("instruction", "input")
_FIELD_PLACEHOLDER = re.compile(r"\{(instruction|input)\}")


def render_prompt(record: Record, template: str, tokenizer: Any = None) -> str:
    """Render the prompt for ``record`` with a named template or a custom format string.

    ``template`` is one of :data:`TEMPLATES` or a string containing ``{instruction}`` (and optionally
    ``{input}``), e.g. ``"Q: {instruction}\\nA: "``. ``chat`` needs ``tokenizer`` with a ``chat_template``.
    """
    check_template(template, tokenizer)
    if template == "alpaca":
        fmt = ALPACA_PROMPT if record.input else ALPACA_PROMPT_NO_INPUT
        return _fill(fmt, record)
    if template == "plain":
        return f"{record.instruction}\n{record.input}\n" if record.input else f"{record.instruction}\n"
    if template == "chat":
        return _render_chat(record, tokenizer)
    return _fill(template, record)


def check_template(template: str, tokenizer: Any = None) -> None:
    """Raise :class:`DataError` if ``template`` cannot be rendered (unknown name, bad placeholder, no chat template)."""
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "data.template 'chat' needs a tokenizer with a chat_template, and this one has none; "
                "use data.template: alpaca or plain, or a model whose tokenizer defines a chat template.",
                field="template",
            )
        return
    if template in TEMPLATES:
        return
    if "{instruction}" in template:
        unknown = sorted(set(_PLACEHOLDER.findall(template)) - set(_CUSTOM_FIELDS))
        if unknown:
            raise DataError(
                f"data.template {template!r} uses unknown placeholder(s) {', '.join(unknown)}; a custom "
                "template may use only {instruction} and {input} (the response is appended after the prompt).",
                field="template",
            )
        return
    raise DataError(_unknown_template_message(template), field="template")


def _unknown_template_message(template: str) -> str:
    close = difflib.get_close_matches(template, list(TEMPLATES), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    names = ", ".join(TEMPLATES)
    return (
        f"unknown data.template {template!r}.{hint} Valid names: {names}; or give a format string "
        "containing {instruction} (and optionally {input}), e.g. 'Q: {instruction}\\nA: '."
    )


def _fill(fmt: str, record: Record) -> str:
    # One pass of plain substitution rather than str.format: templates and user text may contain other braces,
    # and text inserted for {instruction} must not be searched again for {input}.
    values = {"instruction": record.instruction, "input": record.input}
    return _FIELD_PLACEHOLDER.sub(lambda m: values[m.group(1)], fmt)


def _render_chat(record: Record, tokenizer: Any) -> str:
    content = record.instruction + (f"\n\n{record.input}" if record.input else "")
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
