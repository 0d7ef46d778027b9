"""Attention under bf16 autocast on CPUs: fp32 flash attention, and a compiled kernel for short sequences.

Under bf16 autocast the q/k/v projections come out in bf16 and PyTorch's CPU ``scaled_dot_product_attention`` then
runs its bf16 flash kernel, whose backward pass is 2-3x slower than the fp32 kernel on this class of CPU (measured:
8 x 9 heads x 128 x 64, forward + backward of torch's sdpa alone on 2 threads of this 2-core Sapphire Rapids CPU,
32-35 ms in bf16 against 14 ms in fp32 per layer).
Attention holds no weights, so computing it in fp32 costs only the casts of q, k, v and the output, and it is at
least as accurate as the bf16 kernel.

``COMPILED_ATTENTION`` (``train.compiled_attention``, auto: on for models of width >= 256) goes further for short
sequences: ``grouped_attention`` written out — q kᵀ with the query heads that share a key/value head folded into
one matmul, fp32 scaling, mask and softmax, p v — and compiled, so the element-wise work between the two matmuls is
one loop each way. Measured on this CPU at 8 x 9 heads (3 key/value heads) x 128 x 64, forward + backward on 2
threads: 7.0 ms against 14.3 ms for the fp32 flash kernel; a prompt-tuning step of SmolLM2 ~8% faster in an
interleaved in-process comparison. Its numerics are those of transformers' eager attention under autocast (the two
matmuls in bf16 with fp32 accumulation, the softmax in fp32). It keeps the [queries x keys] probabilities for the
backward pass, so it is used up to ``MAX_SCORES`` scores per layer and the flash kernel above; calls with dropout,
soft-capping, a position bias, an additive (float) mask or a per-head mask also go to the flash kernel.

``FP32_SDPA`` is a transformers attention implementation (registered with ``AttentionInterface`` and its mask
function with ``AttentionMaskInterface``, so masks, padding, packing and the cache work exactly as for ``sdpa``).
It changes nothing outside autocast: with autocast off, it is transformers' ``sdpa`` itself, so evaluation and
generation of a model left with this setting behave as before. ``use_fp32_attention(model)`` switches a model
(from ``sdpa`` only) and returns a callable that restores the previous implementation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

FP32_SDPA = "tunelab_sdpa_fp32"
COMPILED_ATTENTION = "tunelab_compiled_attention"
_registered = False


def sdpa_fp32_under_autocast(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' sdpa attention; under autocast with low-precision q/k/v, computed in fp32 and cast back."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if not torch.is_autocast_enabled(query.device.type) or dtype == torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(device_type=query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


# -- the compiled kernel for short sequences ------------------------------------------------------------------
MAX_SCORES = 2**24  # batch x heads x queries x keys above this: flash kernel (the math kernel keeps them for backward)
_NEG = torch.finfo(torch.float32).min


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """softmax(q kᵀ·scale, masked) v with the query heads that share a key/value head folded into one matmul
    (no repeat of k and v). The numerics of transformers' eager attention under autocast: q kᵀ and p v are matmuls
    in the inputs' dtype (fp32 accumulation), the scaling, mask and softmax in fp32.
    ``keep``: bool, [batch, queries, keys] or broadcastable to [queries, keys]; a row with no key kept gives uniform
    weights, never NaN. Returns [batch, heads, queries, value dim]."""
    b, h, t, d = query.shape
    kv, s = key.shape[1], key.shape[2]
    g = h // kv
    scores = (query.reshape(b, kv, g * t, d) @ key.transpose(-1, -2)).float()
    mask = keep[:, None, None] if keep.dim() == 3 else keep  # -> [batch, 1, 1, queries, keys]
    scores = scores.view(b, kv, g, t, s) * scale + torch.where(mask, 0.0, _NEG)
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(b, kv, g * t, s)
    return (probs @ value).view(b, h, t, value.shape[-1])


@functools.cache
def _causal(t: int, s: int, device: torch.device) -> torch.Tensor:
    return torch.ones(t, s, dtype=torch.bool, device=device).tril()


@functools.cache
def _grouped_kernel() -> Callable[..., torch.Tensor] | None:
    """The compiled ``grouped_attention`` (built and probed once per process), or None."""
    from tunelab.train.fused import compiled_or_none

    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    return compiled_or_none(grouped_attention, (q, k, k, _causal(3, 3, q.device), 0.5), "train.compiled_attention")


def compiled_attention_under_autocast(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                      attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                      scaling: float | None = None, is_causal: bool | None = None,
                                      **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Under autocast: ``grouped_attention`` compiled, on q/k/v cast to the autocast dtype (one fused kernel per side
    of the matmuls instead of the flash kernel, ~2x faster forward + backward at 128 tokens here) when the call is a
    plain one — no dropout, soft-capping, position bias or per-head mask, scores that fit ``MAX_SCORES`` — and the
    fp32 flash path (``sdpa_fp32_under_autocast``) otherwise."""
    b, h, t, _ = query.shape
    s = key.shape[2]
    plain = (torch.is_autocast_enabled(query.device.type) and dropout == 0.0
             and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
             and not kwargs.get("output_attentions", False) and h % key.shape[1] == 0 and b * h * t * s <= MAX_SCORES)
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        keep = _causal(t, s, query.device) if causal and t > 1 else torch.ones(1, 1, dtype=torch.bool,
                                                                               device=query.device)
        plain = plain and (t == s or not causal or t == 1)
    else:
        keep = attention_mask
        plain = plain and keep.dtype == torch.bool and keep.dim() == 4 and keep.shape[1] == 1
    kernel = _grouped_kernel() if plain else None
    if kernel is None:
        return sdpa_fp32_under_autocast(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        is_causal=is_causal, **kwargs)
    if keep.dim() == 4:
        keep = keep[:, 0]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # q/k/v in the matmul dtype, as autocast gives eager attention's matmuls. fp32 q/k/v arrive when the residual
    # stream is fp32 (full tuning: a trainable fp32 embedding makes the rotary cos/sin, and so q and k, fp32).
    dtype = query.dtype if query.dtype != torch.float32 else torch.get_autocast_dtype(query.device.type)
    with torch.autocast(device_type=query.device.type, enabled=False):
        out = kernel(query.to(dtype), key.to(dtype), value.to(dtype), keep, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``FP32_SDPA`` and ``COMPILED_ATTENTION`` known to transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_SDPA, sdpa_fp32_under_autocast)
    AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)
    AttentionInterface.register(COMPILED_ATTENTION, compiled_attention_under_autocast)
    AttentionMaskInterface.register(COMPILED_ATTENTION, sdpa_mask)
    _registered = True


def use_fp32_attention(model: nn.Module, compiled: bool = False) -> Callable[[], None]:
    """Switch a transformers model from ``sdpa`` to ``FP32_SDPA``; returns the function that switches it back.

    Models on another implementation (eager, flash, a custom one) are left alone: the returned function does
    nothing for them.
    """
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return lambda: None
    register()
    model.set_attn_implementation(COMPILED_ATTENTION if compiled else FP32_SDPA)
    return lambda: model.set_attn_implementation(before)
