"""Fitting the scaling laws of fine-tuning (Zhang, Liu, Cherry, Firat, ICLR 2024, https://arxiv.org/abs/2402.17193).

Multiplicative joint law (the paper's), for one factor X (model size, pretraining tokens or PET size) and the
fine-tuning data size D_f:

    L̂(X, D_f) = A · X̃^(−α) · D̃_f^(−β) + E

additive law (the comparison):

    L̂(X, D_f) = A · X̃^(−α) + B · D̃_f^(−β) + E

with X̃ = X / X₀ and D̃_f = D_f / D₀ normalised by a reference point (the geometric means of the fitted values), and
A, B, E fitted as logs a, b, e. In log space ``log L̂`` is a log-sum-exp: log L̂ = LSE(a − α log X̃ − β log D̃, e)
(multiplicative) or LSE(a − α log X̃, b − β log D̃, e) (additive). The objective is the Huber loss (δ = 1e-3) of
the residuals r = log L̂ − log L **summed** over points — averaging it scales the gradient down by the number of
points and makes L-BFGS stop at its tolerance long before the optimum (the error Besiroglu et al., 2024 found in the
Chinchilla fits) — minimised with L-BFGS-B (analytic gradient, tight tolerances) from a grid of starts.

The paper's two-stage fit: stage 1 fits the model-size and pretraining-data axes of a method jointly with a shared β
and E (per-factor A and α); stage 2 refits A and α per factor (including the PET-size axis) with β and E fixed.
Held out from the fit, as in the paper: the largest model size, the largest D_f, an interior pretraining point; the
mean absolute deviation |L̂ − L| is reported on fitted and held-out points. Intervals (90%) come from a bootstrap
over runs; the critical D_f where two methods tie is the root of L̂₁ − L̂₂ (``scipy.optimize.brentq``).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import brentq, minimize

LAWS = ("multiplicative", "additive")
STAGE1_FACTORS = ("model", "pretrain")
FACTORS = ("model", "pretrain", "pet")
EXP_BOUNDS = (-2.0, 4.0)  # α, β: negative allowed (a PET size can hurt)
LOG_BOUNDS = (-20.0, 20.0)  # a, b, e
log = logging.getLogger(__name__)
LBFGS_OPTIONS = {"maxiter": 20000, "maxfun": 50000, "ftol": 1e-15, "gtol": 1e-12, "maxls": 50}


@dataclass(frozen=True)
class Point:
    """One observation: test NLL ``loss`` of a run at factor value ``x`` (on axis ``factor``) and D_f = ``d``."""

    factor: str
    x: float
    d: float
    loss: float
    run: str = ""


# --------------------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------------------


def huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss h_δ(r) = r²/2 (|r| ≤ δ), δ(|r| − δ/2) otherwise, and its derivative clip(r, −δ, δ)."""
    a = np.abs(r)
    inside = a <= delta
    value = np.where(inside, 0.5 * r * r, delta * (a - 0.5 * delta))
    return value, np.where(inside, r, np.copysign(delta, r))


@dataclass
class Layout:
    """Where each parameter sits in θ for a joint fit over ``factors``: [a_f…, α_f…, (b), β, e]."""

    law: str
    factors: list[str]

    @property
    def size(self) -> int:
        return 2 * len(self.factors) + (3 if self.law == "additive" else 2)

    def a(self, g: int) -> int:
        return g

    def alpha(self, g: int) -> int:
        return len(self.factors) + g

    @property
    def b(self) -> int:
        return 2 * len(self.factors)

    @property
    def beta(self) -> int:
        return self.size - 2

    @property
    def e(self) -> int:
        return self.size - 1

    def bounds(self, fixed: dict[int, float]) -> list[tuple[float, float]]:
        out = []
        for i in range(self.size):
            is_exp = i == self.beta or len(self.factors) <= i < 2 * len(self.factors)
            out.append((fixed[i], fixed[i]) if i in fixed else EXP_BOUNDS if is_exp else LOG_BOUNDS)
        return out


