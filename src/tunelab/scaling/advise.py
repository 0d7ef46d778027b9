"""From a fitted study to a decision: which method, at which PET size, for N examples and a time / memory budget.

``advise(store, examples=N, budget_hours=H, memory_gib=M)`` turns the fitted laws of a study (``analysis``) and the
costs measured in its runs (training seconds per step, peak RSS, trainable parameters: recorded by the runner) into:

- one **candidate** per (method, PET size) the study measured on the advised model — a PET method on the PET-size
  axis is one candidate per size (its law ``pet`` at X = the size), otherwise the method at its default size (law
  ``model`` at X = the model's non-embedding parameters, or ``pretrain`` at its pretraining tokens);
- per method the law (multiplicative or additive) with the lower deviation on held-out points;
- each candidate's predicted test NLL at D_f = N with a 90% interval (bootstrap over runs, as every interval of
  the lab), its expected training time — the study's step budget at N (``BudgetSpec.steps``) times the median
  measured seconds per step — and its measured peak RSS;
- the candidate with the lowest predicted loss among those that fit the budget, the best candidate of another
  method as the runner-up, their paired difference with its interval, and the D_f where the two cross.

Predictions outside the measured D_f range, or a budget that no candidate fits, are said in the advice's
``warnings``. ``check(store)`` replays the advice on held-out data: for each of the largest D_f values of the study it
fits on the other D_f values only, advises at that D_f, and compares with the losses measured there.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import AnalysisError
from tunelab.scaling.analysis import points_from_rows
from tunelab.scaling.fit import (
    LAWS,
    LawParams,
    MethodFit,
    Point,
    bootstrap,
    critical_df,
    fit_method,
    interval,
)
from tunelab.scaling.spec import BudgetSpec
from tunelab.scaling.store import RunRow, Store

DEFAULT_REPLICATES = 100  # bootstrap replicates unless asked (a replicate refits every method: ~1 s each on 2 cores)

__all__ = ["Advice", "Candidate", "advise", "check", "render"]


@dataclass
class Candidate:
    method: str  # the study's method label
    method_name: str  # full, lora, prompt, ...
    pet_size: int | None
    pet_key: str | None  # the method option the PET size sets (r, num_tokens, ...)
    factor: str  # the law's axis used for the prediction: pet, model or pretrain
    x: float  # that axis's value for this candidate
    law: str  # multiplicative or additive
    loss: float = math.nan  # predicted test NLL at D_f = N
    interval: tuple[float, float] = (math.nan, math.nan)
    steps: int = 0  # the study's step budget at N
    seconds_per_step: float | None = None
    hours: float | None = None  # expected training time at N
    peak_rss_gib: float | None = None
    trainable_params: int | None = None
    tokens_per_s: float | None = None
    accuracy: float | None = None  # measured exact match, interpolated in log D_f (where the study has it)
    accuracy_note: str = ""
    fits_budget: bool = True
    over: list[str] = field(default_factory=list)  # which limits it exceeds

    @property
    def name(self) -> str:
        if self.pet_size is None:
            return self.method
        return f"{self.method} {self.pet_key}={self.pet_size}" if self.pet_key else f"{self.method} ({self.pet_size})"


@dataclass
class Advice:
    study: str
    model: str
    examples: int
    budget_hours: float | None
    memory_gib: float | None
    best: Candidate | None
    runner_up: Candidate | None
    difference: tuple[float, float, float] | None  # best − runner-up: estimate, 90% interval
    crossing: dict[str, Any] | None  # where best and runner-up trade places, with its interval
    candidates: list[Candidate]
    d_range: tuple[float, float]  # the D_f values measured
    replicates: int
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("best", "runner_up"):
            if out[key] is not None:
                out[key]["name"] = getattr(self, key).name
        for c, d in zip(self.candidates, out["candidates"], strict=True):
            d["name"] = c.name
        return out


# --------------------------------------------------------------------------------------------------------------
# Candidates and their costs
# --------------------------------------------------------------------------------------------------------------


def _spec(store: Store) -> dict[str, Any]:
    return store.info("spec", {}) or {}


def _target_model(rows: Sequence[RunRow], spec: dict[str, Any], model: str | None) -> str:
    labels = sorted({r.factors.get("model") for r in rows if r.factors.get("model")})
    if model is not None:
        if model not in labels:
            raise AnalysisError(f"model {model!r} is not in the study; its models: {', '.join(labels)}")
        return model
    if spec.get("pet_model") in labels:
        return spec["pet_model"]
    sized = [r for r in rows if r.factors.get("params")]
    if sized:  # the largest model of the size axis
        return max(sized, key=lambda r: r.factors["params"]).factors["model"]
    return labels[-1]


def _candidates(rows: Sequence[RunRow], points: dict[str, list[Point]], names: dict[str, str],
                model: str, spec: dict[str, Any]) -> list[Candidate]:
    keys = {m.get("label"): (m.get("pet") or {}).get("key") for m in spec.get("methods", [])}
    out = []
    mine = [r for r in rows if r.factors.get("model") == model]
    for method, pts in points.items():
        own = [r for r in mine if r.factors.get("method") == method]
        if not own:
            continue
        on_pet = [r for r in own if "pet" in r.factors.get("axes", [])]
        if on_pet:
            for size in sorted({r.factors["pet_size"] for r in on_pet}):
                out.append(Candidate(method, names[method], size, keys.get(method), "pet", float(size), ""))
            continue
        f = own[0].factors
        for factor, x in (("model", f.get("params")), ("pretrain", f.get("tokens"))):
            if x and any(p.factor == factor for p in pts):
                out.append(Candidate(method, names[method], f.get("pet_size"), keys.get(method), factor,
                                     float(x), ""))
                break
    return out


def _runs_of(rows: Sequence[RunRow], c: Candidate, model: str) -> list[RunRow]:
    return [r for r in rows if r.status == "done" and r.metrics and r.factors.get("model") == model
            and r.factors.get("method") == c.method and r.factors.get("pet_size") == c.pet_size]


def _costs(c: Candidate, runs: list[RunRow], budget: BudgetSpec, examples: int) -> None:
    m = [r.metrics for r in runs if r.metrics]
    per_step = [x["train_seconds"] / x["steps"] for x in m if x.get("train_seconds") and x.get("steps")]
    c.steps = budget.steps(examples)
    if per_step:
        c.seconds_per_step = statistics.median(per_step)
        c.hours = c.steps * c.seconds_per_step / 3600
    rss = [x["peak_rss_mb"] for x in m if x.get("peak_rss_mb")]
    c.peak_rss_gib = max(rss) / 1024 if rss else None
    trainable = [x["trainable_params"] for x in m if x.get("trainable_params")]
    c.trainable_params = int(statistics.median(trainable)) if trainable else None
    tps = [x["tokens"] / x["train_seconds"] for x in m if x.get("tokens") and x.get("train_seconds")]
    c.tokens_per_s = statistics.median(tps) if tps else None
    by_d: dict[float, list[float]] = {}
    for r in runs:
        if r.metrics.get("exact_match") is not None:
            by_d.setdefault(float(r.factors["d_f"]), []).append(float(r.metrics["exact_match"]))
    if by_d:
        ds = sorted(by_d)
        acc = [statistics.mean(by_d[d]) for d in ds]
        c.accuracy = float(np.interp(math.log(examples), [math.log(d) for d in ds], acc))
        inside = ds[0] <= examples <= ds[-1]
        c.accuracy_note = (f"measured exact match interpolated between D_f {ds[0]:g} and {ds[-1]:g}" if inside else
                           f"measured exact match at D_f {ds[0] if examples < ds[0] else ds[-1]:g} (N is outside)")


def _law_choice(fits: dict[str, MethodFit]) -> str:
    """The law with the lower held-out deviation (the fitted deviation when nothing was held out)."""
    def score(law: str) -> float:
        mf = fits[law]
        v = mf.mad_heldout if mf.n_heldout else mf.mad_fit
        return v if math.isfinite(v) else math.inf

    return min(LAWS, key=lambda law: (score(law), LAWS.index(law)))


def _law(fits: dict[str, dict[str, MethodFit]], c: Candidate) -> LawParams | None:
    mf = fits.get(c.method, {}).get(c.law)
    return mf.laws.get(c.factor) if mf else None


def _predict(fits: dict[str, dict[str, MethodFit]], c: Candidate, d: float) -> float | None:
    law = _law(fits, c)
    if law is None:
        return None
    v = float(law.predict(c.x, d))
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------------------------------------------
# The advice
# --------------------------------------------------------------------------------------------------------------


def _fit_all(points: dict[str, list[Point]], delta: float, heldout: bool) -> dict[str, dict[str, MethodFit]]:
    for label, pts in points.items():
        if len({p.d for p in pts}) < 2 or len(pts) < 4:
            raise AnalysisError(f"method '{label}': {len(pts)} finished runs over {len({p.d for p in pts})} D_f "
                                "values; advice needs a fitted law (at least 2 D_f values and 4 runs per method)")
    return {m: _fit_laws(tuple(pts), delta, heldout) for m, pts in points.items()}


@functools.lru_cache(maxsize=64)
def _fit_laws(points: tuple[Point, ...], delta: float, heldout: bool) -> dict[str, MethodFit]:
    """Both laws of one method's points (cached: advice for several N or budgets on one study fits once)."""
    return {law: fit_method(points, law, delta=delta, heldout=heldout) for law in LAWS}


