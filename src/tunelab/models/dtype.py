"""Compute dtypes: names to torch dtypes, and ``auto`` — bf16 where this machine does bf16 maths fast (AMX or
AVX512-BF16 on the CPU, a bf16-capable CUDA device), else fp32."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from tunelab.errors import ModelError

_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """Map a dtype name to a torch dtype; ``auto`` is bfloat16 where bf16 maths is fast on ``device``, else float32.

    bf16 counts as fast on a CUDA device that supports it, or on a CPU with AMX or AVX512-BF16 units. Without a
    ``device``: on this machine's CUDA device when there is one, else on its CPU.
    """
    if isinstance(name, torch.dtype) and name in _DTYPES.values():
        return name
    key = str(name).strip().lower()
    if key == "auto":
        return torch.bfloat16 if fast_bf16_available(device) else torch.float32
    if key not in _DTYPES:
        raise ModelError(f"unknown dtype {name!r}; use one of: auto, {', '.join(_DTYPES)}.")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a torch dtype as configs write it (bf16, fp32, fp16), else torch's own."""
    return next((k for k, v in _DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def fast_bf16_available(device: torch.device | str | None = None) -> bool:
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()
