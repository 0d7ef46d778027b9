"""`tunelab suite SUITE.yaml --data-dir DIR [--scale small|full]`: a real-data comparison under the protocol.

    name: math (MAWPS equations)
    model: {name: smollm2-135m}
    data:
      train: [{path: mawps/trainset.json, format: mawps}]     # relative to --data-dir; several files are mixed
      dev: {path: mawps/validset.json, format: mawps}         # or dev_fraction: 0.05 (carved from train)
      template: alpaca
      max_length: 256
    train: {batch_size: 8, warmup_ratio: 0.05}                # shared by every row (the step budget: scales)
    rows:
      - {label: lora-r8, method: {name: lora, r: 8, alpha: 16}, lrs: [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3]}
    eval:
      sets:                                                   # one test set each; generate and/or loglik task
        - {name: mawps, generate: mawps-eq}
      baselines: [first-two-sum]
    scales:
      small: {max_steps: 200, seeds: [0], limit: 500}
      full: {max_steps: 400, seeds: [0, 1, 2]}

What it does, in order, for each row (rows are finished one by one, so a partial study has whole rows):

1. **Data, once.** The training files are read in their row format (``tunelab.data.formats``), duplicate
   questions dropped, and written with the dev split to ``OUT/data/train.jsonl`` and ``dev.jsonl``; every row
   trains on exactly those records. Each test set is decontaminated against both (``tunelab.data.contamination``),
   and the number of questions removed is reported.
2. **The base**: the untrained model on every task (zero-shot generation in the trained format, log-likelihood),
   and trivial baselines (``tunelab.study.baselines``) on the same items.
3. **LR search**: each rate of the row's grid trains once (first seed) and is scored by its dev loss; the best
   is kept (``tunelab.study.protocol``).
4. **Seeds**: the chosen rate trains once per seed (the first seed's search run is reused) and is evaluated on
   every test set.
5. **Report** (``tunelab.study.report``): tables, chart and JSON from the store, with paired intervals.

Every unit (a base evaluation, a search point, a final seed) is a row of a SQLite store (``OUT/study.sqlite``,
the store of ``tunelab sweep``): finished units are never run again, and a killed suite continues with the same
command. ``tunelab runs OUT`` lists them. Within a unit nothing long is lost either: training checkpoints every
``CHECKPOINT_EVERY`` steps (one checkpoint kept; resumed bit-exactly) and an evaluation keeps the test sets it
finished (``tunelab.eval.harness``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import ConfigError, build, read_yaml
from tunelab.data import FieldMap, Record, load_source
from tunelab.data.contamination import question_key
from tunelab.files import atomic_write_json, atomic_write_text
from tunelab.scaling.ledger import Ledger, digest
from tunelab.scaling.store import Claim, Heartbeat, Store, process_alive, process_start
from tunelab.study.compare import (
    CompareConfig,
    CompareEval,
    CompareRow,
    check_unique_labels,
    row_config,
    run_row,
)
from tunelab.study.protocol import (
    BUDGET_KEYS,
    DEV_LOSS,
    MAX_GRID_EXTENSIONS,
    best_rate,
    grid_extension,
    grid_problems,
)
from tunelab.study.provenance import commit


@dataclass
class SuiteSource:
    path: str  # relative to --data-dir, or absolute
    format: str = "as-is"
    limit: int | None = None  # at most this many records: a seeded random sample


@dataclass
class SuiteData:
    train: list[SuiteSource]
    dev: SuiteSource | None = None
    dev_fraction: float = 0.0  # carved from the training records when `dev` is not given
    dev_max: int = 256
    template: str = "alpaca"
    max_length: int = 256
    sample_seed: int = 0


@dataclass
class SuiteRow:
    label: str
    method: dict[str, Any]
    lrs: list[float]
    train: dict[str, Any] = field(default_factory=dict)
    quantize: dict[str, Any] | None = None


@dataclass
class SuiteSet:
    name: str
    generate: str | None = None  # task scored by generation in the trained format
    loglik: str | None = None  # task scored by log-likelihood
    group: str = "test"  # e.g. in-domain / transfer: averages are taken per group


@dataclass
class SuiteEval:
    sets: list[SuiteSet]
    baselines: list[str] = field(default_factory=list)
    batch_size: int = 16
    dtype: str = "auto"  # bf16 where this machine has bf16 units, else fp32 (each unit records what it used)


@dataclass
class SuiteScale:
    max_steps: int
    seeds: list[int] = field(default_factory=lambda: [0])
    limit: int | None = None  # test items per set (the first N after decontamination; the same for every row)
    rows: list[str] | None = None  # only these rows (None: all)


@dataclass
class SuiteClaim:
    """A paper's claim about two rows, checked by the paired difference a − b on the first group's average."""

    text: str
    a: str
    b: str


@dataclass
class SuiteConfig:
    name: str
    data: SuiteData
    rows: list[SuiteRow]
    eval: SuiteEval
    scales: dict[str, SuiteScale]
    model: dict[str, Any] = field(default_factory=lambda: {"name": "smollm2-135m"})
    train: dict[str, Any] = field(default_factory=dict)
    select: str = DEV_LOSS
    description: str = ""
    claims: list[SuiteClaim] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------ config


def load_suite(path: str | Path) -> SuiteConfig:
    """Read and check a suite YAML (rows, grids, budget keys, scales, task names)."""
    from tunelab.eval.tasks import discover_tasks, get_task

    data, lines = read_yaml(path)
    cfg = build(SuiteConfig, data, "", lines)
    cfg.scales = {name: build(SuiteScale, value, f"scales.{name}", lines) for name, value in cfg.scales.items()}
    check_unique_labels(path, cfg.rows)
    if cfg.select != DEV_LOSS:
        raise ConfigError(f"{path}: select must be '{DEV_LOSS}' (the dev split is the only data a rate may be "
                          f"chosen on), got {cfg.select!r}")
    fixed = [k for k in ("lr", "max_steps", "epochs", "seed") if k in cfg.train]
    if fixed:
        raise ConfigError(f"{path}: train.{fixed[0]} is set by the protocol (the rate by the search, steps and "
                          f"seeds by the scale); remove it")
    for row in cfg.rows:
        bad = [k for k in ("lr", *BUDGET_KEYS) if k in row.train]
        if bad:
            raise ConfigError(f"{path}: row '{row.label}' sets train.{bad[0]}; every row shares the budget")
        if not row.lrs or any(lr <= 0 for lr in row.lrs):
            raise ConfigError(f"{path}: row '{row.label}': lrs must be positive rates, got {row.lrs}")
    if not cfg.scales:
        raise ConfigError(f"{path}: scales needs at least one entry, e.g. small: {{max_steps: 200, seeds: [0]}}")
    tasks = discover_tasks()
    for name in (t for s in cfg.eval.sets for t in (s.generate, s.loglik) if t is not None):
        get_task(name, tasks)
    _check_row_names(path, cfg)
    return cfg


def _check_row_names(path: str | Path, cfg: SuiteConfig) -> None:
    """Claims and scales may name only rows of the suite."""
    labels = {r.label for r in cfg.rows}
    named = [(f"claim {c.text!r}", {c.a, c.b}) for c in cfg.claims]
    named += [(f"scale '{name}'", set(scale.rows or ())) for name, scale in cfg.scales.items()]
    for what, rows in named:
        unknown = sorted(rows - labels)
        if unknown:
            raise ConfigError(f"{path}: {what} names unknown rows {unknown}; rows: {sorted(labels)}")


@dataclass
class SuiteRun:
    """A suite at one scale, bound to its data directory and output folder."""

    cfg: SuiteConfig
    scale_name: str
    data_dir: Path
    out: Path
    source: str = ""
    ledger: Ledger | None = None  # set by attach_ledger: finished units are also written there

    @property
    def scale(self) -> SuiteScale:
        return self.cfg.scales[self.scale_name]

    def rows(self) -> list[SuiteRow]:
        """The scale's rows, in the order it names them (all rows in the file's order when it names none)."""
        if self.scale.rows is None:
            return list(self.cfg.rows)
        by_label = {r.label: r for r in self.cfg.rows}
        return [by_label[label] for label in self.scale.rows]

    def tasks(self) -> list[str]:
        return [t for s in self.cfg.eval.sets for t in (s.generate, s.loglik) if t is not None]

    def base_records(self, s: SuiteSet) -> list[Record]:
        """The scored items of a test set, as every row sees them: decontaminated, then the scale's limit."""
        from tunelab.eval.tasks import discover_tasks, get_task, select_examples

        spec = get_task(s.generate or s.loglik or "", discover_tasks())
        return select_examples(spec, self.data_dir, self.scale.limit, seen_keys(self))[0]


