"""The sweep spec of a scaling study (YAML) and its expansion into runs.

    name: toy
    output_dir: runs/lab-toy             # study.sqlite, runs/KEY/, report/
    task:                                # the fine-tuning task of every run
      train: world/tasks/translate-train.jsonl   # D_f = the first D_f records (nested subsets)
      test: world/tasks/translate-test.jsonl
      template: "<aa> {instruction} <bb>"
      test_examples: 300
    models:
      sizes:                             # the model-size axis: one entry per size (its final checkpoint)
        - {label: xs, model: models/xs/ckpt-1}
      pretraining:                       # the pretraining-data axis: checkpoints of one size
        - {label: l@0.25, model: models/l/ckpt-0.25}
    methods:                             # learning rates found once per method, as the paper did
      - {label: full, method: {name: full}, train: {lr: 1.0e-3}}
      - label: lora
        method: {name: lora, r: 4, alpha: 8}
        train: {lr: 3.0e-3}
        pet: {key: r, sizes: [1, 4, 16]}  # the PET-size axis (LoRA rank / prompt length)
    pet_model: l                         # the size the PET-size axis runs on
    d_f: [25, 50, 100, 200, 400, 800]
    seeds: [0]
    budget: {epochs: 5, min_steps: 30, max_steps: 250, batch_size: 16}

Every run is a point of one or more axes ("model", "pretrain", "pet"); a run shared by several axes (e.g. the
largest pretraining checkpoint of the pretraining model) is one run, keyed by the hash of its config.
Model size X is the non-embedding parameter count; pretraining tokens come from the checkpoint's pretrain.json
(written by ``tunelab pretrain``) or the entry's ``tokens``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import config_from_dict
from tunelab.errors import ConfigError
from tunelab.schema import Lines, build, read_yaml

AXES = ("model", "pretrain", "pet")


@dataclass
class TaskSpec:
    train: str
    test: str
    template: str = "plain"
    max_length: int = 256
    test_examples: int = 300
    train_on_prompt: bool = False
    format: str = "as-is"  # row format of train/test (tunelab.data.formats: as-is, mc-text, mawps)


@dataclass
class ModelEntry:
    label: str
    model: str  # model spec: folder, alias, tiny model, GGUF
    params: int | None = None  # non-embedding parameters (computed from the model when absent)
    tokens: int | None = None  # pretraining tokens (read from MODEL/pretrain.json when absent)


@dataclass
class ModelsSpec:
    sizes: list[ModelEntry] = field(default_factory=list)
    pretraining: list[ModelEntry] = field(default_factory=list)
    dtype: str = "fp32"


@dataclass
class PetSpec:
    key: str  # the method option that is the PET size (r, num_tokens)
    sizes: list[int] = field(default_factory=list)


@dataclass
class MethodSpec:
    label: str
    method: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    pet: PetSpec | None = None


@dataclass
class BudgetSpec:
    """Steps of a run: ceil(epochs · D_f / batch_size), clamped to [min_steps, max_steps]."""

    epochs: float = 5.0
    min_steps: int = 20
    max_steps: int = 300
    batch_size: int = 16

    def steps(self, d_f: int) -> int:
        return int(min(self.max_steps, max(self.min_steps, math.ceil(self.epochs * d_f / self.batch_size))))


@dataclass
class EvalSpec:
    generation: int = 0  # test examples scored by greedy exact match (0 = test NLL only)
    max_new_tokens: int = 48


@dataclass
class FitSpec:
    bootstrap: int = 200
    delta: float = 1e-3  # Huber δ on log-space residuals, summed over points
    heldout: bool = True  # hold out the largest size, the largest D_f and an interior pretraining point
    seed: int = 0


@dataclass
class SweepSpec:
    name: str
    output_dir: str
    task: TaskSpec
    models: ModelsSpec
    methods: list[MethodSpec]
    d_f: list[int]
    seeds: list[int] = field(default_factory=lambda: [0])
    pet_model: str | None = None
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    train: dict[str, Any] = field(default_factory=dict)  # shared training settings (warmup_ratio, schedule, ...)
    eval: EvalSpec = field(default_factory=EvalSpec)
    fit: FitSpec = field(default_factory=FitSpec)

    @property
    def store_path(self) -> Path:
        return Path(self.output_dir) / "study.sqlite"


@dataclass
class Run:
    """One point of the grid: its self-contained config (what is hashed) and its coordinates."""

    config: dict[str, Any]
    factors: dict[str, Any]

    @property
    def key(self) -> str:
        return run_key(self.config)


def run_key(config: dict[str, Any]) -> str:
    """Hash of the canonical JSON of a run config (the identity of a run in the store)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Loading and checking
