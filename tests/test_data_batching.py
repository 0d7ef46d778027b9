"""tunelab.data batching: batch_order (determinism, permutation, length grouping), packing bins, padding_ratio."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.data import IGNORE_INDEX, DataError, Example, batch_order, pack_examples, padding_ratio

lengths_st = st.lists(st.integers(min_value=1, max_value=300), min_size=0, max_size=400)


def flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


@settings(max_examples=60, deadline=None)
@given(
    lengths=lengths_st,
    batch_size=st.integers(1, 9),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 50),
    group=st.booleans(),
    shuffle=st.booleans(),
)
def test_batch_order_is_a_deterministic_partition(lengths, batch_size, seed, epoch, group, shuffle):
    kwargs = {"seed": seed, "epoch": epoch, "group_by_length": group, "shuffle": shuffle}
    batches = batch_order(lengths, batch_size, **kwargs)
    assert sorted(flat(batches)) == list(range(len(lengths)))
    sizes = [len(b) for b in batches]
    assert all(0 < s <= batch_size for s in sizes)
    assert sum(s < batch_size for s in sizes) <= 1  # only one partial batch is kept
    assert len(batches) == math.ceil(len(lengths) / batch_size)
    assert batch_order(lengths, batch_size, **kwargs) == batches
    if (
        group and len(lengths) <= 50 * batch_size
    ):  # one mega-batch: every batch is a run of the sorted lengths
        for b in batches:
            assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_batch_order_changes_with_seed_and_epoch_and_not_otherwise():
    lengths = list(range(1, 201))
    base = batch_order(lengths, 8, seed=1, epoch=0)
    assert batch_order(lengths, 8, seed=1, epoch=0) == base
    assert batch_order(lengths, 8, seed=1, epoch=1) != base
    assert batch_order(lengths, 8, seed=2, epoch=0) != base
    assert batch_order(lengths, 8, seed=1, epoch=0, shuffle=False) == [
        list(range(i, min(i + 8, 200))) for i in range(0, 200, 8)
    ]


def test_group_by_length_cuts_padding_but_keeps_order_random():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(2000)]

    def ratio(batches):
        return padding_ratio([[lengths[i] for i in b] for b in batches])

    plain = batch_order(lengths, 8, seed=0, epoch=0)
    grouped = batch_order(lengths, 8, seed=0, epoch=0, group_by_length=True)
    assert ratio(grouped) < 0.05 < 0.3 < ratio(plain)
    firsts = [lengths[b[0]] for b in grouped]
    assert firsts != sorted(firsts, reverse=True) and firsts != sorted(firsts)  # batch order is shuffled
    assert grouped != batch_order(lengths, 8, seed=0, epoch=1, group_by_length=True)


def test_batch_order_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        batch_order([1, 2], 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="seed"):
        batch_order([1, 2], 1, seed=-1, epoch=0)


def test_padding_ratio():
    assert padding_ratio([[4, 4], [2]]) == 0.0
    assert padding_ratio([[4, 2], [3, 1]]) == pytest.approx(1 - 10 / 14)
    assert padding_ratio([]) == 0.0


def examples_of(lengths: list[int]) -> list[Example]:
    return [Example(input_ids=[7] * n, labels=[IGNORE_INDEX] * n, line=i + 1) for i, n in enumerate(lengths)]


def naive_first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if room >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), max_size=300), capacity=st.integers(64, 200))
def test_pack_examples_is_first_fit_decreasing(lengths, capacity):
    bins = pack_examples(examples_of(lengths), capacity)
    assert bins == naive_first_fit_decreasing(lengths, capacity)
    assert sorted(flat(bins)) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert len(bins) >= math.ceil(sum(lengths) / capacity)
    assert pack_examples(examples_of(lengths), capacity) == bins


def test_pack_examples_rejects_an_example_longer_than_the_row():
    with pytest.raises(DataError, match=r":2: example has 9 tokens, more than the packing length 8"):
        pack_examples(examples_of([3, 9]), 8)
