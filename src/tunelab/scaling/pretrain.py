"""Pretraining a family of tiny Llama models from random initialisation, with the one training loop.

``pretrain(cfg)`` builds a randomly initialised Llama of a given size over a local tokenizer, saves it as a Hugging
Face folder (``SIZE/init``), trains every weight with ``tunelab.train.loop`` (method ``full``, loss on all tokens:
the prompt is just BOS, the document is the response, ``train_on_prompt``; documents packed into rows), and exports
the checkpoints taken at fractions of the budget as loadable folders ``SIZE/ckpt-F`` with a ``pretrain.json``
(tokens seen, step, non-embedding parameters, losses) — the pretraining-data axis of the scaling study.

Model size N is counted as in Kaplan et al. (2020) and Zhang et al. (2024): parameters without the token embeddings
(and without the tied output projection).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tunelab.config import ConfigError, DataSection, ModelSection, RunConfig, TrainSection
from tunelab.files import read_jsonl

PRETRAIN_FILE = "pretrain.json"


@dataclass(frozen=True)
class ModelSize:
    """One member of the tiny Llama family (SwiGLU MLP, full multi-head attention, tied embeddings)."""

    label: str
    hidden: int
    layers: int
    heads: int
    intermediate: int

    def non_embedding_params(self) -> int:
        """N = L·(4·h² + 3·h·i + 2·h) + h: attention q/k/v/o, the SwiGLU MLP and the RMSNorms."""
        h, i = self.hidden, self.intermediate
        return self.layers * (4 * h * h + 3 * h * i + 2 * h) + h


# ~27K to ~0.94M non-embedding parameters, roughly ×2–3 apart. m is 3 layers of width 64 with 2 heads of 32: the
# 4-layer, 4-head shape of the same width sat on a plateau (held-out loss ≈ 2.06) for half of pretraining and ended
# above s at every rate and seed probed (1.617–1.652; docs/scaling.md, "Toward the paper's preconditions").
FAMILY: dict[str, ModelSize] = {s.label: s for s in (
    ModelSize("xs", 32, 2, 2, 96),
    ModelSize("s", 48, 3, 3, 128),
    ModelSize("m", 64, 3, 2, 192),
    ModelSize("l", 96, 4, 4, 256),
    ModelSize("xl", 128, 5, 4, 320),
)}


def get_size(label: str) -> ModelSize:
    from tunelab.errors import suggest

    if label not in FAMILY:
        raise ConfigError(f"unknown model size '{label}'.{suggest(label, FAMILY)} Sizes: {', '.join(FAMILY)}")
    return FAMILY[label]


def build_model(size: ModelSize, tokenizer: Any, seed: int = 0, max_positions: int = 1024) -> Any:
    """A randomly initialised LlamaForCausalLM of ``size`` over ``tokenizer``'s vocabulary (global RNG untouched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def non_embedding_params(model_dir: str | Path) -> int:
    """Non-embedding parameters of a saved causal LM, counted on the meta device (no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                  for p in m.parameters()}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in embeddings:
            seen.add(id(p))
            total += p.numel()
    return total


@dataclass
class PretrainConfig:
    """One model's pretraining run."""

    corpus: str  # JSONL of {instruction: "", output: document}
    tokenizer: str  # folder with the tokenizer (tokenizer.json)
    size: str  # a label of FAMILY
    out: str  # the model family folder: SIZE/init, SIZE/run, SIZE/ckpt-F
    steps: int = 300
    batch_size: int = 16
    max_length: int = 128  # packed row length (tokens)
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    checkpoints: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    seed: int = 0
    threads: int | None = None
    eval_fraction: float = 0.01
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.checkpoints or any(not 0.0 < f <= 1.0 for f in self.checkpoints):
            raise ConfigError(f"pretrain: checkpoints are fractions in (0, 1], got {self.checkpoints}")
        if self.steps < 1:
            raise ConfigError(f"pretrain: steps must be at least 1, got {self.steps}")


def checkpoint_steps(steps: int, fractions: list[float]) -> dict[float, int]:
    """Fraction -> optimizer step (at least 1) at which its checkpoint is taken."""
    return {f: max(1, round(f * steps)) for f in sorted(set(fractions))}


