"""DiReFT: direct ReFT, LoReFT without the orthogonality and the difference (Wu et al., 2024, §3.3,
https://arxiv.org/abs/2404.03592).

    Φ(h) = h + W₂ᵀ a(W₁ h + b),   W₁, W₂ ∈ ℝ^{r×d} (unconstrained), b ∈ ℝ^r

applied like LoReFT (residual stream after the chosen decoder layers, first n / last m prompt tokens); 2rd + r
parameters per intervention. W₂ starts with orthonormal rows as in pyreft; pyreft 0.1.0's ``DireftIntervention``
keeps W₂ orthogonally parametrised during training, its ``NodireftIntervention`` does not — this module follows the
paper's equation (no constraint). Machinery: ``tunelab.methods.reft``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from tunelab.methods.contract import Capabilities
from tunelab.methods.core import MethodHandle
from tunelab.methods.reft import ReftConfig, apply_reft, count_reft

DESCRIPTION = "DiReFT: h + W₂ᵀ(W₁h + b) at the first/last prompt positions of chosen layers (no orthogonality)"
PAPER = ("Wu et al., 2024, ReFT: Representation Finetuning for Language Models, https://arxiv.org/abs/2404.03592")


CAPABILITIES = Capabilities()
@dataclass(frozen=True)
class Config(ReftConfig):
    """r, layers, positions, tied, dropout, activation: see tunelab.methods.reft."""

    method: ClassVar[str] = "direft"
    orthogonal: ClassVar[bool] = False


def apply(model: nn.Module, config: Config, *, tokenizer: Any = None) -> MethodHandle:
    """Freeze the model and add a DiReFT intervention per chosen layer (and span, when untied)."""
    return apply_reft(model, config)


def num_parameters(model: nn.Module, config: Config) -> int:
    """Closed form: (2rd + r) × layers × (1 tied, 2 untied with both spans)."""
    return count_reft(model, config)
