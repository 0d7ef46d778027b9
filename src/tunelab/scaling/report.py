"""`tunelab report STUDY`: markdown + PNG plots of a study's fits and the paper's findings with our verdicts.

Writes ``STUDY/report/``: ``report.md`` (and ``report.html``, the same page self-contained), ``fit.json`` (laws, convergence, estimates, intervals), and plots —
``loss_vs_df_<method>.png`` (loss against D_f per axis and factor value, fitted curves, held-out points marked),
``predicted_vs_observed.png`` (both laws) and ``critical_df.png`` (critical D_f against model size).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np

from tunelab.files import atomic_write_json, atomic_write_text
from tunelab.scaling.analysis import StudyFit, fit_study, study_summary, verdicts
from tunelab.scaling.fit import LAWS, heldout_mask
from tunelab.scaling.store import Store

AXIS_NAMES = {"model": "model size N (non-embedding params)", "pretrain": "pretraining tokens",
              "pet": "PET size (rank / prompt length)"}


def write_report(store: Store, out_dir: str | Path, *, bootstrap_replicates: int = 200, delta: float = 1e-3,
                 heldout: bool = True, seed: int = 0) -> Path:
    """Fit the study in ``store`` and write the report folder; returns the path of report.md."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = fit_study(store.rows(), bootstrap_replicates=bootstrap_replicates, delta=delta, heldout=heldout,
                      seed=seed)
    atomic_write_json(out / "fit.json", study_summary(study))
    plots = [plot_loss_vs_df(study, m, out) for m in study.methods]
    plots += [plot_predicted_vs_observed(study, out), plot_critical_df(study, out)]
    text = render_markdown(study, store, [p for p in plots if p is not None], time.perf_counter() - t0)
    atomic_write_text(out / "report.md", text)
    from tunelab.htmlpage import write_page

    write_page(out / "report.md")  # report.html: the same page, self-contained
    return out / "report.md"


# --------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.4g}"


def render_markdown(study: StudyFit, store: Store, plots: list[Path], fit_seconds: float) -> str:
    counts = store.counts()
    rows = store.rows("done")
    wall = sum(r.seconds or 0 for r in rows)
    spec = store.info("spec", {}) or {}
    lines = [f"# Scaling-law report: {spec.get('name', store.path.parent.name)}", "",
             f"Runs: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending, "
             f"{counts['running']} running; run time {wall / 60:.1f} worker-minutes. Fits and "
             f"{study.replicates} bootstrap replicates: {fit_seconds:.0f} s."
             + (f" {retired} run(s) of an earlier version of the spec (not in its current grid) are kept in the "
                "store and not fitted." if (retired := store.retired_count()) else ""), "",
             "L is the test NLL per target token; X is the non-embedding parameter count (model axis), pretraining "
             "tokens (pretraining axis) or the PET size; D_f is the number of fine-tuning examples. Laws: "
             "multiplicative L̂ = A·X̃^−α·D̃^−β + E and additive L̂ = A·X̃^−α + B·D̃^−β + E (inputs normalised "
             "by the geometric means X₀, D₀). Intervals are 90% bootstrap percentile intervals over runs.", "",
             "## The paper's findings at this scale", "",
             "| claim | paper | subject | estimate | 90% interval | verdict |", "|---|---|---|---:|---|---|"]
    for v in verdicts(study):
        lines.append(f"| {v.claim} | {v.paper} | {v.subject} | {_fmt(v.estimate)} | "
                     f"[{_fmt(v.interval[0])}, {_fmt(v.interval[1])}] | {v.verdict} |")
    lines += ["", "## Fitted laws", "", *_law_table(study), *_bound_notes(study), "", "## Convergence", "",
              *_convergence_table(study)]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## Measured", "", *_environment_lines(store), ""]
    return "\n".join(lines)


def _bound_notes(study: StudyFit) -> list[str]:
    """A caveat for every fitted E that sits on its lower bound: the data do not identify an irreducible term."""
    from tunelab.scaling.fit import LOG_BOUNDS

    floor = math.exp(LOG_BOUNDS[0])
    at_bound = [f"{m} {law}" for m, by_law in study.methods.items() for law, mf in by_law.items()
                if any(lp.E is not None and floor * 1.01 >= lp.E for lp in mf.laws.values())]
    if not at_bound:
        return []
    return ["", f"Note: E is at its lower bound (e^{LOG_BOUNDS[0]:g}) for {', '.join(at_bound)}: over this range of "
                "D_f and X the points do not identify an irreducible loss, so those fits are pure power laws and "
                "their A, α, β absorb it; extrapolation far beyond the fitted range overstates the gains."]


