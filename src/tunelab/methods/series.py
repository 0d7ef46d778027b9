"""Series (bottleneck) adapters after a sublayer's output (Houlsby et al., 2019; Pfeiffer et al., 2021).

    h ← h + δ(h),   δ(h) = s · (W_up f(W_down drop(h) + b_down) + b_up)      (tunelab.methods.bottleneck)

where h is the output of each targeted module (for a module returning a tuple, such as an attention block
returning (output, weights), h is its first element and the rest passes through). Default placement: after the MLP,
the best single placement in LLM-Adapters (Hu et al., 2023); ``attention`` puts it after the attention output (before
the residual add) and ``both`` after each (Houlsby's original placement). With ``init: zero`` W_up = b_up = 0 and the
model is exactly unchanged at initialisation.

Trainable parameters: Σ over targets of b·2d (+ b + d with bias), d = config.hidden_size for blocks and
out_features for a linear target. Not mergeable: f is nonlinear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tunelab.methods import bottleneck as bn
from tunelab.methods.contract import Capabilities
from tunelab.methods.core import MethodHandle

DESCRIPTION = "Series adapter: h + s·up(f(down(h))) after the MLP / attention output (not mergeable)"
PAPER = ("Houlsby et al., 2019, Parameter-Efficient Transfer Learning for NLP, https://arxiv.org/abs/1902.00751; "
         "Pfeiffer et al., 2021, AdapterFusion, https://arxiv.org/abs/2005.00247; "
         "Hu et al., 2023, LLM-Adapters, https://arxiv.org/abs/2304.01933")


CAPABILITIES = Capabilities()
@dataclass(frozen=True)
class Config(bn.AdapterConfig):
    """bottleneck, activation, scaling, dropout, init, bias, targets: see tunelab.methods.bottleneck."""

    method: ClassVar[str] = "series"


class SeriesAdapter(nn.Module):
    """Wraps a module (``base_layer``) and adds δ(h) to its output h."""

    def __init__(self, base_layer: nn.Module, adapter: bn.Bottleneck, name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.enabled = True
        self._where = f"series adapter after {name or type(base_layer).__name__}"

    def _add(self, h: torch.Tensor) -> torch.Tensor:
        bn.check_width(h, self.adapter.down.in_features, self._where)
        return h + self.adapter(h)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if not self.enabled:
            return out
        return bn.map_first(out, self._add, self._where)

    def unwrap(self) -> nn.Module:
        return self.base_layer


def apply(model: nn.Module, config: Config, *, tokenizer: Any = None) -> MethodHandle:
    """Freeze the model and wrap every target module with a SeriesAdapter."""
    return bn.inject(model, config, SeriesAdapter, side="output")


def num_parameters(model: nn.Module, config: Config) -> int:
    """Closed form: Σ_targets b·(d_in + d_out) + (b + d_out)·[bias], d_in = d_out = d."""
    return bn.count(model, config, side="output")