@dataclass
class Data:
    """Arrays of a fit: group index, log X̃, log D̃, log L per point."""

    group: np.ndarray
    lx: np.ndarray
    ld: np.ndarray
    log_loss: np.ndarray


def log_predict(theta: np.ndarray, lay: Layout, data: Data) -> tuple[np.ndarray, list[np.ndarray]]:
    """log L̂ per point and the softmax weights of its log-sum-exp terms (for the gradient)."""
    g = len(lay.factors)
    a, alpha = theta[:g][data.group], theta[g: 2 * g][data.group]
    beta, e = theta[lay.beta], theta[lay.e]
    if lay.law == "multiplicative":
        t = a - alpha * data.lx - beta * data.ld
        pred = np.logaddexp(t, e)
        w0 = np.exp(t - pred)
        return pred, [w0, 1.0 - w0]
    t1, t2 = a - alpha * data.lx, theta[lay.b] - beta * data.ld
    pred = np.logaddexp(np.logaddexp(t1, t2), e)
    w1, w2 = np.exp(t1 - pred), np.exp(t2 - pred)
    return pred, [w1, w2, np.exp(e - pred)]


def objective(theta: np.ndarray, lay: Layout, data: Data, delta: float) -> tuple[float, np.ndarray]:
    """Σ_i h_δ(log L̂_i − log L_i) and its gradient in θ (d log L̂ / d term = that term's softmax weight)."""
    pred, w = log_predict(theta, lay, data)
    value, psi = huber(pred - data.log_loss, delta)
    g = len(lay.factors)
    grad = np.empty_like(theta)
    pw = psi * w[0]
    grad[:g] = np.bincount(data.group, pw, minlength=g)
    grad[g: 2 * g] = np.bincount(data.group, -pw * data.lx, minlength=g)
    data_term = psi * (w[0] if lay.law == "multiplicative" else w[1])
    grad[lay.beta] = -np.dot(data_term, data.ld)
    if lay.law == "additive":
        grad[lay.b] = np.sum(psi * w[1])
    grad[lay.e] = np.dot(psi, w[-1])
    return float(value.sum()), grad


# --------------------------------------------------------------------------------------------------------------
# One fit
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """X₀ per factor and D₀: inputs are divided by these before fitting (geometric means of the fitted points)."""

    x: dict[str, float]
    d: float

    @classmethod
    def of(cls, points: Sequence[Point]) -> Reference:
        xs: dict[str, list[float]] = {}
        for p in points:
            xs.setdefault(p.factor, []).append(math.log(p.x))
        d = float(np.exp(np.mean([math.log(p.d) for p in points])))
        return cls({f: float(np.exp(np.mean(v))) for f, v in xs.items()}, d)


@dataclass
class LawParams:
    """Fitted law of one factor, in normalised units: L̂ = A·(X/X₀)^−α·(D/D₀)^−β + E (or the additive form)."""

    law: str
    A: float
    alpha: float
    beta: float
    E: float
    B: float = float("nan")
    x0: float = 1.0
    d0: float = 1.0

    def predict(self, x: Any, d: Any) -> np.ndarray:
        xt, dt = np.asarray(x, float) / self.x0, np.asarray(d, float) / self.d0
        if self.law == "multiplicative":
            return self.A * xt ** -self.alpha * dt ** -self.beta + self.E
        return self.A * xt ** -self.alpha + self.B * dt ** -self.beta + self.E

    def as_dict(self) -> dict[str, float]:
        out = {"A": self.A, "alpha": self.alpha, "beta": self.beta, "E": self.E, "x0": self.x0, "d0": self.d0}
        if self.law == "additive":
            out["B"] = self.B
        return out


@dataclass
class Fit:
    """A (joint) fit: per-factor laws, objective, and the convergence record of its starts."""

    law: str
    params: dict[str, LawParams]
    objective: float
    theta: np.ndarray
    converged: bool
    starts: int
    converged_starts: int
    messages: dict[str, int] = field(default_factory=dict)

    def predict(self, p: Point) -> float:
        return float(self.params[p.factor].predict(p.x, p.d))