def advise(store: Store, examples: int, *, budget_hours: float | None = None, memory_gib: float | None = None,
           model: str | None = None, replicates: int | None = None, rows: Sequence[RunRow] | None = None,
           heldout: bool | None = None, seed: int = 0) -> Advice:
    """The advice for ``examples`` fine-tuning examples (see the module docstring). ``rows`` replaces the store's
    finished runs (``check`` passes a subset); ``replicates`` defaults to the study's ``fit.bootstrap``, at most
    ``DEFAULT_REPLICATES``."""
    if examples < 1:
        raise AnalysisError(f"--examples must be a positive number of fine-tuning examples, not {examples}")
    spec = _spec(store)
    fit_cfg = spec.get("fit", {})
    replicates = min(DEFAULT_REPLICATES, int(fit_cfg.get("bootstrap", 200))) if replicates is None else replicates
    heldout = bool(fit_cfg.get("heldout", True)) if heldout is None else heldout
    delta = float(fit_cfg.get("delta", 1e-3))
    rows = list(store.rows()) if rows is None else list(rows)
    points, names = points_from_rows(rows)
    if not points:
        raise AnalysisError(f"study {store.path.parent}: no finished runs with a test_nll; run its sweep first "
                            "(`tunelab sweep SPEC`, or `tunelab lab toy`), then advise")
    target = _target_model(rows, spec, model)
    fits = _fit_all(points, delta, heldout)
    cands = _candidates(rows, points, names, target, spec)
    if not cands:
        raise AnalysisError(f"study {store.path.parent}: no method has finished runs on model {target!r}")
    budget = BudgetSpec(**spec["budget"]) if spec.get("budget") else BudgetSpec()
    for c in cands:
        c.law = _law_choice(fits[c.method])
        c.loss = _predict(fits, c, examples) or math.nan
        _costs(c, _runs_of(rows, c, target), budget, examples)
        if budget_hours is not None and c.hours is not None and c.hours > budget_hours:
            c.over.append(f"time {c.hours:.2g} h > {budget_hours:g} h")
        if memory_gib is not None and c.peak_rss_gib is not None and c.peak_rss_gib > memory_gib:
            c.over.append(f"memory {c.peak_rss_gib:.2g} GiB > {memory_gib:g} GiB")
        c.fits_budget = not c.over
    ranked = sorted((c for c in cands if math.isfinite(c.loss)), key=lambda c: c.loss)
    eligible = [c for c in ranked if c.fits_budget]
    best = eligible[0] if eligible else None
    runner = next((c for c in eligible if best and c.method != best.method), None)
    ds = [p.d for pts in points.values() for p in pts]
    d_range = (min(ds) / 10, max(ds) * 10)  # where a crossing is searched

    def quantities(f: dict[str, dict[str, MethodFit]]) -> dict[str, float | None]:
        q: dict[str, float | None] = {c.name: _predict(f, c, examples) for c in cands}
        if best and runner:
            a, b = q[best.name], q[runner.name]
            q["difference"] = None if a is None or b is None else a - b
            q["crossing"] = _crossing(f, best, runner, d_range)[0]
        return q

    estimate = quantities(fits)
    reps = bootstrap(points, quantities, fits, replicates=replicates, seed=seed, delta=delta,
                     heldout=heldout) if replicates > 0 else []
    for c in cands:
        c.interval = interval([r.get(c.name) for r in reps])
    difference = crossing = None
    if best and runner and estimate.get("difference") is not None:
        difference = (float(estimate["difference"]), *interval([r.get("difference") for r in reps]))
        found = [r.get("crossing") for r in reps]
        crossing = {"d_f": estimate.get("crossing"), "interval": interval(found),
                    "replicates_with_crossing": sum(v is not None for v in found), "replicates": len(reps),
                    "first": _crossing(fits, best, runner, d_range)[1]}
    advice = Advice(str(store.path.parent), target, examples, budget_hours, memory_gib, best, runner, difference,
                    crossing, sorted(cands, key=lambda c: (not math.isfinite(c.loss), c.loss)), (min(ds), max(ds)),
                    len(reps))
    advice.warnings = _warnings(advice, ranked, eligible)
    advice.reasons = _reasons(advice, fits)
    return advice