# --------------------------------------------------------------------------------------------------------------


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; errors name file:line and what would work."""
    data, lines = read_yaml(path)
    spec = build(SweepSpec, data, "", lines)
    _check(spec, lines)
    _resolve_relative(spec, Path(path).parent, data)
    return spec


def spec_from_dict(data: dict[str, Any]) -> SweepSpec:
    spec = build(SweepSpec, data, "")
    _check(spec, Lines())
    return spec


def _check(spec: SweepSpec, lines: Lines) -> None:
    if not spec.models.sizes and not spec.models.pretraining:
        raise ConfigError(f"{lines.where('models')}'models' needs 'sizes' and/or 'pretraining' entries")
    labels = [m.label for m in spec.models.sizes + spec.models.pretraining]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{lines.where('models')}model labels must be unique, got {labels}")
    if not spec.d_f or any(d < 1 for d in spec.d_f):
        raise ConfigError(f"{lines.where('d_f')}'d_f' needs positive fine-tuning data sizes, got {spec.d_f}")
    if [m.label for m in spec.methods] != list(dict.fromkeys(m.label for m in spec.methods)):
        raise ConfigError(f"{lines.where('methods')}method labels must be unique")
    if any(m.pet for m in spec.methods) and spec.pet_model not in labels:
        raise ConfigError(f"{lines.where('pet_model')}'pet_model' must name one of the models ({', '.join(labels)}) "
                          f"when a method has a 'pet' axis, got {spec.pet_model!r}")
    for m in spec.methods:
        _check_method(spec, m, lines)


def _check_method(spec: SweepSpec, m: MethodSpec, lines: Lines) -> None:
    where = lines.where("methods")
    if m.pet is not None and m.pet.key not in {k for k in _method_options(m)}:
        raise ConfigError(f"{where}method '{m.label}': pet.key '{m.pet.key}' is not an option of method "
                          f"'{m.method.get('name')}' (options: {', '.join(_method_options(m))})")
    try:
        config_from_dict(_run_config_dict(spec, m, spec.models.sizes[0] if spec.models.sizes else
                                          spec.models.pretraining[0], spec.d_f[0], spec.seeds[0], None))
    except ConfigError as e:
        raise ConfigError(f"{where}method '{m.label}': {e}") from None


def _method_options(m: MethodSpec) -> list[str]:
    from tunelab.methods import method_options

    return [name for name, _, _ in method_options(str(m.method.get("name", "")))]


def _resolve_relative(spec: SweepSpec, base: Path, data: dict[str, Any]) -> None:
    """Paths in a spec file are relative to the file when they exist there (else to the working directory)."""
    def fix(p: str) -> str:
        q = base / p
        return str(q) if not Path(p).is_absolute() and not Path(p).exists() and q.exists() else p

    spec.task.train, spec.task.test = fix(spec.task.train), fix(spec.task.test)
    for m in spec.models.sizes + spec.models.pretraining:
        m.model = fix(m.model)


# --------------------------------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------------------------------


def _run_config_dict(spec: SweepSpec, m: MethodSpec, entry: ModelEntry, d_f: int, seed: int,
                     pet_size: int | None) -> dict[str, Any]:
    """The tunelab run config (model/method/data/train) of one grid point, output_dir filled in by the runner."""
    method = copy.deepcopy(m.method)
    if pet_size is not None and m.pet is not None:
        method[m.pet.key] = pet_size
    t = spec.task
    train = {"batch_size": spec.budget.batch_size, "max_steps": spec.budget.steps(d_f), "seed": seed,
             "progress": False, **spec.train, **m.train}
    data = {"train": t.train, "eval": t.test, "limit": d_f, "eval_max_examples": t.test_examples,
            "template": t.template, "max_length": t.max_length, "train_on_prompt": t.train_on_prompt}
    if t.format != "as-is":  # studies without a row format keep the run keys they always had
        data["format"] = t.format
    return {"model": {"name": entry.model, "dtype": spec.models.dtype}, "method": method, "data": data,
            "train": train}


def _pet_default(m: MethodSpec) -> int | None:
    if m.pet is None:
        return None
    value = m.method.get(m.pet.key)
    if value is None:
        from tunelab.methods import method_options

        value = {n: d for n, _, d in method_options(str(m.method["name"]))}[m.pet.key]
    return int(value)


def expand(spec: SweepSpec) -> list[Run]:
    """Every run of the study, deduplicated by config (a run on several axes keeps all of them)."""
    runs: dict[str, Run] = {}
    for axis, entry, m, pet_size in _axis_points(spec):
        for d_f in spec.d_f:
            for seed in spec.seeds:
                config = _run_config_dict(spec, m, entry, d_f, seed, pet_size)
                config["eval"] = {"generation": spec.eval.generation, "max_new_tokens": spec.eval.max_new_tokens}
                key = run_key(config)
                factors = _factors(spec, entry, m, pet_size, d_f, seed)
                if key not in runs:
                    runs[key] = Run(config, factors)
                for name, value in factors.items():  # a shared run: the pretraining entry knows its tokens
                    if runs[key].factors.get(name) is None:
                        runs[key].factors[name] = value
                if axis == "pretrain" and runs[key].factors["tokens"] is None:
                    raise ConfigError(f"models.pretraining '{entry.label}': pretraining tokens unknown: {entry.model} "
                                      f"has no pretrain.json (written by `tunelab pretrain` / `tunelab lab toy`); "
                                      f"pretrain it first or give 'tokens:' in the entry")
                runs[key].factors["axes"] = sorted(set(runs[key].factors["axes"]) | {axis})
    return list(runs.values())


def _axis_points(spec: SweepSpec) -> list[tuple[str, ModelEntry, MethodSpec, int | None]]:
    points = []
    for m in spec.methods:
        default = _pet_default(m)
        points += [("model", e, m, default) for e in spec.models.sizes]
        points += [("pretrain", e, m, default) for e in spec.models.pretraining]
        if m.pet is not None:
            entry = _entry(spec, spec.pet_model or "")
            points += [("pet", entry, m, size) for size in m.pet.sizes]
    return points


def _entry(spec: SweepSpec, label: str) -> ModelEntry:
    return next(e for e in spec.models.sizes + spec.models.pretraining if e.label == label)


def _factors(spec: SweepSpec, entry: ModelEntry, m: MethodSpec, pet_size: int | None, d_f: int,
             seed: int) -> dict[str, Any]:
    return {"axes": [], "model": entry.label, "method": m.label, "method_name": m.method.get("name"),
            "pet_size": pet_size, "d_f": d_f, "seed": seed, "params": entry.params or model_params(entry.model),
            "tokens": entry.tokens if entry.tokens is not None else pretrain_tokens(entry.model)}


@functools.lru_cache(maxsize=256)
def model_params(model: str) -> int | None:
    """Non-embedding parameters of a model folder (None for other specs: the run measures them)."""
    from tunelab.scaling.pretrain import non_embedding_params

    return non_embedding_params(model) if (Path(model) / "config.json").is_file() else None


def pretrain_tokens(model: str) -> int | None:
    from tunelab.scaling.pretrain import read_pretrain_info

    info = read_pretrain_info(model) if Path(model).is_dir() else None
    return int(info["tokens"]) if info else None