def _data(points: Sequence[Point], factors: list[str], ref: Reference) -> Data:
    index = {f: i for i, f in enumerate(factors)}
    return Data(group=np.array([index[p.factor] for p in points], dtype=int),
                lx=np.array([math.log(p.x / ref.x[p.factor]) for p in points]),
                ld=np.array([math.log(p.d / ref.d) for p in points]),
                log_loss=np.array([math.log(p.loss) for p in points]))


def start_grid(points: Sequence[Point], lay: Layout, size: str = "wide") -> list[np.ndarray]:
    """Starts for L-BFGS: a grid over α, β, E (as a share of the lowest loss) and A around mean(L) − E."""
    losses = np.array([p.loss for p in points])
    alphas, betas = ((0.0, 0.2, 0.5, 1.0), (0.0, 0.2, 0.5, 1.0)) if size == "wide" else ((0.1, 0.5), (0.1, 0.5))
    shares = (0.05, 0.5, 0.9) if size == "wide" else (0.5,)
    starts = []
    for alpha, beta, share in itertools.product(alphas, betas, shares):
        E = share * losses.min()
        level = math.log(max(float(np.mean(losses)) - E, 1e-6))
        theta = np.zeros(lay.size)
        for g in range(len(lay.factors)):
            theta[lay.a(g)], theta[lay.alpha(g)] = level - (math.log(2) if lay.law == "additive" else 0), alpha
        if lay.law == "additive":
            theta[lay.b] = level - math.log(2)
        theta[lay.beta], theta[lay.e] = beta, math.log(E)
        starts.append(theta)
    return starts


def fit_law(points: Sequence[Point], law: str, *, delta: float = 1e-3, ref: Reference | None = None,
            fixed: dict[str, float] | None = None, starts: Sequence[np.ndarray] | None = None) -> Fit:
    """Fit ``law`` jointly over the factors present in ``points`` (shared β, E — and B for the additive law —,
    per-factor A and α). ``fixed`` holds shared parameters by name ('beta', 'E', 'B') at given values."""
    if law not in LAWS:
        raise ValueError(f"unknown law {law!r}; laws: {', '.join(LAWS)}")
    factors = sorted({p.factor for p in points}, key=FACTORS.index)
    lay = Layout(law, factors)
    ref = ref or Reference.of(points)
    data = _data(points, factors, ref)
    pinned = _pinned(lay, fixed or {})
    tries = list(starts) if starts is not None else start_grid(points, lay)
    results = [_minimise(_pin(t, pinned), lay, data, delta, pinned) for t in tries]
    best = min(results, key=lambda r: r.fun)
    theta = best.x
    params = {f: _params(theta, lay, g, ref) for g, f in enumerate(factors)}
    messages = Counter(str(r.message) for r in results)
    n_ok = sum(bool(r.success) for r in results)
    log.info("%s fit of %s (%d points): objective %.6g, best start %s after %d iterations, %d/%d starts "
             "converged; %s", law, "+".join(factors), len(points), best.fun, "converged" if best.success else
             f"NOT converged ({best.message})", best.nit, n_ok, len(results), dict(messages))
    return Fit(law, params, float(best.fun), theta, bool(best.success), len(results), n_ok, dict(messages))


def _pinned(lay: Layout, fixed: dict[str, float]) -> dict[int, float]:
    names = {"beta": lay.beta, "E": lay.e, "B": lay.b}
    out = {}
    for name, value in fixed.items():
        out[names[name]] = value if name == "beta" else math.log(value)
    return out


def _pin(theta: np.ndarray, pinned: dict[int, float]) -> np.ndarray:
    theta = theta.copy()
    for i, v in pinned.items():
        theta[i] = v
    return theta


def _minimise(theta0: np.ndarray, lay: Layout, data: Data, delta: float, pinned: dict[int, float]) -> Any:
    return minimize(objective, theta0, args=(lay, data, delta), jac=True, method="L-BFGS-B",
                    bounds=lay.bounds(pinned), options=LBFGS_OPTIONS)