def _crossing(fits: dict[str, dict[str, MethodFit]], a: Candidate, b: Candidate,
              d_range: tuple[float, float]) -> tuple[float | None, str | None]:
    """The D_f where the predicted losses of ``a`` and ``b`` cross, and which of the two is ahead above it
    ((None, None) when they do not cross in ``d_range``)."""
    la, lb = _law(fits, a), _law(fits, b)
    if la is None or lb is None:
        return None, None
    d = critical_df(la, lb, a.x, b.x, d_range)
    if d is not None:
        return d, a.name
    d = critical_df(lb, la, b.x, a.x, d_range)
    return (d, b.name) if d is not None else (None, None)


def _warnings(advice: Advice, ranked: list[Candidate], eligible: list[Candidate]) -> list[str]:
    out = []
    lo, hi = advice.d_range
    if not lo <= advice.examples <= hi:
        out.append(f"N = {advice.examples:,} lies outside the measured D_f range [{lo:g}, {hi:g}]: the losses are "
                   "extrapolated by the fitted laws (the held-out check of the lab says how far that carries)")
    if ranked and not eligible:
        cheapest = min((c for c in ranked if c.hours is not None), key=lambda c: c.hours, default=None)
        out.append("no candidate fits the budget" + (f"; the cheapest is {cheapest.name} ({', '.join(cheapest.over)})"
                                                     if cheapest else ""))
    missing = [c.name for c in advice.candidates if c.hours is None]
    if missing:
        out.append(f"no measured training time for {', '.join(missing)}: not checked against --budget-hours")
    if advice.best and advice.runner_up and advice.difference:
        _, lo_d, hi_d = advice.difference
        if not (hi_d < 0):
            out.append(f"{advice.best.name} and {advice.runner_up.name} are not separated: the 90% interval of their "
                       f"predicted difference [{lo_d:+.3f}, {hi_d:+.3f}] includes 0")
    return out


