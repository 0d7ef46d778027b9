"""Typed run configuration: dataclasses are the single source of truth.

YAML files and ``--set a.b=value`` overrides are only two ways of filling them. Every value is checked against
the dataclass field's type; unknown keys are rejected with the nearest valid key, and errors name the file and the
line of the offending key when the value came from a YAML file.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tunelab.data.formats import FORMATS
from tunelab.errors import ConfigError as ConfigError
from tunelab.errors import suggest as suggest
from tunelab.schema import Lines as Lines
from tunelab.schema import apply_overrides as apply_overrides
from tunelab.schema import build as build
from tunelab.schema import parse_override as parse_override
from tunelab.schema import read_yaml as read_yaml

# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelSection:
    """Which base model to load (see ``tunelab.models.load_model``)."""

    name: str = "smollm2-135m"
    dtype: str = "auto"  # auto (bf16 where the CPU has fast bf16), bf16, fp32


@dataclass
class FieldsSection:
    """Names of the record fields in the data files (LLM-Adapters / Alpaca names by default)."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"  # chat-format rows: a list of {role, content} turns (loss on assistant turns)


@dataclass
class DataSection:
    """Training data: a JSON/JSONL file of instruction records or a built-in synthetic task."""

    train: str = ""  # path, or synthetic:NAME:SPLIT:N
    eval: str | None = None  # path or synthetic spec; None = hold out eval_fraction of train
    eval_fraction: float = 0.0
    eval_max_examples: int = 256
    limit: int | None = None  # use at most this many training records
    template: str = "alpaca"  # alpaca, plain, chat, or a format string with {instruction} and {input}
    fields: FieldsSection = field(default_factory=FieldsSection)
    format: str = "as-is"  # row format of train/eval files: as-is, mc-text, mawps (tunelab.data.formats)
    max_length: int = 512
    train_on_prompt: bool = False
    packing: bool = False
    group_by_length: bool = True
    skip_bad_rows: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_length < 2:
            raise ConfigError(f"data.max_length must be at least 2, got {self.max_length}")
        if self.format not in FORMATS:
            raise ConfigError(f"data.format {self.format!r} is not a row format.{suggest(self.format, FORMATS)}")


@dataclass
class TrainSection:
    """Optimisation settings shared by every method (one loop trains them all)."""

    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 8  # micro-batch size per process
    grad_accum: int = 1
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float | None = 1.0
    seed: int = 42
    autocast: Literal["auto", "bf16", "off"] = "auto"
    fp32_attention: bool = True  # under bf16 autocast on the CPU, attention in fp32 (faster backward there;
    # tunelab.train.attention); on CUDA attention stays in bf16 (sdpa's flash kernel)
    fused_kernels: bool | Literal["auto"] = "auto"  # compiled RMSNorm + SwiGLU gate (tunelab.train.fused);
    # auto: on for models of width >= 256, bf16 autocast or fp32 (the compile, ~15 s once per process, pays back)
    keep_freed_memory: bool = True  # glibc keeps freed buffers up to 32 MiB for reuse (tunelab.train.memory): far
    # fewer page faults on each step's new buffers; SmolLM2 steps 1.2-1.5x faster, memory held until the process ends
    mmap_threshold_kib: int | None = None  # glibc mmap threshold for this process (tunelab.train.memory); None:
    # as keep_freed_memory leaves it. 1024 gives activation buffers their own mappings: lower peak RSS, slower steps
    compiled_attention: bool | Literal["auto"] = "auto"  # with fp32_attention: a compiled grouped-query attention
    # kernel for short sequences (tunelab.train.attention); auto: on where fused_kernels' auto rule says so
    eval_every: int = 0  # steps; 0 = only at the end (when an eval set exists)
    save_every: int = 0  # steps; 0 = only the final weights
    keep_checkpoints: int = 2
    log_every: int = 1
    threads: int | None = None
    compile: bool = False  # torch.compile each decoder block (dynamic shapes): ~40 s once, then faster steps
    # recompute each decoder block's activations in the backward pass instead of keeping them (transformers'
    # non-reentrant gradient checkpointing): activation memory of one block instead of all, ~1 more forward per step
    activation_checkpointing: bool = False
    progress: bool = True
    report_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, mlflow, wandb
    # under torchrun: ddp (a full copy per process) or fsdp (FSDP2 fully_shard on the decoder blocks: parameters,
    # gradients and optimizer states sharded over the processes; checkpoints gathered to full tensors)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # where to train (tunelab.devices): auto (CUDA when torch sees a GPU — under torchrun the LOCAL_RANK-th — else
    # the CPU), cpu, cuda or cuda:N. On CUDA, fp32_attention and auto fused kernels (CPU measures) stay off
    device: str = "auto"
    # adamw (fp32 states), adamw-8bit or adamw-4bit (torchao's quantized states: ~4x / ~8x smaller; needs torchao;
    # tunelab.train.optimizers)
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        from tunelab.train.optimizers import check_name
        from tunelab.train.tracking import check_names

        check_names(self.report_to)
        check_name(self.optimizer)
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be at least 1 (or null), got {self.max_steps}")
        if self.epochs <= 0:
            raise ConfigError(f"train.epochs must be positive, got {self.epochs}")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas needs two numbers, got {self.adam_betas}")
        if self.mmap_threshold_kib is not None and not 0 <= self.mmap_threshold_kib <= 32 * 1024:
            raise ConfigError(f"train.mmap_threshold_kib must be between 0 and 32768 (glibc's limit) or null, got "
                              f"{self.mmap_threshold_kib}")


