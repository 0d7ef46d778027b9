"""LoReFT: low-rank linear subspace ReFT (Wu et al., 2024, https://arxiv.org/abs/2404.03592, eq. 2).

    Φ(h) = h + Rᵀ(a(W h + b) − R h),   R ∈ ℝ^{r×d} with orthonormal rows, W ∈ ℝ^{r×d}, b ∈ ℝ^r

applied to the residual stream after the chosen decoder layers at the first n and last m prompt tokens of each
example; 2rd + r parameters per intervention. The machinery (positions, hooks, the cheap orthonormal
parametrisation of R) is in ``tunelab.methods.reft``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from tunelab.methods.contract import Capabilities
from tunelab.methods.core import MethodHandle
from tunelab.methods.reft import ReftConfig, apply_reft, count_reft

DESCRIPTION = "LoReFT: h + Rᵀ(Wh + b − Rh) at the first/last prompt positions of chosen layers (R orthonormal)"
PAPER = ("Wu et al., 2024, ReFT: Representation Finetuning for Language Models, https://arxiv.org/abs/2404.03592")


CAPABILITIES = Capabilities()
@dataclass(frozen=True)
class Config(ReftConfig):
    """r, layers, positions, tied, dropout, activation: see tunelab.methods.reft."""

    method: ClassVar[str] = "loreft"
    orthogonal: ClassVar[bool] = True


def apply(model: nn.Module, config: Config, *, tokenizer: Any = None) -> MethodHandle:
    """Freeze the model and add a LoReFT intervention per chosen layer (and span, when untied)."""
    return apply_reft(model, config)


def num_parameters(model: nn.Module, config: Config) -> int:
    """Closed form: (2rd + r) × layers × (1 tied, 2 untied with both spans)."""
    return count_reft(model, config)
