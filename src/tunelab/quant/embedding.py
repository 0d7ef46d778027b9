"""Quantized token embedding and (tied) output head: one packed table, row-gather lookup, chunked logits.

The table E [V, D] is quantized with ``tunelab.quant.quantizers.quantize`` exactly as a linear weight is, with the
blocks along the hidden dimension: each row is zero-padded to D_p = ⌈D / block⌉ · block (no padding when the block
divides D, e.g. 576 = 9 · 64 for SmolLM2), so a block never spans two rows and row v owns the bytes
[v · D_p/per_byte, (v+1) · D_p/per_byte) of the codes and the scales [v · D_p/block, (v+1) · D_p/block).

    QuantEmbedding   lookup:  e_v = s_b · code-book(c) of row v only (gathered codes and scales, never the table)
    QuantHead        logits:  z = h Êᵀ (+ b), computed ``chunk`` vocabulary rows at a time: Ê[r0:r1] is rebuilt
                     per chunk in the compute dtype; the backward pass rebuilds the chunks again for
                     ∂L/∂h = Σ_chunks ∂L/∂z[:, r0:r1] · Ê[r0:r1] and saves nothing but the (shared) codes.

With tied embeddings (SmolLM2, GPT-2) the head holds an *unregistered* reference to the QuantEmbedding: one copy
of the codes, one entry in the state dict and the saved file. An untied head gets its own table (same spec).
Codes and scales are buffers: no gradient reaches them; the head's gradient goes to its input only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.quant.linear import DenseCache, compute_dtype
from tunelab.quant.quantizers import QuantizedTensor, QuantSpec, byte_table, dequantize_codes, quantize

HEAD_CHUNK = 4096  # vocabulary rows dequantized at a time by QuantHead


def padded_dim(dim: int, block: int) -> int:
    """Row length of the quantized table: ``dim`` rounded up to whole blocks."""
    return -(-dim // block) * block


def quantize_table(table: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize a [V, D] table row-blockwise (rows zero-padded to whole blocks; see module docstring)."""
    v, d = table.shape
    pad = padded_dim(d, spec.block) - d
    w = table.detach().float()
    return quantize(F.pad(w, (0, pad)) if pad else w, spec)


class QuantTable(nn.Module):
    """Packed codes + block scales of a [num_embeddings, embedding_dim] table, with row gathers."""

    def __init__(self, qweight: QuantizedTensor, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.padded_dim = (int(d) for d in qweight.shape)
        self.embedding_dim = int(embedding_dim)
        if self.padded_dim != padded_dim(self.embedding_dim, qweight.spec.block):
            raise ValueError(f"table of shape {qweight.shape} is not [V, D] with D={embedding_dim} padded to "
                             f"blocks of {qweight.spec.block}")
        self.spec = qweight.spec
        for name, tensor in qweight.tensors().items():
            self.register_buffer(name, tensor)
        self.register_buffer("table", byte_table(self.spec.codebook(), self.spec.bits), persistent=False)
        if self.spec.double_quant:  # the INT-8 code book of the scales (dequantized per gathered block)
            from tunelab.quant.quantizers import dq_spec

            inner = dq_spec(self.spec)
            self.register_buffer("scale_table", byte_table(inner.codebook(), inner.bits), persistent=False)
        self.out_dtype = torch.float32  # lookup dtype outside autocast; follows .to(dtype) (see _apply)

    @property
    def bytes_per_row(self) -> int:
        return self.padded_dim // self.spec.per_byte

    @property
    def blocks_per_row(self) -> int:
        return self.padded_dim // self.spec.block

    def qweight(self) -> QuantizedTensor:
        names = ("codes", "absmax") if not self.spec.double_quant else \
            ("codes", "absmax_codes", "absmax_scale", "absmax_mean")
        return QuantizedTensor.from_tensors({n: getattr(self, n) for n in names},
                                            (self.num_embeddings, self.padded_dim), self.spec)

    def nbytes(self) -> int:
        return self.qweight().nbytes()

    def _apply(self, fn: Any, recurse: bool = True) -> QuantTable:  # type: ignore[override]
        out = super()._apply(fn, recurse)
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype)).dtype  # model.to(bf16) -> bf16 lookups
        return out

    # -- gathers -----------------------------------------------------------------------------------------------
    def block_scales(self, blocks: torch.Tensor) -> torch.Tensor:
        """fp32 scales s_b of the (flat) block indices ``blocks``: the same values as ``qweight().scales()``."""
        if not self.spec.double_quant:
            return self.absmax[blocks].float()
        # dequantize(absmax_q) + mean, for the gathered blocks only: INT-8 value · its dq-block scale + mean
        value = F.embedding(self.absmax_codes[blocks].int(), self.scale_table)[..., 0]
        return value * self.absmax_scale.float()[blocks // self.spec.dq_block] + self.absmax_mean.float()

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Ê[ids] in ``dtype`` ([*ids.shape, embedding_dim]) from the gathered codes and scales of those rows."""
        flat = ids.reshape(-1).long()
        codes = self.codes.view(self.num_embeddings, self.bytes_per_row)[flat]
        blocks = flat[:, None] * self.blocks_per_row + torch.arange(self.blocks_per_row, device=flat.device)
        out = self._dequantize(codes, self.block_scales(blocks), flat.numel(), dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    def row_range(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Ê[start:stop] in ``dtype`` (contiguous rows: a slice of the codes)."""
        codes = self.codes[start * self.bytes_per_row: stop * self.bytes_per_row]
        blocks = torch.arange(start * self.blocks_per_row, stop * self.blocks_per_row, device=codes.device)
        return self._dequantize(codes, self.block_scales(blocks), stop - start, dtype)

    def _dequantize(self, codes: torch.Tensor, scales: torch.Tensor, n_rows: int, dtype: torch.dtype) -> torch.Tensor:
        w = dequantize_codes(codes.reshape(-1), scales.reshape(-1), self.table, (n_rows, self.padded_dim), dtype)
        return w if self.padded_dim == self.embedding_dim else w[:, : self.embedding_dim]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole Ê [V, D] (reports, merging, tests: never on the lookup or logits path)."""
        return self.row_range(0, self.num_embeddings, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized fp32 table, computed on access (V·D floats: avoid in loops)."""
        return self.dequantize(torch.float32)

    @property
    def dtype(self) -> torch.dtype:
        return self.out_dtype


class QuantEmbedding(QuantTable):
    """nn.Embedding stand-in over a QuantTable: ``forward(ids)`` gathers only the looked-up rows.

    Output dtype: autocast's when autocast is on (what a bf16 table gives the trainer), else ``out_dtype``
    (fp32, or the dtype of the last ``.to(dtype)``). ``embed_scale`` (Gemma's scaled embeddings) is kept.
    """

    is_quantized_embedding = True

    def __init__(self, qweight: QuantizedTensor, embedding_dim: int, embed_scale: float | None = None,
                 padding_idx: int | None = None) -> None:
        super().__init__(qweight, embedding_dim)
        self.embed_scale = embed_scale
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, module: nn.Module, spec: QuantSpec) -> QuantEmbedding:
        w = module.weight.detach()
        scale = getattr(module, "embed_scale", None)
        scale = float(scale) if scale is not None else None
        emb = cls(quantize_table(w, spec), w.shape[1], scale, getattr(module, "padding_idx", None))
        emb.out_dtype = w.dtype
        return emb.to(w.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(ids.device.type) if torch.is_autocast_enabled(ids.device.type) \
            else self.out_dtype
        out = self.rows(ids, dtype)
        return out * self.embed_scale if self.embed_scale is not None else out

    def to_embedding(self, dtype: torch.dtype = torch.float32) -> nn.Embedding:
        """A dense nn.Embedding holding Ê (merging, export). ``embed_scale`` is not carried over."""
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, dtype=dtype,
                             device=self.codes.device)
        with torch.no_grad():
            dense.weight.copy_(self.dequantize(torch.float32))
        dense.requires_grad_(False)
        return dense

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{self.num_embeddings}, {self.embedding_dim}, quant={s.quant}{s.bits}, block={s.block}, "
                f"double_quant={s.double_quant}")


