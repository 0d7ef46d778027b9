"""Progress: bars on a terminal only, one line per finished run in a log (tunelab.progress)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab import progress

REPO = Path(__file__).resolve().parents[1]


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(("setting", "tty", "want"), [
    (None, True, True), (None, False, False), ("0", True, False), ("1", False, True)])
def test_bars_only_on_a_terminal_unless_told(monkeypatch, setting, tty, want):
    if setting is None:
        monkeypatch.delenv("TUNELAB_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("TUNELAB_PROGRESS", setting)
    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    assert progress.interactive() is want
    for _ in progress.bar(range(3), desc="x", unit="step"):
        pass
    progress.summary("one line")
    text = stream.getvalue()
    assert ("one line" in text) is (not want)  # the line stands in for the bar where there is none
    assert ("3/3" in text) is want


def test_training_in_a_log_file_draws_no_bar(tmp_path):
    """`tunelab train` with stderr in a file: no carriage-return redraws, the summary lines only."""
    out = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", "configs/tiny-smoke.yaml", "--set",
                          f"output_dir={tmp_path / 'run'}", "--set", "train.max_steps=3"], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stderr and "train:" not in out.stderr
    assert "steps 3" in out.stdout


def test_a_sweep_line_names_the_run_its_factors_and_its_outcome():
    from types import SimpleNamespace

    from tunelab.scaling.runner import run_line

    base = {"key": "k1", "factors": {"axes": ["d_f"], "method": "lora", "d_f": 64}, "seconds": 12.4, "attempts": 2}
    done = run_line(SimpleNamespace(**base, status="done", metrics={"test_nll": 1.23456}, error=None))
    assert done == "[sweep] k1 method=lora d_f=64: test NLL 1.2346 (12 s, attempt 2)"
    failed = run_line(SimpleNamespace(**base, status="failed", metrics=None, error="Traceback\n  ...\nValueError: x\n"))
    assert failed.endswith(": FAILED: ValueError: x (12 s, attempt 2)")
    assert "FAILED:  (" in run_line(SimpleNamespace(**base, status="failed", metrics=None, error="  \n"))
