"""Quantized bases on disk and the hooks the trainer and run loader call.

A quantized base directory (``tunelab quantize MODEL --out DIR``) holds::

    DIR/quantize.json                 format, the base model spec + weight fingerprint, the quantize settings,
                                      the LoRA (r, α) the LoftQ factors were computed for, the per-layer report
    DIR/quantized_base.safetensors    codes (uint8) and scales of every quantized layer — never pickle
    DIR/adapter_init.safetensors      LoftQ only: the initial LoRA A/B, keyed like the LoRA adapter

Only the quantized layers are stored (with ``quantize.embeddings``: also the embedding table, and an untied
head's table; a tied head is recorded as tied, no second copy); the rest (norms, biases, an unquantized
embedding) is read from the base model, whose fingerprint is checked. ``model.name: DIR`` trains on it; a run trained with a ``quantize:`` section stores the
same ``quantized_base.safetensors`` in its run directory so that evaluation uses exactly the trained-on codes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.quant.model import (
    QuantError,
    QuantState,
    install_quantized_layers,
    memory_report,
    quantize_model,
)

BASE_META = "quantize.json"
QUANT_FILE = "quantized_base.safetensors"
ADAPTER_INIT = "adapter_init.safetensors"
BASE_FORMAT = "tunelab-quantized-base/1"


def is_quantized_base(spec: str) -> bool:
    """Whether ``spec`` is a directory written by ``tunelab quantize``."""
    return (Path(spec) / BASE_META).is_file()


def read_base_meta(path: str | Path) -> dict[str, Any]:
    meta = json.loads((Path(path) / BASE_META).read_text(encoding="utf-8"))
    if meta.get("format") != BASE_FORMAT:
        raise QuantError(f"{path}/{BASE_META}: format {meta.get('format')!r} is not {BASE_FORMAT!r}; "
                         f"rewrite it with `tunelab quantize`")
    return meta


def load_quantized_base(path: str | Path, dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) of a quantized base directory: the base model with its quantized layers swapped in."""
    from tunelab.models import load_model, model_fingerprint

    meta = read_base_meta(path)
    model, tokenizer = load_model(meta["base_model"], dtype)
    found = model_fingerprint(model)
    if meta.get("base_fingerprint") and found != meta["base_fingerprint"]:
        raise QuantError(f"{path} was quantized from {meta['base_model']!r} with weights fingerprint "
                         f"{meta['base_fingerprint']}, but that model now has fingerprint {found}; quantize it again")
    install_quantized_layers(model, Path(path) / QUANT_FILE)
    model.tunelab_spec = str(path)
    return model, tokenizer


def quantized_numel(model: nn.Module) -> int:
    """Weights held as codes by QuantLinear layers and quantized embedding / untied head tables (not parameters,
    so count_parameters misses them; a tied head's table is the embedding's and counts once, like a tied weight)."""
    from tunelab.quant.embedding import QuantTable
    from tunelab.quant.linear import QuantLinear

    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear)) + \
        sum(m.num_embeddings * m.embedding_dim for m in model.modules() if isinstance(m, QuantTable))


def describe_quantized_base(path: str | Path) -> str:
    meta = read_base_meta(path)
    q = meta["quantize"]
    emb = ", embeddings too" if q.get("embeddings") else ""
    return f"{path} ({q['quant']}{q['bits']} {q['init']} quantization{emb} of {meta['base_model_id']})"


