"""`tunelab compare CONFIG.yaml`: several methods, same data, same token budget and seed, one table.

    name: full-vs-lora
    base:                       # a run config shared by every row (model, data, train, ...)
      model: {name: smollm2-135m}
      data: {train: synthetic:date-format:train:2000, template: chat}
      train: {max_steps: 100, batch_size: 8, seed: 0}
    methods:                    # one row each: a label, the method section, optional train overrides
      - {label: full, method: {name: full}, train: {lr: 5.0e-5}}
      - {label: lora-r8, method: {name: lora, r: 8}, train: {lr: 2.0e-3}}
    eval: {tasks: [synth-date-format], data_dir: null, limit: 200}
    output_dir: runs/compare-full-vs-lora

Each row is trained and evaluated in its own processes (so peak memory is the row's own and a crash cannot take
the others down); a failed row appears in the table with its error. Finished rows are recorded in
``OUTPUT/<label>/row.json`` and skipped when the command is run again; an interrupted training resumes.
Rows may change only optimisation hyper-parameters: data, steps, batch sizes and seed are shared so every method
gets the same token budget.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import ConfigError, apply_overrides, build, config_from_dict, read_yaml
from tunelab.files import atomic_write_json, atomic_write_text, save_png
from tunelab.study.protocol import BUDGET_KEYS


@dataclass
class CompareEval:
    tasks: list[str] = field(default_factory=list)
    data_dir: str | None = None
    tasks_dir: list[str] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 16
    dtype: str = "fp32"
    decontaminate: list[str] = field(default_factory=list)  # training/dev files whose questions leave the tests


@dataclass
class CompareRow:
    label: str
    method: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    set: list[str] = field(default_factory=list)  # extra dotted overrides, e.g. ["data.template=alpaca"]
    quantize: dict[str, Any] | None = None  # a quantize section for this row (QLoRA / LoftQ on a quantized base)


@dataclass
class CompareConfig:
    name: str
    base: dict[str, Any]
    methods: list[CompareRow]
    eval: CompareEval = field(default_factory=CompareEval)
    output_dir: str = "runs/compare"


def check_unique_labels(path: str | Path, rows: list[Any]) -> None:
    """Rows are stored under OUTPUT/<label>/: two rows with one label would overwrite each other."""
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{path}: method labels must be unique, got {labels}")


def load_compare(path: str | Path) -> CompareConfig:
    data, lines = read_yaml(path)
    cfg = build(CompareConfig, data, "", lines)
    check_unique_labels(path, cfg.methods)
    for row in cfg.methods:
        changed = [k for k in BUDGET_KEYS if k in row.train]
        if changed:
            raise ConfigError(f"{path}: row '{row.label}' changes train.{changed[0]}; rows share data, steps, "
                              f"batch size and seed so that every method gets the same token budget")
        row_config(cfg, row)  # validate now, before anything trains
    return cfg


def row_config(cfg: CompareConfig, row: CompareRow) -> dict[str, Any]:
    """The full run config of one row (validated)."""
    data = json.loads(json.dumps(cfg.base))
    data["method"] = dict(row.method)
    if row.quantize is not None:
        data["quantize"] = dict(row.quantize)
    data.setdefault("train", {}).update(row.train)
    data["output_dir"] = str(Path(cfg.output_dir) / row.label / "run")
    apply_overrides(data, row.set)
    try:
        config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"compare row '{row.label}': {e}") from None
    return data


def _run(cmd: list[str], log: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, text=True)
    tail = log.read_text(encoding="utf-8").strip().splitlines()
    return proc.returncode, (tail[-1] if tail else "")


def run_row(cfg: CompareConfig, row: CompareRow) -> dict[str, Any]:
    """Train and evaluate one row in subprocesses; return its result (with 'error' when it failed)."""
    row_dir = Path(cfg.output_dir) / row.label
    row_dir.mkdir(parents=True, exist_ok=True)
    run_dir = row_dir / "run"
    cfg_path = row_dir / "config.yaml"
    atomic_write_text(cfg_path, yaml.safe_dump(row_config(cfg, row), sort_keys=False))
    log = row_dir / "log.txt"
    t0 = time.perf_counter()
    cli = [sys.executable, "-m", "tunelab.cli"]
    meta_path = run_dir / "meta.json"
    status = json.loads(meta_path.read_text()).get("status") if meta_path.is_file() else None
    if status == "diverged":  # resume is bit-exact: it would diverge again at the same step
        meta = json.loads(meta_path.read_text())
        return {"label": row.label, "method": row.method.get("name"),
                "error": f"{meta.get('error') or 'training diverged'} ({run_dir} is kept: delete it to train "
                         "this row again)"}
    if status != "complete":
        resume = ["--resume"] if meta_path.is_file() else []
        code, last = _run([*cli, "train", str(cfg_path), "--set", "train.progress=false", *resume], log)
        if code != 0:
            return {"label": row.label, "method": row.method.get("name"), "error": last or f"exit {code}"}
    train_wall = time.perf_counter() - t0
    tasks = [a for t in cfg.eval.tasks for a in ("--task", t)]
    extra = (["--data-dir", cfg.eval.data_dir] if cfg.eval.data_dir else []) + \
            (["--limit", str(cfg.eval.limit)] if cfg.eval.limit else []) + \
            [a for d in cfg.eval.tasks_dir for a in ("--tasks-dir", d)] + \
            [a for d in cfg.eval.decontaminate for a in ("--decontaminate", d)]
    if tasks:
        code, last = _run([*cli, "eval", str(run_dir), *tasks, *extra, "--batch-size", str(cfg.eval.batch_size),
                           "--dtype", cfg.eval.dtype, "--out", str(row_dir / "eval")], log)
        if code != 0:
            return {"label": row.label, "method": row.method.get("name"), "error": f"eval: {last}"}
    return _collect(row, run_dir, row_dir, train_wall, time.perf_counter() - t0)


def _collect(row: CompareRow, run_dir: Path, row_dir: Path, train_wall: float, wall: float) -> dict[str, Any]:
    meta = json.loads((run_dir / "meta.json").read_text())
    m = meta.get("metrics", {})
    result = {
        "label": row.label, "method": meta["method"], "trainable_params": meta["trainable_params"],
        "trainable_percent": meta["trainable_percent"], "tokens_per_s": m.get("tokens_per_s"),
        "train_tokens": m.get("tokens"), "peak_rss_mb": m.get("peak_rss_mb"), "train_loss": m.get("train_loss"),
        "eval_loss": m.get("eval_loss"), "disk_bytes": (run_dir / "adapter.safetensors").stat().st_size,
        "train_wall_s": train_wall, "wall_s": wall, "tasks": {}, "train_dtype": meta.get("compute_dtype"),
    }
    summary = row_dir / "eval" / "summary.json"
    if summary.is_file():
        evaluated = json.loads(summary.read_text())
        result["eval_dtype"] = evaluated.get("dtype")
        for s in evaluated["tasks"]:
            result["tasks"][s["task"]] = {k: s.get(k) for k in ("accuracy", "ci_low", "ci_high", "accuracy_norm",
                                                                 "loss", "n", "parsed_fraction", "removed_overlap")}
    return result


def compare(path: str | Path, *, rerun: bool = False) -> list[dict[str, Any]]:
    """Run (or resume) a comparison; write table.md, table.csv, chart.png, results.json and report.html."""
    cfg = load_compare(path)
    results = run_rows(cfg, rerun=rerun)
    write_tables(cfg, results, Path(cfg.output_dir))
    return results


def run_rows(cfg: CompareConfig, *, rerun: bool = False) -> list[dict[str, Any]]:
    """Run (or reuse the recorded result of) every row of ``cfg``, in order; failed rows carry 'error'."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for row in cfg.methods:
        done = out / row.label / "row.json"
        if done.is_file() and not rerun:
            print(f"[compare] {row.label}: finished earlier, skipped", flush=True)
            results.append(json.loads(done.read_text()))
            continue
        print(f"[compare] {row.label}: training and evaluating ...", flush=True)
        result = run_row(cfg, row)
        if "error" not in result:
            atomic_write_json(done, result)
        print(f"[compare] {row.label}: {result.get('error') or 'done'}", flush=True)
        results.append(result)
    return results


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------


