"""Row formats: how one JSON object of a data file becomes a training or evaluation record.

A format is chosen with ``data.format`` (training) or a task's ``format:`` (evaluation) and works on the raw
object, so the same file can be trained on in several target formats. The formats:

* ``as-is`` — the record's fields as they are (``data.fields`` names them): LLM-Adapters and Alpaca records.
* ``mc-text`` — an LLM-Adapters multiple-choice record (``... Answer1: a Answer2: b ... Answer format:
  answer1/answer2``, or BoolQ's ``true/false``) whose target is the *text* of the gold option instead of the label
  sentence ``the correct answer is answer2``. The prompt lists the options, one per line::

      Question: Which factor will most likely cause a person to develop a fever?
      Options:
      - a leg muscle relaxing after exercise
      - a bacterial population in the bloodstream
      ...
      (target: "a bacterial population in the bloodstream")

  In the label format every target shares its first five tokens and carries one informative token (which of four
  labels); here the whole target depends on the question and names the answer, so the loss cannot sit at a
  label-guessing floor. BoolQ's options are ``yes`` / ``no``. The gold label is read from the ``answer`` field, or
  the last word of the response field when there is none.
* ``mawps`` — a raw MAWPS record ``{original_text, equation, ans}``: the problem is the instruction and the
  equation the target, its left side written ``x`` (``X=((22.0-14.0)/4.0)`` -> ``x=((22.0-14.0)/4.0)``), so that
  a model learns to write the computation and the ``equation`` parser (``tunelab.eval.parsers``) evaluates it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from tunelab.data.mc import ParseError, read_question
from tunelab.data.records import FieldMap, Record, RowError, get_field

FORMATS: dict[str, str] = {
    "as-is": "the record's fields as they are (instruction / input / output; data.fields names them)",
    "mc-text": "LLM-Adapters multiple choice with the gold option's text as the target (options listed)",
    "mawps": "raw MAWPS {original_text, equation, ans}: the equation as the target ('x=(22.0-14.0)/4.0')",
}


def mc_text_prompt(stem: str, options: tuple[str, ...]) -> str:
    """The instruction of an mc-text record: the question and its options, one per line."""
    return f"Question: {stem}\nOptions:\n" + "".join(f"- {o}\n" for o in options)


def _gold_label(row: dict[str, Any], fields: FieldMap) -> str:
    if isinstance(row.get("answer"), str) and row["answer"].strip():
        return row["answer"]
    words = get_field(row, fields.output, "output", required=True).split()
    if not words:
        raise RowError(f"field '{fields.output}' is empty and there is no 'answer' field", field=fields.output,
                       fix="Give the gold label (e.g. answer2) in 'answer' or at the end of the response")
    return words[-1]


def mc_text(row: dict[str, Any], fields: FieldMap) -> Record:
    instruction = get_field(row, fields.instruction, "instruction", required=True)
    try:
        q = read_question(instruction, _gold_label(row, fields))
    except ParseError as err:
        raise RowError(f"not a multiple-choice record for format mc-text: {err}", field=fields.instruction,
                       fix="Use data.format: as-is for records that are not LLM-Adapters multiple choice") from None
    if len(set(q.options)) != len(q.options):
        raise RowError(f"two options have the same text ({list(q.options)}); mc-text cannot tell them apart",
                       field=fields.instruction, fix="Remove the row or train it with data.format: as-is")
    return Record(mc_text_prompt(q.stem, q.options), "", q.options[q.gold], options=q.options)


_LHS = re.compile(r"^\s*[A-Za-z]+\s*=")


def mawps(row: dict[str, Any], fields: FieldMap) -> Record:
    del fields  # the raw MAWPS layout has fixed names
    text = get_field(row, "original_text", "instruction", required=True).strip()
    equation = get_field(row, "equation", "output", required=True).strip()
    if not _LHS.match(equation):
        raise RowError(f"equation {equation!r} does not start with 'x='", field="equation",
                       fix="Write the equation as 'x=<expression>'")
    if not _is_number(row.get("ans")):
        raise RowError(f"field 'ans' is {json.dumps(row.get('ans'))}, expected a number", field="ans",
                       fix="Give the numeric answer in 'ans'")
    return Record(text, "", _LHS.sub("x=", equation, count=1))


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return False
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


ROW_FORMATS: dict[str, Callable[[dict[str, Any], FieldMap], Record] | None] = {
    "as-is": None, "mc-text": mc_text, "mawps": mawps,
}


def get_format(name: str) -> Callable[[dict[str, Any], FieldMap], Record] | None:
    """The row function of format ``name`` (None for ``as-is``); a DataError naming the valid formats otherwise."""
    from tunelab.data.records import DataError

    if name not in ROW_FORMATS:
        valid = ", ".join(f"{k} ({v})" for k, v in FORMATS.items())
        raise DataError(f"unknown data format {name!r}; valid formats: {valid}", field="format")
    return ROW_FORMATS[name]

