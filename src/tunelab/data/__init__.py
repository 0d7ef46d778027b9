"""Data for fine-tuning: records, prompt templates, tokenisation with loss masks, batching/packing, synthetic tasks.

Typical flow::

    records, bad = load_source("synthetic:arith:train:2000")      # or a JSON / JSONL path
    examples, stats = tokenize_records(records, tokenizer, template="alpaca", max_length=512)
    for batch in batch_order([len(e.input_ids) for e in examples], 8, seed=0, epoch=0):
        inputs = collate([examples[i] for i in batch], tokenizer.pad_token_id)
"""

from tunelab.data.batching import batch_order, collate, collate_packed, pack_examples, padding_ratio
from tunelab.data.records import BadRow, DataError, FieldMap, Record, load_records
from tunelab.data.sources import load_source
from tunelab.data.synthetic import SPLITS, SYNTHETIC_TASKS, SyntheticTask, generate, parse_synthetic_spec
from tunelab.data.templates import TEMPLATES, check_template, render_prompt
from tunelab.data.tokenize import (
    IGNORE_INDEX,
    Example,
    TokenizeStats,
    encode_prompts,
    encode_responses,
    tokenize_records,
)

__all__ = [
    "IGNORE_INDEX",
    "SPLITS",
    "SYNTHETIC_TASKS",
    "TEMPLATES",
    "BadRow",
    "DataError",
    "Example",
    "FieldMap",
    "Record",
    "SyntheticTask",
    "TokenizeStats",
    "batch_order",
    "check_template",
    "collate",
    "collate_packed",
    "encode_prompts",
    "encode_responses",
    "generate",
    "load_records",
    "load_source",
    "pack_examples",
    "padding_ratio",
    "parse_synthetic_spec",
    "render_prompt",
    "tokenize_records",
]
