"""Where a model runs: the ``device`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``), moving batches there, and
the device's own memory peak.

``auto`` is CUDA when torch sees a CUDA device — under ``torchrun`` the process's ``LOCAL_RANK``-th one — and the
CPU otherwise. A CUDA batch goes through pinned host memory and is copied without blocking the host (the copy
overlaps the previous step's kernels still queued on the stream).

Status: the CUDA path is written to torch's documented APIs and tested on the CPU only (the selection logic with
CUDA simulated, see tests/test_devices.py); no run on a GPU is recorded yet (docs/distributed.md, "What was verified
where").
"""

from __future__ import annotations

import os
from typing import Any

import torch

from tunelab.errors import RunError

DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(setting: str | torch.device = "auto", local_rank: int | None = None,
                   where: str = "train.device") -> torch.device:
    """The torch device for ``setting``; ``local_rank`` (default: ``$LOCAL_RANK`` or 0) picks the GPU under auto
    and plain ``cuda``. A CUDA device that torch cannot see is refused, naming ``where`` and what would work."""
    if isinstance(setting, torch.device):
        setting = str(setting)
    key = str(setting).strip().lower()
    rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if key == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        key = "cuda"  # this process's GPU, with the same check that it exists
    try:
        device = torch.device(key)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise RunError(f"{where}: unknown device {setting!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RunError(f"{where}: {setting!r} asked for a CUDA device, but torch sees none "
                       f"(torch {torch.__version__}, built with CUDA: {torch.version.cuda or 'no'}); use "
                       f"{where}=auto (the CPU here) or cpu, or install a CUDA build of torch")
    index = rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise RunError(f"{where}: {setting!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                       f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def available_devices() -> list[str]:
    """The device types this machine can run tests on: the CPU always, CUDA when torch sees a device."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch``'s tensors on ``device`` (the same dict when it is the CPU); to CUDA through pinned memory, without
    blocking the host."""
    if device.type == "cpu":
        return batch
    cuda = device.type == "cuda"

    def move(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or v.device == device:
            return v
        if cuda and v.device.type == "cpu":
            return v.pin_memory().to(device, non_blocking=True)
        return v.to(device)

    return {k: move(v) for k, v in batch.items()}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_device_memory_mb(device: torch.device) -> float | None:
    """The most memory torch's allocator held on ``device`` since the last reset, in MiB; None on the CPU (where
    the process's peak RSS is the measure)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