class _ChunkedLogits(torch.autograd.Function):
    """h Êᵀ chunk by chunk; the backward pass rebuilds each chunk: ∂L/∂h = Σ ∂L/∂z[:, r0:r1] Ê[r0:r1]."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, head: QuantHead, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        ctx.head, ctx.dtype, ctx.h_dtype = head, dtype, h.dtype
        return head.logits(h, dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        head, dtype = ctx.head, ctx.dtype
        grad = grad.to(dtype)
        gh = None
        with torch.autocast(grad.device.type, enabled=False):
            for start, stop in head.chunks():
                part = grad[..., start:stop] @ head.source.row_range(start, stop, dtype)
                gh = part if gh is None else gh.add_(part)
        assert gh is not None
        return gh.to(ctx.h_dtype), None, None


class QuantHead(DenseCache, nn.Module):
    """The output projection z = h Êᵀ (+ b) over a QuantTable, ``chunk`` vocabulary rows at a time.

    ``tied``: ``source`` is the model's QuantEmbedding, referenced but not registered (the codes are the
    embedding's); otherwise ``source`` is the head's own table, registered as ``table_q``.
    """

    def __init__(self, source: QuantTable, tied: bool, bias: torch.Tensor | None = None,
                 chunk: int = HEAD_CHUNK) -> None:
        super().__init__()
        if tied:
            self.__dict__["_source"] = source  # unregistered: no second copy in modules(), state_dict, files
        else:
            self.table_q = source
        self.tied = tied
        self.chunk = chunk
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @property
    def source(self) -> QuantTable:
        return self.__dict__["_source"] if self.tied else self.table_q

    @property
    def in_features(self) -> int:
        return self.source.embedding_dim

    @property
    def out_features(self) -> int:
        return self.source.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized fp32 [V, D] weight, computed on access (V·D floats: avoid in loops)."""
        return self.source.dequantize(torch.float32)

    def nbytes(self) -> int:
        """Bytes this head adds: 0 when tied (the embedding's codes), else its own codes and scales."""
        return 0 if self.tied else self.source.nbytes()

    def chunks(self) -> list[tuple[int, int]]:
        v = self.out_features
        return [(s, min(s + self.chunk, v)) for s in range(0, v, self.chunk)]

    def logits(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """h Êᵀ in ``dtype`` without autograd bookkeeping (one dequantized chunk alive at a time)."""
        x = h.to(dtype)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            for start, stop in self.chunks():  # kept per chunk under inference_weights: the same products
                rows = self.dense((dtype, start), lambda a=start, b=stop: self.source.row_range(a, b, dtype))
                out[..., start:stop] = x @ rows.T
        return out

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(h)
        if torch.is_grad_enabled() and h.requires_grad:
            z = _ChunkedLogits.apply(h, self, dtype)
        else:
            z = self.logits(h, dtype)
        return z if self.bias is None else z + self.bias.to(z.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tied={self.tied}, "
                f"chunk={self.chunk}, bias={self.bias is not None}")
