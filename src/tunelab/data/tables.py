"""Rows from tabular sources, for the same record checks as JSON / JSONL files (``tunelab.data.records``):

* ``data.csv`` / ``data.tsv`` — a header line, then one row per record (standard library ``csv``);
* ``data.parquet`` — read with pyarrow;
* a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict``: name the split as
  ``FOLDER#split``; the default is ``train``);
* a hub-style dataset folder (data files and an optional README.md, as a Hub dataset repository is laid out) read
  with ``datasets.load_dataset(FOLDER)`` — offline: a local folder needs no network.

Each row is a mapping of column to value; ``data.fields`` names the columns. The row numbers that errors and
records carry are 1-based: the file line for CSV (the header is line 1), the row index otherwise. ``datasets`` and
pyarrow are imported only when such a source is read (``pip install 'tunelab[data]'``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
SPLIT_MARK = "#"


def is_table_source(spec: str | Path) -> bool:
    """Whether ``spec`` names a CSV / TSV / parquet file or a dataset folder (not a JSON / JSONL file)."""
    path, _ = split_spec(spec)
    return path.suffix.lower() in TABLE_SUFFIXES or path.is_dir()


def split_spec(spec: str | Path) -> tuple[Path, str | None]:
    """``FOLDER#split`` -> (FOLDER, split); anything else -> (path, None)."""
    text = str(spec)
    if SPLIT_MARK in text and not Path(text).exists():
        base, split = text.rsplit(SPLIT_MARK, 1)
        return Path(base), split or None
    return Path(text), None


def iter_table_rows(spec: str | Path) -> tuple[str, str, Iterator[tuple[int, dict[str, Any]]]]:
    """(the source as errors name it, "line" or "row" — what the numbers count —, an iterator of (number, row))."""
    path, split = split_spec(spec)
    if not path.exists():
        raise DataError(f"{path}: data file or folder does not exist (resolved to {path.resolve()}). Check "
                        f"data.train / data.eval", source=str(path))
    suffix = path.suffix.lower()
    if path.is_file() and split is not None:
        raise DataError(f"{spec}: '{SPLIT_MARK}{split}' names a split, which only a dataset folder has; give "
                        f"the file alone", source=str(path))
    if suffix in (".csv", ".tsv"):
        return str(path), "line", _csv_rows(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return str(path), "row", _indexed(_parquet_table(path).to_pylist())
    source, rows = _dataset_rows(path, split)
    return source, "row", rows


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 text ({err.reason}); save the file as UTF-8",
                        source=str(path), line=line) from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(f"{path}: empty: expected a header line naming the columns, then one row per record",
                        source=str(path))
    start = 2
    for row in reader:
        if None in row:  # more cells than header columns
            raise DataError(f"{path}:{start}: {len(row) - 1 + len(row[None])} cells but the header names "
                            f"{len(reader.fieldnames)} columns ({', '.join(reader.fieldnames)}); quote cells that "
                            f"hold the delimiter", source=str(path), line=start)
        yield start, {k: v for k, v in row.items()}
        start = reader.line_num + 1


def _parquet_table(path: Path) -> Any:
    pq = _optional("pyarrow.parquet", "pyarrow")
    try:
        return pq.read_table(path)
    except Exception as err:  # pyarrow raises its own error types for damaged files
        raise DataError(f"{path}: not a readable parquet file ({err})", source=str(path)) from None


def _dataset_rows(path: Path, split: str | None) -> tuple[str, Iterator[tuple[int, dict[str, Any]]]]:
    datasets = _optional("datasets", "datasets")
    saved = (path / "dataset_info.json").is_file() or (path / "state.json").is_file()
    saved_dict = (path / "dataset_dict.json").is_file()
    try:
        data = datasets.load_from_disk(str(path)) if saved or saved_dict else datasets.load_dataset(str(path))
    except Exception as err:  # datasets raises many types for a folder it cannot read
        raise DataError(f"{path}: not a dataset folder that datasets can read offline ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}). Give a folder written by save_to_disk, "
                        f"a folder of data files (parquet, CSV, JSON), or a single file", source=str(path)) from None
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        chosen = split or ("train" if "train" in splits else None)
        if chosen not in splits:
            raise DataError(f"{path}: the dataset has splits {', '.join(splits)}; name one as "
                            f"{path}{SPLIT_MARK}{splits[0]}" + (f" ('{split}' is not one of them)" if split else ""),
                            source=str(path), field="split")
        data, split = data[chosen], chosen
    elif split is not None:
        raise DataError(f"{path}: a single dataset with no splits; drop '{SPLIT_MARK}{split}'", source=str(path))
    source = f"{path} (split {split})" if split else str(path)
    if len(data) == 0:
        raise DataError(f"{source}: the split is empty", source=str(path), field="split")
    return source, _indexed(data)


def _indexed(rows: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, row in enumerate(rows, start=1):
        yield i, dict(row)


def _optional(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading this data source needs the package {package}: pip install 'tunelab[data]' "
                        f"(or pip install {package})") from None
