"""Code books: the values a k-bit code stands for, in [-1, 1] (a block's absmax scales them back).

NormalFloat (Dettmers et al., 2023, QLoRA, https://arxiv.org/abs/2305.14314, appendix E; bitsandbytes
``create_normal_map``): quantiles of N(0, 1) at evenly spaced probabilities, asymmetric so that 0 is exact —

    positives  q_i = Φ⁻¹(p_i),  p_i = linspace(δ, 1/2, 2^{k-1} + 1)[:-1]     (2^{k-1} values)
    negatives −Φ⁻¹(p_j),        p_j = linspace(δ, 1/2, 2^{k-1})[:-1]          (2^{k-1} − 1 values)
    zero, then every value divided by the largest,   δ = 0.9677083 = ½(1 − 1/(2·15) + 1 − 1/(2·16))

For k = 4 this is the bitsandbytes NF4 table (``NF4_BNB`` below, copied from bitsandbytes
``functional.get_4bit_type('nf4')``; a test checks that the construction reproduces it); for k = 2 it is LoftQ's
NF2 table {−1, 0, 0.338, 1} (Li et al., 2024, reference code ``NFQuantizer.create_normal_map``).

Uniform INT-k (symmetric absmax): the 2^k − 1 levels i / (2^{k-1} − 1), i = −(2^{k-1} − 1) … 2^{k-1} − 1
(round-to-nearest of w / absmax · (2^{k-1} − 1)); one code of the 2^k is unused so that 0 is exact.
"""

from __future__ import annotations

import torch

NF_OFFSET = 0.9677083

NF4_BNB = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])

KINDS = ("nf", "int")
BITS = (2, 4, 8)


def nf_codebook(bits: int, offset: float = NF_OFFSET) -> torch.Tensor:
    """NormalFloat-k: 2^k sorted fp32 values in [-1, 1] (see the module docstring for the equation)."""
    half = 2 ** (bits - 1)
    # probabilities in fp32 as bitsandbytes builds them (torch.linspace), quantiles in fp64
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half)[:-1].double())
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.max()).float()


def int_codebook(bits: int) -> torch.Tensor:
    """Symmetric uniform INT-k: the 2^k − 1 levels i / (2^{k-1} − 1)."""
    top = 2 ** (bits - 1) - 1
    return torch.arange(-top, top + 1, dtype=torch.float64).div(top).float()


def codebook(kind: str, bits: int) -> torch.Tensor:
    """The sorted code book of ``kind`` ('nf' or 'int') at ``bits`` (2, 4 or 8)."""
    if kind not in KINDS or bits not in BITS:
        raise ValueError(f"no code book for quant={kind!r} bits={bits}; use quant in {KINDS} and bits in {BITS}")
    if kind == "nf" and bits == 4:
        return NF4_BNB.clone()
    return nf_codebook(bits) if kind == "nf" else int_codebook(bits)
