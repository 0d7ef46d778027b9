"""Loading what a user names: a base model from any source ``tunelab.models`` reads or a quantized base directory
(``tunelab quantize``), and a finished run on its base. The one layer above ``tunelab.models`` and ``tunelab.quant``:
neither of those imports the other or this module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tunelab.config import load_config
from tunelab.errors import RunError
from tunelab.files import load_tensors
from tunelab.methods import get_method
from tunelab.models import describe_spec, load_model, model_fingerprint
from tunelab.quant.base import (
    describe_quantized_base,
    install_run_quantization,
    is_quantized_base,
    load_quantized_base,
)
from tunelab.rundir import ADAPTER_FILE, CONFIG_FILE, read_meta


def load_base(spec: str, dtype: str = "auto", *, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``spec``: a quantized base directory (the base model with its quantized layers
    swapped in) or anything ``tunelab.models.load_model`` reads."""
    if is_quantized_base(spec):
        return load_quantized_base(spec, dtype)
    return load_model(spec, dtype, trust_remote_code=trust_remote_code)


def describe_base(spec: str) -> str:
    """The reproducible identity of ``spec`` for run metadata (see ``tunelab.models.describe_spec``)."""
    return describe_quantized_base(spec) if is_quantized_base(spec) else describe_spec(spec)


def load_run(run_dir: str | os.PathLike, *, base: str | None = None, allow_base_mismatch: bool = False,
             dtype: str | None = None):
    """Load a finished run: its base model with the method applied and the trained weights loaded.

    Returns ``(model, tokenizer, handle, config)``. Refuses a base model whose weight fingerprint differs from the
    one the run was trained on, unless ``allow_base_mismatch``.
    """
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    if meta.get("status") != "complete" or not (run_dir / ADAPTER_FILE).is_file():
        raise RunError(f"{run_dir}: the run did not complete (status: {meta.get('status')}); resume it with "
                       f"`tunelab train {run_dir / CONFIG_FILE} --resume` or use a finished run")
    cfg = load_config(run_dir / CONFIG_FILE)
    spec = base or cfg.model.name
    model, tokenizer = load_base(spec, dtype or cfg.model.dtype)
    fingerprint = model_fingerprint(model)
    expected = meta.get("base_fingerprint")
    if expected and fingerprint != expected and not allow_base_mismatch:
        raise RunError(
            f"{run_dir} was trained on base model {meta.get('base_model')!r} (weights fingerprint {expected}), but "
            f"{spec!r} has fingerprint {fingerprint}. Load the same base model, or pass --allow-base-mismatch to "
            f"proceed anyway."
        )
    install_run_quantization(model, run_dir, cfg)  # a run trained on a quantized base: its exact codes
    module = get_method(cfg.method_name())
    handle = module.apply(model, cfg.method_config(), tokenizer=tokenizer)
    handle.load_state_dict(load_tensors(run_dir / ADAPTER_FILE))
    model.eval()
    return model, tokenizer, handle, cfg
