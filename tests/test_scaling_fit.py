"""The law fitter: gradient, recovery of the paper's Table 4 parameters from noisy points, held-out points,
the additive law, the critical D_f, the bootstrap, and an independent plain-scipy oracle of the objective."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import approx_fprime, minimize

from tunelab.scaling.fit import (
    Data,
    LawParams,
    Layout,
    Point,
    Reference,
    bootstrap,
    critical_df,
    fit_law,
    fit_method,
    heldout_mask,
    huber,
    interval,
    objective,
)

# Zhang et al. (2024), Table 4, En-De full-model tuning.
ALPHA_M, ALPHA_P, BETA, E = 0.52, 0.21, 0.15, 0.75
SIZES = [1e9, 2e9, 4e9, 8e9, 16e9]
TOKENS = [25e9, 50e9, 100e9, 200e9, 283e9]
D_F = [1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6]


def table4_points(noise: float = 0.005, seed: int = 0) -> list[Point]:
    """L = A·(X/X₀)^−α·(D/D₀)^−β + E per axis, times log-normal noise."""
    rng = np.random.default_rng(seed)
    points = []
    for factor, xs, alpha, A in (("model", SIZES, ALPHA_M, 1.2), ("pretrain", TOKENS, ALPHA_P, 1.0)):
        x0 = math.exp(np.mean(np.log(xs)))
        for x in xs:
            for d in D_F:
                clean = A * (x / x0) ** -alpha * (d / 3e4) ** -BETA + E
                points.append(Point(factor, x, d, clean * math.exp(noise * rng.standard_normal()), f"{factor}{x}{d}"))
    return points


def test_huber_is_quadratic_inside_delta_and_linear_outside():
    v, g = huber(np.array([0.0005, -0.01]), 1e-3)
    assert v[0] == pytest.approx(0.5 * 0.0005**2) and v[1] == pytest.approx(1e-3 * (0.01 - 0.0005))
    assert g.tolist() == pytest.approx([0.0005, -1e-3])


@pytest.mark.parametrize("law", ["multiplicative", "additive"])
def test_gradient_matches_finite_differences(law):
    pts = table4_points()
    lay = Layout(law, ["model", "pretrain"])
    ref = Reference.of(pts)
    from tunelab.scaling.fit import _data

    data = _data(pts, lay.factors, ref)
    theta = np.random.default_rng(1).normal(0, 0.3, lay.size)
    # δ large: the whole objective is smooth, so finite differences are exact to O(h²)
    f = lambda t: objective(t, lay, data, 10.0)[0]  # noqa: E731
    assert objective(theta, lay, data, 10.0)[1] == pytest.approx(approx_fprime(theta, f, 1e-7), rel=1e-4, abs=1e-5)


def test_recovers_table4_parameters_from_noisy_points():
    pts = table4_points()
    fit = fit_law(pts, "multiplicative")
    assert fit.converged_starts >= 1 and fit.starts >= 40
    m, p = fit.params["model"], fit.params["pretrain"]
    assert m.alpha == pytest.approx(ALPHA_M, abs=0.03) and p.alpha == pytest.approx(ALPHA_P, abs=0.03)
    assert m.beta == pytest.approx(BETA, abs=0.015) and abs(m.E - E) < 0.03
    assert m.beta == p.beta and m.E == p.E  # shared across the two axes


def test_two_stage_fit_with_heldout_points_extrapolates():
    pts = table4_points()
    mask = heldout_mask(pts)
    assert all(p.x == SIZES[-1] or p.d == D_F[-1] for p, h in zip(pts, mask, strict=True) if h and p.factor == "model")
    assert any(h and p.factor == "pretrain" and p.x == TOKENS[2] for p, h in zip(pts, mask, strict=True))
    mf = fit_method(pts, "multiplicative")
    assert mf.laws["model"].alpha == pytest.approx(ALPHA_M, abs=0.05)
    assert mf.laws["pretrain"].alpha == pytest.approx(ALPHA_P, abs=0.05)
    assert mf.mad_heldout < 0.02 and mf.mad_fit < 0.01 and mf.n_heldout > 0
    additive = fit_method(pts, "additive")
    assert additive.mad_heldout > mf.mad_heldout  # the data are multiplicative


def test_sum_not_mean_oracle_with_plain_scipy():
    """An independent implementation (written from the equation, numeric gradient) reaches the same optimum."""
    pts = [p for p in table4_points(noise=0.002) if p.factor == "model"]
    x, d = np.array([p.x for p in pts]), np.array([p.d for p in pts])
    y = np.log([p.loss for p in pts])
    x0, d0 = math.exp(np.mean(np.log(x))), math.exp(np.mean(np.log(d)))

    def total(t):
        a, alpha, beta, e = t
        pred = np.logaddexp(a - alpha * np.log(x / x0) - beta * np.log(d / d0), e)
        r = pred - y
        return np.sum(np.where(np.abs(r) <= 1e-3, 0.5 * r**2, 1e-3 * (np.abs(r) - 0.5e-3)))

    best = min((minimize(total, s, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 40000})
                for s in ([0, 0.5, 0.2, -0.3], [0.5, 0.3, 0.1, -0.2])), key=lambda r: r.fun)
    ours = fit_law(pts, "multiplicative").params["model"]
    assert ours.alpha == pytest.approx(best.x[1], abs=2e-3) and ours.beta == pytest.approx(best.x[2], abs=2e-3)
    assert abs(ours.E - math.exp(best.x[3])) < 3e-3


def test_fixed_shared_parameters_are_kept():
    pts = [p for p in table4_points() if p.factor == "pretrain"]
    fit = fit_law(pts, "multiplicative", fixed={"beta": 0.2, "E": 0.7})
    assert fit.params["pretrain"].beta == 0.2 and abs(fit.params["pretrain"].E - 0.7) < 1e-12


def test_critical_df_where_full_tuning_overtakes():
    full = LawParams("multiplicative", A=2.0, alpha=0.3, beta=0.4, E=0.5)
    pet = LawParams("multiplicative", A=1.0, alpha=0.3, beta=0.1, E=0.6)
    d = critical_df(full, pet, 1.0, 1.0, (1e-3, 1e6))
    assert full.predict(1.0, d) == pytest.approx(pet.predict(1.0, d), abs=1e-9)
    assert full.predict(1.0, d * 2) < pet.predict(1.0, d * 2)
    assert critical_df(pet, pet, 1.0, 1.0, (1.0, 10.0)) is None


def test_bootstrap_intervals_cover_the_truth():
    pts = table4_points(noise=0.01)
    est = {"full": {"multiplicative": fit_method(pts, "multiplicative")}}
    reps = bootstrap({"full": pts}, lambda f: {"am": f["full"]["multiplicative"].laws["model"].alpha}, est,
                     replicates=12, seed=0)
    lo, hi = interval([r["am"] for r in reps])
    assert lo < hi and lo - 0.05 < ALPHA_M < hi + 0.05
    assert all(math.isnan(v) for v in interval([float("nan")]))


def test_data_layout_sizes():
    assert Layout("multiplicative", ["model"]).size == 4 and Layout("additive", ["model", "pet"]).size == 7
    assert isinstance(Data(np.zeros(1, int), np.zeros(1), np.zeros(1), np.zeros(1)), Data)


def test_report_flags_an_irreducible_term_fitted_at_its_bound():
    from types import SimpleNamespace

    from tunelab.scaling.fit import LOG_BOUNDS
    from tunelab.scaling.report import _bound_notes

    def study(e):
        law = SimpleNamespace(laws={"model": SimpleNamespace(E=e), "pretrain": SimpleNamespace(E=0.7)})
        return SimpleNamespace(methods={"full": {"multiplicative": law}})

    note = _bound_notes(study(math.exp(LOG_BOUNDS[0])))
    assert len(note) == 2 and "E is at its lower bound" in note[1] and "full multiplicative" in note[1]
    assert _bound_notes(study(0.75)) == []
