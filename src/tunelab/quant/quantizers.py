"""Blockwise absmax quantization with packed codes, optional double quantization of the scales.

For a tensor W flattened row-major and cut into blocks b of ``block`` values (the last block zero-padded):

    s_b = max_{i∈b} |W_i|,      c_i = argmin_j |W_i / s_b − v_j|,      Ŵ_i = s_b · v_{c_i}

with v the code book (``tunelab.quant.codebooks``). Hence |W_i − Ŵ_i| ≤ s_b · g/2, g the largest gap between
neighbouring code book values. Codes are packed 8/k to a byte, the first value in the high bits.

Double quantization (QLoRA §3): the fp32 scales s (one per block) are themselves quantized — their mean m is
subtracted and s − m is quantized with symmetric INT-8 in blocks of ``dq_block`` (256) values, each with an fp32
scale; memory per weight falls from 32/64 = 0.5 bits to 8/64 + 32/(64·256) ≈ 0.127 bits. (QLoRA uses an 8-bit
float for this second level; INT-8 is what is implemented here.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from tunelab.errors import QuantError
from tunelab.quant.codebooks import BITS, KINDS, codebook


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized: code book (``quant`` at ``bits``), block size, double quantization."""

    quant: Literal["nf", "int"] = "nf"
    bits: int = 4
    block: int = 64
    double_quant: bool = False
    dq_block: int = 256

    def __post_init__(self) -> None:
        if self.quant not in KINDS:
            raise ValueError(f"quant must be one of {KINDS}, got {self.quant!r}")
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.block < 1 or self.block % self.per_byte:
            raise ValueError(f"block must be a positive multiple of {self.per_byte} at {self.bits} bits "
                             f"(whole bytes per block), got {self.block}; the default is 64")
        if self.dq_block < 1:
            raise ValueError(f"dq_block must be positive, got {self.dq_block}")

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    def codebook(self) -> torch.Tensor:
        return codebook(self.quant, self.bits)


DQ_SPEC_BITS = 8


