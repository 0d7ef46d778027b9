"""Tabular data sources (tunelab.data.tables): CSV / TSV, parquet, datasets' save_to_disk folders (one Dataset, or a
DatasetDict by split) and hub-style dataset folders, read offline, with data.fields naming the columns; bad input is
named by file, split, row and column."""

from __future__ import annotations

import json

import pytest

from tunelab.data import FieldMap, load_source
from tunelab.errors import DataError

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

ROWS = [{"question": "What is 2 + 3?", "context": "", "answer": "5"},
        {"question": "Spell cat backwards.", "context": "letters", "answer": "tac"}]
FIELDS = FieldMap(instruction="question", input="context", output="answer")


def _check(records):
    assert [(r.instruction, r.input, r.output) for r in records] == [(r["question"], r["context"], r["answer"])
                                                                     for r in ROWS]


def test_csv_with_mapped_columns_and_quoted_newlines(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('question,context,answer\n"What is 2 + 3?",,5\n"Spell cat backwards.",letters,tac\n'
                    '"Two\nlines",,x\n')
    records, bad = load_source(path, FIELDS)
    _check(records[:2])
    assert records[2].instruction == "Two\nlines" and [r.line for r in records] == [2, 3, 4] and not bad


def test_tsv(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("question\tcontext\tanswer\n" + "\n".join(f"{r['question']}\t{r['context']}\t{r['answer']}"
                                                             for r in ROWS) + "\n")
    _check(load_source(path, FIELDS)[0])


def test_csv_errors_name_the_line_and_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("question,context,answer\nq1,,a1\nq2,,\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: field 'answer' is empty") as info:
        load_source(path, FIELDS)
    assert info.value.line == 3 and info.value.field == "answer"
    records, bad = load_source(path, FIELDS, skip_bad_rows=True)
    assert len(records) == 1 and bad[0].line == 3
    path.write_text("prompt,answer\nq1,a1\n")
    with pytest.raises(DataError, match=r"missing field 'question' \(fields present: prompt, answer\)"):
        load_source(path, FIELDS)
    path.write_text("question,context,answer\nq1,,a1,extra\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: 4 cells but the header names 3 columns"):
        load_source(path, FIELDS)
    path.write_text("")
    with pytest.raises(DataError, match="expected a header line"):
        load_source(path, FIELDS)


def test_parquet_and_a_non_string_column(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    _check(load_source(path, FIELDS)[0])
    pq.write_table(pa.Table.from_pylist([{"question": "q", "context": "", "answer": 5}]), path)
    with pytest.raises(DataError, match=r"train\.parquet, row 1: field 'answer' is a JSON number") as info:
        load_source(path, FIELDS)
    assert info.value.field == "answer"


def test_save_to_disk_dataset_and_dataset_dict_splits(tmp_path):
    one = tmp_path / "one"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(one))
    _check(load_source(one, FIELDS)[0])
    both = tmp_path / "both"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "validation": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(both))
    _check(load_source(both, FIELDS)[0])  # train by default
    assert len(load_source(f"{both}#validation", FIELDS)[0]) == 1
    with pytest.raises(DataError, match=r"splits train, validation; .*'test' is not one of them"):
        load_source(f"{both}#test", FIELDS)
    with pytest.raises(DataError, match="no splits"):
        load_source(f"{one}#train", FIELDS)


def test_hub_style_folder_of_data_files(tmp_path):
    folder = tmp_path / "hub-like"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    (folder / "data" / "test.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (folder / "README.md").write_text("# a dataset\n")
    _check(load_source(folder, FIELDS)[0])
    assert len(load_source(f"{folder}#test", FIELDS)[0]) == 1


def test_a_folder_datasets_cannot_read_says_so(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "weights.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match="not a dataset folder that datasets can read offline"):
        load_source(tmp_path / "notes", FIELDS)


def test_csv_parquet_and_dataset_folders_train_the_same_as_the_jsonl(tmp_path):
    """The same rows as JSONL, CSV, parquet, a save_to_disk folder and a hub-style folder: the same tokens, the same
    loss curve and the same trained weights, bit for bit."""
    import csv

    import torch
    from safetensors.torch import load_file

    from tunelab.config import load_config
    from tunelab.train.loop import train

    rows = [{"question": f"What is {i} + {i + 3}?", "context": "" if i % 2 else f"note {i}", "answer": str(2 * i + 3)}
            for i in range(12)]
    sources = {"jsonl": tmp_path / "train.jsonl", "csv": tmp_path / "train.csv",
               "parquet": tmp_path / "train.parquet", "disk": tmp_path / "disk", "hub": tmp_path / "hub"}
    sources["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(sources["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), sources["parquet"])
    datasets.Dataset.from_list(rows).save_to_disk(str(sources["disk"]))
    (sources["hub"] / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), sources["hub"] / "data" / "train-00000-of-00001.parquet")
    runs = {}
    for name, path in sources.items():
        cfg = load_config(None, ["model.name=tiny-llama", "method.name=lora", f"data.train={path}",
                                 "data.fields.instruction=question", "data.fields.input=context",
                                 "data.fields.output=answer", "train.max_steps=4", "train.batch_size=3",
                                 "train.progress=false", f"output_dir={tmp_path / ('run-' + name)}"])
        result = train(cfg)
        curve = [json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(x)]
        runs[name] = (result.tokens, curve, load_file(str(result.run_dir / "adapter.safetensors")))
    tokens, curve, weights = runs["jsonl"]
    assert tokens > 0 and len(curve) == 4
    for name, (t, c, w) in runs.items():
        assert (t, c) == (tokens, curve), name
        assert w.keys() == weights.keys() and all(torch.equal(w[k], weights[k]) for k in w), name
