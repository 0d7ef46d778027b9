"""LoftQ: quantization-aware initialisation of LoRA (Li et al., ICLR 2024, https://arxiv.org/abs/2310.08659).

For a weight W ∈ ℝ^{d_out×d_in}, rank r and LoRA scaling s (α/r, or α/√r with rsLoRA), starting from B₀A₀ = 0:

    for t = 1..T:   Q_t = q_N(W − s·B_{t−1}A_{t−1})
                    U Σ Vᵀ = svd(W − Q_t);   B_t = U_r √(Σ_r / s),   A_t = √(Σ_r / s) V_rᵀ

so that s·B_t A_t is the rank-r truncated SVD of W − Q_t, with √σ split evenly over the two factors and the
scaling folded in (peft stores U√Σ and √Σ Vᵀ without dividing by s: exact only when α = r). The LoRA layer then
computes Q_T x + s·B_T A_T x ≈ W x. QLoRA is T = 0 of this: Q = q_N(W), B = 0.

Everything runs in fp32 on the CPU (``torch.linalg.svd``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tunelab.quant.quantizers import QuantizedTensor, QuantSpec, dequantize, quantize


@dataclass
class LoftQResult:
    """Q_T (quantized), the LoRA factors A [r, d_in], B [d_out, r] and the relative errors."""

    qweight: QuantizedTensor
    A: torch.Tensor
    B: torch.Tensor
    qlora_error: float  # ‖W − q_N(W)‖_F / ‖W‖_F
    errors: list[float] = field(default_factory=list)  # ‖W − Q_t − s·B_t A_t‖_F / ‖W‖_F for t = 1..T

    @property
    def error(self) -> float:
        return self.errors[-1]


def relative_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    """‖W − approx‖_F / ‖W‖_F (0 for an all-zero W approximated exactly)."""
    norm = float(torch.linalg.vector_norm(w.float()))
    diff = float(torch.linalg.vector_norm(w.float() - approx.float()))
    return diff / norm if norm > 0 else diff


def lowrank_factors(residual: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·B·A the rank-r truncated SVD of ``residual``: B = U_r √(Σ_r/s), A = √(Σ_r/s) V_rᵀ."""
    residual = residual.float()
    if residual.shape[0] < residual.shape[1]:  # LAPACK is ~2x faster on tall matrices: svd(Rᵀ) = V Σ Uᵀ
        v, sigma, uh = torch.linalg.svd(residual.T, full_matrices=False)
        u, vh = uh.T, v.T
    else:
        u, sigma, vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(sigma[:r] / scaling)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def loftq(w: torch.Tensor, spec: QuantSpec, r: int, scaling: float, iters: int = 1) -> LoftQResult:
    """Alternate quantization and rank-r SVD ``iters`` times (module docstring); W is [d_out, d_in]."""
    if iters < 1:
        raise ValueError(f"loftq: iters must be at least 1, got {iters}")
    if not 1 <= r <= min(w.shape):
        raise ValueError(f"loftq: rank r={r} must be between 1 and min{tuple(w.shape)}")
    if not scaling > 0 or not math.isfinite(scaling):
        raise ValueError(f"loftq: the LoRA scaling must be positive, got {scaling}")
    w = w.detach().float()
    lowrank = torch.zeros_like(w)
    errors: list[float] = []
    qlora_error = float("nan")
    for t in range(iters):
        qt = quantize(w - lowrank, spec)
        q = dequantize(qt)
        if t == 0:
            qlora_error = relative_error(w, q)
        a, b = lowrank_factors(w - q, r, scaling)
        lowrank = scaling * (b @ a)
        errors.append(relative_error(w, q + lowrank))
    return LoftQResult(qt, a, b, qlora_error, errors)