def open_suite(path: str | Path, data_dir: str | Path, scale: str, out: str | Path | None = None) -> SuiteRun:
    cfg = load_suite(path)
    if scale not in cfg.scales:
        raise ConfigError(f"{path}: no scale {scale!r}; this suite has {', '.join(cfg.scales)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ConfigError(f"--data-dir {data_dir} is not a folder (expected the LLM-Adapters layout, e.g. "
                          f"{data_dir}/{cfg.data.train[0].path})")
    default = Path("runs") / f"suite-{Path(path).stem}-{scale}"
    return SuiteRun(cfg, scale, data_dir, Path(out) if out else default, str(path))


# ------------------------------------------------------------------------------------------------------ data


def _read(run: SuiteRun, src: SuiteSource, rng: random.Random) -> list[Record]:
    path = Path(src.path) if Path(src.path).is_absolute() else run.data_dir / src.path
    records, bad = load_source(path, FieldMap(), skip_bad_rows=True, format=src.format)
    if bad:
        print(f"[suite] {path}: {len(bad)} rows skipped (first: {bad[0]})", flush=True)
    if src.limit is not None and len(records) > src.limit:
        records = rng.sample(records, src.limit)
    return records


def _unique(records: list[Record]) -> list[Record]:
    seen: set[str] = set()
    out = []
    for r in records:
        key = question_key(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _jsonl(records: list[Record]) -> str:
    def row(r: Record) -> dict[str, Any]:
        d = {"instruction": r.instruction, "input": r.input, "output": r.output}
        return {**d, "options": list(r.options)} if r.options else d

    return "".join(json.dumps(row(r), ensure_ascii=False) + "\n" for r in records)


def prepare_data(run: SuiteRun) -> dict[str, Any]:
    """Write OUT/data/train.jsonl and dev.jsonl once (later calls reuse them); returns their counts."""
    folder = run.out / "data"
    info_path = folder / "info.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    d = run.cfg.data
    rng = random.Random(d.sample_seed)
    train = _unique([r for src in d.train for r in _read(run, src, rng)])
    if not train:
        raise ConfigError(f"{run.source}: data.train ({', '.join(s.path for s in d.train)}) gave no usable record")
    rng.shuffle(train)  # sources mixed (batches are also reshuffled each epoch by the loop)
    if d.dev is not None:
        dev_keys = {question_key(r) for r in train}
        dev = [r for r in _unique(_read(run, d.dev, rng)) if question_key(r) not in dev_keys][: d.dev_max]
    else:
        if not 0 < d.dev_fraction < 1:
            raise ConfigError(f"{run.source}: data needs a dev set: give data.dev or data.dev_fraction in (0, 1)")
        n_dev = min(d.dev_max, max(1, round(d.dev_fraction * len(train))))
        dev, train = train[:n_dev], train[n_dev:]
    atomic_write_text(folder / "train.jsonl", _jsonl(train))
    atomic_write_text(folder / "dev.jsonl", _jsonl(dev))
    info = {"train": len(train), "dev": len(dev), "sources": [dataclasses.asdict(s) for s in d.train]}
    atomic_write_json(info_path, info)
    return info


# ------------------------------------------------------------------------------------------------------ units


# A unit's training checkpoints this often (steps) unless the suite's train section says otherwise, keeping one:
# a suite stopped mid-unit (a machine handed back) loses at most this many steps of that unit.
CHECKPOINT_EVERY = 50


def _base_config(run: SuiteRun) -> dict[str, Any]:
    d = run.cfg.data
    folder = (run.out / "data").resolve()
    train = {"save_every": CHECKPOINT_EVERY, "keep_checkpoints": 1, **run.cfg.train}
    return {"model": dict(run.cfg.model),
            "data": {"train": str(folder / "train.jsonl"), "eval": str(folder / "dev.jsonl"),
                     "template": d.template, "max_length": d.max_length, "eval_max_examples": d.dev_max},
            "train": {**train, "max_steps": run.scale.max_steps, "progress": False}}


def _compare_eval(run: SuiteRun, tasks: list[str]) -> CompareEval:
    folder = (run.out / "data").resolve()
    return CompareEval(tasks=tasks, data_dir=str(run.data_dir.resolve()), limit=run.scale.limit,
                       batch_size=run.cfg.eval.batch_size, dtype=run.cfg.eval.dtype,
                       decontaminate=[str(folder / "train.jsonl"), str(folder / "dev.jsonl")])


def unit_label(row: str, lr: float, seed: int) -> str:
    return f"{row}/lr={lr:g}/seed={seed}"


def _unit(run: SuiteRun, row: SuiteRow, lr: float, seed: int, tasks: list[str]) -> dict[str, Any]:
    """The store config of one training unit: a compare row (one method, one rate, one seed)."""
    base = _base_config(run)
    base["train"]["seed"] = seed
    cfg = CompareConfig(name=run.cfg.name, base=base, methods=[], eval=_compare_eval(run, tasks),
                        output_dir=str((run.out / "runs").resolve()))
    crow = CompareRow(label=unit_label(row.label, lr, seed), method=dict(row.method), train={**row.train, "lr": lr},
                      quantize=row.quantize)
    row_config(cfg, crow)  # validated before anything trains
    return {"kind": "train", "compare": dataclasses.asdict(cfg), "row": dataclasses.asdict(crow)}


def _execute(config: dict[str, Any]) -> dict[str, Any]:
    """Run one unit's config (train or base) and return its result; raises RuntimeError when it failed."""
    if config["kind"] == "base":
        return _execute_base(config)
    c = config["compare"]
    cfg = CompareConfig(name=c["name"], base=c["base"], methods=[], eval=CompareEval(**c["eval"]),
                        output_dir=c["output_dir"])
    result = run_row(cfg, CompareRow(**config["row"]))
    if "error" in result:
        raise RuntimeError(result["error"])
    result["threads"] = _threads()  # what it trained with (train.threads, or the share --jobs gave this process)
    return result


def _execute_base(config: dict[str, Any]) -> dict[str, Any]:
    out = Path(config["out"])
    cmd = [sys.executable, "-m", "tunelab.cli", "eval", config["model"], "--template", config["template"],
           "--data-dir", config["data_dir"], "--dtype", config["dtype"], "--batch-size", str(config["batch_size"]),
           "--out", str(out / "eval")]
    cmd += [a for t in config["tasks"] for a in ("--task", t)]
    cmd += [a for f in config["decontaminate"] for a in ("--decontaminate", f)]
    cmd += ["--limit", str(config["limit"])] if config["limit"] else []
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "a", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"base evaluation failed (exit {proc.returncode}); see {out / 'log.txt'}")
    summary = json.loads((out / "eval" / "summary.json").read_text())
    return {"label": "base", "eval_dtype": summary.get("dtype"), "tasks": {s["task"]: s for s in summary["tasks"]},
            "threads": int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)}  # the evaluation's


