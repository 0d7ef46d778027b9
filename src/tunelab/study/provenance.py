"""Where a result came from: the machine (CPU model and the bf16 / AMX flags that decide speed) and the code commit.

Every study unit records the commit of the code that produced it, so a table assembled from units run over several
sessions says which commits its numbers come from (``tunelab.study.report``).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """CPU model, the bf16 / AMX flags, cores and library versions: which kind of machine a result is from."""
    import torch

    flags, model = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")
    return {"cpu": model, "flags": sorted(f for f in wanted if f in flags), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform()}


def commit() -> str | None:
    """The short commit of the tunelab source tree in use (``+local changes`` when it differs from the commit);
    None outside a git checkout (an installed wheel)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("+local changes" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
