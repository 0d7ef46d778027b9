"""Peak memory of a training process: glibc's mmap threshold.

A training step allocates and frees the same activation buffers (0.4-3 MB each for SmolLM2 at 8 x 128 tokens)
again and again. glibc serves buffers below its mmap threshold from the heap, and the threshold adapts upwards (to
32 MiB) as soon as a large mmapped buffer is freed, so after the first step nearly every activation lives on the
heap. Freed buffers then leave holes that the next step's differently ordered sizes do not fit, the heap grows, and
the process's peak RSS ends up well above what is ever live at once: a LoRA step on SmolLM2 peaks at ~1,780 MiB
with ~930 MiB still resident between steps, although between steps only the model (~740 MiB with the runtime) is
live. A fixed threshold of 1 MiB sends every activation-sized buffer to its own mapping, returned to the system when
freed: the same run peaks at ~1,540 MiB (full tuning: 3,330 instead of ~3,530-4,160 MiB). The price is a page
fault for every page of every new buffer: the LoRA step was ~5% slower (1.48 s against 1.41 s, 8 steps each,
interleaved in one process). So it is off by default (``train.mmap_threshold_kib: null``); set 1024 where memory is
what limits the run.

``set_mmap_threshold`` is process-wide and stays after training (glibc offers no way back to the adaptive rule).
It does nothing where the C library has no ``mallopt`` (musl, macOS): the result says whether it took effect.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
ACTIVATION_THRESHOLD = 1 << 20


def set_mmap_threshold(nbytes: int = ACTIVATION_THRESHOLD) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, nbytes)``; True when the C library took it."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, nbytes))
