"""`tunelab export RUN --format merged|peft --out DIR`: a finished run in a format other tools load.

* ``merged`` — a transformers ``save_pretrained`` folder (safetensors) of the base with the run's update folded in,
  for every method whose update is a weight change: full tuning (the trained weights), and the methods whose
  ``CAPABILITIES.mergeable`` says so (LoRA, random masking; on a quantized base the merged model is the dequantized
  base plus the update, in fp32). Load it with ``AutoModelForCausalLM.from_pretrained(DIR)``: no tunelab needed.
* ``peft`` — the peer format of the methods that write one (``CAPABILITIES.exports``: LoRA, prompt tuning, prefix
  tuning — peft's LORA, PROMPT_TUNING and PREFIX_TUNING).

Methods whose update is not a weight change (prompt and prefix tuning, ReFT, bottleneck adapters) have no merged
form; the error says so and names the formats that exist (peft for prompt and prefix tuning; none for ReFT and the
bottleneck adapters, which no other tool loads — use the run with tunelab).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.errors import RunError
from tunelab.files import atomic_write_text
from tunelab.loading import load_run
from tunelab.methods import get_method
from tunelab.rundir import read_meta

FORMATS = ("merged", "peft")
EXPORT_FILE = "tunelab-export.json"


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, fmt: str = "merged") -> Path:
    """Write run ``run_dir`` to ``out`` in format ``fmt``; returns ``out``."""
    if fmt not in FORMATS:
        raise RunError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    model, tokenizer, handle, cfg = load_run(run_dir, dtype="fp32")
    method = get_method(cfg.method_name())
    caps = method.CAPABILITIES
    if fmt == "peft":
        if "peft" not in caps.exports:
            raise RunError(f"{run_dir}: method '{cfg.method_name()}' has no peft format here (methods with one: "
                           f"lora, prompt, prefix); {_other_formats(caps)}")
        method.export(handle, out, read_meta(run_dir).get("base_model", ""))
        return out
    if caps.trains_base_weights:
        merged = model
    elif caps.mergeable:
        merged = handle.merge_and_unload()
    else:
        raise RunError(f"{run_dir}: method '{cfg.method_name()}' cannot be merged into the weights: "
                       f"{handle.merge_note or 'its update is not a weight change'}. {_other_formats(caps)}")
    densify(merged)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = read_meta(run_dir)
    atomic_write_text(out / EXPORT_FILE, json.dumps({
        "format": "merged", "run": str(run_dir.resolve()), "method": cfg.method_name(),
        "base_model": meta.get("base_model"), "base_fingerprint": meta.get("base_fingerprint"),
        "quantized_base": cfg.quantize is not None or "quantize" in str(meta.get("base_model", "")),
    }, indent=1) + "\n")
    return out


def _other_formats(caps: Any) -> str:
    if caps.exports:
        return f"Formats for it: {', '.join(caps.exports)} (--format {caps.exports[0]})."
    return ("No other tool loads this method's update: use the run with tunelab (tunelab eval / generate, "
            "tunelab.loading.load_run).")


def densify(model: nn.Module) -> None:
    """Replace tunelab's quantized modules by dense ones and give every layer back the module class the
    architecture defines (a quantized or merged GPT-2 ``Conv1D`` came back as ``nn.Linear``), so that
    ``save_pretrained`` writes the checkpoint transformers expects."""
    from tunelab.quant.model import dequantize_modules

    dequantize_modules(model)
    _restore_architecture_modules(model)


def _restore_architecture_modules(model: nn.Module) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, nn.Linear):
            continue
        try:
            expected = skeleton.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(expected, Conv1D):
            conv = Conv1D(module.out_features, module.in_features)
            with torch.no_grad():
                conv.weight.copy_(module.weight.detach().T)
                if module.bias is not None:
                    conv.bias.copy_(module.bias.detach())
                else:
                    conv.bias.zero_()
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, conv)
