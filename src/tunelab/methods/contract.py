"""The contract every method module keeps, typed: what central code (the trainer, the run loader, quantization, the
CLI, the scaling analysis) may ask of a method — and all it may ask. Central code reads ``CAPABILITIES``; it never
tests a method's name or probes its attributes.

A method module provides:

* ``Config`` — a frozen dataclass of the method's options, validated in ``__post_init__``;
* ``apply(model, config, *, tokenizer=None) -> MethodHandle`` — inject the method (the caller passes the model's
  tokenizer; methods that need one, e.g. prompt tuning's ``init: text``, say so when it is missing);
* ``num_parameters(model, config) -> int`` — the closed form of its trainable-parameter count;
* ``DESCRIPTION``, ``PAPER`` and ``CAPABILITIES`` (below);
* ``export(handle, out_dir, base_model_id) -> Path`` when ``CAPABILITIES.exports`` names a peer format;
* ``low_rank(config) -> LowRank`` and ``init_low_rank(handle, factors, made_for)`` when
  ``CAPABILITIES.loftq_init`` (LoftQ computes low-rank factors for the method's rank and scaling, and the method
  copies them into its layers).

``tests/test_method_contract.py`` checks every registered module against this, and the invariants matrix checks
that the flags tell the truth (a mergeable method merges, a method that trains the base weights leaves them
trainable, …).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from tunelab.methods.core import MethodHandle


@dataclass(frozen=True)
class Capabilities:
    """What a method is, for the code that drives it."""

    trains_base_weights: bool = False  # it updates the model's own weights (full tuning): a quantized base cannot
    mergeable: bool = False  # its update folds into the base weights (merge / merge_and_unload)
    loftq_init: bool = False  # it can start from LoftQ's low-rank factors (it provides low_rank / init_low_rank)
    exports: tuple[str, ...] = ()  # peer formats its ``export`` writes next to every run (e.g. "peft")
    fsdp: bool = True  # it trains under train.distributed: fsdp (its compute stays inside the model's forward)
    activation_checkpointing: bool = True  # it trains with train.activation_checkpointing (its state survives a
    # block's recomputation)


@dataclass(frozen=True)
class LowRank:
    """The low-rank update LoftQ initialises: rank, scaling and the layers it wraps."""

    r: int
    alpha: float
    rslora: bool
    scaling: float  # the factor the update B·A is multiplied by (α/r, or α/√r with rsLoRA)
    targets: str | Sequence[str]

    def info(self) -> dict[str, Any]:
        """What a quantized base records about the update its factors were computed for."""
        return {"r": self.r, "alpha": self.alpha, "rslora": self.rslora, "scaling": self.scaling}


@runtime_checkable
class MethodModule(Protocol):
    """A module of ``tunelab.methods.REGISTRY`` (see the module docstring)."""

    Config: type
    DESCRIPTION: str
    PAPER: str
    CAPABILITIES: Capabilities

    def apply(self, model: nn.Module, config: Any, *, tokenizer: Any = None) -> MethodHandle: ...

    def num_parameters(self, model: nn.Module, config: Any) -> int: ...


@runtime_checkable
class Exporter(Protocol):
    """A method with ``CAPABILITIES.exports``."""

    def export(self, handle: MethodHandle, out_dir: Path, base_model_id: str = "") -> Path: ...


@runtime_checkable
class LowRankInit(Protocol):
    """A method with ``CAPABILITIES.loftq_init``."""

    def low_rank(self, config: Any) -> LowRank: ...

    def init_low_rank(self, handle: MethodHandle, factors: dict[str, Any], made_for: dict[str, Any]) -> None: ...
