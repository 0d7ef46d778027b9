"""The report of a suite, rebuilt from its store and per-item outputs at any time: JSON, markdown, PNG.

Per row and test set: accuracy over seeds × items with its 95% two-level bootstrap interval
(``tunelab.eval.metrics.seed_item_ci``), for generation in the trained format and for log-likelihood; the group
averages; the paired difference to the base (the better of the untrained model's generation and log-likelihood
accuracy and the trivial baselines, per set) with a paired, task-stratified bootstrap interval; the collapse
checks of the protocol; trainable parameters, training time, tokens/s and peak RSS; the chosen rate and whether
it sits at the grid's edge. Rows fall into tiers: sorted by their average, a row starts a new tier when the paired
interval of its difference to the best row of the current tier excludes 0.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.eval.metrics import paired_bootstrap_diff, seed_item_ci, stratified_paired_diff
from tunelab.files import atomic_write_json, atomic_write_text, save_png
from tunelab.scaling.store import Store
from tunelab.study.protocol import at_edge, best_rate, label_shares, shape_shares
from tunelab.study.provenance import commit, machine


def _jsonl(path: Path) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ collection


def _matrix(rows_per_seed: list[list[dict[str, Any]]]) -> np.ndarray | None:
    if not rows_per_seed or any(r is None for r in rows_per_seed):
        return None
    n = {len(r) for r in rows_per_seed}
    if len(n) != 1:
        return None
    return np.array([[float(x["correct"]) for x in rows] for rows in rows_per_seed])


def _task_stats(rows_per_seed: list[list[dict[str, Any]]]) -> dict[str, Any] | None:
    m = _matrix(rows_per_seed)
    if m is None:
        return None
    acc, low, high = seed_item_ci(m)
    stats: dict[str, Any] = {"accuracy": acc, "ci_low": low, "ci_high": high, "n": m.shape[1],
                             "seeds": m.shape[0], "per_item": m.mean(axis=0).tolist(),
                             "per_seed": m.mean(axis=1).tolist()}
    pooled = [x for rows in rows_per_seed for x in rows]
    if pooled and "gold_index" in pooled[0]:
        stats["labels"] = label_shares([x.get("pred_index") for x in pooled], [x["gold_index"] for x in pooled])
    elif pooled and "output" in pooled[0]:
        stats["shapes"] = shape_shares([x["output"] for x in pooled], [x.get("parsed") for x in pooled])
    return stats


def base_eval_dir(out: Path) -> Path:
    """The untrained model's evaluation folder in the suite folder ``out``."""
    return out / "base" / "eval"


def unit_eval_dir(out: Path, factors: dict[str, Any]) -> Path | None:
    """The evaluation folder of a suite unit (the base, or a final seed) in the suite folder ``out``, where its
    per-item rows are read from; None for a unit without one (a search point)."""
    if factors.get("phase") == "base":
        return base_eval_dir(out)
    if factors.get("phase") == "final":
        return out / "runs" / factors["row"] / f"lr={factors['lr']:g}" / f"seed={factors['seed']}" / "eval"
    return None


