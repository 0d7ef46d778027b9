"""Parallel (bottleneck) adapters beside a module (He et al., 2022; LLM-Adapters, Hu et al., 2023).

    y = module(x) + δ(x),   δ(x) = s · (W_up f(W_down drop(x) + b_down) + b_up)      (tunelab.methods.bottleneck)

where x is the module's hidden-state input (first positional argument or ``hidden_states=``) and y its output (a
tuple's first element when the module returns a tuple; the rest passes through). Default placement: beside the MLP
(He et al.'s best placement, the FFN); ``attention`` beside the attention block, ``both`` beside each, or named
linears as LLM-Adapters does (Llama ``[v_proj, down_proj]``; ``[q_proj, v_proj]`` / GPT-2 ``[c_attn]``). With
``init: zero`` the model is exactly unchanged at initialisation.

Trainable parameters: Σ over targets of b·(d_in + d_out) (+ b + d_out with bias); beside a linear d_in/d_out are its
in/out features, beside a block both are config.hidden_size. Not mergeable: f is nonlinear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from tunelab.methods import bottleneck as bn
from tunelab.methods.contract import Capabilities
from tunelab.methods.core import MethodHandle

DESCRIPTION = "Parallel adapter: module(x) + s·up(f(down(x))) beside the MLP or named linears (not mergeable)"
PAPER = ("He et al., 2022, Towards a Unified View of Parameter-Efficient Transfer Learning, "
         "https://arxiv.org/abs/2110.04366; Hu et al., 2023, LLM-Adapters, https://arxiv.org/abs/2304.01933")


CAPABILITIES = Capabilities()
@dataclass(frozen=True)
class Config(bn.AdapterConfig):
    """bottleneck, activation, scaling, dropout, init, bias, targets: see tunelab.methods.bottleneck."""

    method: ClassVar[str] = "parallel"


class ParallelAdapter(nn.Module):
    """Wraps a module (``base_layer``) and adds δ(x) of its input x to its output."""

    def __init__(self, base_layer: nn.Module, adapter: bn.Bottleneck, name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.enabled = True
        self._where = f"parallel adapter beside {name or type(base_layer).__name__}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if not self.enabled:
            return out
        x = bn.first_input(args, kwargs, self._where)
        bn.check_width(x, self.adapter.down.in_features, self._where)

        def add(y):
            return y + self.adapter(x, like=y)

        return bn.map_first(out, add, self._where)

    def unwrap(self) -> nn.Module:
        return self.base_layer


def apply(model: nn.Module, config: Config, *, tokenizer: Any = None) -> MethodHandle:
    """Freeze the model and wrap every target module with a ParallelAdapter."""
    return bn.inject(model, config, ParallelAdapter, side="input")


def num_parameters(model: nn.Module, config: Config) -> int:
    """Closed form: Σ_targets b·(d_in + d_out) + (b + d_out)·[bias]."""
    return bn.count(model, config, side="input")
