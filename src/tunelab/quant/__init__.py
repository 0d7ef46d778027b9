"""Quantized bases on the CPU: NF/INT-k blockwise quantizers, packed QuantLinear, QLoRA and LoftQ.

    codebooks   NormalFloat-k (NF4 = the bitsandbytes table) and symmetric INT-k code books
    quantizers  blockwise absmax quantization, packing, double quantization of the scales
    linear      QuantLinear: packed codes + scales, dequantized block-wise per call (weight never saved)
    embedding   QuantEmbedding (row-gather lookup) and QuantHead (chunked logits; tied: the embedding's codes)
    loftq       LoftQ's alternating quantization / rank-r SVD, with the LoRA scaling folded in
    model       quantize a model's linear layers, error/memory reports, save/load of the codes
    base        quantized base directories and the trainer / run-loader hooks
"""

from __future__ import annotations

from typing import Any

from tunelab.quant.codebooks import NF4_BNB, codebook, int_codebook, nf_codebook
from tunelab.quant.embedding import QuantEmbedding, QuantHead
from tunelab.quant.linear import QuantLinear
from tunelab.quant.loftq import LoftQResult, loftq
from tunelab.quant.quantizers import QuantizedTensor, QuantSpec, dequantize, pack, quantize, unpack

__all__ = ["NF4_BNB", "LoftQResult", "QuantEmbedding", "QuantHead", "QuantLinear", "QuantSpec", "QuantizedTensor", "codebook", "dequantize",
           "int_codebook", "loftq", "merge_message", "nf_codebook", "pack", "quantize", "unpack"]


def merge_message(layer: Any) -> str:
    """What merging LoRA onto a quantized layer does (warned once per process by Python's default filter)."""
    s = layer.spec
    return (f"merging LoRA onto a {s.quant}{s.bits}-quantized base: merged layers are dense fp32 copies of the "
            f"dequantized weight plus s·B·A (rounding the update into {s.bits}-bit codes would erase it); "
            f"merge_and_unload() returns a model whose adapted layers are dequantized (a quantized embedding / head, "
            f"which has no adapter, stays quantized), unmerge() restores the original codes")
