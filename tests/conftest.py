"""Shared fixtures: tiny random models built from configs, the real data folder when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "llm-adapters"


def tiny(name: str = "tiny-llama", dtype: str = "fp32"):
    """A fresh tiny model (deterministic weights) and its byte-level tokenizer."""
    from tunelab.models import load_model

    return load_model(name, dtype)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


def batch_for(tokenizer, texts=("Hello there, tiny model.", "What is 2 + 2? It is 4.")):
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
