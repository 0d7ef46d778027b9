"""Random masking: sparse fine-tuning of a fixed random subset of weight entries.

Xu & Zhang, ICML 2024, "Random Masking Finds Winning Tickets for Parameter Efficient Fine-tuning",
https://arxiv.org/abs/2405.02596. For every targeted linear layer with frozen weight W₀ ∈ ℝ^{d_out×d_in}:

    W = W₀ + M ⊙ Δ,    M ∈ {0, 1}^{d_out×d_in} a fixed random mask with k ones,   y = x Wᵀ + b

Only the k selected entries exist: a flat index vector I (I_j = r_j·d_in + c_j, sorted, drawn once from the seed)
and a value vector v ∈ ℝ^k (fp32, starts at 0, so the model is unchanged at initialisation). Nothing of size
d_out×d_in is created for the method: no dense Δ, mask, gradient or optimizer state.

    forward      y = x (W₀ + Σ_j v_j e_{r_j} e_{c_j}ᵀ)ᵀ + b   — the k entries are written into W₀ for the one matmul
                 and their original values restored bitwise right after (k numbers saved and written back)
    ∂L/∂v_j    = Σ_t g[t, r_j] · x[t, c_j]                    — gathered products, in chunks of tokens × entries
    ∂L/∂x      = g (W₀ + M ⊙ Δ)                                — the same in-place patch around the matmul

Budget: ``fraction`` of the whole model's parameters (the paper's convention; ``budget: model``), k = ⌊f·N + ½⌋
entries in all, spread over the targeted matrices in proportion to their size (every targeted matrix gets the same
density, as in the authors' code) or in equal counts (``spread: equal``); or ``budget: matrix``: each matrix keeps
k_i = ⌊f·n_i + ½⌋ of its n_i entries. Merging writes W₀[I] + v into the weight (computed in fp32); unmerge writes
the k saved original values back, so it is exact in every dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.contract import Capabilities
from tunelab.methods.core import (
    ALL_LINEAR,
    MethodError,
    MethodHandle,
    count_parameters,
    find_targets,
    freeze,
    linear_shape,
    replace_modules,
)

DESCRIPTION = "Random masking: W₀ + M⊙Δ on a fixed random subset of weight entries (sparse, mergeable)"
PAPER = ("Xu & Zhang, 2024, Random Masking Finds Winning Tickets for Parameter Efficient Fine-tuning (ICML), "
         "https://arxiv.org/abs/2405.02596")

CAPABILITIES = Capabilities(mergeable=True)
CHUNK_ELEMENTS = 1 << 22  # largest tokens × entries temporary of the value gradient (16 MiB in fp32)
FUSED_MIN_WORK = 1 << 14  # tokens × entries from which the value gradient uses the compiled (fused) kernel


@dataclass(frozen=True)
class Config:
    fraction: float = 1e-4  # trainable entries: of the whole model's parameters (budget: model) or of each matrix
    budget: Literal["model", "matrix"] = "model"
    spread: Literal["proportional", "equal"] = "proportional"  # budget: model only
    targets: str | list[str] = ALL_LINEAR
    seed: int = 0
    fused_gradient: bool = True  # value gradient by a torch.compile'd gather-multiply-sum (eager chunks if off)

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"random-mask: fraction must be in (0, 1] (1.0e-4 = 0.01% trainable), got {self.fraction}")


# --------------------------------------------------------------------------------------------------------------
# Budget and sampling
# --------------------------------------------------------------------------------------------------------------


def _round(x: float) -> int:
    return int(x + 0.5)


def allocate(sizes: list[int], config: Config, model_params: int) -> list[int]:
    """Entries per target matrix (sizes n_i = d_out·d_in).

    ``budget: matrix``: k_i = ⌊f·n_i + ½⌋. ``budget: model``: K = ⌊f·N + ½⌋ with N the model's parameter count,
    split by largest remainder in proportion to n_i (``proportional``) or equally (``equal``), so Σ k_i = K.
    """
    if config.budget == "matrix":
        return [_round(config.fraction * n) for n in sizes]
    total = _round(config.fraction * model_params)
    weights = sizes if config.spread == "proportional" else [1] * len(sizes)
    denom = sum(weights)
    base = [total * w // denom for w in weights]
    order = sorted(range(len(sizes)), key=lambda i: (-(total * weights[i] % denom), i))
    for i in order[: total - sum(base)]:
        base[i] += 1
    return base


def matrix_seed(seed: int, name: str) -> int:
    """A matrix's own seed from the run seed and its module name (its mask does not depend on the other targets)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_indices(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct integers drawn uniformly from [0, n), sorted (int64); memory O(k), never O(n) while k ≤ n/2.

    Draws with replacement and drops duplicates until k distinct values are found, then keeps a uniformly random
    k of them: the set is exchangeable at every step, so the result is a uniform k-subset. Above n/2 (where
    rejection would be slow) a permutation of n is drawn; the k values then take O(n) memory anyway.
    """
    if k > n // 2:
        return torch.randperm(n, generator=generator)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        need = k - chosen.numel()
        draw = torch.randint(0, n, (need + need // 4 + 16,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))
    if chosen.numel() > k:
        chosen = chosen[torch.randperm(chosen.numel(), generator=generator)[:k]].sort().values
    return chosen


# --------------------------------------------------------------------------------------------------------------
# The numerics: patched matmul and the gradient of the selected entries
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def patched(weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> Iterator[torch.Tensor]:
    """W[flat] ← W[flat] + v (added in fp32, stored in W's dtype) for the duration of the block, then the k
    original entries are written back bitwise. Works on ``weight.data`` so autograd's version counters of other
    users of W are untouched (the data they see is identical before and after)."""
    w = weight.data.view(-1)
    original = w[flat]
    w[flat] = (original.float() + values.detach().float()).to(w.dtype)
    try:
        yield weight
    finally:
        w[flat] = original


def entry_gradient(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   chunk_elements: int = CHUNK_ELEMENTS, fused: bool = False) -> torch.Tensor:
    """∂L/∂v_j = Σ_t g[t, r_j] · x[t, c_j] in fp32, for g [T, d_out] and x [T, d_in] (no d_out×d_in product).

    ``fused``: one compiled kernel (``torch.compile``) gathers, multiplies and sums without any T × k temporary;
    2-3× faster than the eager path at 0.1% density on this CPU (bench/masking_throughput.py). It is used when
    the work (T × k) is at least ``FUSED_MIN_WORK`` and torch.compile works here; otherwise (and as the reference)
    rows of the transposed g and x are gathered in chunks so that a temporary never exceeds ``chunk_elements``
    (T × entries) elements.
    """
    if fused and grad_out.shape[0] * rows.numel() >= FUSED_MIN_WORK:
        kernel = _fused_kernel()
        if kernel is not None:
            return kernel(grad_out, x, rows, cols)
    g_t, x_t = grad_out.t().contiguous(), x.t().contiguous()
    step = max(1, chunk_elements // max(1, g_t.shape[1]))
    parts = []
    for s in range(0, rows.numel(), step):
        a = g_t.index_select(0, rows[s: s + step]).float()
        b = x_t.index_select(0, cols[s: s + step]).float()
        parts.append((a * b).sum(1))
    return torch.cat(parts) if parts else grad_out.new_zeros(0, dtype=torch.float32)


def _gather_dot(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return (g[:, rows].float() * x[:, cols].float()).sum(0)


def _fused_kernel() -> Any:
    """The compiled ``_gather_dot`` (dynamic shapes: one compilation serves every matrix), or None when
    torch.compile cannot build it here: then the eager path is used (one warning says why)."""
    from tunelab.train.fused import compiled_or_none

    probe = torch.arange(6, dtype=torch.float32).view(2, 3)
    idx = torch.tensor([0, 2])
    return compiled_or_none(_gather_dot, (probe, probe, idx, idx),
                            "random-mask value gradient (method.fused_gradient: false skips it)")


class _MaskedLinearFn(torch.autograd.Function):
    """y = x (W₀ + M⊙Δ)ᵀ + b with W₀ frozen; gradients for x and the k values only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, layer: MaskedLinear) -> torch.Tensor:
        with patched(layer.base_layer.weight, layer.weight_index(), values):
            y = F.linear(x, layer.linear_weight(), layer.base_layer.bias)
        ctx.layer = layer
        ctx.save_for_backward(x, values)
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, values = ctx.saved_tensors
        layer: MaskedLinear = ctx.layer
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            with patched(layer.base_layer.weight, layer.weight_index(), values):
                w = layer.linear_weight()
                grad_x = (g @ w.to(g.dtype)).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            rows, cols = layer.rows_cols()
            grad_v = entry_gradient(g, x.reshape(-1, x.shape[-1]), rows, cols,
                                    fused=layer.fused_gradient).to(values.dtype)
        return grad_x, grad_v, None


