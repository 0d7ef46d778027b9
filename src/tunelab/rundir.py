"""The run directory: its files, the lock held by the process training into it, and its metadata.

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
import time
from pathlib import Path
from typing import Any

from tunelab.errors import RunError
from tunelab.files import warn

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "train.lock"


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


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()