def ensure(store: Store, key: str, config: dict[str, Any], factors: dict[str, Any],
           ledger: Ledger | None = None) -> dict[str, Any] | None:
    """The result of unit ``key``: from the store when it finished earlier, else run now (and recorded, in the
    ledger too when there is one). While ``key`` is held by another process (a ``--jobs`` helper, another suite on
    the same folder), this one runs other pending units, or waits when there are none.

    Returns None when the unit failed (its error is in the store; ``--retry-failed`` runs it again)."""
    store.add_runs([(key, config, factors)])
    while True:
        done = next(r for r in store.rows() if r.key == key)
        if done.status == "done":
            return done.metrics
        if done.status == "failed":
            return None
        claim = store.claim(prefer=key)
        if claim is None:  # held by a live process
            time.sleep(WAIT_S)
            continue
        run_claimed(store, claim, ledger)


WAIT_S = 5.0  # how often a process with nothing to claim looks at the store again


def run_claimed(store: Store, claim: Claim, ledger: Ledger | None, tag: str = "suite") -> None:
    """Run one claimed unit and record its result (or its failure) in the store, and in the ledger if given."""
    t0 = time.perf_counter()
    code = commit()  # read at the start: the checkout may move while a long unit runs
    print(f"[{tag}] {claim.key}: running", flush=True)
    try:
        with Heartbeat(store, claim):  # a long unit is not taken for a dead one by another process's claim
            result = _execute(claim.config)
    except (RuntimeError, OSError, ValueError) as err:
        store.fail(claim, str(err), time.perf_counter() - t0)
        print(f"[{tag}] {claim.key}: failed: {err}", flush=True)
        return
    result["commit"] = code  # the code that produced this unit (a suite may span several commits)
    if store.commit(claim, result, time.perf_counter() - t0) and ledger is not None:
        done = next(r for r in store.rows() if r.key == claim.key)
        ledger.record(done, ledger_files(ledger_root(store), done))
    print(f"[{tag}] {claim.key}: done in {time.perf_counter() - t0:.0f} s", flush=True)


