"""Contamination check: test questions that also occur in the training or dev data, found by normalised text.

About 80% of the AddSub, SingleEq and MultiArith problems are also in the MAWPS training file (the LLM-Adapters
collection reuses them), so a math score on those sets measures recall unless the overlap is removed. A question's
key is its instruction and input, lower-cased, punctuation dropped and runs of whitespace joined
(the ``option`` parser compares answers by the same rule): "There are 7 crayons in the drawer ."
and "There are 7 crayons in the drawer." share a key. Near-duplicates that differ in a number are different
problems and are kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tunelab.data.records import Record


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace runs as one space."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def question_key(record: Record) -> str:
    """The text a record is matched on: its instruction and input, normalised."""
    return normalise(f"{record.instruction} {record.input}")


def keys(records: Iterable[Record]) -> frozenset[str]:
    return frozenset(question_key(r) for r in records)


def overlap(test: Iterable[Record], seen: frozenset[str]) -> list[Record]:
    """The test records whose question key is in ``seen`` (keys of the training and dev records)."""
    return [r for r in test if question_key(r) in seen]
