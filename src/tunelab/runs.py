"""Runs on disk: atomic writes, the run directory, loading a trained run back onto its base model.

A run directory holds::

    config.yaml              the resolved config (every default filled in)
    meta.json                tunelab version, base model id + weight fingerprint, method, parameter counts, metrics,
                             status ("running", "failed", "diverged", "complete")
    adapter.safetensors      the method's trainable weights (never pickle); written only when training completed
    metrics.jsonl            one JSON object per logged step / evaluation
    checkpoints/step-N/      resumable checkpoints (see tunelab.train.checkpoint)
    peft/                    LoRA runs only: the adapter in peft's format
    train.lock               held (``fcntl.flock``) by the process training into the folder; who holds it
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "train.lock"


class RunError(ValueError):
    """A run directory is missing, incomplete or does not fit the base model."""


def warn(message: str) -> None:
    """One line on stderr for something the user should know but that does not stop the command."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


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


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a JSONL file this package appended to (``append_jsonl``).

    A process killed inside a write leaves a torn last line: it is dropped with a warning naming the file and
    line. A bad line before the last one is damage, not a kill: RunError naming the file and line.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i < last:
                raise RunError(f"{path}:{i}: not a JSON row ({e.msg}); the file is damaged before its last line. "
                               f"Remove or fix that line") from None
            warn(f"{path}:{i}: dropped a torn last line (a write was interrupted): {line[:60]!r}")
            continue
        if not isinstance(row, dict):
            raise RunError(f"{path}:{i}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------
# The run lock: one training process per run directory
# --------------------------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run directory for the process that trains into it (``with RunLock(dir): ...``).

    ``fcntl.flock`` on ``DIR/train.lock``: the kernel releases it when the holder exits however it exits (kill -9
    too), so a lock is never stale. The file records the holder (pid, host, start time) for the message a second
    process gets; a holder that died leaves that record behind, and the next process takes the lock over with a
    warning. The file is never replaced (a lock lives on its inode), only rewritten in place, and emptied on release.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file: Any = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(f.read())
            f.close()
            raise RunError(f"{self.path.parent} is in use: {holder} is training into it (lock {self.path}). Wait "
                           f"for it to finish or stop it, or choose another output_dir (--set output_dir=...)") from None
        left = f.read()
        if left.strip():
            warn(f"{self.path}: taking over the lock left by {_describe_holder(left)}: that process is gone")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}) + "\n")
        f.flush()
        os.fsync(f.fileno())
        self._file = f
        return self

    def release(self) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()  # an empty file: released cleanly (a record left behind means its holder died)
        self._file.flush()
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} (since {h['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process (it has not recorded itself yet)"


# --------------------------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------------------------


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} is not a tunelab run directory (no {META_FILE}); give a run directory written "
                       f"by `tunelab train` or a model name")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: damaged, not a JSON object ({e}); the run cannot be read back") from None
    if not isinstance(meta, dict):
        raise RunError(f"{path}: damaged, not a JSON object")
    return meta


def load_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """A safetensors file's tensors, or RunError naming the file (missing, truncated, or not safetensors at all —
    a pickle under this name is refused, never unpickled)."""
    path = Path(path)
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise RunError(f"{path}: file missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        from tunelab.models import looks_like_pickle

        if path.is_file() and looks_like_pickle(path):
            raise RunError(f"{path}: refused: this is a pickle (torch.save) file, not safetensors; tunelab never "
                           f"unpickles (loading a pickle can run code). Only safetensors written by tunelab are "
                           f"loaded") from None
        raise RunError(f"{path}: not a readable safetensors file (truncated or damaged: {e})") from None


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
    handle.load_state_dict(load_tensors(run_dir / ADAPTER_FILE))
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
