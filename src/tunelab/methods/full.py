"""Full-model fine-tuning: every weight (or the weights of chosen modules) is trained.

    W ← W − η · AdamW(∇_W L)   for all W in the selected modules

Trainable weights are kept in fp32 (with bf16 autocast for the matmuls); the rest stay in the load dtype.
There is no separate adapter: the tuned weights are the model, so merge and disable do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from tunelab.methods.contract import Capabilities
from tunelab.methods.core import MethodHandle, count_parameters, find_targets, freeze

DESCRIPTION = "Full fine-tuning of all weights (or of the modules matched by 'targets')"
PAPER = "Standard full-model fine-tuning (FMT in Zhang et al., ICLR 2024, https://arxiv.org/abs/2402.17193)"
CAPABILITIES = Capabilities(trains_base_weights=True)
NO_MERGE = "full tuning writes into the base weights; there is no separate adapter to merge or disable"


@dataclass(frozen=True)
class Config:
    targets: str | list[str] = "all"  # "all", a regex on module names, or a list of module names/suffixes


def _selected(model: nn.Module, config: Config) -> list[nn.Module]:
    if config.targets == "all":
        return [model]
    names = find_targets(model, config.targets, predicate=lambda m: any(True for _ in m.parameters(recurse=False)),
                         kind="parameterised")
    return [model.get_submodule(n) for n in names]


def apply(model: nn.Module, config: Config, *, tokenizer: Any = None) -> MethodHandle:
    """Unfreeze the selected modules' parameters (all of them by default)."""
    freeze(model)
    for module in _selected(model, config):
        for p in module.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    return MethodHandle(name="full", model=model, config=config, merge_note=NO_MERGE)


def num_parameters(model: nn.Module, config: Config) -> int:
    """Closed form: the unique parameters of the selected modules (tied weights once)."""
    if config.targets == "all":
        return count_parameters(model)
    seen, total = set(), 0
    for module in _selected(model, config):
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total