def _params(theta: np.ndarray, lay: Layout, g: int, ref: Reference) -> LawParams:
    f = lay.factors[g]
    B = math.exp(theta[lay.b]) if lay.law == "additive" else float("nan")
    return LawParams(lay.law, math.exp(theta[lay.a(g)]), float(theta[lay.alpha(g)]), float(theta[lay.beta]),
                     math.exp(theta[lay.e]), B, ref.x[f], ref.d)


# --------------------------------------------------------------------------------------------------------------
# The paper's procedure for one method: held-out points, two stages
# --------------------------------------------------------------------------------------------------------------


def heldout_mask(points: Sequence[Point]) -> list[bool]:
    """True for held-out points: the largest model size, the largest D_f, an interior pretraining point."""
    d_max = max(p.d for p in points)
    by_factor: dict[str, list[float]] = {}
    for p in points:
        by_factor.setdefault(p.factor, []).append(p.x)
    sizes = sorted(set(by_factor.get("model", [])))
    pre = sorted(set(by_factor.get("pretrain", [])))
    interior = pre[len(pre) // 2] if len(pre) >= 3 else None
    out = []
    for p in points:
        largest = p.factor == "model" and len(sizes) >= 3 and p.x == sizes[-1]
        middle = p.factor == "pretrain" and p.x == interior
        out.append(largest or middle or (p.d == d_max and len({q.d for q in points}) >= 3))
    return out


@dataclass
class MethodFit:
    """Both stages of one law for one method, with the deviations on fitted and held-out points."""

    law: str
    stage1: Fit | None
    laws: dict[str, LawParams]  # factor -> final (stage 2) law
    fits: dict[str, Fit]
    mad_fit: float
    mad_heldout: float
    n_fit: int
    n_heldout: int

    def predict(self, p: Point) -> float:
        return float(self.laws[p.factor].predict(p.x, p.d))


def fit_method(points: Sequence[Point], law: str, *, delta: float = 1e-3, heldout: bool = True,
               warm: MethodFit | None = None) -> MethodFit:
    """Two-stage fit of one method's points (see the module docstring).

    Stage 1 starts from the full grid (or, in a bootstrap replicate, from the estimate ``warm`` plus one grid
    point); stage 2, a fit of (a, α) alone with the shared parameters fixed, starts from stage 1's values for the
    factor (or ``warm``'s) and from α ∈ {0, 0.5}.
    """
    mask = heldout_mask(points) if heldout else [False] * len(points)
    train = [p for p, h in zip(points, mask, strict=True) if not h]
    test = [p for p, h in zip(points, mask, strict=True) if h]
    ref = Reference.of(points)
    joint = [p for p in train if p.factor in STAGE1_FACTORS]
    stage1 = None
    shared: dict[str, float] = {}
    if joint:
        stage1 = fit_law(joint, law, delta=delta, ref=ref, starts=_warm_starts(warm and warm.stage1, joint))
        any_law = next(iter(stage1.params.values()))
        shared = {"beta": any_law.beta, "E": any_law.E} | ({"B": any_law.B} if law == "additive" else {})
    fits = {}
    for factor in sorted({p.factor for p in train}, key=FACTORS.index):
        own = [p for p in train if p.factor == factor]
        if shared:
            previous = (warm.fits.get(factor) if warm else None) or stage1
            starts = _stage2_starts(previous, factor, own, law)
        else:
            starts = _warm_starts(warm.fits.get(factor) if warm else None, own)
        fits[factor] = fit_law(own, law, delta=delta, ref=ref, fixed=shared or None, starts=starts)
    laws = {f: fit.params[f] for f, fit in fits.items()}
    return MethodFit(law, stage1, laws, fits, _mad(train, laws), _mad(test, laws), len(train), len(test))


def _warm_starts(previous: Fit | None, points: Sequence[Point]) -> list[np.ndarray] | None:
    """The previous optimum plus one grid point, when its layout fits these points (None: the full grid)."""
    if previous is None:
        return None
    lay = Layout(previous.law, sorted({p.factor for p in points}, key=FACTORS.index))
    if lay.size != len(previous.theta):
        return None
    return [previous.theta, start_grid(points, lay, "small")[0]]


def _stage2_starts(previous: Fit | None, factor: str, points: Sequence[Point], law: str) -> list[np.ndarray]:
    """Starts for a one-factor fit with shared parameters pinned: the previous (a, α) of this factor, α ∈ {0, 0.5}."""
    lay = Layout(law, [factor])
    base = start_grid(points, lay, "small")[0]
    starts = []
    if previous is not None and factor in previous.params:
        old = previous.params[factor]
        theta = base.copy()
        theta[lay.a(0)], theta[lay.alpha(0)] = math.log(old.A), old.alpha
        starts.append(theta)
    for alpha in (0.0, 0.5):
        theta = base.copy()
        theta[lay.alpha(0)] = alpha
        starts.append(theta)
    return starts


def _mad(points: Sequence[Point], laws: dict[str, LawParams]) -> float:
    devs = [abs(float(laws[p.factor].predict(p.x, p.d)) - p.loss) for p in points if p.factor in laws]
    return float(np.mean(devs)) if devs else float("nan")


# --------------------------------------------------------------------------------------------------------------
# Critical fine-tuning data size
# --------------------------------------------------------------------------------------------------------------


def critical_df(first: LawParams, second: LawParams, x_first: float, x_second: float,
                d_range: tuple[float, float]) -> float | None:
    """The D_f where L̂₁(X, D_f) = L̂₂(X, D_f) and method 1 overtakes method 2 (L̂₁ − L̂₂ turns from > 0 to < 0),
    searched on a log grid over ``d_range`` and refined with brentq; None when they do not cross there."""
    def gap(u: float) -> float:
        d = math.exp(u)
        return float(first.predict(x_first, d) - second.predict(x_second, d))

    us = np.linspace(math.log(d_range[0]), math.log(d_range[1]), 400)
    values = [gap(u) for u in us]
    for lo, hi, vlo, vhi in zip(us[:-1], us[1:], values[:-1], values[1:], strict=True):
        if vlo > 0 >= vhi:
            return math.exp(brentq(gap, lo, hi, xtol=1e-12)) if vhi < 0 else math.exp(hi)
    return None


# --------------------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------------------


def resample_runs(points: Sequence[Point], rng: np.random.Generator) -> list[Point]:
    """A bootstrap sample over runs: draw runs with replacement, keep all points of each drawn run."""
    runs: dict[str, list[Point]] = {}
    for p in points:
        runs.setdefault(p.run or f"{p.factor}:{p.x}:{p.d}", []).append(p)
    keys = list(runs)
    drawn = rng.integers(0, len(keys), size=len(keys))
    return [p for i in drawn for p in runs[keys[i]]]


def interval(values: Sequence[float], level: float = 0.90) -> tuple[float, float]:
    """Percentile interval (5th, 95th for 90%) of the finite values; (nan, nan) when there are none."""
    arr = np.array([v for v in values if v is not None and np.isfinite(v)], float)
    if arr.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    return float(np.percentile(arr, tail)), float(np.percentile(arr, 100 - tail))


def bootstrap(points_by_method: dict[str, list[Point]], quantities: Callable[[dict[str, dict[str, MethodFit]]],
              dict[str, float | None]], estimate: dict[str, dict[str, MethodFit]], *, replicates: int,
              seed: int = 0, delta: float = 1e-3, heldout: bool = True) -> list[dict[str, float | None]]:
    """``quantities`` of each bootstrap replicate: every method's runs resampled, both laws refitted (warm-started
    at the point estimate)."""
    from tunelab import progress

    rng = np.random.default_rng(seed)
    out = []
    for _ in progress.bar(range(replicates), desc="bootstrap", unit="fit", leave=False):
        fits: dict[str, dict[str, MethodFit]] = {}
        for method, points in points_by_method.items():
            sample = resample_runs(points, rng)
            fits[method] = {law: fit_method(sample, law, delta=delta, heldout=heldout, warm=estimate[method][law])
                            for law in estimate[method]}
        out.append(quantities(fits))
    return out