def _eval_dirs(run: Any, store: Store, label: str) -> tuple[dict[str, Any], list[Path]]:
    """(facts of a row's final units, their eval folders in seed order)."""
    mine = [r for r in store.rows() if r.factors.get("row") == label]
    finals = [r for r in mine if r.factors.get("phase") == "final"]
    search = {r.factors["lr"]: r for r in mine if r.factors.get("phase") == "search"}
    scores = {lr: (r.metrics or {}).get("eval_loss") if r.status == "done" else None
              for lr, r in sorted(search.items())}
    chosen = best_rate(scores)  # finals at a rate an extended grid has since beaten are not this row's result
    done = sorted((r for r in finals if r.status == "done" and r.factors["lr"] == chosen),
                  key=lambda r: r.factors["seed"])
    facts: dict[str, Any] = {"search": {str(lr): v for lr, v in scores.items()}}
    if done:
        lr = done[0].factors["lr"]
        first = search.get(lr)
        metrics = [r.metrics for r in done]
        walls = [m.get("train_wall_s") or 0.0 for m in metrics]
        if first is not None and first.metrics:  # the first seed's training ran as the search point
            walls[0] = first.metrics.get("train_wall_s") or walls[0]
        facts.update(lr=lr, seeds=[r.factors["seed"] for r in done], trainable=metrics[0]["trainable_params"],
                     trainable_percent=metrics[0]["trainable_percent"], train_wall_s=float(np.median(walls)),
                     tokens_per_s=float(np.median([m.get("tokens_per_s") or 0 for m in metrics])),
                     peak_rss_mb=float(np.max([m.get("peak_rss_mb") or 0 for m in metrics])),
                     train_tokens=metrics[0].get("train_tokens"),
                     train_loss=float(np.mean([m.get("train_loss") or math.nan for m in metrics])),
                     edge=at_edge([float(x) for x in search], lr))
    configured = next((row.lrs for row in run.cfg.rows if row.label == label), [])
    facts["extended"] = sorted(float(x) for x in search if float(x) not in configured)
    return facts, [d for d in (unit_eval_dir(run.out, r.factors) for r in done) if d is not None]


def _collect_base(run: Any, result: dict[str, Any]) -> None:
    """The untrained model's per-task scores, the trivial baselines and the decontamination counts."""
    from tunelab.study.baselines import BASELINES

    base_dir = base_eval_dir(run.out)
    base: dict[str, Any] = {"label": "base", "method": "none (untrained)", "tasks": {}}
    for s in run.cfg.eval.sets:
        for task in (t for t in (s.generate, s.loglik) if t):
            stats = _task_stats([_jsonl(base_dir / f"{task}.jsonl")])
            if stats:
                base["tasks"][task] = stats
        for name in run.cfg.eval.baselines:
            correct = BASELINES[name](run.base_records(s))
            if correct is not None:
                acc, low, high = seed_item_ci(np.array([correct]))
                result["baselines"].setdefault(name, {})[s.name] = {"accuracy": acc, "ci_low": low, "ci_high": high,
                                                                   "per_item": correct}
    result["base"] = base
    summary = base_dir / "summary.json"
    if summary.is_file():
        result["removed_overlap"] = {t["task"]: t.get("removed_overlap")
                                     for t in json.loads(summary.read_text())["tasks"]}


def collect(run: Any, store: Store) -> dict[str, Any]:
    """Everything the tables show, as one JSON-able mapping."""
    sets = run.cfg.eval.sets
    result: dict[str, Any] = {"suite": run.cfg.name, "scale": run.scale_name, "source": run.source,
                              "sets": [s.__dict__ for s in sets], "rows": [], "baselines": {}}
    _collect_base(run, result)
    for row in run.rows():
        facts, dirs = _eval_dirs(run, store, row.label)
        entry = {"label": row.label, "method": row.method.get("name"), "quantize": row.quantize, **facts,
                 "lrs": row.lrs, "tasks": {}}
        for task in (t for s in sets for t in (s.generate, s.loglik) if t and dirs):
            stats = _task_stats([_jsonl(d / f"{task}.jsonl") for d in dirs])
            if stats:
                entry["tasks"][task] = stats
        result["rows"].append(entry)
    _judge(result, sets, run.cfg.claims)
    return result


# ------------------------------------------------------------------------------------------------ judgement


def _primary(entry: dict[str, Any], s: Any) -> dict[str, Any] | None:
    """A trained row's score on a set: generation in the trained format, else log-likelihood."""
    return entry["tasks"].get(s.generate) if s.generate else entry["tasks"].get(s.loglik)


def _base_best(result: dict[str, Any], s: Any) -> tuple[str, dict[str, Any]] | None:
    """The base's score on a set: the best of its generation and log-likelihood accuracy and the baselines."""
    options = [(t, result["base"]["tasks"].get(t)) for t in (s.generate, s.loglik) if t]
    options += [(name, per.get(s.name)) for name, per in result["baselines"].items()]
    options = [(k, v) for k, v in options if v]
    return max(options, key=lambda kv: kv[1]["accuracy"]) if options else None


