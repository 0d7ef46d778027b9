"""Instruction records read from JSON / JSONL files, with errors that name file:line:field.

Accepted layouts (detected from the content, not the file extension):

* a top-level JSON array of objects, as the Alpaca and LLM-Adapters files are;
* JSONL: one object per line, blank lines skipped.

Every record remembers the file and the 1-based line where its row starts, so that an error raised later
(tokenisation, truncation) can still point at the row.
"""

from __future__ import annotations

import dataclasses
import json
import re
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import DataError as DataError

_SKIP_HINT = "or pass --skip-bad-rows to skip bad rows."


@dataclass(frozen=True)
class FieldMap:
    """Names of the row fields that hold the instruction, the optional input and the response."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"  # chat-format rows: [{role, content}, ...] (see _chat_record)


@dataclass(frozen=True)
class Record:
    """One instruction example; ``source`` is the file path and ``line`` the 1-based line of its row.

    ``options`` holds the answer options of a multiple-choice record whose ``output`` is the text of one of them
    (the ``mc-text`` format, ``tunelab.data.formats``); empty for every other record.
    """

    instruction: str
    input: str
    output: str
    source: str = ""
    line: int = 0
    options: tuple[str, ...] = ()
    # a chat-format row: every turn as (role, content); instruction is its first user turn and output its last
    # assistant turn, for what reads records as single turns (generation, decontamination)
    messages: tuple[tuple[str, str], ...] = ()


@dataclass
class BadRow:
    """A row that was skipped, and why."""

    source: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


class RowError(Exception):
    """A bad row: reason (without file:line), the field at fault and the fix to suggest.

    Raised by row formats (``tunelab.data.formats``) too; :func:`load_records` adds the file and line.
    """

    def __init__(self, reason: str, field: str | None = None, fix: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.fix = fix


RowFormat = Callable[[dict[str, Any], FieldMap], Record]


def load_records(
    path: str | Path, fields: FieldMap = FieldMap(), *, skip_bad_rows: bool = False,
    row_format: RowFormat | None = None,
) -> tuple[list[Record], list[BadRow]]:
    """Read instruction records from a JSON array or JSONL file, a CSV / TSV / parquet file or a ``datasets``
    folder (``tunelab.data.tables``; ``FOLDER#split`` for one split of a DatasetDict).

    Returns ``(records, bad_rows)``. A bad row (not valid JSON, not an object, a required field missing or
    not a string, an empty output) raises :class:`DataError` naming ``file:line`` and the field, unless
    ``skip_bad_rows`` is set, in which case it is reported in ``bad_rows``. A JSON array that is broken
    mid-way always raises: after a syntax error the rows that follow cannot be found reliably.
    ``row_format`` (``tunelab.data.formats.get_format``) turns each JSON object into the record instead of the
    plain field mapping; the errors it raises get the same ``file:line``.
    """
    from tunelab.data.tables import is_table_source, iter_table_rows

    if is_table_source(path):  # CSV / TSV / parquet, a datasets folder (tunelab.data.tables)
        source, unit, rows = iter_table_rows(path)
        expected = "a header line and one row per record" if unit == "line" else "at least one row"
    else:
        source, unit = str(path), "line"
        rows = _iter_rows(_read_text(Path(path), source), source)
        expected = "a JSON array of objects or JSONL (one object per line)"
    records: list[Record] = []
    bad: list[BadRow] = []
    n_rows = 0
    for line, row in rows:
        n_rows += 1
        where = f"{source}:{line}" if unit == "line" else f"{source}, row {line}"
        try:
            records.append(_to_record(row, fields, source, line, row_format))
        except RowError as err:
            if not skip_bad_rows:
                raise DataError(
                    f"{where}: {err.reason}. {err.fix}, {_SKIP_HINT}",
                    source=source,
                    line=line,
                    field=err.field,
                ) from None
            bad.append(BadRow(source, line, err.reason))
    if n_rows == 0:
        raise DataError(f"{source}: no rows found; expected {expected}.", source=source)
    return records, bad


def _read_text(path: Path, source: str) -> str:
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(
            f"{source}: data file {where} (resolved to {path.resolve()}). Check data.train / data.eval, "
            "or use a built-in task such as synthetic:arith:train:2000.",
            source=source,
        )
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(
            f"{source}:{line}: not valid UTF-8 text ({err.reason}); save the file as UTF-8.",
            source=source,
            line=line,
        ) from None


def _iter_rows(text: str, source: str) -> Iterator[tuple[int, Any | RowError]]:
    """Yield ``(line, parsed_row_or_error)`` for each row; the layout is chosen from the first character."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _iter_json_array(text, source)
    return _iter_jsonl(text, source)


def _iter_jsonl(text: str, source: str) -> Iterator[tuple[int, Any | RowError]]:
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as err:
            if number == 1 and raw.strip() == "{":
                _raise_if_single_object(text, source)
            yield (
                number,
                RowError(
                    f"not valid JSON ({err.msg} at column {err.colno})",
                    fix="Each line of a JSONL file must hold one complete JSON object; fix the line",
                ),
            )


def _raise_if_single_object(text: str, source: str) -> None:
    """A pretty-printed single JSON object looks like broken JSONL; say what it really is."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(obj, dict):
        keys = ", ".join(list(obj)[:8])
        raise DataError(
            f"{source}:1: the file is one JSON object (keys: {keys}), not a list of rows. Expected a JSON "
            "array of objects or JSONL (one object per line); extract the list of rows into its own file.",
            source=source,
            line=1,
        )


def _iter_json_array(text: str, source: str) -> Iterator[tuple[int, Any | RowError]]:
    """Decode a JSON array element by element, so each element keeps the line where it starts."""
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def line_of(offset: int) -> int:
        return bisect_right(line_starts, offset)

    decoder = json.JSONDecoder()
    pos = _skip_ws(text, text.index("[") + 1)
    if text.startswith("]", pos):
        _check_tail(text, pos + 1, source, line_of)
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise _broken_array(source, line_of(err.pos), f"{err.msg} at column {err.colno}") from None
        yield line_of(pos), obj
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif text.startswith("]", pos):
            _check_tail(text, pos + 1, source, line_of)
            return
        else:
            found = repr(text[pos]) if pos < len(text) else "end of file"
            raise _broken_array(source, line_of(pos), f"expected ',' or ']' after a row, found {found}")


def _check_tail(text: str, pos: int, source: str, line_of: Callable[[int], int]) -> None:
    """Only whitespace may follow the closing bracket."""
    pos = _skip_ws(text, pos)
    if pos < len(text):
        raise _broken_array(source, line_of(pos), "extra text after the closing ']'")


def _broken_array(source: str, line: int, detail: str) -> DataError:
    return DataError(
        f"{source}:{line}: the JSON array is broken here ({detail}). Fix the file there; rows inside a broken "
        "JSON array cannot be skipped (--skip-bad-rows works row by row in JSONL files).",
        source=source,
        line=line,
    )


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _to_record(row: Any, fields: FieldMap, source: str, line: int, row_format: RowFormat | None = None) -> Record:
    """Check one parsed row and turn it into a :class:`Record` (raises :class:`RowError`)."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(
            f"row is a JSON {_json_type(row)}, expected an object with fields "
            f"'{fields.instruction}' and '{fields.output}'",
            fix="Each row must be a JSON object; fix the row",
        )
    if row_format is not None:
        return dataclasses.replace(row_format(row, fields), source=source, line=line)
    if fields.messages in row and fields.instruction not in row:
        return _chat_record(row[fields.messages], fields.messages, source, line)
    instruction = get_field(row, fields.instruction, "instruction", required=True)
    inp = get_field(row, fields.input, "input", required=False)
    output = get_field(row, fields.output, "output", required=True)
    if not output.strip():
        raise RowError(
            f"field '{fields.output}' is empty",
            field=fields.output,
            fix="Every row needs a non-empty response to train on; fill it in or remove the row",
        )
    return Record(instruction=instruction, input=inp, output=output, source=source, line=line,
                  options=_options(row))


