"""One entry point for a data source named in a config: a file path or a ``synthetic:TASK:SPLIT:N`` spec."""

from __future__ import annotations

from pathlib import Path

from tunelab.data.formats import get_format
from tunelab.data.records import BadRow, DataError, FieldMap, Record, load_records
from tunelab.data.synthetic import generate, parse_synthetic_spec

_DEFAULT_FIELDS = FieldMap()


def load_source(
    spec: str | Path, fields: FieldMap = _DEFAULT_FIELDS, *, skip_bad_rows: bool = False, seed: int = 0,
    format: str = "as-is",
) -> tuple[list[Record], list[BadRow]]:
    """Records from ``spec``: ``synthetic:TASK:SPLIT:N`` (generated with ``seed``) or a JSON / JSONL file path.

    ``format`` names the row format of a file (``tunelab.data.formats``: ``as-is``, ``mc-text``, ``mawps``).
    """
    parsed = parse_synthetic_spec(str(spec))
    row_format = get_format(format)
    if parsed is not None:
        if row_format is not None:
            raise DataError(f"data format {format!r} applies to files; {spec} is a synthetic task (use as-is)",
                            field="format")
        name, split, n = parsed
        return generate(name, split, n, seed=seed), []
    return load_records(spec, fields, skip_bad_rows=skip_bad_rows, row_format=row_format)