def work(store: Store, ledger: Ledger | None, driver: int) -> int:
    """The loop of a ``--jobs`` helper process: run the store's pending units one at a time until the driver
    (process ``driver``, which adds the units as the protocol reaches them) has ended and nothing is pending.
    Returns how many units it ran."""
    start, ran = process_start(driver), 0
    tag = f"suite helper {os.getpid()}"
    while True:
        claim = store.claim()
        if claim is not None:
            run_claimed(store, claim, ledger, tag)
            ran += 1
        elif process_alive(driver, start):
            time.sleep(WAIT_S)
        else:
            return ran


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def threads_per_job(jobs: int) -> int:
    """Threads for each of ``jobs`` units run at once: this process's torch threads (OMP_NUM_THREADS or the
    cores) shared out, at least one."""
    return max(1, _threads() // jobs)


def start_helpers(run: SuiteRun, jobs: int, ledger: str | Path | None) -> list[subprocess.Popen[bytes]]:
    """``jobs - 1`` helper processes (``tunelab suite ... --worker-of PID``) on this suite's folder, each with
    ``threads_per_job(jobs)`` threads; their output goes where this process's goes."""
    if not run.source:
        raise ConfigError("--jobs needs the suite's YAML file (the helpers open it again)")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_job(jobs))}
    cmd = [sys.executable, "-m", "tunelab.cli", "suite", str(run.source), "--data-dir", str(run.data_dir),
           "--scale", run.scale_name, "--out", str(run.out), "--worker-of", str(os.getpid())]
    cmd += ["--ledger", str(ledger)] if ledger is not None else []
    return [subprocess.Popen(cmd, env=env) for _ in range(jobs - 1)]


