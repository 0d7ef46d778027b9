"""Quantize a model's linear layers (QLoRA) or quantize and initialise LoRA (LoftQ); save and load the codes.

``quantize_model(model, section, lora)`` swaps every targeted linear layer for a ``QuantLinear`` and returns a
``QuantState``: the quantized layers, the LoftQ factors (when ``init: loftq``) and a per-layer error report.
After the LoRA method is applied, ``state.init_adapters(handle)`` copies the LoftQ factors into its A/B.
Quantized layers are saved as safetensors (codes uint8, scales fp32) with their specs in the metadata.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.config import QuantizeSection
from tunelab.methods.core import MethodError, find_targets, get_submodule_parent, linear_shape
from tunelab.quant.linear import QuantLinear, dense_weight
from tunelab.quant.loftq import loftq, relative_error
from tunelab.quant.quantizers import QuantizedTensor, QuantSpec, dequantize, quantize


class QuantError(MethodError):
    """Quantization cannot be applied as configured (message says what would work)."""


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Decoder layer index of a module name (model.layers.3.mlp.up_proj -> 3; transformer.h.0.attn -> 0)."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def spec_for(name: str, section: QuantizeSection) -> QuantSpec:
    """The QuantSpec of layer ``name``: ``mixed_bits`` in the first ``mixed`` decoder layers, else ``bits``."""
    index = layer_index(name)
    bits = section.mixed_bits if section.mixed and index is not None and index < section.mixed else section.bits
    return QuantSpec(section.quant, bits, section.block, section.double_quant)


@dataclass
class LayerReport:
    """One quantized layer: shape, bits, relative errors and bytes."""

    name: str
    shape: tuple[int, int]
    bits: int
    qlora_error: float  # ‖W − q_N(W)‖_F / ‖W‖_F
    loftq_error: float | None  # ‖W − Q − s·B·A‖_F / ‖W‖_F (LoftQ only)
    bytes: int  # codes + scales
    bf16_bytes: int


@dataclass
class QuantState:
    """What quantizing a model produced (see module docstring)."""

    section: QuantizeSection | None
    layers: dict[str, QuantLinear] = field(default_factory=dict)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (A, B)
    report: list[LayerReport] = field(default_factory=list)
    lora: dict[str, Any] | None = None  # r, alpha, scaling of the LoRA the factors were computed for
    seconds: float = 0.0
    save_with_run: bool = True  # False when the model came from a quantized base directory

    def init_adapters(self, handle: Any) -> None:
        """Copy the LoftQ factors into the LoRA layers of ``handle`` (no-op for QLoRA: B = 0 already)."""
        if not self.factors:
            return
        missing = sorted(set(self.factors) - set(handle.layers))
        if missing:
            raise QuantError(f"LoftQ factors exist for {missing[:3]} but the method did not wrap them; use the same "
                             f"targets for method and quantize, or init: qlora")
        with torch.no_grad():
            for name, (a, b) in self.factors.items():
                layer = handle.layers[name]
                if layer.lora_A.shape != a.shape or abs(layer.scaling - self.lora["scaling"]) > 1e-12:
                    raise QuantError(f"LoftQ factors of {name} were computed for r={self.lora['r']} "
                                     f"scaling={self.lora['scaling']:g}; the method has r={layer.r} "
                                     f"scaling={layer.scaling:g}. Use the same method.r and method.alpha")
                layer.lora_A.copy_(a)
                layer.lora_B.copy_(b)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """The quantized layers as safetensors: ``{name}.{codes,absmax,...}`` + specs and shapes in metadata."""
        save_quantized_layers(self.layers, path, extra)


# --------------------------------------------------------------------------------------------------------------
# Quantizing a model
# --------------------------------------------------------------------------------------------------------------


def quantize_model(model: nn.Module, section: QuantizeSection, lora: Any = None) -> QuantState:
    """Replace the ``section.targets`` linear layers of ``model`` with QuantLinear (QLoRA: Q = q_N(W)).

    With ``section.init == 'loftq'``, ``lora`` (a ``tunelab.methods.lora.Config``) gives r and the scaling s, and
    the layers LoRA will wrap get Q_T and factors from ``tunelab.quant.loftq`` (T = ``section.iters``).
    """
    t0 = time.perf_counter()
    names = find_targets(model, section.targets, kind="linear (to quantize)")
    loftq_names = _loftq_targets(model, section, lora)
    state = QuantState(section, lora=_lora_info(lora) if loftq_names else None)
    for name in names:
        parent, attr = get_submodule_parent(model, name)
        module = getattr(parent, attr)
        layer, report, ab = _quantize_layer(name, module, spec_for(name, section), section, lora, name in loftq_names)
        setattr(parent, attr, layer)
        state.layers[name], state.report = layer, [*state.report, report]
        if ab is not None:
            state.factors[name] = ab
    state.seconds = time.perf_counter() - t0
    return state


def _lora_info(lora: Any) -> dict[str, Any]:
    return {"r": lora.r, "alpha": lora.alpha, "rslora": lora.rslora, "scaling": lora.scaling}


def _loftq_targets(model: nn.Module, section: QuantizeSection, lora: Any) -> set[str]:
    if section.init != "loftq":
        return set()
    if lora is None or not hasattr(lora, "scaling"):
        raise QuantError("quantize.init: loftq initialises LoRA factors: it needs method: lora "
                         "(or use quantize.init: qlora with any other method)")
    return set(find_targets(model, lora.targets))


def _quantize_layer(name: str, module: nn.Module, spec: QuantSpec, section: QuantizeSection, lora: Any,
                    use_loftq: bool) -> tuple[QuantLinear, LayerReport, tuple[torch.Tensor, torch.Tensor] | None]:
    w = dense_weight(module)
    d_in, d_out = linear_shape(module)
    ab = None
    if use_loftq:
        res = loftq(w, spec, lora.r, lora.scaling, section.iters)
        qt, qlora_err, loftq_err, ab = res.qweight, res.qlora_error, res.error, (res.A, res.B)
    else:
        qt = quantize(w, spec)
        qlora_err, loftq_err = relative_error(w, dequantize(qt)), None
    layer = QuantLinear(qt, getattr(module, "bias", None))
    report = LayerReport(name, (d_out, d_in), spec.bits, qlora_err, loftq_err, qt.nbytes(), 2 * d_in * d_out)
    return layer, report, ab


# --------------------------------------------------------------------------------------------------------------
# Saving and loading quantized layers
# --------------------------------------------------------------------------------------------------------------

FORMAT = "tunelab-quantized-layers/1"


def save_quantized_layers(layers: dict[str, QuantLinear], path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """safetensors with every layer's codes and scales; metadata: format, per-layer spec and shape, ``extra``."""
    from tunelab.runs import atomic_save_tensors

    tensors, specs = {}, {}
    for name, layer in layers.items():
        for key, t in layer.qweight().tensors().items():
            tensors[f"{name}.{key}"] = t
        specs[name] = {"shape": [layer.out_features, layer.in_features], **asdict(layer.spec)}
    meta = {"format": FORMAT, "layers": json.dumps(specs), "extra": json.dumps(extra or {})}
    atomic_save_tensors(path, tensors, metadata=meta)