def run_config(cfg: PretrainConfig, init_dir: Path, run_dir: Path) -> RunConfig:
    """The training-loop config of a pretraining run: full tuning, packed rows, loss on every token."""
    at = checkpoint_steps(cfg.steps, cfg.checkpoints)
    every = math.gcd(*at.values())
    data = DataSection(train=cfg.corpus, eval_fraction=cfg.eval_fraction, eval_max_examples=256,
                       template="{instruction}", max_length=cfg.max_length, train_on_prompt=True, packing=True)
    train = TrainSection(lr=cfg.lr, max_steps=cfg.steps, batch_size=cfg.batch_size, warmup_ratio=cfg.warmup_ratio,
                         schedule="cosine", min_lr_ratio=0.1, weight_decay=cfg.weight_decay, seed=cfg.seed,
                         autocast="off", save_every=every, eval_every=every, keep_checkpoints=cfg.steps // every + 1,
                         threads=cfg.threads, progress=cfg.progress)
    return RunConfig(model=ModelSection(name=str(init_dir), dtype="fp32"), method={"name": "full", "targets": "all"},
                     data=data, train=train, output_dir=str(run_dir))


@dataclass
class PretrainResult:
    size: str
    non_embedding_params: int
    checkpoints: dict[float, Path]
    eval_loss: float | None
    seconds: float


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Pretrain one size of the family; see the module docstring for what is written where."""
    from transformers import AutoTokenizer

    from tunelab.train.loop import train

    size = get_size(cfg.size)
    root = Path(cfg.out) / size.label
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)
    init_dir = root / "init"
    if init_dir.exists():
        shutil.rmtree(init_dir)
    build_model(size, tokenizer, seed=cfg.seed, max_positions=max(cfg.max_length, 512)).save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    run_dir = root / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    result = train(run_config(cfg, init_dir, run_dir))
    exported = export_checkpoints(cfg, init_dir, run_dir, root, result.eval_loss)
    return PretrainResult(size.label, size.non_embedding_params(), exported, result.eval_loss, result.seconds)


def _tokens_by_step(run_dir: Path) -> dict[int, int]:
    """Cumulative tokens seen after each step, from the run's metrics.jsonl."""
    total, out = 0, {}
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        if "tokens" in row:
            total += int(row["tokens"])
            out[int(row["step"])] = total
    return out


def _losses_by_step(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """``key`` (the train loss, or ``eval_loss``: held-out loss at every checkpoint) per step of metrics.jsonl."""
    return {int(r["step"]): float(r[key]) for r in read_jsonl(run_dir / "metrics.jsonl") if r.get(key) is not None}


def export_checkpoints(cfg: PretrainConfig, init_dir: Path, run_dir: Path, root: Path,
                       final_eval: float | None) -> dict[float, Path]:
    """Turn the run's checkpoints at the requested fractions into model folders ``ckpt-F`` (+ pretrain.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.train.checkpoint import list_checkpoints

    stored = {int(p.name.split("-")[1]): p / "trainable.safetensors" for p in list_checkpoints(run_dir / "checkpoints")}
    stored[cfg.steps] = run_dir / "adapter.safetensors"
    tokens, losses, evals = _tokens_by_step(run_dir), _losses_by_step(run_dir), _losses_by_step(run_dir, "eval_loss")
    tokenizer = AutoTokenizer.from_pretrained(str(init_dir), local_files_only=True)
    out: dict[float, Path] = {}
    for fraction, step in checkpoint_steps(cfg.steps, cfg.checkpoints).items():
        model = AutoModelForCausalLM.from_pretrained(str(init_dir), local_files_only=True)
        missing, unexpected = model.load_state_dict(load_file(str(stored[step])), strict=False)
        if unexpected or any(k != "lm_head.weight" for k in missing):
            raise ConfigError(f"{stored[step]}: weights do not fit {init_dir} (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
        target = root / f"ckpt-{fraction:g}"
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        info = {"size": cfg.size, "step": step, "fraction": fraction, "tokens": tokens.get(step, 0),
                "train_loss": losses.get(step), "non_embedding_params": get_size(cfg.size).non_embedding_params(),
                "eval_loss": final_eval if step == cfg.steps else evals.get(step)}
        (target / PRETRAIN_FILE).write_text(json.dumps(info, indent=2))
        out[fraction] = target
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # exported; the optimizer states are not needed
    return out


def read_pretrain_info(model_dir: str | Path) -> dict[str, Any] | None:
    """pretrain.json of a model folder written by ``tunelab pretrain`` (None for other models)."""
    path = Path(model_dir) / PRETRAIN_FILE
    return json.loads(path.read_text()) if path.is_file() else None