def run_base(run: SuiteRun, store: Store) -> dict[str, Any] | None:
    folder = (run.out / "data").resolve()
    config = {"kind": "base", "model": run.cfg.model.get("name", "smollm2-135m"), "template": run.cfg.data.template,
              "data_dir": str(run.data_dir.resolve()), "dtype": run.cfg.eval.dtype,
              "batch_size": run.cfg.eval.batch_size, "tasks": run.tasks(), "limit": run.scale.limit,
              "decontaminate": [str(folder / "train.jsonl"), str(folder / "dev.jsonl")],
              "out": str((run.out / "base").resolve())}
    return ensure(store, "base", config, {"phase": "base", "row": "base"}, run.ledger)


def run_row_units(run: SuiteRun, store: Store, row: SuiteRow) -> dict[str, Any]:
    """LR search then seeds for one row; returns {"lr", "search": {lr: dev loss}, "seeds": {seed: result}}.

    When the best rate sits at the grid's edge the search goes one grid step beyond it (at most
    ``MAX_GRID_EXTENSIONS`` times), so that a chosen rate is an interior optimum wherever the budget allows."""
    first = run.scale.seeds[0]
    search: dict[float, float | None] = {}
    lrs = list(row.lrs)
    while True:
        for lr in lrs:
            if lr in search:
                continue
            res = ensure(store, f"search/{unit_label(row.label, lr, first)}", _unit(run, row, lr, first, []),
                         {"phase": "search", "row": row.label, "lr": lr, "seed": first}, run.ledger)
            search[lr] = None if res is None else res.get("eval_loss")
        nxt = grid_extension(search)
        if nxt is None or len(lrs) - len(row.lrs) >= MAX_GRID_EXTENSIONS:
            break
        print(f"[suite] {row.label}: best rate {best_rate(search):g} is at the grid's edge; searching {nxt:g}",
              flush=True)
        lrs.append(nxt)
    lr = best_rate(search)
    seeds: dict[int, Any] = {}
    if lr is not None:
        for seed in run.scale.seeds:
            seeds[seed] = ensure(store, f"final/{unit_label(row.label, lr, seed)}",
                                 _unit(run, row, lr, seed, run.tasks()),
                                 {"phase": "final", "row": row.label, "lr": lr, "seed": seed}, run.ledger)
    return {"lr": lr, "search": search, "seeds": seeds}


