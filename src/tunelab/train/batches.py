"""From a run config's data section to the stream of micro-batches the loop consumes.

The stream is a pure function of (data, seed, epoch): micro-batch g of the run is batch g mod n of epoch g div n.
An optimizer step s takes micro-batches [s·G·W, (s+1)·G·W) (G = grad_accum, W = processes) and process r takes
every W-th of them, so one process with G = 2 and two processes with G = 1 see the same examples per step, and
a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.config import DataSection
from tunelab.data import (
    DataError,
    Example,
    FieldMap,
    Record,
    batch_order,
    collate,
    collate_packed,
    load_source,
    pack_examples,
    tokenize_records,
)
from tunelab.train.objective import IGNORE_INDEX


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)


def read_source(spec: str, data: DataSection, seed: int) -> tuple[list[Record], list]:
    """Records from a file path or a ``synthetic:NAME:SPLIT:N`` spec."""
    fields = FieldMap(instruction=data.fields.instruction, input=data.fields.input, output=data.fields.output,
                      messages=data.fields.messages)
    return load_source(spec, fields, skip_bad_rows=data.skip_bad_rows, seed=seed, format=data.format)


def _held_out(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic split by a hash of (seed, text): the same record always lands on the same side."""
    def score(r: Record) -> float:
        h = hashlib.blake2b(f"{seed}\x00{r.instruction}\x00{r.input}\x00{r.output}".encode(), digest_size=8)
        return int.from_bytes(h.digest(), "big") / 2**64

    train = [r for r in records if score(r) >= fraction]
    held = [r for r in records if score(r) < fraction]
    return train, held


def prepare_data(data: DataSection, tokenizer: Any, seed: int) -> PreparedData:
    """Read, split and tokenise the training and evaluation sets."""
    if not data.train:
        raise DataError("data.train is empty: give a JSON/JSONL file of instruction records or a synthetic task "
                        "such as synthetic:arith:train:2000")
    records, bad = read_source(data.train, data, seed)
    if data.limit is not None:
        records = records[: data.limit]
    eval_records: list[Record] = []
    if data.eval:
        eval_records, bad_eval = read_source(data.eval, data, seed)
        bad = bad + bad_eval
    elif data.eval_fraction > 0:
        records, eval_records = _held_out(records, data.eval_fraction, seed)
    eval_records = eval_records[: data.eval_max_examples]
    kw = dict(template=data.template, max_length=data.max_length, train_on_prompt=data.train_on_prompt,
              skip_bad_rows=data.skip_bad_rows)
    train, train_stats = tokenize_records(records, tokenizer, **kw)
    evals, _ = tokenize_records(eval_records, tokenizer, **kw) if eval_records else ([], None)
    if not train:
        raise DataError(f"{data.train}: no usable training examples")
    stats = {
        "train_examples": len(train), "eval_examples": len(evals),
        "truncated": train_stats.n_truncated, "dropped": train_stats.n_dropped,
        "bad_rows": [f"{b.source}:{b.line}: {b.reason}" for b in bad],
        "train_target_tokens": train_stats.n_target_tokens, "train_tokens": train_stats.n_tokens,
    }
    return PreparedData(train=train, eval=evals, stats=stats)


def skipped_rows_message(stats: dict[str, Any], shown: int = 3) -> str | None:
    """The console line for the rows ``--skip-bad-rows`` left out (count and the first few ``file:line: reason``),
    or None when none was."""
    bad, dropped = stats.get("bad_rows", []), stats.get("dropped", 0)
    if not bad and not dropped:
        return None
    parts = []
    if bad:
        more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
        parts.append(f"skipped {len(bad)} bad row{'s' * (len(bad) != 1)}: {'; '.join(bad[:shown])}{more}")
    if dropped:
        parts.append(f"dropped {dropped} training row{'s' * (dropped != 1)} with no response token within "
                     f"data.max_length")
    return " | ".join(parts) + " (--skip-bad-rows; see the run's meta.json)"


class BatchPlan:
    """Groups examples into micro-batches (optionally packed) and orders them per epoch."""

    def __init__(self, examples: list[Example], batch_size: int, max_length: int, pad_id: int, *, seed: int,
                 packing: bool = False, group_by_length: bool = True) -> None:
        self.examples = examples
        self.pad_id = pad_id
        self.seed = seed
        self.packing = packing
        self.group_by_length = group_by_length and not packing
        self.batch_size = batch_size
        self.units: list[list[int]] = pack_examples(examples, max_length) if packing else [[i] for i in range(len(examples))]
        self.unit_lengths = [sum(len(examples[i].input_ids) for i in u) for u in self.units]
        self.unit_targets = [sum(_targets(examples[i]) for i in u) for u in self.units]
        self._epochs: dict[int, list[list[int]]] = {}

    def batches_in_epoch(self) -> int:
        return -(-len(self.units) // self.batch_size)

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            self._epochs = {epoch: batch_order(self.unit_lengths, self.batch_size, seed=self.seed, epoch=epoch,
                                               group_by_length=self.group_by_length)}
        return self._epochs[epoch]

    def unit_ids(self, g: int) -> list[int]:
        n = self.batches_in_epoch()
        return self._epoch(g // n)[g % n]

    def targets(self, g: int) -> int:
        """Target tokens of micro-batch ``g`` without building it (for the loss normaliser)."""
        return sum(self.unit_targets[u] for u in self.unit_ids(g))

    def micro_batch(self, g: int) -> tuple[dict[str, torch.Tensor], int]:
        """(tensors, number of real tokens) of global micro-batch ``g``."""
        unit_ids = self.unit_ids(g)
        if self.packing:
            bins = [self.units[u] for u in unit_ids]
            batch = collate_packed(self.examples, bins, self.pad_id)
        else:
            batch = collate([self.examples[u] for u in unit_ids], self.pad_id)
        tokens = sum(self.unit_lengths[u] for u in unit_ids)
        return batch, tokens


def _targets(example: Example) -> int:
    """Positions that carry a loss once labels are shifted (the first token is never predicted)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def step_micro_batches(step: int, grad_accum: int, world: int, rank: int) -> Sequence[int]:
    """Global micro-batch indices that process ``rank`` runs in optimizer step ``step``."""
    start = step * grad_accum * world
    return range(start + rank, start + grad_accum * world, world)


def all_step_micro_batches(step: int, grad_accum: int, world: int) -> Sequence[int]:
    start = step * grad_accum * world
    return range(start, start + grad_accum * world)
