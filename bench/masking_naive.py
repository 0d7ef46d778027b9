"""The dense "naive" random masking of the authors' code (PEFT/random_masking_naive.py of Xu & Zhang, 2024), as a
method for tunelab's loop, for the benchmark only (registered at run time by ``masking_throughput.py``).

    y = W₀ x + b + (M ⊙ Δ) x,   Δ ∈ ℝ^{d_out×d_in} a dense trainable tensor (fp32), M a dense Bernoulli mask (bool)

Every masked weight carries a full-size Δ, its full-size gradient and AdamW's two full-size moments: what
``tunelab.methods.masking`` avoids. The mask density equals that of random-mask's model budget (proportional
spread): f·N / Σ n_i on every target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.methods.core import (
    ALL_LINEAR,
    MethodHandle,
    count_parameters,
    find_targets,
    freeze,
    linear_shape,
    replace_modules,
)

DESCRIPTION = "benchmark only: dense Δ and mask (the authors' naive random masking)"
PAPER = "Xu & Zhang, 2024, https://arxiv.org/abs/2405.02596 (PEFT/random_masking_naive.py)"


@dataclass(frozen=True)
class Config:
    fraction: float = 1e-4
    targets: str | list[str] = ALL_LINEAR
    seed: int = 0


class NaiveMaskedLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, density: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base_layer = base_layer
        d_in, d_out = linear_shape(base_layer)
        self.register_buffer("mask", torch.rand(d_out, d_in, generator=generator) < density)
        self.tunable_weight = nn.Parameter(torch.zeros(d_out, d_in))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + F.linear(x, self.tunable_weight * self.mask)

    def unwrap(self) -> nn.Module:
        return self.base_layer


def apply(model: nn.Module, config: Config) -> MethodHandle:
    names = find_targets(model, config.targets)
    sizes = [linear_shape(model.get_submodule(n))[0] * linear_shape(model.get_submodule(n))[1] for n in names]
    density = config.fraction * count_parameters(model) / sum(sizes)
    freeze(model)
    gen = torch.Generator().manual_seed(config.seed)
    layers = replace_modules(model, names, lambda _n, m: NaiveMaskedLinear(m, density, gen))
    return MethodHandle(name="random-mask-naive", model=model, config=config, layers=layers,
                        merge_note="benchmark-only method")


def num_parameters(model: nn.Module, config: Config) -> int:
    """Dense: every entry of Δ is a parameter (the masked-out ones get zero gradients)."""
    return sum(a * b for a, b in (linear_shape(model.get_submodule(n)) for n in find_targets(model, config.targets)))
