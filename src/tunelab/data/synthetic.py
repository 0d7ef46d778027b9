"""Built-in synthetic tasks with exact-match answers, so demos and tests need no downloaded data.

A problem belongs to a split by a hash of its task name and *canonical key* (80% train, 10% dev, 10% test), so
``train``, ``dev`` and ``test`` never share a problem, whatever ``n`` and ``seed`` are asked for. The key
identifies the problem rather than its wording: ``589 + 347`` and ``347 + 589`` share one, and so do a date
written in either direction, so a test problem is never a reworded training problem.
Configs name them as ``synthetic:TASK:SPLIT:N``, e.g. ``data.train: synthetic:arith:train:2000``.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from tunelab.data.records import DataError, Record

SPLITS = ("train", "dev", "test")
_SPLIT_OF_BUCKET = ("train",) * 8 + ("dev", "test")  # hash bucket 0..9 -> split
_MAX_DRAWS_PER_EXAMPLE = 200


@dataclass(frozen=True)
class SyntheticTask:
    """A problem generator: ``make(rng) -> (instruction, answer, key)``; ``difficulty`` 1 (easy) .. 3 (hard)."""

    name: str
    description: str
    difficulty: int
    make: Callable[[random.Random], tuple[str, str, str]]


def _make_arith(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", str(a + b), f"{min(a, b)}+{max(a, b)}"
    return f"What is {a} - {b}?", str(a - b), f"{a}-{b}"


def _make_reverse(rng: random.Random) -> tuple[str, str, str]:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
    return f"Reverse the letters: {word}", word[::-1], word


MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_FIRST_DAY = dt.date(1950, 1, 1).toordinal()
_LAST_DAY = dt.date(2049, 12, 31).toordinal()


def _make_date(rng: random.Random) -> tuple[str, str, str]:
    day = dt.date.fromordinal(rng.randint(_FIRST_DAY, _LAST_DAY))
    iso, long = day.isoformat(), f"{day.day} {MONTHS[day.month - 1]} {day.year}"
    if rng.random() < 0.5:
        return f"Convert the date {iso} to the format 'D Month YYYY'.", long, iso
    return f"Convert the date {long} to the format 'YYYY-MM-DD'.", iso, iso


_WORDS_TEXT = (
    "apple river stone cloud tiger piano garden candle orange bridge silver forest window rabbit pepper "
    "castle meadow rocket violin banana planet marble lemon island desert falcon helmet jungle kettle ladder "
    "mirror needle oyster parrot quartz saddle tunnel umbrella valley walnut yogurt zebra anchor basket "
    "cactus dragon engine feather glacier harbor igloo jacket koala lantern magnet nectar orbit pebble"
)
WORDS = tuple(_WORDS_TEXT.split())


def _make_sort_words(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 6))
    answer = " ".join(sorted(words))
    return f"Sort these words alphabetically: {' '.join(words)}", answer, answer


SYNTHETIC_TASKS: dict[str, SyntheticTask] = {
    task.name: task
    for task in (
        SyntheticTask("date-format", "convert dates between 2023-07-14 and 14 July 2023", 1, _make_date),
        SyntheticTask("reverse", "reverse a string of 3-8 letters", 2, _make_reverse),
        SyntheticTask("sort-words", "sort 3-6 words alphabetically", 2, _make_sort_words),
        SyntheticTask("arith", "add or subtract two numbers of 2-3 digits", 3, _make_arith),
    )
}


def split_of(name: str, key: str) -> str:
    """The split a problem belongs to: a stable hash of the task ``name`` and the problem's canonical ``key``."""
    digest = hashlib.sha256(f"{name}\n{key}".encode()).digest()
    return _SPLIT_OF_BUCKET[int.from_bytes(digest[:8], "big") % len(_SPLIT_OF_BUCKET)]


def generate(name: str, split: str, n: int, seed: int = 0) -> list[Record]:
    """``n`` distinct problems of task ``name`` from ``split``; the same for the same ``(name, split, n, seed)``."""
    task = get_task(name)
    _check_split(split)
    rng = random.Random(f"{name}:{split}:{seed}")
    seen: set[str] = set()
    records: list[Record] = []
    for _ in range(_MAX_DRAWS_PER_EXAMPLE * n + 1000):
        if len(records) == n:
            break
        instruction, answer, key = task.make(rng)
        if instruction in seen or split_of(name, key) != split:
            continue
        seen.add(instruction)
        records.append(
            Record(instruction, "", answer, source=f"synthetic:{name}:{split}", line=len(records) + 1)
        )
    if len(records) < n:
        raise DataError(
            f"synthetic task {name!r} found only {len(records)} distinct {split} problems, {n} asked."
        )
    return records


def get_task(name: str) -> SyntheticTask:
    """The task called ``name``; :class:`DataError` with the closest name otherwise."""
    if name in SYNTHETIC_TASKS:
        return SYNTHETIC_TASKS[name]
    close = difflib.get_close_matches(name, list(SYNTHETIC_TASKS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise DataError(f"unknown synthetic task {name!r}.{hint} Tasks: {', '.join(SYNTHETIC_TASKS)}.")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        close = difflib.get_close_matches(split, SPLITS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise DataError(f"unknown synthetic split {split!r}.{hint} Splits: {', '.join(SPLITS)}.")


def parse_synthetic_spec(spec: str) -> tuple[str, str, int] | None:
    """``"synthetic:arith:train:2000"`` -> ``("arith", "train", 2000)``; ``None`` if ``spec`` is not synthetic."""
    if not spec.startswith("synthetic:"):
        return None
    parts = spec.split(":")
    if len(parts) != 4 or not parts[3].isdigit() or int(parts[3]) < 1:
        raise DataError(
            f"bad synthetic data spec {spec!r}; expected synthetic:TASK:SPLIT:N with N >= 1, e.g. "
            f"synthetic:arith:train:2000. Tasks: {', '.join(SYNTHETIC_TASKS)}; splits: {', '.join(SPLITS)}."
        )
    _, name, split, count = parts
    get_task(name)
    _check_split(split)
    return name, split, int(count)
