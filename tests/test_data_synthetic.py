"""tunelab.data synthetic tasks: deterministic, disjoint splits, answers recomputed independently, specs."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from tunelab.data import SPLITS, SYNTHETIC_TASKS, DataError, generate, load_source, parse_synthetic_spec

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip


def solve(name: str, instruction: str) -> tuple[str, str]:
    """Independent solution and problem identity (same for reworded problems), parsed from the instruction."""
    if name == "arith":
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", instruction).groups()
        if op == "+":
            return str(int(a) + int(b)), str(sorted([int(a), int(b)]))
        return str(int(a) - int(b)), f"{a}-{b}"
    if name == "reverse":
        word = re.fullmatch(r"Reverse the letters: ([a-z]+)", instruction).group(1)
        return "".join(reversed(word)), word
    if name == "sort-words":
        words = instruction.split(": ", 1)[1].split()
        return " ".join(sorted(words)), str(sorted(words))
    if name == "date-format":
        iso = re.fullmatch(
            r"Convert the date (\d{4})-(\d\d)-(\d\d) to the format 'D Month YYYY'\.", instruction
        )
        if iso:
            day = dt.date(int(iso[1]), int(iso[2]), int(iso[3]))
            return f"{day.day} {MONTHS[day.month - 1]} {day.year}", str(day)
        d, month, y = re.fullmatch(
            r"Convert the date (\d+) (\w+) (\d{4}) to the format 'YYYY-MM-DD'\.", instruction
        ).groups()
        day = dt.date(int(y), MONTHS.index(month) + 1, int(d))
        return day.strftime("%Y-%m-%d"), str(day)
    raise AssertionError(f"no independent solver for {name}")


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_answers_are_correct_and_splits_disjoint(name):
    by_split = {split: generate(name, split, 300 if split == "train" else 100) for split in SPLITS}
    for split, records in by_split.items():
        assert len(records) == len({r.instruction for r in records})  # no repeats inside a split
        for i, r in enumerate(records):
            assert r.output == solve(name, r.instruction)[0], r
            assert (r.input, r.source, r.line) == ("", f"synthetic:{name}:{split}", i + 1)
    problems = {split: {solve(name, r.instruction)[1] for r in recs} for split, recs in by_split.items()}
    assert not problems["train"] & problems["dev"]
    assert not problems["train"] & problems["test"]
    assert not problems["dev"] & problems["test"]


def test_generation_is_deterministic():
    assert generate("arith", "train", 50, seed=3) == generate("arith", "train", 50, seed=3)
    assert generate("arith", "train", 50, seed=3) != generate("arith", "train", 50, seed=4)
    assert generate("reverse", "dev", 20) == generate("reverse", "dev", 20, seed=0)


def test_the_tasks_the_demo_needs_exist_with_difficulties():
    assert {"arith", "reverse", "date-format", "sort-words"} <= set(SYNTHETIC_TASKS)
    assert len({t.difficulty for t in SYNTHETIC_TASKS.values()}) >= 2
    assert generate("arith", "test", 1)[0].instruction.startswith("What is ")


def test_parse_synthetic_spec():
    assert parse_synthetic_spec("synthetic:arith:train:2000") == ("arith", "train", 2000)
    assert parse_synthetic_spec("data/train.jsonl") is None
    for bad in (
        "synthetic:arith",
        "synthetic:arith:train:0",
        "synthetic:arith:train:many",
        "synthetic:a:b:c:1",
    ):
        with pytest.raises(DataError, match="expected synthetic:TASK:SPLIT:N.*Tasks: .*arith"):
            parse_synthetic_spec(bad)
    with pytest.raises(DataError, match="Did you mean 'arith'"):
        parse_synthetic_spec("synthetic:ariht:train:10")
    with pytest.raises(DataError, match="Did you mean 'dev'.*Splits: train, dev, test"):
        parse_synthetic_spec("synthetic:arith:deev:10")
    with pytest.raises(DataError, match="unknown synthetic task 'nope'"):
        generate("nope", "train", 1)


def test_load_source_reads_specs_and_files(tmp_path):
    records, bad = load_source("synthetic:date-format:dev:5")
    assert len(records) == 5 and bad == []
    path = tmp_path / "t.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n')
    assert load_source(path)[0][0].output == "b"


def test_splits_partition_a_small_problem_space(monkeypatch):
    """With 60 possible problems, the three splits together cover them all, without overlap."""
    from tunelab.data import SyntheticTask

    def make(rng):
        k = rng.randrange(60)
        return f"Echo {k}", str(k), str(k)

    monkeypatch.setitem(SYNTHETIC_TASKS, "tiny", SyntheticTask("tiny", "echo a number", 1, make))
    sizes = {}
    for split in SPLITS:
        n = 1
        while True:  # find how many distinct problems the split holds
            try:
                generate("tiny", split, n + 1)
            except DataError as err:
                assert f"found only {n} distinct {split} problems" in str(err)
                break
            n += 1
        sizes[split] = n
    found = {split: {r.output for r in generate("tiny", split, sizes[split])} for split in SPLITS}
    assert set().union(*found.values()) == {str(k) for k in range(60)}
    assert sum(sizes.values()) == 60 and sizes["train"] > sizes["dev"] > 0 and sizes["test"] > 0
