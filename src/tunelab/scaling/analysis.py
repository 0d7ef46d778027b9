"""A study's results → points → fits of both laws per method → bootstrap intervals → verdicts on the paper's claims.

Works on any study store (toy or real models): a run is a point of every axis it belongs to, with X = its
non-embedding parameters (model axis), its pretraining tokens (pretraining axis) or its PET size (PET axis),
D_f = its fine-tuning examples and L = its test NLL per target token.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import AnalysisError
from tunelab.scaling.fit import LAWS, MethodFit, Point, bootstrap, critical_df, fit_method, interval
from tunelab.scaling.store import RunRow

PET_BOUND = 0.005  # the paper: |α_t| < 0.005 for prompt length and LoRA rank

__all__ = ["AnalysisError", "StudyFit", "Verdict", "fit_study", "points_from_rows", "study_summary", "verdicts"]


def points_from_rows(rows: Sequence[RunRow]) -> tuple[dict[str, list[Point]], dict[str, str]]:
    """Finished runs as points per method label, and each label's method name (full, lora, prompt, ...).

    A run whose test NLL is not finite (a diverged run stored before runs refused to finish with NaN) is never a
    point: it is left out with a warning naming it."""
    points: dict[str, list[Point]] = {}
    names: dict[str, str] = {}
    for row in rows:
        if row.status != "done" or not row.metrics or row.metrics.get("test_nll") is None:
            continue
        if not math.isfinite(float(row.metrics["test_nll"])):
            print(f"warning: run {row.key}: test_nll is {row.metrics['test_nll']}; left out of the fit "
                  "(rerun it with a smaller learning rate)", file=sys.stderr)
            continue
        f = row.factors
        names[f["method"]] = f.get("method_name") or f["method"]
        for axis in f["axes"]:
            x = {"model": f.get("params") or row.metrics.get("model_params"), "pretrain": f.get("tokens"),
                 "pet": f.get("pet_size")}[axis]
            if x:
                points.setdefault(f["method"], []).append(
                    Point(axis, float(x), float(f["d_f"]), float(row.metrics["test_nll"]), row.key))
    return points, names


@dataclass
class StudyFit:
    methods: dict[str, dict[str, MethodFit]]  # label -> law -> fit
    names: dict[str, str]
    points: dict[str, list[Point]]
    estimates: dict[str, float | None]
    intervals: dict[str, tuple[float, float]]
    replicates: int
    sizes: list[float]
    d_range: tuple[float, float]
    size_labels: dict[float, str] = field(default_factory=dict)

    def pairs(self) -> list[tuple[str, str]]:
        """(full-tuning method, PET method) pairs whose critical D_f is reported."""
        fulls = [m for m, n in self.names.items() if trains_base_weights(n)]
        pets = [m for m, n in self.names.items() if not trains_base_weights(n)]
        return [(f, p) for f in fulls for p in pets]


def trains_base_weights(method: str) -> bool:
    """Whether ``method`` tunes the model's own weights (the paper's FMT) rather than a PET module."""
    from tunelab.methods import REGISTRY, get_method

    return method in REGISTRY and get_method(method).CAPABILITIES.trains_base_weights


def fit_study(rows: Sequence[RunRow], *, bootstrap_replicates: int = 200, delta: float = 1e-3,
              heldout: bool = True, seed: int = 0) -> StudyFit:
    """Fit both laws for every method, then bootstrap over runs for 90% intervals of every derived quantity."""
    points, names = points_from_rows(rows)
    if not points:
        raise AnalysisError("no finished runs with a test_nll in the study: run `tunelab sweep SPEC` first")
    for label, pts in points.items():
        _check_points(label, pts)
    methods = {m: {law: fit_method(pts, law, delta=delta, heldout=heldout) for law in LAWS}
               for m, pts in points.items()}
    sizes = sorted({p.x for pts in points.values() for p in pts if p.factor == "model"})
    ds = [p.d for pts in points.values() for p in pts]
    study = StudyFit(methods, names, points, {}, {}, bootstrap_replicates, sizes, (min(ds) / 10, max(ds) * 10),
                     _size_labels(rows))
    study.estimates = quantities(study, methods)
    reps = bootstrap(points, lambda fits: quantities(study, fits), methods, replicates=bootstrap_replicates,
                     seed=seed, delta=delta, heldout=heldout)
    study.intervals = {k: interval([r.get(k) for r in reps]) for k in study.estimates}
    return study


def _check_points(label: str, pts: list[Point]) -> None:
    for factor in {p.factor for p in pts}:
        own = [p for p in pts if p.factor == factor]
        if len({p.d for p in own}) < 2 or len(own) < 4:
            raise AnalysisError(f"method '{label}', axis '{factor}': {len(own)} finished runs over "
                                f"{len({p.d for p in own})} D_f values; a law needs at least 2 D_f values and 4 runs")


def _size_labels(rows: Sequence[RunRow]) -> dict[float, str]:
    out = {}
    for r in rows:
        if "model" in r.factors.get("axes", []) and r.factors.get("params"):
            out[float(r.factors["params"])] = r.factors["model"]
    return out


def quantities(study: StudyFit, fits: dict[str, dict[str, MethodFit]]) -> dict[str, float | None]:
    """Every number a verdict rests on, from one set of fits (the estimate or a bootstrap replicate)."""
    q: dict[str, float | None] = {}
    for m, by_law in fits.items():
        for law, mf in by_law.items():
            any_law = next(iter(mf.laws.values()))
            q |= {f"{m}.{law}.beta": any_law.beta, f"{m}.{law}.E": any_law.E,
                  f"{m}.{law}.mad_fit": mf.mad_fit, f"{m}.{law}.mad_heldout": mf.mad_heldout}
            q |= {f"{m}.{law}.alpha_{f}": lp.alpha for f, lp in mf.laws.items()}
        mult = by_law["multiplicative"].laws
        if "model" in mult and "pretrain" in mult:
            q[f"{m}.alpha_model-alpha_pretrain"] = mult["model"].alpha - mult["pretrain"].alpha
        q[f"{m}.mad_heldout.additive-multiplicative"] = (by_law["additive"].mad_heldout
                                                         - by_law["multiplicative"].mad_heldout)
    for full, pet in study.pairs():
        if full in fits and pet in fits:
            a, b = fits[full]["multiplicative"].laws, fits[pet]["multiplicative"].laws
            q[f"beta.{full}-{pet}"] = next(iter(a.values())).beta - next(iter(b.values())).beta
            if "model" in a and "model" in b:
                for x in study.sizes:
                    q[f"critical_df.{full}-{pet}.{x:g}"] = critical_df(a["model"], b["model"], x, x, study.d_range)
    return q


# --------------------------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    claim: str
    paper: str
    subject: str
    estimate: float | None
    interval: tuple[float, float]
    verdict: str


def _sign_verdict(lo: float, hi: float, threshold: float = 0.0) -> str:
    if math.isnan(lo):
        return "no estimate"
    if lo > threshold:
        return "holds"
    if hi < threshold:
        return "reversed"
    return "inconclusive"


def verdicts(study: StudyFit) -> list[Verdict]:
    """The paper's findings, each with our estimate, its 90% bootstrap interval and the verdict it supports."""
    out: list[Verdict] = []
    est, ci = study.estimates, study.intervals

    def add(claim: str, paper: str, subject: str, key: str, judge: Any = _sign_verdict) -> None:
        if key in est:
            lo, hi = ci.get(key, (math.nan, math.nan))
            out.append(Verdict(claim, paper, subject, est[key], (lo, hi), judge(lo, hi)))

    for m in study.methods:
        add("power law in D_f (β > 0)", "holds for every method", m, f"{m}.multiplicative.beta")
    for m in study.methods:
        add("α_m > α_p (model size helps more than pretraining data)", "holds", m, f"{m}.alpha_model-alpha_pretrain")
    for m, name in study.names.items():
        if not trains_base_weights(name):
            add(f"|α_t| < {PET_BOUND} (PET size barely matters)", "holds", m, f"{m}.multiplicative.alpha_pet",
                _pet_verdict)
    for full, pet in study.pairs():
        add("β_FMT > β_PET (full tuning gains more from data)", "holds", f"{full} vs {pet}", f"beta.{full}-{pet}")
    for m in study.methods:
        add("multiplicative beats additive on held-out points (MAD_add − MAD_mult > 0)", "holds", m,
            f"{m}.mad_heldout.additive-multiplicative")
    out += _critical_verdicts(study)
    return out