def _reasons(advice: Advice, fits: dict[str, dict[str, MethodFit]]) -> list[str]:
    b, r = advice.best, advice.runner_up
    if b is None:
        return []
    mf = fits[b.method][b.law]
    deviation = (f"held-out deviation {mf.mad_heldout:.3f} nats" if mf.n_heldout else
                 f"fitted deviation {mf.mad_fit:.3f} nats")
    out = [f"{b.name} has the lowest predicted test NLL at D_f = {advice.examples:,} among the candidates that fit "
           f"the budget ({b.law} law on its {b.factor} axis; {deviation})."]
    if r is not None and advice.difference is not None:
        d, lo, hi = advice.difference
        out.append(f"Against the runner-up {r.name}: {d:+.3f} nats [{lo:+.3f}, {hi:+.3f}] (90%, bootstrap over runs).")
    cross = advice.crossing
    if r is not None and cross:
        if cross["d_f"] is not None:
            lo, hi = cross["interval"]
            where = "above" if advice.examples > cross["d_f"] else "below"
            out.append(f"The laws of {b.name} and {r.name} cross at D_f ≈ {cross['d_f']:,.0f} [{lo:,.0f}, {hi:,.0f}] "
                       f"({cross['replicates_with_crossing']} of {cross['replicates']} replicates cross); "
                       f"{cross['first']} is ahead above it, and N is {where} it.")
        else:
            out.append(f"The laws of {b.name} and {r.name} do not cross within D_f ∈ [{advice.d_range[0] / 10:g}, "
                       f"{advice.d_range[1] * 10:g}]: the order holds over the whole range.")
    excluded = [c for c in advice.candidates if c.over and math.isfinite(c.loss) and c.loss < b.loss]
    if excluded:
        out.append("Predicted lower but over the budget: " + "; ".join(f"{c.name} ({', '.join(c.over)})"
                                                                      for c in excluded) + ".")
    return out


