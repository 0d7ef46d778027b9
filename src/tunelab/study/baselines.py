"""Trivial baselines: what a table's rows must beat besides the untrained model, scored on the same items.

* ``first-two-sum`` (math): the sum of the first two numbers in the question — what a model that learned only
  "add the numbers" scores. AddSub and SingleEq reward it often.
* ``majority`` (multiple choice): always the most frequent gold option position of the scored items — for BoolQ
  "always yes" (62.2% of its test questions are true). It is computed from the test labels themselves, so it is an
  upper bound on any constant guess.

Each baseline maps the task's records to per-item correctness (1.0 / 0.0), so it enters the same paired
comparisons as a model row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from tunelab.data import Record
from tunelab.eval.parsers import numbers_match, parse_number

NUMBERS_FIRST_TWO = 2


def _numbers(text: str) -> list[float]:
    """The numbers of a question, in order (the ``number`` parser's rule applied word by word)."""
    found = []
    for word in text.replace(",", " ").split():
        value = parse_number(word)
        if value is not None:
            found.append(value)
    return found


def first_two_sum(records: list[Record]) -> list[float] | None:
    """Per item: whether the first two numbers of the question add up to the gold answer."""
    def correct(r: Record) -> float:
        nums = _numbers(f"{r.instruction} {r.input}")[:NUMBERS_FIRST_TWO]
        if len(nums) < NUMBERS_FIRST_TWO:
            return 0.0
        try:
            return float(numbers_match(sum(nums), r.output))
        except ValueError:  # a gold answer that is not a number: not a math task
            return 0.0

    if any(r.options for r in records):
        return None
    return [correct(r) for r in records]


def majority(records: list[Record]) -> list[float] | None:
    """Per item: whether the most frequent gold option position is the gold one (None without options)."""
    if not records or not all(r.options for r in records):
        return None
    golds = [r.options.index(r.output) for r in records]
    top = Counter(golds).most_common(1)[0][0]
    return [float(g == top) for g in golds]


BASELINES: dict[str, Callable[[list[Record]], list[float] | None]] = {
    "first-two-sum": first_two_sum,
    "majority": majority,
}
