"""`tunelab lr-search CONFIG.yaml`: every method row at a grid of learning rates; the best rate chosen on a dev split.

    name: random masking vs LoRA, learning-rate grid
    base:                        # a compare base: model, data, train shared by every point
      data: {train: ..., eval_fraction: 0.05}       # the dev split: held out of the training file
      train: {max_steps: 60, batch_size: 8, seed: 0}
    methods:                     # one row per method; each is trained once per rate in `lrs`
      - {label: mask-0.01%, method: {name: random-mask, fraction: 1.0e-4}, lrs: [3.0e-3, 1.0e-2, 3.0e-2]}
      - {label: lora-r8, method: {name: lora, r: 8}, lrs: [3.0e-4, 1.0e-3, 3.0e-3]}
    select: eval_loss            # lowest dev loss (default), or the name of a task in eval.tasks (highest accuracy)
    eval: {tasks: [arc-easy-ll], data_dir: DATA, limit: 500}
    output_dir: runs/lr-search

Each (row, rate) point is a row of an ordinary comparison (``tunelab.study.compare``: own processes, same token budget,
finished points skipped on a rerun) written under ``OUTPUT/grid/``. Then, per row, the rate with the best
``select`` score is kept: ``best.md`` / ``best.csv`` hold one compare row per method at its selected rate, and
``lr.png`` plots accuracy (95% interval) against the learning rate for every row and task, the selected rate
marked. Selecting on ``eval_loss`` uses only the dev split, so the reported test accuracy is not chosen on itself;
``select: TASK`` selects on that task's accuracy and is honest only when the task is a dev set.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import ConfigError, build, read_yaml
from tunelab.files import atomic_write_json, atomic_write_text, save_png
from tunelab.study.compare import (
    CompareConfig,
    CompareEval,
    CompareRow,
    check_unique_labels,
    markdown_table,
    row_config,
    run_rows,
    table_rows,
    write_tables,
)
from tunelab.study.protocol import BUDGET_KEYS, DEV_LOSS, best_rate


@dataclass
class SearchRow:
    label: str
    method: dict[str, Any]
    lrs: list[float]
    train: dict[str, Any] = field(default_factory=dict)
    set: list[str] = field(default_factory=list)


@dataclass
class SearchConfig:
    name: str
    base: dict[str, Any]
    methods: list[SearchRow]
    select: str = DEV_LOSS
    eval: CompareEval = field(default_factory=CompareEval)
    output_dir: str = "runs/lr-search"


def point_label(label: str, lr: float) -> str:
    return f"{label}@lr={lr:g}"


def grid(cfg: SearchConfig) -> CompareConfig:
    """The comparison of every (row, rate) point, written under OUTPUT/grid."""
    rows = [CompareRow(label=point_label(r.label, lr), method=dict(r.method), train={**r.train, "lr": lr},
                       set=list(r.set)) for r in cfg.methods for lr in r.lrs]
    return CompareConfig(name=f"{cfg.name} (every rate)", base=cfg.base, methods=rows, eval=cfg.eval,
                         output_dir=str(Path(cfg.output_dir) / "grid"))


def _check_row(path: str | Path, row: SearchRow) -> None:
    if not row.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in row.lrs):
        raise ConfigError(f"{path}: row '{row.label}': lrs must be a non-empty list of positive rates, got {row.lrs}")
    if len(set(row.lrs)) != len(row.lrs):
        raise ConfigError(f"{path}: row '{row.label}': lrs has a repeated rate: {row.lrs}")
    fixed = [k for k in ("lr", *BUDGET_KEYS) if k in row.train]
    if fixed:
        raise ConfigError(f"{path}: row '{row.label}' sets train.{fixed[0]}; the rate comes from lrs and data, "
                          f"steps, batch size and seed are shared by every point (set them in base.train)")


def _check_select(path: str | Path, cfg: SearchConfig) -> None:
    if cfg.select == DEV_LOSS:
        data = cfg.base.get("data", {})
        if not data.get("eval") and not data.get("eval_fraction"):
            raise ConfigError(f"{path}: select: {DEV_LOSS} needs a dev split: set base.data.eval_fraction "
                              f"(e.g. 0.05) or base.data.eval, or select on a task of eval.tasks")
    elif cfg.select not in cfg.eval.tasks:
        raise ConfigError(f"{path}: select: {cfg.select!r} is neither '{DEV_LOSS}' nor a task of eval.tasks "
                          f"{cfg.eval.tasks}")


def load_search(path: str | Path) -> SearchConfig:
    """Read and validate an LR-search config (every point's run config is validated before anything trains)."""
    data, lines = read_yaml(path)
    cfg = build(SearchConfig, data, "", lines)
    check_unique_labels(path, cfg.methods)
    for row in cfg.methods:
        _check_row(path, row)
    _check_select(path, cfg)
    g = grid(cfg)
    for row in g.methods:
        row_config(g, row)
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------------


def score(result: dict[str, Any], select: str) -> float | None:
    """Higher is better: −dev loss, or the task's accuracy; None when the point failed or lacks the metric."""
    if "error" in result:
        return None
    if select == DEV_LOSS:
        loss = result.get("eval_loss")
        return None if loss is None or not math.isfinite(loss) else -loss
    return (result.get("tasks", {}).get(select) or {}).get("accuracy")


def select_best(cfg: SearchConfig, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row: its point with the best score (the lower rate on a tie), with 'lr' and 'select' added."""
    best = []
    for row in cfg.methods:
        scored = [(score(results[point_label(row.label, lr)], cfg.select), lr) for lr in row.lrs]
        scored = [(s, lr) for s, lr in scored if s is not None]
        if not scored:
            best.append({"label": row.label, "method": row.method.get("name"), "lr": None,
                         "error": f"no rate of {row.lrs} finished with a {cfg.select} score"})
            continue
        lr = best_rate({lr: -s for s, lr in scored})  # the protocol's rule: best score, the lower rate on a tie
        best.append({**results[point_label(row.label, lr)], "label": row.label, "lr": lr, "select": cfg.select})
    return best


def search(path: str | Path, *, rerun: bool = False) -> list[dict[str, Any]]:
    """Run (or resume) the grid; write grid/ tables, best.md/.csv/.json and lr.png; return the selected rows."""
    cfg = load_search(path)
    g = grid(cfg)
    points = run_rows(g, rerun=rerun)
    write_tables(g, points, Path(g.output_dir))
    by_label = {r["label"]: r for r in points}
    best = select_best(cfg, by_label)
    write_best(cfg, best, Path(cfg.output_dir))
    lr_chart(cfg, by_label, best, Path(cfg.output_dir) / "lr.png")
    return best


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


def write_best(cfg: SearchConfig, best: list[dict[str, Any]], out: Path) -> None:
    """best.md / best.csv: the compare table of the selected points, with the rate and its dev score."""
    table_cfg = CompareConfig(name=cfg.name, base=cfg.base, methods=[], eval=cfg.eval)
    header, rows = table_rows(table_cfg, best)
    header = ["lr", f"dev {cfg.select}", *header]
    for r, cells in zip(best, rows, strict=True):
        s = score(r, cfg.select) if "error" not in r else None
        dev = "–" if s is None else (f"{-s:.4f}" if cfg.select == DEV_LOSS else f"{100 * s:.1f}")
        cells[:0] = ["–" if r.get("lr") is None else f"{r['lr']:g}", dev]
    grid_of = "; ".join(f"{row.label}: {', '.join(f'{lr:g}' for lr in row.lrs)}" for row in cfg.methods)
    note = f"Each method at the rate with the best {cfg.select} of its grid ({grid_of}).\n\n"
    atomic_write_text(out / "best.md", f"# {cfg.name}\n\n{note}" + markdown_table(header, rows))
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    atomic_write_text(out / "best.csv", buf.getvalue())
    atomic_write_json(out / "best.json", best)


def _curve(row: SearchRow, results: dict[str, dict[str, Any]], task: str) -> tuple[list[float], ...]:
    xs, ys, lo, hi = [], [], [], []
    for lr in sorted(row.lrs):
        t = results.get(point_label(row.label, lr), {}).get("tasks", {}).get(task) or {}
        if t.get("accuracy") is None:
            continue
        xs.append(lr)
        ys.append(100 * t["accuracy"])
        lo.append(100 * (t["accuracy"] - (t.get("ci_low") or t["accuracy"])))
        hi.append(100 * ((t.get("ci_high") or t["accuracy"]) - t["accuracy"]))
    return xs, ys, lo, hi


def lr_chart(cfg: SearchConfig, results: dict[str, dict[str, Any]], best: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (95% CI) against learning rate (log axis), one line per row, one panel per task; ★ = selected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = cfg.eval.tasks or []
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5.5 * max(1, len(tasks)), 3.8), squeeze=False)
    chosen = {b["label"]: b.get("lr") for b in best}
    for ax, task in zip(axes[0], tasks, strict=False):
        for row in cfg.methods:
            xs, ys, lo, hi = _curve(row, results, task)
            if not xs:
                continue
            line = ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=row.label)
            if chosen.get(row.label) in xs:
                i = xs.index(chosen[row.label])
                ax.plot([xs[i]], [ys[i]], marker="*", markersize=14, color=line[0].get_color())
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"{task} accuracy (%)")
        ax.set_title(f"{task} (★ best {cfg.select})", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(cfg.name, fontsize=10)
    save_png(fig, path)


def format_best(out: Path) -> str:
    """The best.md table and where the outputs are (for the CLI)."""
    return ((out / "best.md").read_text() + f"\nbest: {out / 'best.md'}, {out / 'best.csv'}; accuracy vs rate: "
            f"{out / 'lr.png'}; every point: {out / 'grid' / 'table.md'}\n")
