"""Runs on disk: atomic writes, the run directory, loading a trained run back onto its base model.

A run directory holds::

    config.yaml              the resolved config (every default filled in)
    meta.json                tunelab version, base model id + weight fingerprint, method, parameter counts, metrics,
                             status ("running", "failed", "complete")
    adapter.safetensors      the method's trainable weights (never pickle); written only when training completed
    metrics.jsonl            one JSON object per logged step / evaluation
    checkpoints/step-N/      resumable checkpoints (see tunelab.train.checkpoint)
    peft/                    LoRA runs only: the adapter in peft's format
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


class RunError(ValueError):
    """A run directory is missing, incomplete or does not fit the base model."""


# --------------------------------------------------------------------------------------------------------------
# Atomic writes: temp file in the same folder, fsync, rename
# --------------------------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either the old file or the complete new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors, written atomically; tensors are made contiguous and detached."""
    clean = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata=metadata))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_jsonl(path: str | os.PathLike, obj: dict[str, Any]) -> None:
    """Append one line and flush it to disk (a killed run keeps every line written before)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------------------------


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} is not a tunelab run directory (no {META_FILE}); give a run directory written "
                       f"by `tunelab train` or a model name")
    return json.loads(path.read_text(encoding="utf-8"))


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def load_run(run_dir: str | os.PathLike, *, base: str | None = None, allow_base_mismatch: bool = False,
             dtype: str | None = None):
    """Load a finished run: its base model with the method applied and the trained weights loaded.

    Returns ``(model, tokenizer, handle, config)``. Refuses a base model whose weight fingerprint differs from the
    one the run was trained on, unless ``allow_base_mismatch``.
    """
    from tunelab.config import load_config
    from tunelab.methods import get_method
    from tunelab.models import load_model, model_fingerprint

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    if meta.get("status") != "complete" or not (run_dir / ADAPTER_FILE).is_file():
        raise RunError(f"{run_dir}: the run did not complete (status: {meta.get('status')}); resume it with "
                       f"`tunelab train {run_dir / CONFIG_FILE} --resume` or use a finished run")
    cfg = load_config(run_dir / CONFIG_FILE)
    spec = base or cfg.model.name
    model, tokenizer = load_model(spec, dtype or cfg.model.dtype)
    fingerprint = model_fingerprint(model)
    expected = meta.get("base_fingerprint")
    if expected and fingerprint != expected and not allow_base_mismatch:
        raise RunError(
            f"{run_dir} was trained on base model {meta.get('base_model')!r} (weights fingerprint {expected}), but "
            f"{spec!r} has fingerprint {fingerprint}. Load the same base model, or pass --allow-base-mismatch to "
            f"proceed anyway."
        )
    from tunelab.quant.base import install_run_quantization

    install_run_quantization(model, run_dir, cfg)  # a run trained on a quantized base: its exact codes
    module = get_method(cfg.method_name())
    handle = module.apply(model, cfg.method_config())
    handle.load_state_dict(load_file(str(run_dir / ADAPTER_FILE)))
    model.eval()
    return model, tokenizer, handle, cfg


def save_png(fig, path: str | Path, dpi: int = 120) -> None:
    """Write a matplotlib figure as PNG atomically (a killed process never leaves half a chart), then close it."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