def unit_settings(run: SuiteRun) -> dict[str, Any]:
    """What a unit's key (row, rate, seed) does not say but its result depends on: the training steps and the
    test limit. Two scales with equal settings share units (e.g. more seeds at the same limit)."""
    return {"max_steps": run.scale.max_steps, "limit": run.scale.limit}


def _stored_settings(store: Store) -> dict[str, Any] | None:
    """The settings the store's units were made with: recorded since they were, else read from a unit's config."""
    recorded = store.info("units")
    if recorded is not None:
        return recorded
    for r in store.rows():
        if r.config.get("kind") == "train":
            c = r.config["compare"]
            return {"max_steps": c["base"]["train"]["max_steps"], "limit": c["eval"]["limit"]}
    return None


def check_same_units(run: SuiteRun, store: Store) -> None:
    """Refuse a scale whose units would differ from the folder's under the same keys: a finished unit is reused by
    its key, so a scale with other training steps or another test limit would silently take the folder's results
    (and its evaluations would overwrite theirs)."""
    have, want = _stored_settings(store), unit_settings(run)
    if have is None or have == want:
        return
    made = (store.info("suite") or {}).get("scale", "?")

    def show(d: dict[str, Any]) -> str:
        return f"max_steps {d['max_steps']}, test limit {d['limit'] if d['limit'] is not None else 'all items'}"

    raise ConfigError(f"{run.out}: this folder holds units of scale '{made}' ({show(have)}); scale "
                      f"'{run.scale_name}' of {run.source} trains or evaluates differently ({show(want)}). Units are "
                      "kept by row, rate and seed, so they cannot be mixed in one folder: give this scale its own "
                      "--out")


def ledger_fingerprint(run: SuiteRun) -> dict[str, Any]:
    """What a suite's unit results depend on beyond their keys: the suite, the training steps and test limit, and
    the exact training and dev records (so scales with equal settings share a ledger, as they share a folder)."""
    folder = run.out / "data"
    return {"suite": run.cfg.name, "units": unit_settings(run),
            "data": digest(folder / "train.jsonl", folder / "dev.jsonl")}


# per-item fields a ledger does not carry: long, and given again by the data (the prompt, the options' texts)
LEDGER_DROPPED_FIELDS = ("prompt", "labels")


def ledger_root(store: Store) -> Path:
    """The study folder a ledger's file paths are relative to: the store's."""
    return store.path.parent


def ledger_files(root: Path, row: Any) -> dict[str, str]:
    """What the report reads of a unit besides its metrics: its evaluation folder's summary and per-item rows
    (without ``LEDGER_DROPPED_FIELDS``), as {path relative to the study folder: text}."""
    from tunelab.study.report import unit_eval_dir

    folder = unit_eval_dir(root, row.factors)
    if folder is None or not folder.is_dir():
        return {}
    files = {}
    for p in sorted(folder.iterdir()):
        if p.suffix == ".jsonl":
            rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
            text = "".join(json.dumps({k: v for k, v in x.items() if k not in LEDGER_DROPPED_FIELDS},
                                      ensure_ascii=False) + "\n" for x in rows)
        elif p.name == "summary.json":
            text = p.read_text(encoding="utf-8")
        else:
            continue
        files[p.relative_to(root).as_posix()] = text
    return files


