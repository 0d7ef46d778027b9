"""Distributed set-up for ``torchrun``: gloo on the CPU, nccl when the processes train on CUDA. One process = no-op.

The small collectives here (loss sums, token counts, peak memory) put their tensor on the backend's device: nccl
reduces CUDA tensors only."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where this process's collectives put their tensors (cuda:LOCAL_RANK under nccl)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device | None = None) -> DistInfo:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK, ...): nccl when
    ``device`` (this process's training device, tunelab.devices.resolve_device) is CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = device or torch.device("cpu")
    if world <= 1:
        return DistInfo(device=str(device))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                    device=str(device) if cuda else "cpu")


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few numbers over all processes (used for losses and token counts)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def gather_value(value: float, info: DistInfo) -> list[float]:
    """Every process's ``value``, in rank order, on every process (e.g. each rank's peak memory)."""
    slots = [0.0] * info.world_size
    slots[info.rank] = value
    return all_reduce_sum(slots, info)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if this process joined one. Called once a command's distributed work is over: a
    process that exits with a live gloo group can abort in its C++ teardown ("terminate called without an active
    exception", SIGABRT), which torchrun reports as a failed run although every step and file was written."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
