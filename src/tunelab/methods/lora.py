"""LoRA: low-rank adaptation of linear layers (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

    h = W x + s · B A x,   A ∈ ℝ^{r×d_in}, B ∈ ℝ^{d_out×r},   s = α / r   (rsLoRA: s = α / √r, Kalajdzievski 2023)

A is initialised Kaiming-uniform (as nn.Linear, peft's default) or N(0, 1/r) ("gaussian"), B = 0, so the model is
unchanged at initialisation. Merging adds s·B·A to W (computed in fp32, stored in W's dtype).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError, QuantError
from tunelab.methods.contract import Capabilities, LowRank
from tunelab.methods.core import (
    ALL_LINEAR,
    MethodError,
    MethodHandle,
    find_targets,
    freeze,
    linear_shape,
    replace_modules,
)

DESCRIPTION = "LoRA: W + (α/r)·B·A on target linear layers (mergeable)"
PAPER = "Hu et al., 2021, LoRA: Low-Rank Adaptation of Large Language Models, https://arxiv.org/abs/2106.09685"


CAPABILITIES = Capabilities(mergeable=True, loftq_init=True, exports=("peft",))
@dataclass(frozen=True)
class Config:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = ALL_LINEAR
    rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora: r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora: dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class _LoraMatmul(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ for a frozen W (and b) in the compute dtype, forward and backward written out.

    Autograd's graph for the same expression (two small linears, a scaled add) allocates and walks the full
    [tokens × out] activation three more times (the low-rank product, the sum, the scaling of its gradient) and the
    [tokens × in] input gradient once more (the sum of both branches'). Here the low-rank term is accumulated into the
    base product in place (``addmm_``), the scale is applied to the [tokens × r] factor, and the low-rank part of the
    input gradient is accumulated into the base part. Measured on this 2-core CPU (SmolLM2's seven linears of one
    layer, 1,024 tokens, r = 8, forward + backward): 27 ms against 36 ms through autograd, 18 ms for the frozen
    linears alone. The matmuls and their dtypes are those autocast runs, so the result is the same up to rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):  # type: ignore[override]
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1]).to(weight.dtype)
        a, b = lora_A.to(weight.dtype), lora_B.to(weight.dtype)
        xa = x2 @ a.t()
        y = F.linear(x2, weight, bias).addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, a, b, xa)
        ctx.scaling, ctx.x_shape, ctx.x_dtype = scaling, shape, dtype
        ctx.ab_dtypes = (lora_A.dtype, lora_B.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x2, weight, a, b, xa = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        gb = (g2 @ b).mul_(ctx.scaling)  # s·g B: [tokens × r]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ weight).addmm_(gb, a).view(ctx.x_shape).to(ctx.x_dtype)
        grad_a = (gb.t() @ x2).to(ctx.ab_dtypes[0]) if ctx.needs_input_grad[3] else None
        grad_b = (xa.t() @ g2).t().mul(ctx.scaling).to(ctx.ab_dtypes[1]) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_a, grad_b, None


def _fast_path(layer: LoraLinear, x: torch.Tensor) -> bool:
    """_LoraMatmul applies: a frozen plain nn.Linear whose dtype is the one its matmuls run in — the autocast dtype
    under autocast, else that of the input and of the LoRA factors (fp32 training on a CPU without bf16 units) —
    without dropout on the low-rank branch."""
    base = layer.base_layer
    if type(base) is not nn.Linear:
        return False
    w, bias = base.weight, base.bias
    if torch.is_autocast_enabled(x.device.type):
        runs_in = w.dtype == torch.get_autocast_dtype(x.device.type)
    else:
        runs_in = w.dtype == x.dtype == layer.lora_A.dtype == layer.lora_B.dtype
    return (runs_in and not w.requires_grad
            and (bias is None or (not bias.requires_grad and bias.dtype == w.dtype))
            and (isinstance(layer.dropout, nn.Identity) or not layer.training))


class LoraLinear(nn.Module):
    """Wraps a frozen linear layer (``base_layer``) and adds the low-rank update s·B·A x."""

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float, init: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        d_in, d_out = linear_shape(base_layer)
        quantized = getattr(base_layer, "is_quantized", False)  # tunelab.quant.QuantLinear: [out, in], no weight
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear) and not quantized  # Conv1D stores [in, out]
        self.r, self.scaling = r, scaling
        device = next(iter(base_layer.buffers() if quantized else base_layer.parameters())).device
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=device))
        self.__dict__["quantized_base"] = None  # while merged onto a quantized base: the original (unregistered)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in fp32, laid out like the base weight."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and not self.merged and _fast_path(self, x):
            base = self.base_layer
            with torch.autocast(x.device.type, enabled=False):
                return _LoraMatmul.apply(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling)
        y = self.base_layer(x)
        if not self.enabled or self.merged:
            return y
        x = self.dropout(x)
        if torch.is_autocast_enabled(x.device.type):  # autocast already runs both matmuls in bf16
            return torch.add(y, F.linear(F.linear(x, self.lora_A), self.lora_B), alpha=self.scaling)
        h = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (h * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            if getattr(self.base_layer, "is_quantized", False):
                self._dequantize_base()
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    def _dequantize_base(self) -> None:
        """Merging into 2/4-bit codes would round the update away: swap in a dense fp32 copy of the quantized
        weight (kept aside, so unmerge restores the exact codes); merge_and_unload returns that dense layer."""
        from tunelab.quant import merge_message

        warnings.warn(merge_message(self.base_layer), stacklevel=4)
        self.__dict__["quantized_base"] = self.base_layer
        self.base_layer = self.base_layer.to_linear(torch.float32)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged and self.quantized_base is not None:
            self.base_layer, self.__dict__["quantized_base"] = self.quantized_base, None
            self.merged = False
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def unwrap(self) -> nn.Module:
        return self.base_layer

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def apply(model: nn.Module, config: Config, *, tokenizer: Any = None) -> MethodHandle:
    """Freeze the model and wrap every target linear layer with a LoraLinear."""
    names = find_targets(model, config.targets)
    for name in names:
        d_in, d_out = linear_shape(model.get_submodule(name))
        if config.r > min(d_in, d_out):
            raise MethodError(
                f"lora: rank r={config.r} is larger than layer {name} ({d_in} -> {d_out}); "
                f"use r <= {min(d_in, d_out)} or leave this layer out of the targets"
            )
    freeze(model)
    layers = replace_modules(
        model, names, lambda _n, m: LoraLinear(m, config.r, config.scaling, config.dropout, config.init)
    )
    return MethodHandle(name="lora", model=model, config=config, layers=layers)


def num_parameters(model: nn.Module, config: Config) -> int:
    """Closed form: Σ over targets of r·(d_in + d_out)."""
    return sum(config.r * sum(linear_shape(model.get_submodule(n))) for n in find_targets(model, config.targets))


def low_rank(config: Config) -> LowRank:
    """The update LoftQ computes factors for (``tunelab.quant``): rank, scaling, targets."""
    return LowRank(r=config.r, alpha=config.alpha, rslora=config.rslora, scaling=config.scaling,
                   targets=config.targets)


def init_low_rank(handle: MethodHandle, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  made_for: dict[str, Any]) -> None:
    """Start every LoRA layer from its LoftQ factors (A, B); ``made_for``: the r and scaling they were computed for."""
    missing = sorted(set(factors) - set(handle.layers))
    if missing:
        raise QuantError(f"LoftQ factors exist for {missing[:3]} but the method did not wrap them; use the same "
                         f"targets for method and quantize, or init: qlora")
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = handle.layers[name]
            if layer.lora_A.shape != a.shape or abs(layer.scaling - made_for.get("scaling", float("nan"))) > 1e-12:
                raise QuantError(f"LoftQ factors of {name} were computed for r={made_for.get('r')} "
                                 f"scaling={made_for.get('scaling', float('nan')):g}; the method has r={layer.r} "
                                 f"scaling={layer.scaling:g}. Use the same method.r and method.alpha")
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)


# --------------------------------------------------------------------------------------------------------------
# peft interoperability
# --------------------------------------------------------------------------------------------------------------


def export(handle: MethodHandle, out_dir: Path, base_model_id: str = "") -> Path:
    """Write the adapter in peft's format (adapter_config.json + adapter_model.safetensors).

    peft stores lora_A / lora_B under ``base_model.model.<module>.lora_{A,B}.weight`` and applies the same
    scaling α/r (or α/√r with use_rslora), so ``PeftModel.from_pretrained`` gives the same logits.
    """
    cfg: Config = handle.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in handle.layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach().float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().float().contiguous()
    any_conv1d = any(layer.fan_in_fan_out for layer in handle.layers.values())
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_id,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": sorted(handle.layers),
        "fan_in_fan_out": any_conv1d,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    from tunelab.files import atomic_write_bytes, atomic_write_text

    atomic_write_text(out_dir / "adapter_config.json", json.dumps(peft_config, indent=2))
    atomic_write_bytes(out_dir / "adapter_model.safetensors", _safetensors_bytes(tensors))
    return out_dir


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)