def _claim(result: dict[str, Any], sets: list[Any], claim: Any, group: str) -> dict[str, Any]:
    """The paired difference a − b on ``group``'s average and what it says (None while a row is missing)."""
    rows = {e["label"]: e for e in result["rows"]}
    a, b = rows.get(claim.a), rows.get(claim.b)
    out: dict[str, Any] = {"text": claim.text, "a": claim.a, "b": claim.b, "group": group, "diff": None}
    in_group = [s for s in sets if s.group == group]
    if not a or not b or group not in a.get("averages", {}) or group not in b.get("averages", {}):
        out["verdict"] = "not measured yet"
        return out
    diff = stratified_paired_diff([(_primary(a, s)["per_item"], _primary(b, s)["per_item"]) for s in in_group])
    out["diff"] = list(diff)
    if diff[1] > 0:
        out["verdict"] = f"{claim.a} better"
    elif diff[2] < 0:
        out["verdict"] = f"{claim.b} better"
    else:
        out["verdict"] = "no difference detected (the interval includes 0)"
    return out


def _judge(result: dict[str, Any], sets: list[Any], claims: list[Any] = ()) -> None:
    groups = sorted({s.group for s in sets})
    result["groups"] = groups
    base_best = {s.name: _base_best(result, s) for s in sets}
    result["base"]["best"] = {k: (v[0], v[1]["accuracy"]) if v else None for k, v in base_best.items()}
    result["base"]["averages"] = {g: _mean([base_best[s.name][1]["accuracy"] for s in sets if s.group == g
                                            and base_best[s.name]]) for g in groups}
    for entry in result["rows"]:
        entry["averages"], entry["vs_base"] = {}, {}
        for g in groups:
            in_group = [s for s in sets if s.group == g]
            scores = [_primary(entry, s) for s in in_group]
            if not scores or any(x is None for x in scores) or any(base_best[s.name] is None for s in in_group):
                continue
            entry["averages"][g] = _mean([x["accuracy"] for x in scores])
            pairs = [(x["per_item"], base_best[s.name][1]["per_item"]) for x, s in zip(scores, in_group, strict=True)]
            entry["vs_base"][g] = list(stratified_paired_diff(pairs))
    _tiers(result, sets, groups[0] if groups else None)
    result["claims"] = [_claim(result, sets, c, groups[0]) for c in claims] if groups else []


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _tiers(result: dict[str, Any], sets: list[Any], group: str | None) -> None:
    """Tier numbers on ``group``'s average (1 = best), by paired intervals against each tier's best row."""
    ranked = sorted((e for e in result["rows"] if group in e.get("averages", {})),
                    key=lambda e: -e["averages"][group])
    in_group = [s for s in sets if s.group == group]
    tier, leader = 0, None
    for e in ranked:
        if leader is not None:
            pairs = [(_primary(leader, s)["per_item"], _primary(e, s)["per_item"]) for s in in_group]
            diff = stratified_paired_diff(pairs)
            e["vs_tier_leader"] = [leader["label"], *diff]
            if diff[1] > 0:
                tier, leader = tier + 1, e
        else:
            tier, leader = 1, e
        e["tier"] = tier
    result["tier_group"] = group


def pairwise(result: dict[str, Any], sets: list[Any], a: str, b: str) -> dict[str, list[float]]:
    """Per set, the paired difference a − b of two rows' primary scores (seed-averaged per item)."""
    rows = {e["label"]: e for e in result["rows"]}
    out = {}
    for s in sets:
        x, y = _primary(rows[a], s), _primary(rows[b], s)
        if x and y:
            out[s.name] = list(paired_bootstrap_diff(x["per_item"], y["per_item"]))
    return out