def attach_ledger(run: SuiteRun, store: Store, folder: str | Path) -> tuple[int, int]:
    """Bind ``folder`` as the suite's ledger (``tunelab.scaling.ledger``): the store takes the units it has and the
    store lacks, it takes the store's finished units, and every unit that finishes from now on is written there.
    Needs the data prepared. Returns (imported, recorded)."""
    run.ledger = Ledger(folder, ledger_fingerprint(run))
    root = ledger_root(store)
    imported, recorded = run.ledger.sync(store, root, lambda row: ledger_files(root, row))
    if imported or recorded:
        print(f"[suite] ledger {folder}: {imported} finished units taken from it, {recorded} written to it",
              flush=True)
    return imported, recorded


def run_suite(run: SuiteRun, *, retry_failed: bool = False, ledger: str | Path | None = None,
              jobs: int = 1) -> Path:
    """Run (or continue) the whole suite at its scale, then write the report; returns the report folder.

    ``jobs > 1`` runs that many units at once, each with an equal share of the threads: this process walks the
    protocol as with one job (and runs units itself) while ``jobs - 1`` helper processes take the units it has
    added and not yet started — every row's search points are added up front, the grid extensions and seeds as the
    protocol reaches them. On a 2-core CPU two 1-thread units train 1.25-1.41x the steps per second of one
    2-thread unit (LoRA on SmolLM2, 8 x 128 tokens, measured 2026-12-08)."""
    import torch

    from tunelab.study.report import write_report

    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    for row in run.rows():
        problems = grid_problems(row.lrs)
        if problems:
            print(f"[suite] note: row '{row.label}' grid has {' and '.join(problems)}", flush=True)
    run.out.mkdir(parents=True, exist_ok=True)
    info = prepare_data(run)
    print(f"[suite] data: {info['train']} training and {info['dev']} dev records in {run.out / 'data'}", flush=True)
    store = Store(run.out / "study.sqlite")
    check_same_units(run, store)
    store.set_info("suite", {"source": run.source, "scale": run.scale_name, "name": run.cfg.name})
    store.set_info("units", unit_settings(run))
    if ledger is not None:
        attach_ledger(run, store, ledger)
    if retry_failed:
        store.reset_failed()
    helpers: list[subprocess.Popen[bytes]] = []
    saved = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")  # restored at the end
    if jobs > 1:
        threads = threads_per_job(jobs)
        store.add_runs([(f"search/{unit_label(row.label, lr, run.scale.seeds[0])}",
                         _unit(run, row, lr, run.scale.seeds[0], []),
                         {"phase": "search", "row": row.label, "lr": lr, "seed": run.scale.seeds[0]})
                        for row in run.rows() for lr in row.lrs])
        helpers = start_helpers(run, jobs, ledger)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the base unit's evaluation subprocess
        print(f"[suite] {jobs} jobs of {threads} thread(s) each: this process and helpers "
              f"{[h.pid for h in helpers]}", flush=True)
    try:
        run_base(run, store)
        for row in run.rows():
            run_row_units(run, store, row)
            write_report(run, store)  # after every row: a stopped suite still has an up-to-date table
    finally:
        for h in helpers:  # every unit the protocol added is finished: the helpers are idle (or the driver failed)
            h.terminate()
        for h in helpers:
            h.wait()
        torch.set_num_threads(saved[0])
        if saved[1] is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved[1]
    return write_report(run, store)


def seen_keys(run: SuiteRun) -> frozenset[str]:
    """Question keys of the suite's training and dev records (what the test sets are decontaminated against)."""
    from tunelab.data.contamination import keys

    folder = run.out / "data"
    return keys([r for name in ("train.jsonl", "dev.jsonl") for r in load_source(folder / name)[0]])
