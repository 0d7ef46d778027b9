"""The bottleneck block shared by series and parallel adapters, and how they are placed.

    δ(x) = s · ( W_up · f( W_down · drop(x) + b_down ) + b_up )

    W_down ∈ ℝ^{b×d_in}, b_down ∈ ℝ^b, W_up ∈ ℝ^{d_out×b}, b_up ∈ ℝ^{d_out},  f ∈ {relu, gelu, silu, tanh},  s: scaling

Trainable parameters per adapter: b·d_in + b·d_out, plus b + d_out with ``bias`` (Houlsby et al. 2019, He et al.
2022 use biases; LLM-Adapters, Hu et al. 2023, uses none).

Initialisation:
- ``zero`` (default): W_down Kaiming-uniform (nn.Linear's init; LLM-Adapters' and He et al.'s "mam_adapter"),
  b_down = 0, W_up = 0, b_up = 0, so δ ≡ 0 and the model is exactly unchanged at initialisation.
- ``normal``: W_down, W_up ~ N(0, 0.02²), biases 0 — LLM-Adapters' default ("bert") init for both projections. The
  adapter changes the output from the first step.

The dropout acts on the adapter's input (as in LLM-Adapters), so the base path never sees it. The adapter keeps its
weights in their own dtype (fp32 after ``upcast_trainable``) and returns δ in the dtype of the tensor it is added to.

Placement: ``targets`` is a placement alias, a list of module names/suffixes, or a regex on full module names:
``mlp`` → ``[mlp]``; ``attention`` → ``[self_attn, attn, attention, self_attention]`` (Llama/Mistral/Qwen/Phi use
``self_attn``, GPT-2 ``attn``, GPT-NeoX ``attention``, Falcon/Bloom ``self_attention``); ``both`` → each of the two,
and each must match something. The width an adapter sees is read from the wrapped module when it is a linear layer
(in_features / out_features) and from the model config (``hidden_size``) otherwise — an MLP or attention block maps
the residual stream to itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.core import (
    MethodError,
    MethodHandle,
    find_targets,
    freeze,
    is_linear,
    linear_shape,
    param_dtype_device,
    replace_modules,
)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
}
NORMAL_STD = 0.02  # LLM-Adapters' "bert" init
ATTENTION_NAMES = ["self_attn", "attn", "attention", "self_attention"]
PLACEMENTS: dict[str, list[list[str]]] = {
    "mlp": [["mlp"]],
    "attention": [ATTENTION_NAMES],
    "both": [ATTENTION_NAMES, ["mlp"]],
}
NO_MERGE = "a nonlinear bottleneck f(·) cannot be folded into the base weights; disable() or remove() it instead"


@dataclass(frozen=True)
class AdapterConfig:
    """Options shared by series and parallel adapters (each method's ``Config`` subclasses this)."""

    bottleneck: int = 64
    activation: Literal["relu", "gelu", "silu", "tanh"] = "tanh"
    scaling: float = 1.0
    dropout: float = 0.0
    init: Literal["zero", "normal"] = "zero"
    bias: bool = True
    targets: str | list[str] = "mlp"  # mlp | attention | both | [names or suffixes] | a regex on full names

    method: ClassVar[str] = "adapter"

    def __post_init__(self) -> None:
        _validate(self.method, self.bottleneck, self.activation, self.scaling, self.dropout, self.init, self.targets)


def _validate(method: str, bottleneck: int, activation: str, scaling: float, dropout: float, init: str,
              targets: Any) -> None:
    """Raise ConfigError naming the option, the value received and what would work."""
    if bottleneck < 1:
        raise ConfigError(f"{method}: bottleneck must be at least 1, got {bottleneck}")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{method}: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if init not in ("zero", "normal"):
        raise ConfigError(f"{method}: init {init!r} is not 'zero' (identity at init) or 'normal' (N(0, 0.02))")
    if not math.isfinite(scaling) or scaling == 0:
        raise ConfigError(f"{method}: scaling must be a finite non-zero number, got {scaling} "
                          f"(s = 0 switches the adapter off and it would never train)")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{method}: dropout must be in [0, 1), got {dropout}")
    if isinstance(targets, str):
        if not targets:
            raise ConfigError(f"{method}: targets is empty; use one of {', '.join(PLACEMENTS)}, a list or a regex")
    elif not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"{method}: targets must be a non-empty list of module names/suffixes, got {targets!r}")


class Bottleneck(nn.Module):
    """δ(x) = s · (W_up f(W_down drop(x) + b_down) + b_up); see the module docstring for init and shapes."""

    def __init__(self, d_in: int, d_out: int, size: int, *, activation: str = "tanh", scaling: float = 1.0,
                 dropout: float = 0.0, init: str = "zero", bias: bool = True, device: Any = None) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, size, bias=bias, device=device)
        self.up = nn.Linear(size, d_out, bias=bias, device=device)
        self.activation, self.scaling = activation, scaling
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        if init == "normal":
            nn.init.normal_(self.down.weight, std=NORMAL_STD)
            nn.init.normal_(self.up.weight, std=NORMAL_STD)
        else:  # "zero": nn.Linear already drew W_down Kaiming-uniform
            nn.init.zeros_(self.up.weight)
        for layer in (self.down, self.up):
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """δ(x), in the dtype of ``like`` (the tensor it will be added to; default x)."""
        out_dtype = (x if like is None else like).dtype
        if not torch.is_autocast_enabled(x.device.type):  # bf16 base, fp32 adapter: compute in the adapter's dtype
            x = x.to(self.down.weight.dtype)
        h = self.up(self.act(self.down(self.dropout(x))))
        return (h * self.scaling).to(out_dtype)

    def extra_repr(self) -> str:
        return f"activation={self.activation}, scaling={self.scaling:g}"


