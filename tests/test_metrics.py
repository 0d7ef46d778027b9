"""Metrics: accuracy, percentile bootstrap intervals, perplexity, paired differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tunelab.eval import metrics
from tunelab.eval.metrics import (
    accuracy,
    bootstrap_ci,
    paired_bootstrap_diff,
    perplexity,
    summarize_accuracy,
)


def _bernoulli(p: float, n: int, seed: int = 0) -> np.ndarray:
    """Exactly round(p n) ones among n, shuffled: a sample whose accuracy is p."""
    x = np.zeros(n)
    x[: round(p * n)] = 1.0
    return np.random.default_rng(seed).permutation(x)


def test_accuracy() -> None:
    assert accuracy([True, False, True, True]) == 0.75
    assert accuracy(np.array([False, False])) == 0.0
    assert math.isnan(accuracy([]))
    with pytest.raises(ValueError, match="1-D"):
        accuracy([[True], [False]])


def test_interval_contains_the_mean_and_narrows_with_n() -> None:
    widths = []
    for n in (100, 400, 1600):
        x = _bernoulli(0.3, n)
        low, high = bootstrap_ci(x, n_boot=2000)
        assert low < x.mean() < high
        widths.append(high - low)
    # the width scales as 1/sqrt(n): quadrupling n halves it
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4.0, rel=0.15)


def test_interval_width_matches_the_normal_approximation() -> None:
    p, n = 0.3, 400
    low, high = bootstrap_ci(_bernoulli(p, n))
    assert high - low == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n), rel=0.15)
    low90, high90 = bootstrap_ci(_bernoulli(p, n), confidence=0.90)
    assert low < low90 < high90 < high


def test_coverage_on_bernoulli_data() -> None:
    # 200 data sets of n=100 drawn from Bernoulli(0.3): about 95% of their 95% intervals contain 0.3
    rng = np.random.default_rng(123)
    hits = 0
    for i in range(200):
        low, high = bootstrap_ci(rng.random(100) < 0.3, n_boot=500, seed=i)
        hits += low <= 0.3 <= high
    assert 0.88 <= hits / 200 <= 0.99


def test_deterministic_for_the_seed_and_the_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(5).normal(size=300)  # continuous, so different seeds give different quantiles
    first = bootstrap_ci(x, n_boot=1000, seed=7)
    assert bootstrap_ci(x, n_boot=1000, seed=7) == first
    assert bootstrap_ci(x, n_boot=1000, seed=8) != first
    monkeypatch.setattr(metrics, "_MAX_CHUNK_ELEMENTS", 1000)  # 3 resamples per chunk instead of all at once
    assert bootstrap_ci(x, n_boot=1000, seed=7) == first


def test_edge_cases() -> None:
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci([0.7]) == (0.7, 0.7)
    assert bootstrap_ci([2.0] * 50, n_boot=100) == (2.0, 2.0)
    assert bootstrap_ci([1.0, 2.0, 3.0, 100.0], n_boot=500, statistic=np.median)[1] <= 100.0
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=95)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1.0, 2.0], n_boot=0)


def test_summarize_accuracy() -> None:
    s = summarize_accuracy([True] * 30 + [False] * 70, n_boot=1000)
    assert set(s) == {"accuracy", "ci_low", "ci_high", "n"}
    assert s["n"] == 100 and s["accuracy"] == 0.3
    assert s["ci_low"] < 0.3 < s["ci_high"]
    empty = summarize_accuracy([])
    assert empty["n"] == 0 and math.isnan(empty["accuracy"]) and math.isnan(empty["ci_low"])


def test_perplexity() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert perplexity(1000.0) == math.inf
    assert perplexity(-math.inf) == 0.0
    assert math.isnan(perplexity(math.nan))


def test_paired_diff_of_identical_vectors_is_zero() -> None:
    a = _bernoulli(0.6, 200)
    assert paired_bootstrap_diff(a, a.copy()) == (0.0, 0.0, 0.0)


def test_paired_diff() -> None:
    assert paired_bootstrap_diff([1, 1, 1], [0, 0, 0], n_boot=100) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    b = rng.random(500) < 0.5
    a = b.copy()
    a[rng.choice(np.flatnonzero(~b), 40, replace=False)] = True  # a = b plus 40 extra right answers
    diff, low, high = paired_bootstrap_diff(a, b, n_boot=2000)
    assert diff == pytest.approx(40 / 500)
    assert 0.0 < low < diff < high
    # pairing removes the shared variance: far narrower than the two independent intervals combined
    la, ha = bootstrap_ci(a, n_boot=2000)
    lb, hb = bootstrap_ci(b, n_boot=2000)
    assert high - low < 0.5 * math.hypot(ha - la, hb - lb)


def test_paired_diff_errors_and_empty() -> None:
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap_diff([1, 0], [1, 0, 1])
    assert all(math.isnan(v) for v in paired_bootstrap_diff([], []))