def _environment_lines(store: Store) -> list[str]:
    """Where and how the report was made (the study's wall time is appended by `tunelab lab toy`)."""
    import os
    import platform

    import torch

    import tunelab

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return [f"Machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}, tunelab {tunelab.__version__}, "
            f"Python {platform.python_version()}.",
            f"Reproduce: `tunelab sweep {store.path.parent / 'spec.yaml'}` (resumes; runs what is missing), then "
            f"`tunelab report {store.path.parent}`."]


def _law_table(study: StudyFit) -> list[str]:
    out = ["| method | law | axis | A | α [90%] | β [90%] | E [90%] | B | MAD fit | MAD held-out |",
           "|---|---|---|---:|---|---|---|---:|---:|---:|"]
    ci = study.intervals
    for m, by_law in study.methods.items():
        for law, mf in by_law.items():
            for f, lp in mf.laws.items():
                a, b, e = (ci.get(f"{m}.{law}.{k}", (math.nan, math.nan)) for k in (f"alpha_{f}", "beta", "E"))
                out.append(f"| {m} | {law} | {f} | {_fmt(lp.A)} | {_fmt(lp.alpha)} [{_fmt(a[0])}, {_fmt(a[1])}] | "
                           f"{_fmt(lp.beta)} [{_fmt(b[0])}, {_fmt(b[1])}] | {_fmt(lp.E)} [{_fmt(e[0])}, {_fmt(e[1])}] "
                           f"| {_fmt(lp.B)} | {_fmt(mf.mad_fit)} | {_fmt(mf.mad_heldout)} |")
    return out