def _pet_verdict(lo: float, hi: float) -> str:
    if math.isnan(lo):
        return "no estimate"
    if max(abs(lo), abs(hi)) < PET_BOUND:
        return "holds"
    if max(abs(lo), abs(hi)) < 0.05:
        return f"small (|α_t| < 0.05) but not < {PET_BOUND}"
    return "does not hold"


def _critical_verdicts(study: StudyFit) -> list[Verdict]:
    out = []
    for full, pet in study.pairs():
        for x in study.sizes:
            key = f"critical_df.{full}-{pet}.{x:g}"
            if key not in study.estimates:
                continue
            value = study.estimates[key]
            lo, hi = study.intervals.get(key, (math.nan, math.nan))
            found = value is not None
            verdict = (f"full tuning overtakes {pet} at D_f ≈ {value:.3g}" if found else
                       f"no crossing in D_f ∈ [{study.d_range[0]:.3g}, {study.d_range[1]:.3g}]")
            label = study.size_labels.get(x, f"{x:g}")
            out.append(Verdict("critical D_f where full tuning overtakes PET", "exists; depends on task and size",
                               f"{full} vs {pet} at {label} ({x:.3g} params)", value, (lo, hi), verdict))
    return out


def study_summary(study: StudyFit) -> dict[str, Any]:
    """JSON-ready summary: fitted laws per method and law, convergence, estimates and intervals."""
    methods = {}
    for m, by_law in study.methods.items():
        methods[m] = {law: {"laws": {f: lp.as_dict() for f, lp in mf.laws.items()},
                            "mad_fit": mf.mad_fit, "mad_heldout": mf.mad_heldout, "n_fit": mf.n_fit,
                            "n_heldout": mf.n_heldout, "convergence": _convergence(mf)}
                      for law, mf in by_law.items()}
    return {"methods": methods, "estimates": study.estimates,
            "intervals": {k: list(v) for k, v in study.intervals.items()}, "bootstrap_replicates": study.replicates,
            "verdicts": [v.__dict__ for v in verdicts(study)]}


def _convergence(mf: MethodFit) -> dict[str, Any]:
    fits = ([("stage1", mf.stage1)] if mf.stage1 else []) + [(f"stage2.{f}", fit) for f, fit in mf.fits.items()]
    return {name: {"objective": fit.objective, "converged": fit.converged, "starts": fit.starts,
                   "converged_starts": fit.converged_starts, "messages": fit.messages} for name, fit in fits}