def num_bottleneck_parameters(d_in: int, d_out: int, size: int, bias: bool) -> int:
    """b·d_in + b·d_out (+ b + d_out with biases)."""
    return size * (d_in + d_out) + ((size + d_out) if bias else 0)


# --------------------------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------------------------


def _is_placeable(module: nn.Module) -> bool:
    """Modules an adapter can sit after or beside: anything with weights but containers and embeddings."""
    if isinstance(module, nn.ModuleList | nn.ModuleDict | nn.Embedding):
        return False
    return any(True for _ in module.parameters())


def find_placements(model: nn.Module, targets: str | Sequence[str], method: str) -> list[str]:
    """Module names for ``targets`` (alias, list of names/suffixes, or regex); refuses nested targets."""
    alias = isinstance(targets, str) and targets in PLACEMENTS  # alternatives across architectures: any may match
    groups = PLACEMENTS[targets] if alias else [targets] if isinstance(targets, str) else [list(targets)]
    names: list[str] = []
    for group in groups:
        names += [n for n in find_targets(model, group, predicate=_is_placeable, kind="module", each=not alias)
                  if n not in names]
    for outer in names:
        inner = [n for n in names if n.startswith(outer + ".")]
        if inner:
            raise MethodError(f"{method}: target {outer} contains other targets ({', '.join(inner[:3])}); an adapter "
                              f"goes after/beside a module or inside it, not both — narrow 'targets'")
    return names


def hidden_size(model: nn.Module, method: str) -> int:
    """The residual-stream width d from the model config."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "hidden_size", None)
    if not isinstance(size, int):
        raise MethodError(f"{method}: cannot read hidden_size from the config of {type(model).__name__}; target "
                          f"linear layers (their widths are read from the layer) instead")
    return size


def adapter_dims(model: nn.Module, name: str, method: str, side: Literal["input", "output"]) -> tuple[int, int]:
    """(d_in, d_out) of the adapter at module ``name``.

    Beside a linear (parallel): (in_features, out_features); after a linear (series): (out_features, out_features);
    any other module (an MLP or attention block): (d, d) with d = config.hidden_size.
    """
    module = model.get_submodule(name)
    if is_linear(module):
        d_in, d_out = linear_shape(module)
        return (d_in, d_out) if side == "input" else (d_out, d_out)
    d = hidden_size(model, method)
    return d, d


def placements(model: nn.Module, config: AdapterConfig, side: Literal["input", "output"]) -> dict[str, tuple[int, int]]:
    """Target module name -> (d_in, d_out) of its adapter."""
    names = find_placements(model, config.targets, config.method)
    return {n: adapter_dims(model, n, config.method, side) for n in names}


def inject(model: nn.Module, config: AdapterConfig, wrapper: Callable[[nn.Module, Bottleneck, str], nn.Module],
           side: Literal["input", "output"]) -> MethodHandle:
    """Freeze the model and replace each target module with ``wrapper(module, Bottleneck(...), name)``."""
    dims = placements(model, config, side)

    def wrap(name: str, module: nn.Module) -> nn.Module:
        adapter = Bottleneck(*dims[name], config.bottleneck, activation=config.activation, scaling=config.scaling,
                             dropout=config.dropout, init=config.init, bias=config.bias,
                             device=param_dtype_device(module)[1])
        return wrapper(module, adapter, name)

    freeze(model)
    layers = replace_modules(model, dims, wrap)
    return MethodHandle(name=config.method, model=model, config=config, layers=layers, merge_note=NO_MERGE)


def count(model: nn.Module, config: AdapterConfig, side: Literal["input", "output"]) -> int:
    """Closed form: Σ_targets b·(d_in + d_out) + (b + d_out)·[bias]."""
    return sum(num_bottleneck_parameters(a, b, config.bottleneck, config.bias)
               for a, b in placements(model, config, side).values())


# --------------------------------------------------------------------------------------------------------------
# Module outputs and inputs: tensors, or tuples whose first element is the hidden state
# --------------------------------------------------------------------------------------------------------------


def map_first(output: Any, fn: Callable[[torch.Tensor], torch.Tensor], where: str) -> Any:
    """Apply ``fn`` to the hidden state of a module's output: the tensor itself, or a tuple's first element."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]), *output[1:])
    raise MethodError(f"{where} returned {type(output).__name__}; an adapter needs a tensor or a tuple whose first "
                      f"element is the hidden state — target the block's sublayers (mlp, attention or a linear)")


def first_input(args: tuple, kwargs: dict[str, Any], where: str) -> torch.Tensor:
    """The hidden-state input of a module call: the first positional argument, or ``hidden_states=``."""
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x", kwargs.get("input")))
    if not isinstance(x, torch.Tensor):
        raise MethodError(f"{where} was called without a hidden-state tensor (positional or hidden_states=); "
                          f"got keyword arguments {sorted(kwargs)}")
    return x


def check_width(h: torch.Tensor, expected: int, where: str) -> None:
    if h.shape[-1] != expected:
        raise MethodError(f"{where}: the adapter expects width {expected} but the hidden state has width "
                          f"{h.shape[-1]}; target modules that map the residual stream (mlp, attention) or linears")