# ------------------------------------------------------------------------------------------------ writing


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _cell(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "–"
    flag = ""
    if stats.get("labels", {}).get("collapsed") or stats.get("shapes", {}).get("collapsed"):
        flag = " ⚠"
    return f"{_pct(stats['accuracy'])} [{_pct(stats['ci_low'])}, {_pct(stats['ci_high'])}]{flag}"


def markdown(result: dict[str, Any], sets: list[Any], header: str) -> str:
    groups = result["groups"]
    cols = [s.name + (" gen" if s.generate and s.loglik else "") for s in sets]
    ll_cols = [f"{s.name} ll" for s in sets if s.generate and s.loglik]
    head = ["row", "tier", "lr", *cols, *[f"avg {g}" for g in groups], *[f"Δ base {g}" for g in groups], *ll_cols,
            "trainable", "train s", "tok/s", "peak RSS MiB"]
    lines = [header, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    b = result["base"]
    base_cells = []
    for s in sets:
        best = b["best"].get(s.name)
        base_cells.append(f"{_pct(best[1])} ({best[0]})" if best else "–")
    lines.append("| " + " | ".join(["base (best of untrained gen / ll / baselines)", "", "", *base_cells,
                                    *[_pct(b["averages"].get(g)) for g in groups], *["" for _ in groups],
                                    *[_cell(b["tasks"].get(s.loglik)) for s in sets if s.generate and s.loglik],
                                    "0", "", "", ""]) + " |")
    for name, per in result["baselines"].items():
        lines.append("| " + " | ".join([f"baseline: {name}", "", "", *[_pct(per[s.name]["accuracy"]) if s.name in per
                                                                       else "–" for s in sets],
                                        *["" for _ in groups], *["" for _ in groups], *["" for _ in ll_cols],
                                        "", "", "", ""]) + " |")
    for e in result["rows"]:
        lr = "–" if e.get("lr") is None else f"{e['lr']:g}" + (" (edge)" if e.get("edge") else "") + (
            " (grid extended: " + ", ".join(f"{x:g}" for x in e["extended"]) + ")" if e.get("extended") else "")
        vs = [f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]" if g in e.get("vs_base", {}) and
              (d := e["vs_base"][g]) else "–" for g in groups]
        cells = [e["label"], str(e.get("tier", "–")), lr, *[_cell(_primary(e, s)) for s in sets],
                 *[_pct(e.get("averages", {}).get(g)) for g in groups], *vs,
                 *[_cell(e["tasks"].get(s.loglik)) for s in sets if s.generate and s.loglik],
                 f"{e['trainable']:,}" if e.get("trainable") else "–",
                 f"{e['train_wall_s']:.0f}" if e.get("train_wall_s") else "–",
                 f"{e['tokens_per_s']:.0f}" if e.get("tokens_per_s") else "–",
                 f"{e['peak_rss_mb']:.0f}" if e.get("peak_rss_mb") else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    claims = result.get("claims") or []
    if claims:
        lines += ["", "Paper claims at this scale (paired difference a − b of the "
                  f"{result['tier_group']} average, 95%):", "", "| claim | a − b | verdict |", "|---|---|---|"]
        for c in claims:
            d = c["diff"]
            cell = "–" if d is None else f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"
            lines.append(f"| {c['text']} ({c['a']} − {c['b']}) | {cell} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def _chart(result: dict[str, Any], sets: list[Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [e for e in result["rows"] if e["tasks"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(sets) * max(1, len(rows) + 1) / 2), 3.8))
    width = 0.8 / (len(rows) + 1)
    base = [result["base"]["best"].get(s.name) for s in sets]
    ax.bar([j for j in range(len(sets))], [100 * (b[1] if b else 0) for b in base], width, color="0.7",
           label="base (best of untrained / baselines)")
    for i, e in enumerate(rows, start=1):
        stats = [_primary(e, s) or {} for s in sets]
        acc = [100 * x.get("accuracy", 0) for x in stats]
        err = [[a - 100 * x.get("ci_low", 0) for a, x in zip(acc, stats, strict=True)],
               [100 * x.get("ci_high", 0) - a for a, x in zip(acc, stats, strict=True)]]
        ax.bar([j + i * width for j in range(len(sets))], acc, width, yerr=err, capsize=2, label=e["label"])
    ax.set_xticks([j + width * len(rows) / 2 for j in range(len(sets))], [s.name for s in sets])
    ax.set_ylabel("accuracy (%), 95% CI over seeds × items")
    ax.set_title(result["suite"], fontsize=9)
    ax.legend(fontsize=7)
    save_png(fig, path)


def _count_units(store: Store, name_of: Callable[[dict[str, Any]], str]) -> dict[str, int]:
    """How many finished units fall under each name that ``name_of`` gives their metrics."""
    counts: dict[str, int] = {}
    for r in store.rows():
        if r.status == "done":
            name = name_of(r.metrics or {})
            counts[name] = counts.get(name, 0) + 1
    return counts


def _unit_commits(store: Store) -> dict[str, int]:
    """How many finished units each code commit produced ("unrecorded" for units from before commits were kept)."""
    return _count_units(store, lambda m: m.get("commit") or "unrecorded")


def unit_dtypes(store: Store) -> dict[str, int]:
    """How many finished units trained and evaluated in each compute dtype (``auto`` resolves per machine: bf16
    where it has bf16 units, else fp32), e.g. {"train fp32 · eval fp32": 12}; "unrecorded" for older units."""
    return _count_units(store, lambda m: " · ".join(
        f"{what} {m[k]}" for what, k in (("train", "train_dtype"), ("eval", "eval_dtype")) if m.get(k)) or "unrecorded")


def unit_threads(store: Store) -> dict[str, int]:
    """How many finished units ran with each number of threads (``--jobs`` shares the cores out, so a unit's
    tokens/s depends on it); "unrecorded" for units from before it was kept."""
    return _count_units(store, lambda m: str(m["threads"]) if m.get("threads") else "unrecorded")


def runtime(store: Store) -> dict[str, Any]:
    """Unit wall time of the study so far, per phase: {"phases": {phase: {"units", "hours"}}, "hours", "pending",
    "failed"} (finished units of the current grid; a unit's time is its whole run: training and evaluation)."""
    phases: dict[str, dict[str, float]] = {}
    pending = failed = 0
    for r in store.rows():
        if r.status == "done":
            p = phases.setdefault(str(r.factors.get("phase", "?")), {"units": 0, "hours": 0.0})
            p["units"] += 1
            p["hours"] += (r.seconds or 0.0) / 3600
        elif r.status == "failed":
            failed += 1
        else:
            pending += 1
    for p in phases.values():
        p["hours"] = round(p["hours"], 2)
    return {"phases": phases, "hours": round(sum(p["hours"] for p in phases.values()), 2), "pending": pending,
            "failed": failed}


def remaining(run: Any, store: Store) -> dict[str, Any]:
    """What the scale still has to run, and an estimate of how long: {"units": {phase: count}, "median_s": {phase:
    median unit wall time so far}, "hours": estimate or None when a phase with units left has none finished yet}.
    Counts the base, each row's configured grid points and its seeds; a grid extension past a winning edge
    (``tunelab.study.suite``) adds search units not counted here."""
    done = [r for r in store.rows() if r.status == "done"]
    have = {(r.factors.get("phase"), r.factors.get("row"), r.factors.get("lr"), r.factors.get("seed")) for r in done}
    left = {"base": 0 if any(r.factors.get("phase") == "base" for r in done) else 1, "search": 0, "final": 0}
    first = run.scale.seeds[0]
    for row in run.rows():
        left["search"] += sum(("search", row.label, lr, first) not in have for lr in row.lrs)
        seeds = {k[3] for k in have if k[0] == "final" and k[1] == row.label}
        left["final"] += sum(s not in seeds for s in run.scale.seeds)
    median = {}
    for phase in left:
        times = sorted(r.seconds for r in done if r.factors.get("phase") == phase and r.seconds)
        if times:
            median[phase] = float(np.median(times))
    known = all(n == 0 or phase in median for phase, n in left.items())
    hours = sum(n * median.get(phase, 0.0) for phase, n in left.items()) / 3600 if known else None
    return {"units": left, "median_s": {k: round(v) for k, v in median.items()},
            "hours": None if hours is None else round(hours, 1)}


def _remaining_line(left: dict[str, Any]) -> str:
    units = {k: n for k, n in left["units"].items() if n}
    if not units:
        return "Every unit of this scale has run."
    parts = ", ".join(f"{n} {phase}" for phase, n in units.items())
    times = ", ".join(f"{phase} {left['median_s'][phase] / 60:.0f} min" for phase in units if phase in left["median_s"])
    missing = [phase for phase in units if phase not in left["median_s"]]
    line = f"Left for this scale: {parts} units (a grid extension adds search units)"
    if left["hours"] is not None:
        return line + f" ≈ {left['hours']:.1f} h at the median unit wall time so far ({times})."
    return (line + " — no estimate yet: no " + " or ".join(missing) + " unit has finished"
            + (f" (median so far: {times})." if times else "."))


def _runtime_line(rt: dict[str, Any]) -> str:
    parts = ", ".join(f"{name} {p['units']} units {p['hours']:.1f} h" for name, p in sorted(rt["phases"].items()))
    line = f"Runtime so far: {rt['hours']:.1f} h of unit wall time ({parts})"
    if rt["pending"] or rt["failed"]:
        line += f"; {rt['pending']} units not yet run" + (f", {rt['failed']} failed" if rt["failed"] else "")
    return line + " — units that shared the machine ran slower."


def write_report(run: Any, store: Store, folder: Path | None = None, command: str | None = None) -> Path:
    """OUT/report/ (or ``folder``): results.json, table.md, chart.png, report.html (table and chart in one
    self-contained page)."""
    folder = folder or run.out / "report"
    result = collect(run, store)
    result["meta"] = {"command": command or f"tunelab suite {run.source} --scale {run.scale_name}",
                      "commit": commit(), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                      "data": json.loads((run.out / "data" / "info.json").read_text()),
                      "unit_commits": _unit_commits(store), "unit_dtypes": unit_dtypes(store),
                      "unit_threads": unit_threads(store),
                      "runtime": runtime(store), "remaining": remaining(run, store)}
    sets = run.cfg.eval.sets
    m = result["meta"]
    header = (f"# {run.cfg.name} — scale {run.scale_name}\n\n"
              f"`{m['command']}` · commit {m['commit']} · {m['machine']['cpu']} ({', '.join(m['machine']['flags'])}; "
              f"{m['machine']['cores']} cores, torch {m['machine']['torch']}) · {m['date']} · "
              f"{m['data']['train']} training / {m['data']['dev']} dev records · units run at "
              + ", ".join(f"{c} ({n})" for c, n in m["unit_commits"].items()) + " · compute dtypes of the units: "
              + ", ".join(f"{c} ({n})" for c, n in m["unit_dtypes"].items()) + " · threads per unit: "
              + ", ".join(f"{c} ({n})" for c, n in m["unit_threads"].items()) + "\n\n"
              + _runtime_line(m["runtime"]) + " " + _remaining_line(m["remaining"]) + "\n\n"
              "Accuracy in % with its 95% interval over seeds × items; ⚠ = fails the protocol's collapse check; "
              "Δ base: paired difference to the base row (task-stratified bootstrap, 95%).")
    removed = result.get("removed_overlap") or {}
    if removed:
        header += ("\n\nTest questions removed because they also occur in the training or dev data: "
                   + ", ".join(f"{t} {n}" for t, n in removed.items()) + ".")
    atomic_write_json(folder / "results.json", result)
    atomic_write_text(folder / "table.md", markdown(result, sets, header))
    _chart(result, sets, folder / "chart.png")
    from tunelab.htmlpage import write_page

    write_page(folder / "table.md", folder / "report.html", [folder / "chart.png"])
    return folder
