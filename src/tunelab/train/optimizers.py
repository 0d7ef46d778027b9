"""The optimizer of a run (``train.optimizer``), and how its states are counted and written without pickle.

- ``adamw``: torch's AdamW with fp32 states, its fused kernel where torch takes these parameters (else foreach).
- ``adamw-8bit`` / ``adamw-4bit``: torchao's AdamW8bit / AdamW4bit (``torchao.optim``): both moments block-wise
  quantized (8-bit: dynamic-tree code book; 4-bit: the second moment with a linear code book, per Li et al.,
  "Memory Efficient Optimizers with 4-bit States", 2023), dequantized inside the compiled update. Tensors smaller
  than torchao's minimum (4,096 values) keep fp32 states. States shrink ~4× / ~8× against fp32 AdamW; the cost
  is one compile per parameter shape on the first step, and a different (quantized) update.

Quantized states are tensor subclasses; a checkpoint stores their inner tensors (codes, scales, code book) as plain
safetensors entries and their class and flatten context in state.json (``flatten_state`` / ``unflatten_state``).
Only classes of ``torchao.optim`` are rebuilt from a checkpoint: nothing else is imported on a file's say-so.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from tunelab.errors import ConfigError, RunError

OPTIMIZERS: dict[str, str | None] = {"adamw": None, "adamw-8bit": "AdamW8bit", "adamw-4bit": "AdamW4bit"}
SUBCLASS_MODULES = ("torchao.optim.",)  # the only modules whose state classes a checkpoint may name


def check_name(name: str, where: str = "train.optimizer") -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(f"{where}: unknown optimizer {name!r}; use one of: {', '.join(OPTIMIZERS)}")


def adamw(groups: list[dict[str, Any]], **options: Any) -> torch.optim.AdamW:
    """AdamW with its fused kernel (one pass over parameter, gradient and both moments per tensor: 0.11 s against
    0.4-0.7 s for the foreach kernel over SmolLM2's 135M parameters on 2 threads here; same update to 1e-7), or the
    foreach kernel where the fused one does not take these parameters (device or dtype)."""
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **options)


def build_optimizer(name: str, groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float],
                    sharded: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see ``OPTIMIZERS``) over ``groups`` (each with its own weight_decay)."""
    check_name(name)
    if OPTIMIZERS[name] is None:
        return adamw(groups, lr=lr, betas=betas)
    if sharded:
        raise RunError(f"train.optimizer: {name} is not supported with train.distributed: fsdp (torchao's "
                       f"quantized states on sharded DTensors are untested here); use optimizer adamw with FSDP, "
                       f"or {name} with ddp / one process")
    try:
        module = importlib.import_module("torchao.optim")
    except ImportError as e:
        raise RunError(f"train.optimizer: {name} needs torchao (pip install 'tunelab[optim]', or pip install "
                       f"torchao): {e}") from None
    return getattr(module, OPTIMIZERS[name])(groups, lr=lr, betas=betas)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, keeping hyper-parameters that the optimizer holds as tensors (torchao
    keeps ``lr`` as a tensor and refuses a float; a checkpoint's param groups hold plain numbers)."""
    kinds = [{k for k, v in g.items() if isinstance(v, torch.Tensor)} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, tensor_keys in zip(optimizer.param_groups, kinds, strict=True):
        for k in tensor_keys:
            if not isinstance(group[k], torch.Tensor):
                group[k] = torch.tensor(group[k])


def plain_number(v: Any) -> Any:
    """One-value tensors (torchao's lr, and the scheduler's base_lrs it derives from them) as numbers, in
    nested lists and dicts too, for state.json."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, dict):
        return {k: plain_number(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return type(v)(plain_number(x) for x in v)
    return v


def is_subclass_state(t: Any) -> bool:
    """A tensor subclass that flattens into plain inner tensors (a torchao quantized state); not a DTensor."""
    return (isinstance(t, torch.Tensor) and type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__")
            and not hasattr(t, "device_mesh"))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` holds: a DTensor's local shard, a quantized state's inner tensors, else numel × element size."""
    if hasattr(t, "to_local"):
        t = t.to_local()
    if is_subclass_state(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _encode(v: Any) -> Any:
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.Size):
        return {"size": list(v)}
    if isinstance(v, tuple):
        return {"tuple": [_encode(x) for x in v]}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if v is None or isinstance(v, bool | int | float | str):
        return v
    raise RunError(f"cannot write an optimizer state's context value {v!r} ({type(v).__name__}) to state.json")


def _decode(v: Any) -> Any:
    if isinstance(v, dict):
        if "dtype" in v:
            dtype = getattr(torch, str(v["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {v['dtype']!r}")
            return dtype
        if "size" in v:
            return torch.Size(int(x) for x in v["size"])
        if "tuple" in v:
            return tuple(_decode(x) for x in v["tuple"])
        raise ValueError(f"unknown context entry {v!r}")
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def flatten_state(key: str, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``t``'s inner tensors under ``key#inner`` and the spec that rebuilds it (class, context, size, stride)."""
    names, ctx = t.__tensor_flatten__()
    cls = type(t)
    spec = {"class": f"{cls.__module__}:{cls.__qualname__}", "ctx": _encode(ctx), "size": list(t.shape),
            "stride": list(t.stride()), "inner": list(names)}
    return {f"{key}#{n}": getattr(t, n).detach().contiguous() for n in names}, spec


def _state_class(name: str, where: str) -> type:
    module, _, qualname = name.partition(":")
    if not module.startswith(SUBCLASS_MODULES) or not qualname.isidentifier():
        raise RunError(f"{where}: optimizer state class {name!r} is not one tunelab rebuilds (only "
                       f"{', '.join(SUBCLASS_MODULES)}* classes)")
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError) as e:
        raise RunError(f"{where}: optimizer state class {name!r} cannot be imported ({e}); is torchao "
                       f"installed (pip install 'tunelab[optim]')?") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.Tensor) and hasattr(cls, "__tensor_unflatten__")):
        raise RunError(f"{where}: {name!r} is not a tensor subclass")
    return cls


def unflatten_state(parts: dict[str, torch.Tensor], spec: dict[str, Any], where: str) -> torch.Tensor:
    """The state tensor ``flatten_state`` wrote (``parts``: inner name → tensor)."""
    cls = _state_class(str(spec.get("class", "")), where)
    missing = sorted(set(spec["inner"]) - set(parts))
    if missing:
        raise RunError(f"{where}: optimizer state parts missing: {', '.join(missing)}")
    ctx = _decode(spec["ctx"])
    return cls.__tensor_unflatten__({n: parts[n] for n in spec["inner"]}, ctx, torch.Size(spec["size"]),
                                    tuple(spec["stride"]))
