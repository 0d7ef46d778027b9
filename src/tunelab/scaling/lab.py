"""`tunelab lab toy`: the whole toy replication with one command.

1. write the toy world (corpus, tasks, tokenizer);  2. pretrain the tiny Llama family (worker processes, largest
first), exporting checkpoints at fractions of the budget;  3. check that pretraining loss falls with model size;
4. write the sweep spec (``OUT/spec.yaml``) and run the grid — full tuning, prompt tuning and LoRA over D_f, on the
model-size, pretraining-data and PET-size axes;  5. fit both laws with the bootstrap and write ``OUT/report/``.
Every step skips what is already done, so the command resumes after an interruption.

Scales: ``full`` is sized for ≤ 60 minutes on a 2-core CPU; ``mini`` (≈ 1–2 minutes) checks the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import ConfigError
from tunelab.files import atomic_write_json, atomic_write_text
from tunelab.scaling.pretrain import PretrainConfig, get_size, pretrain, read_pretrain_info
from tunelab.scaling.toyworld import WorldConfig, write_world

METHODS: list[dict[str, Any]] = [  # learning rates chosen once per method (see docs/scaling.md)
    {"label": "full", "method": {"name": "full"}, "train": {"lr": 1.0e-3}},  # 3e-4 / 1e-3 / 3e-3 probed
    {"label": "prompt", "method": {"name": "prompt", "num_tokens": 8, "init": "vocab", "vocab_top": 400},
     "train": {"lr": 3.0e-2}, "pet": {"key": "num_tokens", "sizes": [2, 8, 32]}},  # 1e-2 / 3e-2 / 1e-1
    {"label": "lora", "method": {"name": "lora", "r": 4, "alpha": 8.0}, "train": {"lr": 1.0e-2},
     "pet": {"key": "r", "sizes": [1, 4, 16]}},  # 2e-3 / 5e-3 / 1.5e-2 probed
]


@dataclass
class ToyLab:
    """Sizes of a toy study (see SCALES)."""

    sizes: list[str]
    documents: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_model: str  # its checkpoints are the pretraining-data axis
    pet_model: str
    checkpoints: list[float]
    d_f: list[int]
    budget: dict[str, Any]
    task_train: int = 2000
    test_examples: int = 300
    seeds: list[int] = field(default_factory=lambda: [0])
    bootstrap: int = 200
    max_length: int = 128
    pretrain_lr: float | dict[str, float] = 3e-3  # one rate, or one per size (smaller models take higher rates)
    task: str = "translate"
    methods: list[dict[str, Any]] = field(default_factory=lambda: [dict(m) for m in METHODS])
    world: WorldConfig = field(default_factory=WorldConfig)

    def lr_for(self, size: str) -> float:
        """The pretraining learning rate of one size."""
        if isinstance(self.pretrain_lr, dict):
            if size not in self.pretrain_lr:
                raise ConfigError(f"toy lab: no pretraining learning rate for size '{size}' (have "
                                  f"{', '.join(self.pretrain_lr)})")
            return self.pretrain_lr[size]
        return self.pretrain_lr


SCALES: dict[str, ToyLab] = {
    # A world with enough to memorise (a larger lexicon, 30% parallel text: translation pairs need MLP capacity) that
    # pretraining loss keeps falling with size; per-size learning rates (smaller models take higher ones; probed,
    # see docs/scaling.md).
    #
    # The paper's preconditions (see ``preconditions``): four sizes over 16.5× (xl would need 19M tokens for 20 per
    # parameter), every size pretrained on 9.0M tokens (4,400 steps of 16 × 128: 20 tokens per parameter for l, 336
    # for xs) from a corpus of 60,000 documents (3.3M tokens, ~2.7 passes), D_f over 2.5 decades in 6 points, 2 seeds.
    "full": ToyLab(sizes=["xs", "s", "m", "l"], documents=60000, pretrain_steps=4400, pretrain_batch=16,
                   pretrain_model="l", pet_model="l", checkpoints=[0.125, 0.25, 0.5, 1.0],
                   d_f=[10, 30, 100, 300, 1000, 3200], seeds=[0, 1], task_train=3200,
                   budget={"epochs": 5, "min_steps": 30, "max_steps": 1000, "batch_size": 16},
                   pretrain_lr={"xs": 2e-2, "s": 1.5e-2, "m": 1e-2, "l": 7e-3},
                   world=WorldConfig(nouns=120, verbs=40, adjectives=20, parallel_share=0.3)),
    "mini": ToyLab(sizes=["xs", "s", "m"], documents=600, pretrain_steps=24, pretrain_batch=8, pretrain_model="s",
                   pet_model="s", checkpoints=[0.5, 1.0], d_f=[16, 32, 64], test_examples=48, bootstrap=10,
                   budget={"epochs": 2, "min_steps": 4, "max_steps": 8, "batch_size": 8}, task_train=128,
                   methods=[{**m, "pet": {**m["pet"], "sizes": m["pet"]["sizes"][:2]}} if "pet" in m else m
                            for m in METHODS]),
}


def get_scale(name: str) -> ToyLab:
    from tunelab.errors import suggest

    if name not in SCALES:
        raise ConfigError(f"unknown toy scale '{name}'.{suggest(name, SCALES)} Scales: {', '.join(SCALES)}")
    return dataclasses.replace(SCALES[name])


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------


def pretrain_family(lab: ToyLab, world_dir: Path, models_dir: Path, workers: int, threads: int,
                    log: Any = print) -> dict[str, dict[str, Any]]:
    """Pretrain every size not yet pretrained (largest first, ``workers`` at a time); pretrain.json per size."""
    todo = []
    for label in sorted(lab.sizes, key=lambda s: -get_size(s).non_embedding_params()):
        cfg = PretrainConfig(corpus=str(world_dir / "corpus.jsonl"), tokenizer=str(world_dir / "tokenizer"),
                             size=label, out=str(models_dir), steps=lab.pretrain_steps, batch_size=lab.pretrain_batch,
                             max_length=lab.max_length, lr=lab.lr_for(label), checkpoints=list(lab.checkpoints),
                             threads=threads)
        if not _pretrained(cfg):
            todo.append(cfg)
    if todo:
        log(f"pretraining {', '.join(c.size for c in todo)} ({lab.pretrain_steps} steps each, {workers} at a time)")
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for result in pool.map(_pretrain_one, todo):
                log(f"  {result['size']}: N = {result['params']:,}  eval loss {result['eval_loss']:.4f}  "
                    f"({result['seconds']:.0f} s)")
    return {s: read_pretrain_info(models_dir / s / "ckpt-1") or {} for s in lab.sizes}


def _pretrain_one(cfg: PretrainConfig) -> dict[str, Any]:
    import torch

    torch.set_num_threads(cfg.threads or 1)
    t0 = time.perf_counter()
    result = pretrain(cfg)
    stamp = Path(cfg.out) / cfg.size / "pretrain-config.json"
    stamp.write_text(json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    return {"size": cfg.size, "params": result.non_embedding_params, "eval_loss": result.eval_loss or float("nan"),
            "seconds": time.perf_counter() - t0}


def _pretrained(cfg: PretrainConfig) -> bool:
    root = Path(cfg.out) / cfg.size
    stamp = root / "pretrain-config.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != json.loads(json.dumps(dataclasses.asdict(cfg))):
        return False
    return all((root / f"ckpt-{f:g}" / "pretrain.json").is_file() for f in cfg.checkpoints)


def check_pretraining(infos: dict[str, dict[str, Any]]) -> list[str]:
    """Problems with the family: final held-out pretraining loss must fall as model size grows."""
    ordered = sorted(infos.items(), key=lambda kv: kv[1].get("non_embedding_params", 0))
    losses = [(s, i.get("eval_loss")) for s, i in ordered]
    problems = []
    for (s1, l1), (s2, l2) in zip(losses[:-1], losses[1:], strict=True):
        if l1 is None or l2 is None or not l2 < l1:
            problems.append(f"pretraining loss does not fall from {s1} ({l1}) to {s2} ({l2})")
    return problems


# The conditions under which the paper's laws were found (Zhang et al. 2024 fine-tune models pretrained on trillions
# of tokens): each is measured and reported before any verdict of a toy study.
MIN_TOKENS_PER_PARAM = 20  # well past the compute-optimal point (Chinchilla: ~20 tokens per parameter)
MAX_LAST_HALF_DROP = 0.02  # "flattened": held-out pretraining loss falls by < 2% over the last half of pretraining
MIN_SIZES, MIN_SIZE_SPAN = 4, 10.0
MIN_CHECKPOINTS = 4
MIN_DF_POINTS, MIN_DF_DECADES = 6, 2.5
MIN_SEEDS = 2


def preconditions(lab: ToyLab, models_dir: Path) -> list[dict[str, Any]]:
    """Each precondition of the paper's setting as measured on this study: ``{"condition", "measured", "ok"}``
    (``ok`` is None when it could not be measured)."""
    import math

    infos = {s: {f: read_pretrain_info(models_dir / s / f"ckpt-{f:g}") or {} for f in lab.checkpoints}
             for s in lab.sizes}
    last, half = max(lab.checkpoints), min(lab.checkpoints, key=lambda f: abs(f - max(lab.checkpoints) / 2))
    out = []
    ratios = {s: i[last].get("tokens", 0) / i[last]["non_embedding_params"] for s, i in infos.items()
              if i[last].get("non_embedding_params")}
    worst = min(ratios, key=ratios.get) if ratios else None
    out.append({"condition": f"≥ {MIN_TOKENS_PER_PARAM} pretraining tokens per non-embedding parameter, every size",
                "measured": ", ".join(f"{s} {r:.0f}" for s, r in ratios.items()) or "not measured",
                "ok": None if worst is None else ratios[worst] >= MIN_TOKENS_PER_PARAM})
    drops = {}
    for s, i in infos.items():
        a, b = i[half].get("eval_loss"), i[last].get("eval_loss")
        if a and b and half != last:
            drops[s] = (a - b) / a
    out.append({"condition": f"pretraining has flattened: held-out loss falls < {MAX_LAST_HALF_DROP:.0%} from "
                             f"checkpoint {half:g} to {last:g}, every size",
                "measured": ", ".join(f"{s} {d:.1%}" for s, d in drops.items()) or "not measured (no held-out loss "
                                                                                  "at the middle checkpoint)",
                "ok": None if len(drops) < len(infos) else max(drops.values()) < MAX_LAST_HALF_DROP})
    params = sorted(i[last]["non_embedding_params"] for i in infos.values() if i[last].get("non_embedding_params"))
    span = params[-1] / params[0] if params else 0.0
    out.append({"condition": f"≥ {MIN_SIZES} model sizes spanning ≥ {MIN_SIZE_SPAN:g}× in parameters",
                "measured": f"{len(lab.sizes)} sizes, {span:.1f}×",
                "ok": len(lab.sizes) >= MIN_SIZES and span >= MIN_SIZE_SPAN})
    out.append({"condition": f"≥ {MIN_CHECKPOINTS} pretraining checkpoints (the pretraining-data axis)",
                "measured": f"{len(lab.checkpoints)}", "ok": len(lab.checkpoints) >= MIN_CHECKPOINTS})
    decades = math.log10(max(lab.d_f) / min(lab.d_f))
    out.append({"condition": f"D_f over ≥ {MIN_DF_DECADES:g} orders of magnitude with ≥ {MIN_DF_POINTS} points",
                "measured": f"{len(lab.d_f)} points over {decades:.2f} decades ({min(lab.d_f)}–{max(lab.d_f)})",
                "ok": len(lab.d_f) >= MIN_DF_POINTS and decades >= MIN_DF_DECADES - 1e-9})
    out.append({"condition": f"≥ {MIN_SEEDS} seeds", "measured": f"{len(lab.seeds)}",
                "ok": len(lab.seeds) >= MIN_SEEDS})
    return out


def preconditions_markdown(rows: list[dict[str, Any]]) -> list[str]:
    mark = {True: "met", False: "**not met**", None: "not measured"}
    lines = ["## Preconditions of the paper's setting (measured, before any verdict)", "",
             "| condition | measured | |", "|---|---|---|"]
    lines += [f"| {r['condition']} | {r['measured']} | {mark[r['ok']]} |" for r in rows]
    failed = [r for r in rows if r["ok"] is False]
    lines += ["", ("Every precondition holds: the verdicts below test the paper's claims in its setting." if not failed
                   else f"{len(failed)} precondition(s) not met: a verdict below that differs from the paper may be "
                        "the toy setting, not the claim.")]
    return lines


def _insert_preconditions(report: Path, rows: list[dict[str, Any]]) -> None:
    text = report.read_text(encoding="utf-8")
    anchor = "## The paper's findings at this scale"
    block = "\n".join(preconditions_markdown(rows)) + "\n\n"
    text = text.replace(anchor, block + anchor, 1) if anchor in text else text + "\n" + block
    atomic_write_text(report, text)
    atomic_write_json(report.parent / "preconditions.json", rows)


def toy_spec(lab: ToyLab, out: Path, world_dir: Path, models_dir: Path, templates: dict[str, str]) -> dict[str, Any]:
    """The sweep spec of the toy study, pointing at the pretrained checkpoints (``templates``: world.json's)."""
    last = f"ckpt-{max(lab.checkpoints):g}"
    return {
        "name": f"toy-{lab.task}", "output_dir": str(out),
        "task": {"train": str(world_dir / "tasks" / f"{lab.task}-train.jsonl"),
                 "test": str(world_dir / "tasks" / f"{lab.task}-test.jsonl"),
                 "template": templates[lab.task], "max_length": 256,
                 "test_examples": lab.test_examples},
        "models": {"sizes": [{"label": s, "model": str(models_dir / s / last)} for s in lab.sizes],
                   "pretraining": [{"label": f"{lab.pretrain_model}@{f:g}",
                                    "model": str(models_dir / lab.pretrain_model / f"ckpt-{f:g}")}
                                   for f in sorted(lab.checkpoints)]},  # the last one is also on the model axis
        "methods": lab.methods, "pet_model": lab.pet_model, "d_f": lab.d_f, "seeds": lab.seeds,
        "budget": lab.budget, "train": {"warmup_ratio": 0.1, "schedule": "cosine"},
        "fit": {"bootstrap": lab.bootstrap},
    }


def write_spec(lab: ToyLab, out: Path, world_dir: Path, models_dir: Path) -> Path:
    """Write OUT/spec.yaml (see ``toy_spec``)."""
    templates = json.loads((world_dir / "world.json").read_text())["templates"]
    path = out / "spec.yaml"
    path.write_text(SPEC_HEADER + yaml.safe_dump(toy_spec(lab, out, world_dir, models_dir, templates), sort_keys=False))
    return path


SPEC_HEADER = """# The toy scaling study (written by `tunelab lab toy`; configs/scaling-toy.yaml is the full-scale copy).
# After `tunelab lab toy --out runs/lab-toy` has pretrained the family, `tunelab sweep` reruns/extends the grid.
"""


def run_toy(out: str | Path, *, scale: str = "full", workers: int = 2, check: bool = True,
            log: Any = print) -> Path:
    """The whole toy study (see the module docstring); returns the report path."""
    from tunelab.scaling.report import write_report
    from tunelab.scaling.runner import sweep, threads_per_worker
    from tunelab.scaling.spec import load_spec
    from tunelab.scaling.store import Store

    t0 = time.perf_counter()
    lab, out = get_scale(scale), Path(out)
    world_dir, models_dir = out / "world", out / "models"
    if not (world_dir / "world.json").is_file():
        write_world(lab.world, world_dir, documents=lab.documents, task_train=lab.task_train,
                    task_test=lab.test_examples)
    else:
        _check_world(lab, world_dir)
    infos = pretrain_family(lab, world_dir, models_dir, workers, threads_per_worker(workers), log)
    problems = check_pretraining(infos)
    if problems and check:
        raise ConfigError("; ".join(problems) + ". Pretrain longer (more steps) or with another learning rate "
                          "before running the grid, or pass --no-check to run it anyway")
    spec = load_spec(write_spec(lab, out, world_dir, models_dir))
    log(f"pretraining done ({time.perf_counter() - t0:.0f} s); sweep of {spec.store_path}")
    result = sweep(spec, workers=workers)
    log(f"sweep: {result.counts} ({result.seconds:.0f} s)")
    report = write_report(Store(spec.store_path), out / "report", bootstrap_replicates=spec.fit.bootstrap,
                          delta=spec.fit.delta, heldout=spec.fit.heldout)
    _insert_preconditions(report, preconditions(lab, models_dir))
    _append_wall_time(report, time.perf_counter() - t0, infos, problems)
    return report


def _check_world(lab: ToyLab, world_dir: Path) -> None:
    """An existing world folder must be the one this scale would write (else its models and runs are another
    study's)."""
    meta = json.loads((world_dir / "world.json").read_text())
    want = json.loads(json.dumps(dataclasses.asdict(lab.world)))
    if meta.get("config") != want or meta.get("documents") != lab.documents:
        raise ConfigError(f"{world_dir / 'world.json'}: this folder holds another toy world (config "
                          f"{meta.get('config')}, {meta.get('documents')} documents) than this scale's "
                          f"({want}, {lab.documents} documents); use a new --out folder")


def _append_wall_time(report: Path, seconds: float, infos: dict[str, dict[str, Any]], problems: list[str]) -> None:
    lines = ["", "## Pretraining", "", "| size | N | tokens | eval loss |", "|---|---:|---:|---:|"]
    for s, i in sorted(infos.items(), key=lambda kv: kv[1].get("non_embedding_params", 0)):
        lines.append(f"| {s} | {i.get('non_embedding_params', 0):,} | {i.get('tokens', 0):,} | "
                     f"{i.get('eval_loss') or float('nan'):.4f} |")
    lines += ["", *(f"- warning: {p}" for p in problems), f"Whole study wall time: {seconds / 60:.1f} min.", ""]
    with open(report, "a", encoding="utf-8") as f:
        f.write("\n".join(lines))
