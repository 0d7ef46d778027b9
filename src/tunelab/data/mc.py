"""The layout of LLM-Adapters multiple-choice instructions, read once for training formats and scoring alike.

``<lead-in>: <stem>\n\nAnswer1: <a> Answer2: <b> ...\n\nAnswer format: answer1/answer2/...`` (ARC, OpenBookQA,
SocialIQA; PIQA's ``Solution1:``, WinoGrande's ``Option1:``; BoolQ's ``Answer format: true/false`` with no options).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class ParseError(Exception):
    """Why an instruction does not fit the layout (callers add the record's place)."""


_FORMAT = re.compile(r"answer format:[ \t]*(?P<labels>[^\n]*?)\s*\Z", re.IGNORECASE)
_LEAD = re.compile(r"^please\b.*?\b(?:question|sentence):\s*", re.IGNORECASE | re.DOTALL)
_LABEL = re.compile(r"(?P<prefix>[a-z]+)(?P<k>\d+)")


def split_format(instruction: str) -> tuple[str, list[str]]:
    """(text before the "Answer format:" line, the label words it lists)."""
    match = _FORMAT.search(instruction.rstrip())  # anchored at the end: the line that ends the prompt
    if match is None:
        raise ParseError("no 'Answer format: a/b/...' line")
    labels = [label.strip().lower() for label in match["labels"].split("/")]
    return instruction[: match.start()], labels


def split_options(body: str, labels: list[str]) -> tuple[str, list[str]]:
    """(text before the first ``<Label>1:`` marker, the text after each marker) for labels prefix1..prefixN."""
    expected = [f"{labels[0].rstrip('0123456789')}{k}" for k in range(1, len(labels) + 1)]
    if len(labels) < 2 or labels != expected or not _LABEL.fullmatch(labels[0]):
        raise ParseError(f"answer format {'/'.join(labels)!r} is not <word>1/<word>2/...")
    spans, pos = [], 0
    for label in labels:
        marker = re.compile(rf"\b{re.escape(label)}\s*:\s*", re.IGNORECASE).search(body, pos)
        if marker is None:
            raise ParseError(f"no '{label.capitalize()}:' option after position {pos}")
        spans.append(marker.span())
        pos = marker.end()
    ends = [start for start, _ in spans[1:]] + [len(body)]
    texts = [body[end:nxt].strip() for (_, end), nxt in zip(spans, ends, strict=True)]
    if not all(texts):
        raise ParseError(f"option {labels[texts.index('')]!r} is empty")
    return body[: spans[0][0]], texts


def gold_index(gold_label: str, labels: list[str]) -> int:
    if gold_label not in labels:
        raise ParseError(f"gold answer {gold_label!r} is not one of the labels {'/'.join(labels)}")
    return labels.index(gold_label)


def stem(head: str) -> str:
    stem = _LEAD.sub("", head, count=1).strip()
    if not stem:
        raise ParseError("empty question")
    return stem


BOOLEAN_TEXTS = {"true": "yes", "false": "no"}  # BoolQ's labels as an answer is written in running text


@dataclass(frozen=True)
class Question:
    """A multiple-choice question: its stem, the option texts, the gold index and the dataset's label words."""

    stem: str
    options: tuple[str, ...]
    gold: int
    labels: tuple[str, ...]


def read_question(instruction: str, gold_label: str) -> Question:
    """The stem, options and gold option of an LLM-Adapters multiple-choice instruction (raises ParseError).

    Labelled options (``Answer1: ...``) give their texts; a ``true/false`` question (BoolQ, no options listed)
    gets the options ``yes`` / ``no``.
    """
    body, labels = split_format(instruction)
    gold = gold_index(gold_label.strip().lower(), labels)
    if labels == ["true", "false"]:
        question = stem(body).rstrip("?").strip() + "?"
        return Question(question, tuple(BOOLEAN_TEXTS[label] for label in labels), gold, tuple(labels))
    head, texts = split_options(body, labels)
    return Question(stem(head), tuple(texts), gold, tuple(labels))