def write_quantized_base(out: str | Path, state: QuantState, model: nn.Module, base_spec: str,
                         fingerprint: str, adapter: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a quantized base directory (see module docstring) from a ``quantize_model`` result."""
    from dataclasses import asdict

    from tunelab.files import atomic_save_tensors, atomic_write_json
    from tunelab.models import describe_spec

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state.save(out / QUANT_FILE)
    if adapter:
        atomic_save_tensors(out / ADAPTER_INIT, adapter, metadata={"format": "tunelab", "method": "lora"})
    meta = {"format": BASE_FORMAT, "base_model": base_spec, "base_model_id": describe_spec(base_spec),
            "base_fingerprint": fingerprint, "quantize": asdict(state.section) if state.section else None,
            "lora": state.lora, "seconds": state.seconds, "memory": memory_report(model),
            "layers": [asdict(r) for r in state.report]}
    atomic_write_json(out / BASE_META, meta)
    return out


# --------------------------------------------------------------------------------------------------------------
# Trainer and run-loader hooks
# --------------------------------------------------------------------------------------------------------------


def prepare(model: nn.Module, cfg: Any, method: Any, method_cfg: Any) -> QuantState | None:
    """Called by the trainer before ``method`` (its module) is applied: quantize as ``cfg.quantize`` says (returns
    the state whose ``init_adapters`` runs after the method), or pick up a quantized base directory's LoftQ
    factors."""
    spec = cfg.model.name
    if is_quantized_base(spec):
        if cfg.quantize is not None:
            raise QuantError(f"model.name {spec!r} is already a quantized base: drop the quantize section (or "
                             f"point model.name at the original model {read_base_meta(spec)['base_model']!r})")
        return _state_from_dir(spec)
    if cfg.quantize is None:
        return None
    if method.CAPABILITIES.trains_base_weights:
        raise QuantError(f"quantize: method '{cfg.method_name()}' trains the base weights, which a quantized base "
                         f"holds as frozen codes; use method: lora (QLoRA/LoftQ) or another adapter method, or drop "
                         f"quantize")
    low_rank = method.low_rank(method_cfg) if method.CAPABILITIES.loftq_init else None
    return quantize_model(model, cfg.quantize, low_rank)


def _state_from_dir(path: str) -> QuantState:
    """The LoftQ factors (if any) of a quantized base directory, to initialise the run's LoRA."""
    from safetensors.torch import load_file

    meta = read_base_meta(path)
    state = QuantState(None, lora=meta.get("lora"), save_with_run=False)
    init = Path(path) / ADAPTER_INIT
    if init.is_file():
        tensors = load_file(str(init))
        names = sorted({k.rsplit(".", 1)[0] for k in tensors})
        state.factors = {n: (tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"]) for n in names}
    return state


def save_run_quantization(state: QuantState | None, run_dir: Path) -> None:
    """A run trained with a quantize section keeps its quantized layers next to the adapter."""
    if state is not None and state.save_with_run:
        state.save(run_dir / QUANT_FILE)


def install_run_quantization(model: nn.Module, run_dir: str | Path, cfg: Any) -> None:
    """Called by ``load_run`` before the method is applied: swap in the run's saved quantized layers."""
    if getattr(cfg, "quantize", None) is None:
        return
    path = Path(run_dir) / QUANT_FILE
    if not path.is_file():
        raise QuantError(f"{run_dir} was trained on a quantized base (quantize section in its config) but has no "
                         f"{QUANT_FILE}; it was written by an older tunelab or the file was removed")
    install_quantized_layers(model, path)


def quantize_to_dir(spec: str, section: Any, low_rank: Any, out: str | Path) -> tuple[QuantState, dict[str, Any]]:
    """`tunelab quantize`: load ``spec`` in fp32, quantize it (LoftQ when ``section.init == 'loftq'``, for the
    low-rank update ``low_rank``), write the quantized base directory ``out``; returns the state and the memory
    report."""
    from tunelab.models import load_model, model_fingerprint

    if is_quantized_base(spec):
        raise QuantError(f"{spec} is already a quantized base; quantize the original model "
                         f"{read_base_meta(spec)['base_model']!r}")
    model, _ = load_model(spec, "fp32")
    fingerprint = model_fingerprint(model)
    state = quantize_model(model, section, low_rank)
    adapter = {}
    for name, (a, b) in state.factors.items():
        adapter[f"{name}.lora_A"], adapter[f"{name}.lora_B"] = a, b
    write_quantized_base(out, state, model, spec, fingerprint, adapter)
    return state, memory_report(model)
