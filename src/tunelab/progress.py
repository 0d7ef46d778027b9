"""Progress on long commands: a tqdm bar on a terminal, one plain line per finished unit elsewhere.

Bars (training steps, generation batches, a sweep's runs, bootstrap replicates) are drawn on stderr when it is a
terminal. In a log file — CI, ``nohup``, a batch scheduler — a bar's carriage-return redraws are noise, so there the
bars are hidden and the long commands print one line per finished run instead (``summary``). ``TUNELAB_PROGRESS=0``
hides the bars everywhere, ``TUNELAB_PROGRESS=1`` draws them even when stderr is not a terminal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any


def interactive() -> bool:
    """Whether bars are drawn: TUNELAB_PROGRESS=0 / 1 decide; unset, whether stderr is a terminal."""
    setting = os.environ.get("TUNELAB_PROGRESS", "")
    if setting in ("0", "1"):
        return setting == "1"
    return sys.stderr.isatty()


def bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str, unit: str,
        initial: int = 0, enabled: bool = True, leave: bool = True) -> Any:
    """A tqdm bar on stderr, disabled unless ``enabled`` and ``interactive()``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                disable=not (enabled and interactive()), file=sys.stderr)


def summary(line: str) -> None:
    """One line for a finished unit (a run of a sweep) when no bar shows it; nothing on a terminal with bars."""
    if not interactive():
        print(line, file=sys.stderr, flush=True)