@dataclass
class QuantizedTensor:
    """Packed codes + per-block scales of one tensor (``absmax``, or its double-quantized form)."""

    codes: torch.Tensor  # uint8 [n_blocks · block / per_byte]
    shape: tuple[int, ...]
    spec: QuantSpec
    absmax: torch.Tensor | None = None  # fp32 [n_blocks] (no double quantization)
    absmax_q: QuantizedTensor | None = None  # INT-8 codes of absmax − absmax_mean (double quantization)
    absmax_mean: torch.Tensor | None = None  # fp32 scalar

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def scales(self) -> torch.Tensor:
        """The per-block absmax s_b in fp32 (dequantized when double quantized)."""
        if self.absmax_q is None:
            assert self.absmax is not None
            return self.absmax.float()
        assert self.absmax_mean is not None
        return dequantize(self.absmax_q) + self.absmax_mean.float()

    def nbytes(self) -> int:
        """Storage in bytes (codes and scales; the code book is a constant of the spec)."""
        parts = [self.codes, self.absmax, self.absmax_mean]
        inner = self.absmax_q.nbytes() if self.absmax_q is not None else 0
        return inner + sum(t.numel() * t.element_size() for t in parts if t is not None)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor mapping (for buffers and safetensors)."""
        if self.absmax_q is None:
            assert self.absmax is not None
            return {"codes": self.codes, "absmax": self.absmax}
        assert self.absmax_mean is not None
        return {"codes": self.codes, "absmax_codes": self.absmax_q.codes, "absmax_scale": self.absmax_q.scales(),
                "absmax_mean": self.absmax_mean}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], shape: tuple[int, ...], spec: QuantSpec) -> QuantizedTensor:
        """Inverse of ``tensors()``."""
        if not spec.double_quant:
            return cls(t["codes"], tuple(shape), spec, absmax=t["absmax"])
        n_blocks = -(-_prod(shape) // spec.block)
        inner = cls(t["absmax_codes"], (n_blocks,), dq_spec(spec), absmax=t["absmax_scale"])
        return cls(t["codes"], tuple(shape), spec, absmax_q=inner, absmax_mean=t["absmax_mean"])


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def dq_spec(spec: QuantSpec) -> QuantSpec:
    """The spec of the second quantization level (symmetric INT-8 blocks of ``dq_block`` scales)."""
    return QuantSpec("int", DQ_SPEC_BITS, spec.dq_block)


# --------------------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------------------


def _shifts(bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    return torch.tensor([8 - bits * (j + 1) for j in range(per_byte)], dtype=torch.uint8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2^bits, length a multiple of 8/bits -> 8/bits codes per byte (first in the high bits)."""
    if codes.numel() % (8 // bits):
        raise ValueError(f"pack: {codes.numel()} codes is not a multiple of {8 // bits} at {bits} bits")
    grouped = codes.reshape(-1, 8 // bits).to(torch.uint8)
    return (grouped << _shifts(bits)).sum(dim=1, dtype=torch.uint8) if bits < 8 else grouped.reshape(-1).clone()


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 [n_bytes] -> uint8 [n_bytes · 8/bits]."""
    if bits == 8:
        return packed.clone()
    mask = (1 << bits) - 1
    return ((packed.reshape(-1, 1) >> _shifts(bits)) & mask).reshape(-1)


def byte_table(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[256, 8/bits]: the code book values of the codes packed in each possible byte (one gather dequantizes a
    whole byte). Codes beyond the code book (INT-k leaves one unused) map to 0."""
    full = torch.zeros(2**bits, dtype=values.dtype)
    full[: values.numel()] = values
    return full[unpack(torch.arange(256, dtype=torch.uint8), bits).long()].reshape(256, 8 // bits)


# --------------------------------------------------------------------------------------------------------------
# Quantize / dequantize
# --------------------------------------------------------------------------------------------------------------


def to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Flatten row-major, zero-pad to a multiple of ``block``, reshape to [n_blocks, block] (fp32)."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, block)


def nearest_codes(normalized: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code book value for every entry (ties go to the lower value)."""
    mid = (values[1:] + values[:-1]) / 2
    if mid.numel() > 15:  # 8-bit code books: binary search
        return torch.bucketize(normalized.contiguous(), mid.to(normalized.dtype)).to(torch.uint8)
    codes = torch.zeros(normalized.shape, dtype=torch.uint8)  # ≤ 4 bits: counting the midpoints below is ~2x faster
    for m in mid.tolist():
        codes += normalized > m
    return codes


def quantize(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Blockwise absmax quantization of ``x`` (any shape, any float dtype; computed in fp32). NaN or infinite
    entries are refused: their block's scale would be NaN or infinite and take every value of the block with it."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise QuantError(f"quantize: the tensor of shape {tuple(x.shape)} holds NaN or infinite values ({bad} of "
                         f"{x.numel()}); the model's weights are damaged or diverged — quantize a finite model")
    blocks = to_blocks(x, spec.block)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # an all-zero block codes to zeros
    codes = nearest_codes(blocks / safe[:, None], spec.codebook())
    qt = QuantizedTensor(pack(codes.reshape(-1), spec.bits), tuple(x.shape), spec)
    if spec.double_quant:
        mean = absmax.mean()
        qt.absmax_q, qt.absmax_mean = quantize(absmax - mean, dq_spec(spec)), mean
    else:
        qt.absmax = absmax
    return qt


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, shape: tuple[int, ...],
                     dtype: torch.dtype) -> torch.Tensor:
    """Ŵ = s_b · v_c from packed codes, per-block scales and a ``byte_table``; the gather and the product run in
    ``dtype`` (fp32, or bf16 for bf16 compute: the scale is rounded to bf16 first, far below the code error)."""
    values = F.embedding(codes.int(), table.to(dtype))  # [n_bytes, per_byte]
    w = values.reshape(scales.numel(), -1) * scales.to(dtype)[:, None]
    n = _prod(shape)
    return (w.reshape(-1) if w.numel() == n else w.reshape(-1)[:n]).reshape(shape)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ŵ of a QuantizedTensor, in ``dtype``."""
    table = byte_table(qt.spec.codebook(), qt.spec.bits)
    return dequantize_codes(qt.codes, qt.scales(), table, qt.shape, dtype)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """dequantize(quantize(x)) in fp32: the quantization q_N(x) as a dense tensor."""
    return dequantize(quantize(x, spec))


def max_half_gap(spec: QuantSpec) -> float:
    """g/2 for the bound |W − Ŵ| ≤ s_b · g/2 (largest gap between neighbouring code book values)."""
    v = spec.codebook()
    return float((v[1:] - v[:-1]).max()) / 2