def read_quantized_layers(path: str | Path) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    """The QuantizedTensors saved by ``save_quantized_layers`` and its ``extra`` metadata."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise QuantError(f"{path} is not a tunelab quantized-layers file (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r}); write one with `tunelab quantize`")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    out = {}
    for name, info in json.loads(meta["layers"]).items():
        shape = tuple(info.pop("shape"))
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".") and "." not in
               k[len(name) + 1:]}
        out[name] = QuantizedTensor.from_tensors(own, shape, QuantSpec(**info))
    return out, json.loads(meta.get("extra", "{}"))


def install_quantized_layers(model: nn.Module, path: str | Path) -> QuantState:
    """Swap the saved layers into ``model`` (biases come from the model's own layers); shapes are checked."""
    saved, _ = read_quantized_layers(path)
    state = QuantState(None, save_with_run=False)
    for name, qt in saved.items():
        try:
            parent, attr = get_submodule_parent(model, name)
            module = getattr(parent, attr)
        except AttributeError:
            raise QuantError(f"{path}: layer {name} does not exist in {type(model).__name__}; was it quantized "
                             f"from another base model?") from None
        d_in, d_out = linear_shape(module)
        if (d_out, d_in) != qt.shape:
            raise QuantError(f"{path}: layer {name} was saved with shape {qt.shape}, the model has {(d_out, d_in)}")
        state.layers[name] = QuantLinear(qt, getattr(module, "bias", None))
        setattr(parent, attr, state.layers[name])
    return state


# --------------------------------------------------------------------------------------------------------------
# Memory and reports
# --------------------------------------------------------------------------------------------------------------


def memory_report(model: nn.Module) -> dict[str, Any]:
    """Bytes of the model's weights as held (quantized layers: codes + scales) against everything in bf16."""
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    q_bytes = sum(m.nbytes() for m in quant)
    q_bf16 = sum(2 * m.in_features * m.out_features for m in quant)
    params = {id(p): p for p in model.parameters()}.values()
    other = sum(p.numel() * 2 for p in params)  # every parameter (embeddings, norms, biases, adapters) in bf16
    return {"quantized_layers": len(quant), "quantized_bytes": q_bytes, "quantized_bf16_bytes": q_bf16,
            "quantized_ratio": q_bytes / q_bf16 if q_bf16 else None,
            "model_bytes": q_bytes + other, "model_bf16_bytes": q_bf16 + other,
            "model_ratio": (q_bytes + other) / (q_bf16 + other) if q_bf16 + other else None}


def format_report(report: list[LayerReport], memory: dict[str, Any] | None = None) -> str:
    """A plain-text table: layer, shape, bits, QLoRA ‖W − Q‖/‖W‖, LoftQ ‖W − Q − sBA‖/‖W‖, KiB."""
    head = f"{'layer':<44} {'shape':>11} {'bits':>4} {'QLoRA err':>10} {'LoftQ err':>10} {'KiB':>8} {'bf16 KiB':>9}"
    lines = [head, "-" * len(head)]
    for r in report:
        loftq_cell = f"{r.loftq_error:.4f}" if r.loftq_error is not None else "–"
        lines.append(f"{r.name:<44} {'x'.join(map(str, r.shape)):>11} {r.bits:>4} {r.qlora_error:>10.4f} "
                     f"{loftq_cell:>10} {r.bytes / 1024:>8.1f} {r.bf16_bytes / 1024:>9.1f}")
    if report:
        mean_q = sum(r.qlora_error for r in report) / len(report)
        lofts = [r.loftq_error for r in report if r.loftq_error is not None]
        mean_l = f"{sum(lofts) / len(lofts):.4f}" if lofts else "–"
        lines.append(f"{'mean':<44} {'':>11} {'':>4} {mean_q:>10.4f} {mean_l:>10}")
    if memory:
        lines.append(_memory_line(memory))
    return "\n".join(lines)


def _memory_line(m: dict[str, Any]) -> str:
    mib = 2**20
    return (f"memory: quantized layers {m['quantized_bytes'] / mib:.1f} MiB vs {m['quantized_bf16_bytes'] / mib:.1f}"
            f" MiB bf16 ({m['quantized_ratio']:.3f}x); whole model {m['model_bytes'] / mib:.1f} MiB vs "
            f"{m['model_bf16_bytes'] / mib:.1f} MiB bf16 ({m['model_ratio']:.3f}x; embeddings, norms stay bf16)")
