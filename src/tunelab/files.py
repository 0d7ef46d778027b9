"""Files, safely: atomic writes (a killed process leaves the old file or the complete new one), append-only JSONL
logs that survive a kill mid-line, and safetensors reads that refuse pickles. A leaf module: it imports nothing of
tunelab's but the error types.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save

from tunelab.errors import RunError


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


def looks_like_pickle(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a pickle (PROTO opcode, protocol >= 2) or a torch.save zip archive."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head[:1] == b"\x80" or head == b"PK"


def load_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """A safetensors file's tensors, or RunError naming the file (missing, truncated, or not safetensors at all —
    a pickle under this name is refused, never unpickled)."""
    path = Path(path)
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise RunError(f"{path}: file missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        if path.is_file() and looks_like_pickle(path):
            raise RunError(f"{path}: refused: this is a pickle (torch.save) file, not safetensors; tunelab never "
                           f"unpickles (loading a pickle can run code). Only safetensors written by tunelab are "
                           f"loaded") from None
        raise RunError(f"{path}: not a readable safetensors file (truncated or damaged: {e})") from None


def save_png(fig, path: str | Path, dpi: int = 120) -> None:
    """Write a matplotlib figure as PNG atomically (a killed process never leaves half a chart), then close it."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