def _task_cell(t: dict[str, Any] | None) -> str:
    if not t:
        return "–"
    if t.get("accuracy") is not None:
        return f"{100 * t['accuracy']:.1f} [{100 * t['ci_low']:.1f}, {100 * t['ci_high']:.1f}]"
    return f"loss {t['loss']:.3f}" if t.get("loss") is not None else "–"


def _average(r: dict[str, Any], tasks: list[str]) -> float | None:
    accs = [r["tasks"][t]["accuracy"] for t in tasks if r.get("tasks", {}).get(t, {}).get("accuracy") is not None]
    return sum(accs) / len(accs) if accs and len(accs) == len(tasks) else None


def table_rows(cfg: CompareConfig, results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    tasks = cfg.eval.tasks
    header = ["method", "label", *tasks, "avg", "trainable", "% of base", "train tok/s", "peak RSS MiB",
              "disk MiB", "wall s", "error"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([str(r.get("method")), r["label"], *["–"] * (len(tasks) + 7), r["error"]])
            continue
        avg = _average(r, tasks)
        rows.append([
            r["method"], r["label"], *[_task_cell(r["tasks"].get(t)) for t in tasks],
            f"{100 * avg:.1f}" if avg is not None else "–", f"{r['trainable_params']:,}",
            f"{r['trainable_percent']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_mb']:.0f}",
            f"{r['disk_bytes'] / 2**20:.1f}", f"{r['wall_s']:.0f}", "",
        ])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_tables(cfg: CompareConfig, results: list[dict[str, Any]], out: Path) -> None:
    header, rows = table_rows(cfg, results)
    atomic_write_text(out / "table.md", f"# {cfg.name}\n\n" + markdown_table(header, rows))
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    atomic_write_text(out / "table.csv", buf.getvalue())
    atomic_write_json(out / "results.json", results)
    _chart(cfg, results, out / "chart.png")
    from tunelab.htmlpage import write_page

    write_page(out / "table.md", out / "report.html", [out / "chart.png"])


def _chart(cfg: CompareConfig, results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    tasks = [t for t in cfg.eval.tasks if any(r["tasks"].get(t, {}).get("accuracy") is not None for r in ok)]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) * max(1, len(ok)) / 2), 3.6))
    width = 0.8 / max(1, len(ok))
    for i, r in enumerate(ok):
        accs = [100 * (r["tasks"].get(t, {}).get("accuracy") or 0) for t in tasks]
        lo = [a - 100 * (r["tasks"].get(t, {}).get("ci_low") or 0) for a, t in zip(accs, tasks, strict=True)]
        hi = [100 * (r["tasks"].get(t, {}).get("ci_high") or 0) - a for a, t in zip(accs, tasks, strict=True)]
        xs = [j + i * width for j in range(len(tasks))]
        ax.bar(xs, accs, width, yerr=[lo, hi], capsize=3,
               label=f"{r['label']} ({r['trainable_percent']:.3g}% params)")
    ax.set_xticks([j + width * (len(ok) - 1) / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("accuracy (%) with 95% CI")
    ax.set_title(cfg.name)
    ax.legend(fontsize=8)
    save_png(fig, path)
