"""The identity of a model's weights, for run metadata and the base-model check of ``load_run``."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from tunelab.errors import ModelError


def model_fingerprint(model: torch.nn.Module) -> str:
    """A 32-hex-digit blake2b digest of the model's weights, to tell base models apart in run metadata.

    Hashes every ``state_dict()`` entry in name order as (name, shape, bytes of the values rounded to bf16):
    identical weights give identical fingerprints whatever the parameter registration order, and the same base
    loaded in fp32 or in bf16 fingerprints the same (a run trained on a bf16 copy can be evaluated in fp32), while
    another model or changed weights change it. Tied weights appear under each of their names. Compute it on the
    *base* model, before a method is applied: injected adapters rename and add entries.
    """
    hasher = hashlib.blake2b(digest_size=16)
    for name, value in sorted(model.state_dict().items()):
        _hash_entry(hasher, name, value)
    return hasher.hexdigest()


def _hash_entry(hasher: Any, name: str, value: Any) -> None:
    if not isinstance(value, torch.Tensor):  # e.g. `_extra_state` objects: only their presence is hashed
        hasher.update(f"{name}\0{type(value).__name__}\n".encode())
        return
    if value.is_meta:
        raise ModelError(f"cannot fingerprint {name!r}: its weights are on the meta device (not loaded yet).")
    flat = value.detach().cpu().contiguous().reshape(-1)
    if flat.is_floating_point():
        flat = flat.to(torch.bfloat16)  # dtype-independent: fp32 and bf16 loads of one model agree
    hasher.update(f"{name}\0{'float' if flat.is_floating_point() else flat.dtype}\0{tuple(value.shape)}\n".encode())
    # uint8 view: numpy has no bfloat16, and this avoids any copy or conversion of the values
    hasher.update(flat.view(torch.uint8).numpy().data)
