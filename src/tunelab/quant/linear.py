"""QuantLinear: a frozen linear layer stored as packed codes + block scales, dequantized block-wise per call.

    y = x Ŵᵀ + b,   Ŵ = dequantize(codes, scales)  (``tunelab.quant.quantizers``), computed in the input's dtype
    (bf16 under bf16 autocast, the training default; fp32 otherwise)

Ŵ is never stored: ``_QuantMatmul`` rebuilds it in the backward pass instead of saving it, so the activation
memory of a step holds only the (shared, tiny) codes and scales per layer. Gradients flow to the input only —
codes and scales are buffers, not parameters; LoRA's factors sit on top (``tunelab.methods.lora``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.quant.quantizers import QuantizedTensor, QuantSpec, byte_table, dequantize_codes


class DenseCache:
    """Mixin: a quantized module that can keep its dequantized weight (per dtype, or per chunk) while
    :func:`inference_weights` is active. Outside it nothing is kept (``_dense`` is None): training rebuilds Ŵ per
    call as the module docstring says."""

    _dense: dict[Any, torch.Tensor] | None = None

    def dense(self, key: Any, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()``, kept under ``key`` while :func:`inference_weights` is active (the same tensor, so the same
        numbers, as building it per call)."""
        if self._dense is None:
            return build()
        if key not in self._dense:
            self._dense[key] = build()
        return self._dense[key]


@contextmanager
def inference_weights(model: Any) -> Iterator[None]:
    """Within the block, quantized layers dequantize their weights once and keep them (in the compute dtype) for the
    calls made without autograd, instead of once per call: generation calls every layer once per token, and
    rebuilding Ŵ per decode step costs more than the product itself. Memory: about a dense copy of those weights in
    the compute dtype while the block runs; the outputs are bit-identical (the same Ŵ, the same products)."""
    layers = [m for m in model.modules() if isinstance(m, DenseCache)] if hasattr(model, "modules") else []
    outer = [m._dense for m in layers]  # nested blocks share the outer block's weights and leave them to it
    for m, kept in zip(layers, outer, strict=True):
        m._dense = {} if kept is None else kept
    try:
        yield
    finally:
        for m, kept in zip(layers, outer, strict=True):
            m._dense = kept


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """bf16 when autocast is on for x's device (autocast would cast the matmul anyway), else x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _QuantMatmul(torch.autograd.Function):
    """x Ŵᵀ with Ŵ rebuilt (not saved) for the input gradient: ∂L/∂x = ∂L/∂y · Ŵ."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), layer.dequantize(dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w = ctx.layer.dequantize(ctx.dtype)
        with torch.autocast(grad.device.type, enabled=False):
            return (grad.to(ctx.dtype) @ w).to(ctx.x_dtype), None, None


class QuantLinear(DenseCache, nn.Module):
    """A linear layer [in_features -> out_features] whose weight is held quantized (see module docstring).

    Looks like a linear layer to the method core (``in_features``, ``out_features``, ``is_quantized``); ``weight``
    is the dequantized fp32 weight, computed on access (read-only: it is not a parameter).
    """

    is_quantized = True

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(d) for d in qweight.shape)
        self.spec = qweight.spec
        for name, tensor in qweight.tensors().items():
            self.register_buffer(name, tensor)
        self.register_buffer("table", byte_table(self.spec.codebook(), self.spec.bits), persistent=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, module: nn.Module, spec: QuantSpec, weight: torch.Tensor | None = None) -> QuantLinear:
        """Quantize an nn.Linear (or GPT-2 Conv1D, stored [in, out]: transposed here); ``weight`` overrides the
        weight to quantize (LoftQ quantizes W − s·B·A), laid out [out, in]."""
        from tunelab.quant.quantizers import quantize

        w = weight if weight is not None else dense_weight(module)
        return cls(quantize(w, spec), getattr(module, "bias", None))

    # -- weights -----------------------------------------------------------------------------------------------
    def qweight(self) -> QuantizedTensor:
        names = ("codes", "absmax") if not self.spec.double_quant else \
            ("codes", "absmax_codes", "absmax_scale", "absmax_mean")
        return QuantizedTensor.from_tensors({n: getattr(self, n) for n in names},
                                            (self.out_features, self.in_features), self.spec)

    def scales(self) -> torch.Tensor:
        if not self.spec.double_quant:
            return self.absmax
        return self.qweight().scales()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ [out, in] in ``dtype``."""
        return dequantize_codes(self.codes, self.scales(), self.table, (self.out_features, self.in_features), dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize(torch.float32)

    def nbytes(self) -> int:
        """Bytes of the quantized weight (codes and scales; the bias is counted by its own parameter)."""
        return self.qweight().nbytes()

    # -- compute -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _QuantMatmul.apply(x, self, dtype)
        else:
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(x.to(dtype), self.dense(dtype, lambda: self.dequantize(dtype)))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A dense nn.Linear holding Ŵ (and the bias) in ``dtype``."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                          device=self.codes.device)
        with torch.no_grad():
            dense.weight.copy_(self.dequantize(torch.float32))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        dense.requires_grad_(False)
        return dense

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, quant={s.quant}{s.bits}, "
                f"block={s.block}, double_quant={s.double_quant}, bias={self.bias is not None}")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like layer as an fp32 [out, in] tensor (Conv1D stores [in, out])."""
    if isinstance(module, QuantLinear):
        return module.dequantize(torch.float32)
    w = module.weight.detach().float()
    return w if isinstance(module, nn.Linear) else w.T
