"""GGUF files, read with transformers' GGUF loader and dequantised into a plain dense model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tunelab.errors import ModelError
from tunelab.models.directories import first_line, with_sdpa


def convert_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a ``.gguf`` file as a plain dense model (every weight dequantised) and its tokenizer."""
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = with_sdpa(
            AutoModelForCausalLM.from_pretrained, folder, gguf_file=name, dtype=dtype, **_dequantize_option()
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(
            f"could not load GGUF file {str(path)!r}: {first_line(err)} (transformers reads "
            "GGUF for the architectures it lists in its GGUF docs)."
        ) from err
    _drop_gguf_quantization(model)
    return model, tokenizer


def _dequantize_option() -> dict[str, Any]:
    """Ask for dense weights explicitly: newer transformers keeps GGUF blocks packed when kernels exist."""
    gguf_config = getattr(transformers, "GgufConfig", None)
    return {"quantization_config": gguf_config(dequantize=True)} if gguf_config is not None else {}


def _drop_gguf_quantization(model: PreTrainedModel) -> None:
    """Forget the GGUF origin of a dequantised model so it saves (and merges) like any dense model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
