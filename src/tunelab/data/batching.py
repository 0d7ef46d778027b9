"""Batches: padding collation, sequence packing, and the deterministic order of batches in an epoch.

Packing puts several examples in one row and tells the model where each starts through ``position_ids``
(restarting at 0) and *no* ``attention_mask``. In transformers 5, ``masking_utils.find_packed_sequence_indices``
then splits each row wherever consecutive position ids do not increase by exactly 1, and the causal mask becomes
block-diagonal (sdpa, eager and flex attention). RoPE sees each example's own positions, so every example gets
exactly the logits it would get alone; ``test_packed_logits_equal_separate_runs`` checks this on a tiny Llama.

Two conditions, both silent when broken:

* call the model with ``use_cache=False``: transformers only looks for packed sequences when there is no cache,
  and a causal LM whose config says ``use_cache=True`` makes one even in training (unless gradient checkpointing
  is on), so without it every token attends to the earlier examples of its row;
* flash-attention 2 detects packing only for a batch of one row; use sdpa/eager, or one row per batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from tunelab.data.records import DataError
from tunelab.data.tokenize import IGNORE_INDEX, Example

MEGABATCH_FACTOR = 50


def collate(
    examples: Sequence[Example],
    pad_id: int,
    *,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad examples into ``input_ids``, ``attention_mask`` (1 = token) and ``labels`` (``IGNORE_INDEX`` on pads).

    All tensors are ``(batch, length)`` int64, where ``length`` is the longest example, rounded up to a multiple
    of ``pad_to_multiple_of`` when given.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not examples:
        raise ValueError("collate() needs at least one example")
    length = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(examples), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, span] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, span] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_examples(examples: Sequence[Example], max_length: int) -> list[list[int]]:
    """Group example indices into bins of total length ``<= max_length`` (first-fit decreasing).

    Examples are placed longest first (ties by index) into the first bin with room; O(n log n) with a max
    segment tree over the bins' free space. Deterministic; each bin lists its indices in ascending order.
    """
    lengths = [len(e.input_ids) for e in examples]
    for example, n in zip(examples, lengths, strict=True):
        if n > max_length:
            raise DataError(
                f"{example.source or '<examples>'}:{example.line}: example has {n} tokens, more than the packing "
                f"length {max_length}; tokenise with data.max_length <= the packing length.",
                source=example.source,
                line=example.line,
            )
    free = _FirstFit(len(lengths), max_length)
    bins: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = free.place(lengths[index])
        if slot == len(bins):
            bins.append([])
        bins[slot].append(index)
    return [sorted(b) for b in bins]


class _FirstFit:
    """Bins with free space, as a max segment tree: find the leftmost bin with room in O(log n).

    All ``n`` possible bins start empty; the leftmost one with room is an open bin when one fits, otherwise
    the first unopened one, which is exactly first-fit.
    """

    def __init__(self, n: int, capacity: int) -> None:
        self.size = 1
        while self.size < max(n, 1):
            self.size *= 2
        self.tree = [capacity] * (2 * self.size)

    def place(self, length: int) -> int:
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= length else 2 * node + 1
        slot = node - self.size
        self.tree[node] -= length
        node //= 2
        while node:
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])
            node //= 2
        return slot


def collate_packed(
    examples: Sequence[Example], bins_for_this_batch: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """One row per bin: ``input_ids``, ``labels`` and ``position_ids`` restarting at 0 for each example.

    There is deliberately no ``attention_mask``: transformers detects the restarts in ``position_ids`` and keeps
    attention inside each example, provided the model is called with ``use_cache=False`` (see the module notes). Rows are right-padded to the longest row; the pad run gets its own restart
    (so it is a separate "sequence" that no real token can see) and ``IGNORE_INDEX`` labels. The first label
    of each example is ignored too: unpacked, nothing predicts it; packed, the previous example's last token
    would.
    """
    if not bins_for_this_batch:
        raise ValueError("collate_packed() needs at least one bin")
    rows = [_packed_row(examples, indices) for indices in bins_for_this_batch]
    length = max(len(ids) for ids, _, _ in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(length, dtype=torch.long).repeat(len(rows), 1)
    for row, (ids, labs, pos) in enumerate(rows):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(labs, dtype=torch.long)
        position_ids[row, :n] = torch.tensor(pos, dtype=torch.long)
        position_ids[row, n:] = torch.arange(length - n, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def _packed_row(
    examples: Sequence[Example], indices: Sequence[int]
) -> tuple[list[int], list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for index in indices:
        example = examples[index]
        ids += example.input_ids
        labels += [IGNORE_INDEX] + list(example.labels[1:])
        positions += range(len(example.input_ids))
    return ids, labels, positions


def batch_order(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    group_by_length: bool = False,
    shuffle: bool = True,
) -> list[list[int]]:
    """The batches of one epoch as lists of indices into ``lengths``; every index appears exactly once.

    Deterministic for ``(seed, epoch)`` (numpy ``default_rng([seed, epoch])``). With ``group_by_length``: shuffle,
    cut into mega-batches of ``50 * batch_size``, sort each by length (longest first), cut into batches, then
    shuffle the batches, so batches hold similar lengths (little padding) yet come in random order. Without
    ``shuffle`` the order is the index order (sorted by length within mega-batches if grouping). The last,
    partial batch is kept.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    order = rng.permutation(n) if shuffle else np.arange(n)
    if group_by_length:
        order = _sort_megabatches(order, np.asarray(lengths, dtype=np.int64), MEGABATCH_FACTOR * batch_size)
    batches = [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
    if group_by_length and shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _sort_megabatches(order: np.ndarray, lengths: np.ndarray, size: int) -> np.ndarray:
    parts = []
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        parts.append(chunk[np.argsort(-lengths[chunk], kind="stable")])
    return np.concatenate(parts) if parts else order


def padding_ratio(batches_lengths: Iterable[Sequence[int]]) -> float:
    """Share of padding tokens when each batch is padded to its longest member: ``1 - real / padded``."""
    real = padded = 0
    for lengths in batches_lengths:
        if len(lengths):
            real += sum(lengths)
            padded += max(lengths) * len(lengths)
    return 1.0 - real / padded if padded else 0.0