def _convergence_table(study: StudyFit) -> list[str]:
    out = ["| method | law | fit | objective (Σ Huber) | best start converged | converged starts |",
           "|---|---|---|---:|---|---:|"]
    for m, by_law in study.methods.items():
        for law, mf in by_law.items():
            fits = ([("stage 1", mf.stage1)] if mf.stage1 else []) + [(f"stage 2: {f}", x) for f, x in mf.fits.items()]
            for name, fit in fits:
                out.append(f"| {m} | {law} | {name} | {fit.objective:.4g} | {fit.converged} | "
                           f"{fit.converged_starts}/{fit.starts} |")
    return out


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks(ax, x_values: list[float]) -> None:
    """Log axes labelled with plain numbers: the D_f values on x (no crowded minor labels), plain y labels."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xticks(x_values)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())


def plot_loss_vs_df(study: StudyFit, method: str, out: Path) -> Path:
    """One panel per axis: observed loss against D_f per factor value, the fitted multiplicative curves."""
    plt = _pyplot()
    pts = study.points[method]
    mask = dict(zip(map(id, pts), heldout_mask(pts), strict=True))
    factors = [f for f in ("model", "pretrain", "pet") if any(p.factor == f for p in pts)]
    fig, axes = plt.subplots(1, len(factors), figsize=(5 * len(factors), 4), squeeze=False)
    laws = study.methods[method]["multiplicative"].laws
    d_grid = np.geomspace(min(p.d for p in pts), max(p.d for p in pts), 60)
    for ax, factor in zip(axes[0], factors, strict=True):
        xs = sorted({p.x for p in pts if p.factor == factor})
        colors = _pyplot().cm.viridis(np.linspace(0, 0.9, len(xs)))
        for x, c in zip(xs, colors, strict=True):
            own = [p for p in pts if p.factor == factor and p.x == x]
            fit_pts = [p for p in own if not mask[id(p)]]
            held = [p for p in own if mask[id(p)]]
            ax.scatter([p.d for p in fit_pts], [p.loss for p in fit_pts], color=c, s=18, label=f"{x:.3g}")
            ax.scatter([p.d for p in held], [p.loss for p in held], color=c, s=50, marker="x")
            if factor in laws:
                ax.plot(d_grid, laws[factor].predict(x, d_grid), color=c, lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_ticks(ax, sorted({p.d for p in pts}))
        ax.set_xlabel("fine-tuning examples D_f")
        ax.set_ylabel("test NLL per target token")
        ax.set_title(f"{method}: {AXIS_NAMES[factor]}", fontsize=9)
        ax.legend(fontsize=7, title="X (× = held out)", title_fontsize=7)
    fig.tight_layout()
    path = out / f"loss_vs_df_{method}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_predicted_vs_observed(study: StudyFit, out: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(LAWS), figsize=(10, 4.5), squeeze=False)
    for ax, law in zip(axes[0], LAWS, strict=True):
        lo, hi = math.inf, 0.0
        for m, pts in study.points.items():
            mf = study.methods[m][law]
            held = heldout_mask(pts)
            obs = np.array([p.loss for p in pts])
            pred = np.array([mf.predict(p) for p in pts])
            h = np.array(held)
            ax.scatter(obs[~h], pred[~h], s=12, label=f"{m} fitted")
            ax.scatter(obs[h], pred[h], s=40, marker="x", label=f"{m} held out")
            lo, hi = min(lo, obs.min(), pred.min()), max(hi, obs.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel("observed test NLL")
        ax.set_ylabel("predicted")
        ax.set_title(f"{law} law", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "predicted_vs_observed.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_critical_df(study: StudyFit, out: Path) -> Path | None:
    pairs = study.pairs()
    if not pairs or not study.sizes:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for full, pet in pairs:
        xs, ys, lo, hi = [], [], [], []
        for x in study.sizes:
            value = study.estimates.get(f"critical_df.{full}-{pet}.{x:g}")
            if value is None:
                continue
            a, b = study.intervals.get(f"critical_df.{full}-{pet}.{x:g}", (math.nan, math.nan))
            xs.append(x)
            ys.append(value)
            lo.append(value - a if not math.isnan(a) else 0.0)
            hi.append(b - value if not math.isnan(b) else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], marker="o", capsize=3,
                        label=f"{full} vs {pet}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model size N (non-embedding params)")
    ax.set_ylabel("critical D_f (full tuning overtakes)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "critical_df.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def runs_table(store: Store, limit: int | None = None) -> str:
    """`tunelab runs STUDY`: one line per run."""
    header = f"{'key':<20} {'status':<8} {'try':>3} {'method':<10} {'model':<10} {'pet':>5} {'D_f':>6} " \
             f"{'seed':>4} {'test_nll':>9} {'seconds':>8}  error"
    lines = [header]
    for r in store.rows()[:limit]:
        f, m = r.factors, r.metrics or {}
        nll = m.get("test_nll", m.get("eval_loss"))  # a suite's units (tunelab suite) record the dev loss
        err = (r.error or "").strip().splitlines()[-1][:60] if r.error else ""
        method = f.get("method", f.get("row", ""))
        lines.append(f"{r.key:<20} {r.status:<8} {r.attempts:>3} {method:<10} {f.get('model', f.get('phase', '')):<10} "
                     f"{f.get('pet_size') if f.get('pet_size') is not None else '':>5} {f.get('d_f', ''):>6} "
                     f"{f.get('seed', ''):>4} {'' if nll is None else f'{nll:.4f}':>9} "
                     f"{'' if r.seconds is None else f'{r.seconds:.1f}':>8}  {err}")
    counts = store.counts()
    retired = store.retired_count()
    lines.append(" ".join(f"{k}: {v}" for k, v in counts.items())
                 + (f"  (+ {retired} retired: runs of an earlier spec, kept, not fitted)" if retired else ""))
    return "\n".join(lines)


def fit_summary_text(store: Store, *, bootstrap_replicates: int, delta: float = 1e-3, heldout: bool = True) -> str:
    """`tunelab fit STUDY`: the fitted laws and the verdict table, as text (also saved as STUDY/fit.json)."""
    study = fit_study(store.rows(), bootstrap_replicates=bootstrap_replicates, delta=delta, heldout=heldout)
    atomic_write_json(store.path.parent / "fit.json", study_summary(study))
    lines = _law_table(study) + [""]
    for v in verdicts(study):
        lines.append(f"{v.claim} — {v.subject}: {_fmt(v.estimate)} [{_fmt(v.interval[0])}, {_fmt(v.interval[1])}]"
                     f" → {v.verdict}")
    return "\n".join(lines) + f"\n(saved {store.path.parent / 'fit.json'}; {json.dumps(store.counts())})"