CHAT_ROLES = ("system", "user", "assistant")


def _chat_record(messages: Any, name: str, source: str, line: int) -> Record:
    """A chat-format row: ``messages`` a list of {role, content} turns with at least one assistant turn (the loss
    is taken on the assistant turns only: tunelab.data.tokenize)."""
    if not isinstance(messages, list) or not messages:
        raise RowError(f"field '{name}' is {'an empty list' if messages == [] else 'a JSON ' + _json_type(messages)}"
                       f", expected a list of {{role, content}} turns", field=name,
                       fix="Write the conversation as a list of turns, e.g. [{\"role\": \"user\", \"content\": "
                           "\"...\"}, {\"role\": \"assistant\", \"content\": \"...\"}]")
    turns = []
    for i, turn in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(f"{where} is a JSON {_json_type(turn)}, expected an object with role and content",
                           field=where, fix="Each turn is {\"role\": ..., \"content\": ...}; fix the turn")
        role, content = turn.get("role"), turn.get("content")
        if role not in CHAT_ROLES:
            raise RowError(f"{where}.role is {role!r}, expected one of {', '.join(CHAT_ROLES)}", field=f"{where}.role",
                           fix="Use the roles system, user and assistant")
        if not isinstance(content, str):
            raise RowError(f"{where}.content is a JSON {_json_type(content)}, expected a string",
                           field=f"{where}.content", fix="Write the turn's text as a string")
        turns.append((role, content))
    if not any(role == "assistant" and content.strip() for role, content in turns):
        raise RowError(f"field '{name}' has no non-empty assistant turn", field=name,
                       fix="Every conversation needs an assistant reply to train on; add one or remove the row")
    first_user = next((c for r, c in turns if r == "user"), "")
    last_assistant = next(c for r, c in reversed(turns) if r == "assistant" and c.strip())
    return Record(instruction=first_user, input="", output=last_assistant, source=source, line=line,
                  messages=tuple(turns))


def _options(row: dict[str, Any]) -> tuple[str, ...]:
    """The ``options`` list a row may carry (written by the mc-text format), as a tuple of strings."""
    value = row.get("options")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RowError(f"field 'options' is a JSON {_json_type(value)}, expected a list of strings",
                       field="options", fix="Write the options as a JSON list of strings or drop the field")
    return tuple(value)


_ROLE_WORDS = {"instruction": "instruction", "input": "optional input", "output": "response"}


def get_field(row: dict[str, Any], name: str, role: str, *, required: bool) -> str:
    if name not in row:
        if not required:
            return ""
        present = ", ".join(row) or "none"
        raise RowError(
            f"missing field '{name}' (fields present: {present})",
            field=name,
            fix=f"Set data.fields.{role} to the name of the {_ROLE_WORDS[role]} field",
        )
    value = row[name]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RowError(
            f"field '{name}' is a JSON {_json_type(value)} ({_short(value)}), expected a string",
            field=name,
            fix=f"Write the value as a JSON string (e.g. {json.dumps(_short(value))}) or set "
            f"data.fields.{role} to a field that holds text",
        )
    return value


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", bool: "boolean", int: "number", float: "number", str: "string"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."