@dataclass
class QuantizeSection:
    """Quantize the base model's linear layers before the method is applied (QLoRA, LoftQ; see tunelab.quant).

    ``embeddings: true`` also quantizes the token embedding table (at ``embedding_bits``, default ``bits``) and
    the output head: a tied head uses the embedding's codes, an untied one gets its own (off by default: QLoRA and
    LoftQ keep both in 16 bits, and no adapter corrects the head's error).

    ``mixed: k`` keeps the first k decoder layers at ``mixed_bits`` (LoftQ's mixed precision: 4 bits in the first
    layers, ``bits`` in the rest). ``init: loftq`` needs ``method: lora`` and sets its A/B (``iters`` alternations).
    """

    bits: int = 4  # 2, 4 or 8
    quant: Literal["nf", "int"] = "nf"  # NormalFloat code book or symmetric uniform INT-k
    block: int = 64  # values per absmax scale
    double_quant: bool = False  # quantize the scales too (INT-8, blocks of 256)
    init: Literal["qlora", "loftq"] = "qlora"
    iters: int = 1  # LoftQ alternations T
    mixed: int = 0  # the first `mixed` decoder layers use mixed_bits
    mixed_bits: int = 4
    targets: str | list[str] = "all-linear"  # which linear layers are quantized (the output head never is)
    embeddings: bool = False  # also quantize the token embedding (+ the output head: tied, the same codes)
    embedding_bits: int = 0  # bits of the embedding / head table (0: the same as `bits`)

    def __post_init__(self) -> None:
        for name in ("bits", "mixed_bits"):
            if getattr(self, name) not in (2, 4, 8):
                raise ConfigError(f"quantize.{name} must be 2, 4 or 8, got {getattr(self, name)}")
        if self.embedding_bits not in (0, 2, 4, 8):
            raise ConfigError(f"quantize.embedding_bits must be 0 (= bits), 2, 4 or 8, got {self.embedding_bits}")
        if self.block < 1 or self.block % 4:
            raise ConfigError(f"quantize.block must be a positive multiple of 4, got {self.block} (default 64)")
        if self.iters < 1:
            raise ConfigError(f"quantize.iters must be at least 1, got {self.iters}")
        if self.mixed < 0:
            raise ConfigError(f"quantize.mixed must be >= 0 (number of first layers at mixed_bits), got {self.mixed}")


@dataclass
class RunConfig:
    """A whole training run. ``method`` is a mapping with ``name`` plus that method's own options."""

    model: ModelSection = field(default_factory=ModelSection)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "lora"})
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/{method}"
    quantize: QuantizeSection | None = None  # QLoRA / LoftQ: quantize the base before the method

    def method_name(self) -> str:
        return str(self.method.get("name", ""))

    def method_config(self) -> Any:
        """The method's own typed config, validated by its module (``tunelab.methods.REGISTRY``)."""
        from tunelab.methods import build_method_config

        return build_method_config(self.method)

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir.format(method=self.method_name()))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["data"]["format"] == "as-is":  # runs without a row format keep the config hash they always had
            del data["data"]["format"]
        if not data["train"]["report_to"]:  # as do runs without trackers (trackers do not change what is trained)
            del data["train"]["report_to"]
        if data["train"]["distributed"] == "ddp":  # and DDP runs (the only kind before FSDP)
            del data["train"]["distributed"]
        if data["quantize"] is None:  # unquantized runs keep the config (and config hash) they always had
            del data["quantize"]
        else:  # so do quantized runs that leave the embedding in bf16 (the options added with it are dropped)
            for key, default in (("embeddings", False), ("embedding_bits", 0)):
                if data["quantize"].get(key) == default:
                    del data["quantize"][key]
        return data


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a run config from YAML (optional) plus overrides, validate it, including the method's options."""
    data, lines = read_yaml(path) if path is not None else ({}, Lines())
    apply_overrides(data, overrides)
    cfg = config_from_dict(data, lines)
    return cfg


def config_from_dict(data: dict[str, Any], lines: Lines | None = None) -> RunConfig:
    lines = lines or Lines()
    cfg = build(RunConfig, data, "", lines)
    method = dict(cfg.method)
    if "name" not in method:
        raise ConfigError(f"{lines.where('method')}'method' needs a 'name' (see `tunelab methods`)")
    try:
        resolved = cfg.method_config()
    except ConfigError as e:
        raise ConfigError(f"{lines.where('method')}{e}") from None
    cfg.method = {"name": method["name"], **dataclasses.asdict(resolved)}  # every default filled in
    if cfg.train.distributed == "fsdp":
        from tunelab.methods import get_method

        if not get_method(method["name"]).CAPABILITIES.fsdp:
            raise ConfigError(f"{lines.where('train.distributed')}train.distributed: fsdp: method "
                              f"'{method['name']}' does not train sharded (see its docs); use distributed: ddp")
    if cfg.train.activation_checkpointing:
        from tunelab.methods import get_method

        if not get_method(method["name"]).CAPABILITIES.activation_checkpointing:
            raise ConfigError(f"{lines.where('train.activation_checkpointing')}train.activation_checkpointing: "
                              f"method '{method['name']}' cannot train with it (see its docs); set it to false")
    return cfg


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (written next to every run)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