# --------------------------------------------------------------------------------------------------------------
# Held-out check
# --------------------------------------------------------------------------------------------------------------


def check(store: Store, *, points_to_check: int = 3, model: str | None = None, replicates: int | None = None,
          budget_hours: float | None = None, memory_gib: float | None = None) -> list[dict[str, Any]]:
    """For each of the ``points_to_check`` largest D_f values: fit on the runs at the other D_f values, advise at
    that D_f, and compare with the mean measured test NLL (over seeds) of every candidate there.

    ``verdict`` is ``best`` (the advised candidate measured lowest), ``within`` (its measured loss exceeds the
    lowest by no more than the half-width of its own predicted 90% interval) or ``missed``."""
    rows = [r for r in store.rows() if r.status == "done" and r.metrics and r.metrics.get("test_nll") is not None]
    d_values = sorted({float(r.factors["d_f"]) for r in rows})
    if len(d_values) < points_to_check + 2:
        raise AnalysisError(f"study {store.path.parent}: {len(d_values)} D_f values; the check holds out "
                            f"{points_to_check} and needs at least 2 left to fit")
    out = []
    for d in d_values[-points_to_check:]:
        kept = [r for r in rows if float(r.factors["d_f"]) != d]
        adv = advise(store, int(d), rows=kept, model=model, replicates=replicates, heldout=False,
                     budget_hours=budget_hours, memory_gib=memory_gib)
        measured = {}
        for c in adv.candidates:
            vals = [r.metrics["test_nll"] for r in _runs_of(rows, c, adv.model) if float(r.factors["d_f"]) == d]
            if vals:
                measured[c.name] = statistics.mean(vals)
        eligible = {k: v for k, v in measured.items() if next(c for c in adv.candidates if c.name == k).fits_budget}
        entry: dict[str, Any] = {"d_f": d, "advised": adv.best.name if adv.best else None, "measured": measured}
        if adv.best and adv.best.name in eligible:
            top = min(eligible, key=eligible.get)
            gap = eligible[adv.best.name] - eligible[top]
            half = (adv.best.interval[1] - adv.best.interval[0]) / 2
            entry |= {"measured_best": top, "gap": gap, "half_width": half,
                      "verdict": "best" if top == adv.best.name else ("within" if gap <= half else "missed")}
        else:
            entry["verdict"] = "not measured"
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------


