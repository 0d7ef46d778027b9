"""Learning-rate schedules: linear warmup, then cosine / linear decay to min_lr_ratio·lr, or constant."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based), in [min_ratio, 1].

    Warmup: (step + 1) / warmup_steps for step < warmup_steps, so the first step already moves.
    Decay over the remaining steps: cosine 0.5·(1 + cos(π·p)) or linear 1 − p, with p the fraction done,
    rescaled to end at min_ratio.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use cosine, linear or constant")
    return min_ratio + (1.0 - min_ratio) * shape


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """warmup_steps when set, else round(warmup_ratio · total_steps)."""
    return warmup_steps if warmup_steps > 0 else int(round(warmup_ratio * total_steps))
