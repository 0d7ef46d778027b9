"""The numerics of reported results, defined once: accuracy, bootstrap intervals, perplexity, paired differences.

Intervals are percentile bootstrap intervals over examples (Efron & Tibshirani 1993, ch. 13): resample the n
per-example values with replacement ``n_boot`` times, compute the statistic on each resample, and report the
``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those statistics. For accuracy on n examples
the interval's width is close to the normal one, ``2 * 1.96 * sqrt(p (1 - p) / n)`` at 95%.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

_MAX_CHUNK_ELEMENTS = 1 << 22  # resampled values held at once (32 MiB of float64)

Statistic = Callable[..., np.ndarray]


def accuracy(correct: Sequence[bool] | np.ndarray) -> float:
    """The fraction of True in ``correct``; nan for no examples."""
    values = _as_1d(correct, "correct")
    return float(values.mean()) if values.size else math.nan


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    statistic: Statistic = np.mean,
) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of ``statistic`` over the examples in ``values``.

    ``statistic(samples, axis=1)`` must reduce each row of a (m, n) array (np.mean, np.median do). Indices are
    drawn with ``np.random.default_rng(seed)`` in chunks of at most ``2**22`` values, so memory stays bounded and
    the result depends only on (values, n_boot, confidence, seed, statistic). n = 0 gives (nan, nan); n = 1 gives
    (v, v), since every resample is that one value.
    """
    x = _as_1d(values, "values")
    _check_bootstrap(n_boot, confidence)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        v = float(statistic(x[None, :], axis=1)[0])
        return v, v
    stats = _resampled_statistics(x, n_boot, seed, statistic)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _resampled_statistics(x: np.ndarray, n_boot: int, seed: int, statistic: Statistic) -> np.ndarray:
    """``statistic`` of ``n_boot`` resamples of ``x`` (with replacement), drawn chunk by chunk."""
    rng = np.random.default_rng(seed)
    n = x.size
    chunk = max(1, _MAX_CHUNK_ELEMENTS // n)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        out[start : start + m] = statistic(x[idx], axis=1)
    return out


def summarize_accuracy(
    correct: Sequence[bool] | np.ndarray, *, n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float | int]:
    """``{"accuracy", "ci_low", "ci_high", "n"}``: accuracy with its percentile bootstrap interval."""
    values = _as_1d(correct, "correct")
    low, high = bootstrap_ci(values, n_boot=n_boot, confidence=confidence, seed=seed)
    return {"accuracy": accuracy(values), "ci_low": low, "ci_high": high, "n": int(values.size)}


def perplexity(mean_nll: float) -> float:
    """``exp(mean_nll)``, the perplexity of a mean negative log-likelihood in nats per token.

    Returns inf instead of raising OverflowError once ``mean_nll`` exceeds ~709.78 (a diverged model); nan stays
    nan.
    """
    if math.isnan(mean_nll):
        return math.nan
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def paired_bootstrap_diff(
    a_correct: Sequence[float] | np.ndarray,
    b_correct: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(mean(a) - mean(b), low, high)`` for two methods scored on the same examples.

    The examples are resampled jointly — one index set per resample for both methods — which is the bootstrap of
    the per-example differences ``d_i = a_i - b_i``. Pairing removes the between-example variance the two methods
    share, so the interval is much narrower than one from two independent bootstraps when they agree often.
    A difference is significant at this level when the interval excludes 0. n = 0 gives (nan, nan, nan).
    """
    a, b = _as_1d(a_correct, "a_correct"), _as_1d(b_correct, "b_correct")
    if a.shape != b.shape:
        raise ValueError(
            f"paired comparison needs the same examples for both methods; got {a.size} and {b.size} values"
        )
    d = a - b
    low, high = bootstrap_ci(d, n_boot=n_boot, confidence=confidence, seed=seed)
    return (float(d.mean()) if d.size else math.nan), low, high


def seed_item_ci(
    correct: Sequence[Sequence[float]] | np.ndarray, *, n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of a (seeds × items) matrix of per-item scores, with an interval covering both.

    Two-level percentile bootstrap: each resample draws the S seeds with replacement *and* the N items with
    replacement (independently) and takes the mean of the resampled S × N block. With one seed it is the item
    bootstrap of :func:`bootstrap_ci`; with several, the spread between training seeds widens the interval, which
    an item bootstrap of seed-averaged scores would hide.
    """
    m = np.asarray(correct, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"seed_item_ci needs a (seeds, items) matrix, got shape {m.shape}")
    _check_bootstrap(n_boot, confidence)
    n_seeds, n_items = m.shape
    if m.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CHUNK_ELEMENTS // m.size)
    stats = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        rows = rng.integers(0, n_seeds, size=(k, n_seeds, 1))
        cols = rng.integers(0, n_items, size=(k, 1, n_items))
        stats[start : start + k] = m[rows, cols].mean(axis=(1, 2))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(m.mean()), float(low), float(high)


def stratified_paired_diff(
    pairs: Sequence[tuple[Sequence[float], Sequence[float]]], *, n_boot: int = 10_000, confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(diff, low, high)`` of the task-averaged score of method a minus method b over several tasks.

    ``pairs`` holds one (a, b) pair of per-item scores per task, on the same items (seed-averaged scores are
    fine). The statistic is mean over tasks of (mean(a_t) - mean(b_t)), each task weighted equally, as the
    "average" column of a table; each resample draws every task's items with replacement, jointly for a and b
    (the paired bootstrap of :func:`paired_bootstrap_diff`, stratified by task).
    """
    if not pairs:
        return math.nan, math.nan, math.nan
    _check_bootstrap(n_boot, confidence)
    diffs = []
    for a, b in pairs:
        x, y = _as_1d(a, "a"), _as_1d(b, "b")
        if x.shape != y.shape or x.size == 0:
            raise ValueError(f"each task needs the same, non-empty items for both methods; got {x.size} and {y.size}")
        diffs.append(x - y)
    rng = np.random.default_rng(seed)
    stats = np.zeros(n_boot, dtype=np.float64)
    for d in diffs:
        chunk = max(1, _MAX_CHUNK_ELEMENTS // d.size)
        for start in range(0, n_boot, chunk):
            k = min(chunk, n_boot - start)
            stats[start : start + k] += d[rng.integers(0, d.size, size=(k, d.size))].mean(axis=1)
    stats /= len(diffs)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(np.mean([d.mean() for d in diffs])), float(low), float(high)


def _as_1d(values: Sequence[float] | Sequence[bool] | np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one value per example (1-D), got shape {x.shape}")
    return x


def _check_bootstrap(n_boot: int, confidence: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