# --------------------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------------------


class MaskedLinear(nn.Module):
    """Wraps a frozen linear layer (``base_layer``); trains k entries of its weight (``values`` at ``indices``).

    ``indices`` are flat positions r·d_in + c in the [d_out, d_in] layout of nn.Linear, whatever the storage of the
    wrapped layer (GPT-2's Conv1D stores [d_in, d_out]); they are a persistent buffer, saved with the values.
    """

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, fused_gradient: bool = True) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fused_gradient = fused_gradient
        self.d_in, self.d_out = linear_shape(base_layer)
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        device = base_layer.weight.device
        self.register_buffer("indices", indices.to(device=device, dtype=torch.int64))
        self.values = nn.Parameter(torch.zeros(indices.numel(), device=device))
        self.enabled = True
        self.merged = False
        self._original: torch.Tensor | None = None  # the k entries of W₀ while merged

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices // self.d_in, self.indices % self.d_in

    def weight_index(self) -> torch.Tensor:
        """Flat positions of the k entries in the wrapped layer's own weight storage."""
        if not self.fan_in_fan_out:
            return self.indices
        rows, cols = self.rows_cols()
        return cols * self.d_out + rows

    def linear_weight(self) -> torch.Tensor:
        """The base weight as F.linear wants it ([d_out, d_in]; a view for Conv1D)."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return self.base_layer(x)
        return _MaskedLinearFn.apply(x, self.values, self)

    @torch.no_grad()
    def merge(self) -> None:
        """W₀[I] ← W₀[I] + v (fp32 sum stored in W's dtype); the k original entries are kept for unmerge."""
        if not self.merged:
            w = self.base_layer.weight.data.view(-1)
            flat = self.weight_index()
            self._original = w[flat].clone()
            w[flat] = (self._original.float() + self.values.float()).to(w.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Write the k original entries back: exact in any dtype."""
        if self.merged:
            assert self._original is not None
            self.base_layer.weight.data.view(-1)[self.weight_index()] = self._original
            self._original = None
            self.merged = False

    def unwrap(self) -> nn.Module:
        return self.base_layer

    def extra_repr(self) -> str:
        n = self.d_in * self.d_out
        return f"entries={self.indices.numel()} of {n} ({100 * self.indices.numel() / n:.4g}%)"


# --------------------------------------------------------------------------------------------------------------
# apply / count
# --------------------------------------------------------------------------------------------------------------


def plan(model: nn.Module, config: Config) -> dict[str, int]:
    """Target module name -> number of trainable entries (checks that every target gets at least one)."""
    names = find_targets(model, config.targets)
    sizes = [linear_shape(model.get_submodule(n))[0] * linear_shape(model.get_submodule(n))[1] for n in names]
    counts = allocate(sizes, config, count_parameters(model))
    for name, n, k in zip(names, sizes, counts, strict=True):
        if k < 1:
            need = 1 / min(sizes) if config.budget == "matrix" else len(names) / count_parameters(model)
            raise MethodError(
                f"random-mask: fraction {config.fraction:g} ({config.budget} budget, {config.spread} spread) leaves "
                f"{name} ({n} entries) with no trainable entry over {len(names)} targets; raise fraction to about "
                f"{need:.2g} or more, or target fewer layers")
        if k > n:
            raise MethodError(f"random-mask: {name} has {n} entries but the equal spread gives it {k}; use "
                              f"spread: proportional or a smaller fraction")
    return dict(zip(names, counts, strict=True))


def apply(model: nn.Module, config: Config, *, tokenizer: Any = None) -> MethodHandle:
    """Freeze the model, draw each target's mask from (seed, module name), wrap targets with MaskedLinear."""
    counts = plan(model, config)
    freeze(model)

    def wrap(name: str, module: nn.Module) -> nn.Module:
        d_in, d_out = linear_shape(module)
        gen = torch.Generator().manual_seed(matrix_seed(config.seed, name))
        return MaskedLinear(module, sample_indices(d_in * d_out, counts[name], gen), config.fused_gradient)

    layers = replace_modules(model, list(counts), wrap)
    return MethodHandle(name="random-mask", model=model, config=config, layers=layers,
                        extra_state_keys=[f"{n}.indices" for n in layers])


def num_parameters(model: nn.Module, config: Config) -> int:
    """Closed form: ⌊f·N + ½⌋ (budget: model, N = the model's parameters) or Σ_targets ⌊f·d_in·d_out + ½⌋."""
    return sum(plan(model, config).values())