def _duration(hours: float | None) -> str:
    if hours is None:
        return "–"
    seconds = hours * 3600
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{hours:.1f} h"


def _row(c: Candidate) -> str:
    lo, hi = c.interval
    cells = [c.name, c.law, f"{c.loss:.4f}" if math.isfinite(c.loss) else "–",
             f"[{lo:.4f}, {hi:.4f}]" if math.isfinite(lo) else "–",
             f"{c.accuracy:.1%}" if c.accuracy is not None else "–",
             _duration(c.hours),
             f"{c.peak_rss_gib:.2f}" if c.peak_rss_gib is not None else "–",
             f"{c.trainable_params:,}" if c.trainable_params else "–", ", ".join(c.over) or "ok"]
    return "| " + " | ".join(cells) + " |"


def render(advice: Advice) -> str:
    limits = ", ".join(x for x in (f"≤ {advice.budget_hours:g} h" if advice.budget_hours is not None else "",
                                   f"≤ {advice.memory_gib:g} GiB" if advice.memory_gib is not None else "") if x)
    lines = [f"Advice for N = {advice.examples:,} fine-tuning examples on model {advice.model} "
             f"(study {advice.study}{'; budget ' + limits if limits else ''})", ""]
    b = advice.best
    if b is None:
        lines.append("No candidate fits the budget.")
    else:
        lo, hi = b.interval
        cost = (f"training ≈ {_duration(b.hours)} ({b.steps} steps × {b.seconds_per_step:.2f} s)"
                if b.hours is not None else "training time not measured")
        lines.append(f"→ {b.name}: predicted test NLL {b.loss:.4f} [{lo:.4f}, {hi:.4f}] (90%)"
                     + (f", accuracy ≈ {b.accuracy:.1%} ({b.accuracy_note})" if b.accuracy is not None else ""))
        lines.append(f"  {cost}, peak RSS {b.peak_rss_gib:.2f} GiB" if b.peak_rss_gib is not None else f"  {cost}")
        if b.trainable_params:
            lines[-1] += f", {b.trainable_params:,} trainable parameters"
        if advice.runner_up:
            r = advice.runner_up
            lines.append(f"  runner-up: {r.name}: {r.loss:.4f} [{r.interval[0]:.4f}, {r.interval[1]:.4f}]")
    if advice.reasons:
        lines += ["", "Why:"] + [f"  {x}" for x in advice.reasons]
    if advice.warnings:
        lines += ["", "Warnings:"] + [f"  ! {x}" for x in advice.warnings]
    lines += ["", f"All candidates (test NLL predicted at D_f = {advice.examples:,}; {advice.replicates} bootstrap "
                  "replicates; time at the study's step budget):", "",
              "| candidate | law | test NLL | 90% | accuracy | training | peak RSS GiB | trainable | budget |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(c) for c in advice.candidates]
    return "\n".join(lines) + "\n"


def render_check(entries: list[dict[str, Any]], study: str | Path) -> str:
    lines = [f"Held-out check of the advice (study {study}): fit without D_f = d, advise at d, compare with the "
             "losses measured at d", "", "| D_f | advised | measured best | gap (nats) | half-width | verdict |",
             "|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['d_f']:g} | {e['advised']} | {e.get('measured_best', '–')} | "
                     f"{e['gap']:.4f} | {e['half_width']:.4f} | {e['verdict']} |" if "gap" in e else
                     f"| {e['d_f']:g} | {e['advised']} | – | – | – | {e['verdict']} |")
    good = sum(e["verdict"] in ("best", "within") for e in entries)
    lines += ["", f"advised = measured best or within its interval at {good} of {len(entries)} held-out D_f values"]
    return "\n".join(lines) + "\n"
