"""The one training loop: every method is trained by ``train(config)``.

Per optimizer step s: the G micro-batches of the step (G·W over W processes) have N target tokens in all; each
micro-batch contributes Σ NLL / N to the objective (``tunelab.train.objective``), so the gradient is that of the
per-token mean over the whole step. Then: clip, AdamW, schedule, log; evaluate and checkpoint on their intervals.

The process holds the run directory's lock (``tunelab.rundir.RunLock``) while it trains. A non-finite training
loss, gradient norm, evaluation loss or final weight ends the run as ``diverged`` (TrainingDiverged), never
``complete``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

import tunelab
from tunelab.config import ConfigError, RunConfig, dump_config
from tunelab.devices import move_batch, peak_device_memory_mb, reset_peak_memory, resolve_device
from tunelab.errors import RunError
from tunelab.errors import TrainingDiverged as TrainingDiverged
from tunelab.files import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    warn,
)
from tunelab.methods import get_method
from tunelab.methods.core import MethodHandle, count_parameters
from tunelab.quant import base as quant_base
from tunelab.rundir import ADAPTER_FILE, CONFIG_FILE, META_FILE, METRICS_FILE, RunLock, read_meta
from tunelab.train import checkpoint as ckpt
from tunelab.train.attention import use_fp32_attention
from tunelab.train.batches import (
    BatchPlan,
    PreparedData,
    all_step_micro_batches,
    prepare_data,
    skipped_rows_message,
    step_micro_batches,
)
from tunelab.train.dist import DistInfo, all_reduce_sum, barrier, gather_value, init_distributed
from tunelab.train.fused import use_fused_kernels
from tunelab.train.memory import keep_freed_memory, set_mmap_threshold
from tunelab.train.objective import mean_nll, nll_sum
from tunelab.train.optimizers import build_optimizer, load_optimizer_state, tensor_bytes
from tunelab.train.schedules import lr_factor, warmup_steps_for


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    tokens: int
    target_tokens: int
    seconds: float
    tokens_per_s: float
    peak_rss_mb: float
    trainable_params: int
    total_params: int
    device: str = "cpu"
    peak_device_mb: float | None = None  # CUDA: the allocator's peak on the device (None on the CPU)


class LossModule(nn.Module):
    """Wraps the model so DistributedDataParallel sees one forward that returns (Σ NLL, N)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return nll_sum(self.model, batch)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autocast_enabled(mode: str, model_dtype: torch.dtype) -> bool:
    return mode == "bf16" or (mode == "auto" and model_dtype == torch.bfloat16)


def autocast_context(mode: str, model_dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked, or ('auto') when the frozen weights are bf16."""
    if not autocast_enabled(mode, model_dtype):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep frozen weights in ``dtype`` (bf16 where the CPU is fast at it: half the memory, no per-step recast);
    trainable weights stay fp32."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for m in model.modules():  # a quantized embedding (codes) returns what a dense table in ``dtype`` would
        if getattr(m, "is_quantized_embedding", False):
            m.out_dtype = dtype


FUSED_MIN_WIDTH = 256  # train.fused_kernels: auto switches the compiled kernels on from this hidden size


def fused_kernels_wanted(setting: bool | str, model: nn.Module) -> bool:
    """train.fused_kernels: true / false, or auto — on when the model is wide enough that the one-off compile
    (~15 s) pays back (tiny test models are not), in bf16 autocast and in fp32 alike: SmolLM2's RMSNorm forward +
    backward at 8 x 128 x 576 takes 4.9 ms eager against 1.3 ms compiled in fp32 too (2-core AVX2 AMD EPYC)."""
    if setting != "auto":
        return bool(setting)
    width = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
    return width >= FUSED_MIN_WIDTH


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every repeated transformer block (the classes in ``model._no_split_modules``).

    Compiling the blocks rather than the whole model keeps one compiled graph for all layers (compile once,
    ~40 s for SmolLM2 on 2 cores) and fuses the many small element-wise kernels of norms, rotary embeddings,
    activations and adapters. Shapes are dynamic so varying sequence lengths do not recompile.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """train.activation_checkpointing: transformers' gradient checkpointing of every decoder block, non-reentrant
    (frozen inputs need no requires_grad trick; RNG state is replayed, so dropout masks match)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} does not support gradient "
                          "checkpointing in transformers; set train.activation_checkpointing: false")
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def config_hash(cfg: RunConfig) -> str:
    """Fingerprint of everything that decides the trained weights (the progress bar setting does not)."""
    data = cfg.to_dict()
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("progress", "threads", "log_every", "compile", "device",
                                                                   "activation_checkpointing")}
    if data["train"].get("optimizer") == "adamw":  # the default, left out: runs from before the option keep their hash
        del data["train"]["optimizer"]
    return hashlib.blake2b(repr(data).encode(), digest_size=8).hexdigest()


# --------------------------------------------------------------------------------------------------------------


class Trainer:
    """State of one training run; ``run()`` executes it. Use ``train(cfg)``."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, model: Any = None, tokenizer: Any = None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.device = resolve_device(cfg.train.device)  # the CPU, or a CUDA device (tunelab.devices)
        self.info: DistInfo = init_distributed(self.device)
        self.run_dir = cfg.resolved_output_dir()
        self.ckpt_root = self.run_dir / "checkpoints"
        self._model, self._tokenizer = model, tokenizer
        self.trackers: Any = None  # train.report_to (opened in run)
        self.final_state_bytes: dict[str, int] | None = None
        self.rank_peak_rss_mb: list[float] | None = None  # each process's peak RSS during training

    # -- set-up ----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Threads and seed, the model with the method applied, the data and its batch plan, the optimizer, the
        kernels, in that order."""
        self._setup_process()
        self._setup_model()
        self._setup_method()
        self.data: PreparedData = self._prepare_data()
        self._setup_plan()
        self._setup_kernels()
        self._build_optimizer()  # after sharding: FSDP replaces the parameters by sharded ones

    def _setup_process(self) -> None:
        t = self.cfg.train
        if t.keep_freed_memory:
            keep_freed_memory()
        if t.mmap_threshold_kib is not None:
            set_mmap_threshold(t.mmap_threshold_kib * 1024)
        if t.threads:
            torch.set_num_threads(t.threads)
        elif self.info.enabled:
            torch.set_num_threads(max(1, (torch.get_num_threads()) // self.info.world_size))
        torch.manual_seed(t.seed)

    def _setup_model(self) -> None:
        """The base model in fp32 (trainable weights start from full-precision values), its identity and size."""
        from tunelab.loading import describe_base, load_base
        from tunelab.models import model_fingerprint

        if self._model is None:
            self._model, self._tokenizer = load_base(self.cfg.model.name, "fp32")
        self.model, self.tokenizer = self._model, self._tokenizer
        self.base_id = describe_base(self.cfg.model.name)
        self.fingerprint = model_fingerprint(self.model)
        self.total_params = count_parameters(self.model) + quant_base.quantized_numel(self.model)

    def _setup_method(self) -> None:
        """Quantize (a quantize section or a quantized base), apply the method, cast the frozen weights."""
        from tunelab.models import resolve_dtype

        self.method = get_method(self.cfg.method_name())
        method_cfg = self.cfg.method_config()
        self.quant = quant_base.prepare(self.model, self.cfg, self.method, method_cfg)
        self.handle: MethodHandle = self.method.apply(self.model, method_cfg, tokenizer=self.tokenizer)
        if self.quant is not None:
            self.quant.init_adapters(self.handle, self.method)  # LoftQ's factors (QLoRA starts from zero)
        self.handle.upcast_trainable()
        self.base_dtype = resolve_dtype(self.cfg.model.dtype, self.device)  # compute dtype: bf16 turns autocast on
        cast_frozen(self.model, self.base_dtype)
        if self.device.type != "cpu":  # prepared on the CPU (quantization, LoftQ's SVDs), trained on the device
            self.model.to(self.device)
            reset_peak_memory(self.device)
        self.params = self.handle.trainable_parameters()
        self.num_trainable = self.handle.num_trainable()  # what is trained (the saved form may be folded smaller)
        if not self.params:
            raise RunError(f"method '{self.handle.name}' left no trainable parameters")

    def _setup_plan(self) -> None:
        t = self.cfg.train
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.pad_id = pad_id
        self.plan = BatchPlan(self.data.train, t.batch_size, self.cfg.data.max_length, pad_id, seed=t.seed,
                              packing=self.cfg.data.packing, group_by_length=self.cfg.data.group_by_length)
        per_step = t.grad_accum * self.info.world_size
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.plan.batches_in_epoch() / per_step))
        self.warmup = warmup_steps_for(self.total_steps, t.warmup_steps, t.warmup_ratio)

    def _setup_kernels(self) -> None:
        """fp32 attention under autocast, compiled blocks or fused kernels, and the (DDP-wrapped) loss module."""
        t = self.cfg.train
        autocast = autocast_enabled(t.autocast, self.base_dtype)
        on_cpu = self.device.type == "cpu"  # fp32 attention and auto fused kernels were measured on CPUs only
        self._restore_attention = lambda: None
        if t.fp32_attention and autocast and on_cpu:
            compiled = fused_kernels_wanted(t.compiled_attention, self.model) and not t.compile
            self._restore_attention = use_fp32_attention(self.model, compiled=compiled)
        self._restore_fused = lambda: None
        if t.compile:
            compile_blocks(self.model)
        elif (on_cpu or t.fused_kernels is True) and fused_kernels_wanted(t.fused_kernels, self.model):
            self._restore_fused = use_fused_kernels(self.model)
        if t.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.forward = LossModule(self.model)
        if self.info.enabled and t.distributed == "fsdp":
            self._shard()
        elif self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = torch.nn.parallel.DistributedDataParallel(self.forward, device_ids=ids,
                                                                     find_unused_parameters=False)

    @property
    def sharded(self) -> bool:
        return self.info.enabled and self.cfg.train.distributed == "fsdp"

    def _shard(self) -> None:
        """FSDP2 on the decoder blocks: each block is one unit, its parameters, gradients and optimizer states
        sharded over the processes (all-gathered for its forward and backward, gradients reduce-scattered and
        averaged, as DDP's all-reduce averages). The parameters outside the blocks (embeddings, final norm, head —
        the loss reads the head's weight directly, outside any forward an FSDP root could hook) stay replicated,
        their gradients all-reduced after each step's backward (``_sync_replicated``)."""
        from torch.distributed.fsdp import fully_shard

        lists = [m for m in self.model.modules() if isinstance(m, nn.ModuleList)]
        blocks = max(lists, key=len) if lists else []
        for block in blocks:
            fully_shard(block)
        self.params = self.handle.trainable_parameters()  # the sharded parameters are DTensors now
        self.replicated = [p for p in self.params.values() if not hasattr(p, "full_tensor")]

    def _sync_replicated(self) -> None:
        import torch.distributed as dist

        for p in getattr(self, "replicated", []):
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.info.world_size)

    def _unshard(self) -> None:
        """Gather every FSDP unit's full parameters (collective), for the final save and checks."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.unshard()

    def _prepare_data(self) -> PreparedData:
        """Tokenised training/eval sets; rows that --skip-bad-rows left out are reported on the console too."""
        data = prepare_data(self.cfg.data, self.tokenizer, self.cfg.train.seed)
        skipped = skipped_rows_message(data.stats)
        if skipped and self.info.is_main:
            warn(skipped)
        return data

    def _build_optimizer(self) -> None:
        t = self.cfg.train
        decay = [p for p in self.params.values() if p.ndim >= 2]
        no_decay = [p for p in self.params.values() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.sharded:  # the fused kernel takes sharded (DTensor) and replicated tensors in separate groups
            groups = [{**g, "params": [p for p in g["params"] if hasattr(p, "full_tensor") == sharded]}
                      for g in groups for sharded in (True, False)]
        groups = [g for g in groups if g["params"]]
        names = {id(p): n for n, p in self.params.items()}
        self.param_order = [names[id(p)] for g in groups for p in g["params"]]  # the optimizer's indices
        self.optimizer = build_optimizer(t.optimizer, groups, lr=t.lr, betas=tuple(t.adam_betas),
                                         sharded=self.sharded)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, self.total_steps, self.warmup, t.schedule, t.min_lr_ratio),
        )

    # -- run directory ---------------------------------------------------------------------------------------
    def prepare_run_dir(self) -> int:
        """Create or check the run directory; return the step to start from."""
        existing = ckpt.latest_checkpoint(self.ckpt_root)
        meta_path = self.run_dir / META_FILE
        if not self.resume and (existing is not None or meta_path.exists()):
            raise RunError(f"{self.run_dir} already holds a run. Pass --resume to continue it, or choose another "
                           f"output_dir (--set output_dir=...)")
        if self.resume and meta_path.exists():
            old = read_meta(self.run_dir)
            if old.get("config_hash") != config_hash(self.cfg):
                raise RunError(f"{self.run_dir}: --resume needs the same config as the interrupted run; "
                               f"compare with {self.run_dir / CONFIG_FILE}")
            if old.get("status") == "complete":
                raise RunError(f"{self.run_dir} is already complete; nothing to resume")
        barrier(self.info)  # every process has checked the folder before the main one writes into it
        start = self._restore_newest() if self.resume and existing is not None else 0
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_temp(self.ckpt_root)
            atomic_write_text(self.run_dir / CONFIG_FILE, dump_config(self.cfg))
            self._write_meta("running")
            if start == 0:
                (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
        barrier(self.info)
        return start

    def _restore_newest(self) -> int:
        """Restore the newest checkpoint that loads (a damaged newer one is named and set aside); 0 if none does."""
        found = ckpt.load_newest(self.ckpt_root, set_aside=self.info.is_main)
        if found is None:
            warn(f"no complete checkpoint in {self.ckpt_root}: starting {self.run_dir} again from step 0")
            return 0
        return self._restore(*found)

    def _restore(self, path: Path, state: ckpt.TrainingState) -> int:
        if self.sharded:  # a checkpoint holds full tensors: every process takes its shards of them
            own = self.handle.state_dict()
            state.trainable = {k: _like(v, own.get(k)) for k, v in state.trainable.items()}
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            for index, per_param in state.optimizer["state"].items():
                for key, value in list(per_param.items()):
                    if value.ndim > 0:
                        per_param[key] = _like(value, params[index])
        self.handle.load_state_dict(state.trainable)
        load_optimizer_state(self.optimizer, state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        ckpt.set_rng_state(state.rng)
        self.counters = {k: v for k, v in state.counters.items() if k != "param_names"}
        self.last_checkpoint = path
        if self.info.is_main:
            _truncate_metrics(self.run_dir / METRICS_FILE, state.step)
        return state.step

    def _write_meta(self, status: str, **extra: Any) -> None:
        from tunelab.models import dtype_name

        meta = {
            "tunelab_version": tunelab.__version__,
            "status": status,
            "method": self.handle.name,
            "base_model": self.cfg.model.name,
            "base_model_id": self.base_id,
            "base_fingerprint": self.fingerprint,
            "config_hash": config_hash(self.cfg),
            "trainable_params": self.num_trainable,
            "total_params": self.total_params,
            "trainable_percent": 100.0 * self.num_trainable / self.total_params,
            "data": {k: v for k, v in self.data.stats.items() if k != "bad_rows"},
            "bad_rows": self.data.stats.get("bad_rows", [])[:100],
            "world_size": self.info.world_size,
            "compute_dtype": dtype_name(self.base_dtype),  # what `auto` resolved to on this machine
            **extra,
        }
        if getattr(self, "final_state_bytes", None) is not None:  # rank 0's share, for DDP/FSDP memory comparisons
            meta["distributed"] = {"mode": self.cfg.train.distributed if self.info.enabled else "none",
                                   "state_bytes_rank0": self.final_state_bytes,
                                   "peak_rss_mb_per_rank": self.rank_peak_rss_mb}
        atomic_write_json(self.run_dir / META_FILE, meta)

    # -- one step --------------------------------------------------------------------------------------------
    def _step(self, step: int) -> dict[str, float]:
        t, info = self.cfg.train, self.info
        ids = step_micro_batches(step, t.grad_accum, info.world_size, info.rank)
        n_target = sum(self.plan.targets(g) for g in all_step_micro_batches(step, t.grad_accum, info.world_size))
        total, tokens = 0.0, 0
        for i, g in enumerate(ids):
            batch, n_tok = self.plan.micro_batch(g)
            batch = move_batch(batch, self.device)
            tokens += n_tok
            sync = i == len(ids) - 1 or not info.enabled
            with self._no_sync(sync), self.autocast:
                s, _ = self.forward(batch)
                loss = s * (info.world_size / max(n_target, 1))
            loss.backward()
            total += float(s.detach())
        if self.sharded:
            self._sync_replicated()
        total, tokens = all_reduce_sum([total, tokens], info)  # every process sees the same sum: all stop together
        self._check_finite(step + 1, "train loss", total / max(n_target, 1))
        grad_norm = self._clip()
        self._check_finite(step + 1, "gradient norm", grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": mean_nll(total, n_target), "tokens": int(tokens), "target_tokens": n_target,
                "grad_norm": grad_norm}

    def _no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        if sync or not hasattr(self.forward, "no_sync"):
            return contextlib.nullcontext()
        return self.forward.no_sync()

    def _clip(self) -> float:
        max_norm = self.cfg.train.max_grad_norm
        params = list(self.params.values())
        if self.sharded:
            return self._clip_sharded(params, max_norm)
        if max_norm is None or max_norm <= 0:
            norms = [p.grad.detach().norm() for p in params if p.grad is not None]
            return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))

    def _clip_sharded(self, params: list[torch.Tensor], max_norm: float | None) -> float:
        """The global gradient norm over sharded (DTensor) and replicated gradients, clipped like
        clip_grad_norm_: the shards' squared norms summed over the processes, the replicated ones counted once."""
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        shard_sq = sum((g.to_local().float() ** 2).sum() for g in grads if hasattr(g, "to_local"))
        repl_sq = sum((g.float() ** 2).sum() for g in grads if not hasattr(g, "to_local"))
        shard_sq = torch.as_tensor(shard_sq, dtype=torch.float64, device=self.info.device)
        dist.all_reduce(shard_sq)
        total = float(torch.sqrt(shard_sq + float(repl_sq)))
        if max_norm and max_norm > 0 and total > max_norm:
            scale = max_norm / (total + 1e-6)
            for g in grads:
                g.mul_(scale)
        return total

    def _check_finite(self, step: int, what: str, value: float) -> None:
        if not math.isfinite(value):
            self._diverged(step, f"{what} is {value}")

    def _diverged(self, step: int, what: str) -> None:
        """Mark the run ``diverged`` and raise TrainingDiverged with one line naming the step and the value."""
        last = getattr(self, "last_checkpoint", None)
        msg = (f"training diverged at step {step}: {what}; last good checkpoint: "
               f"{last or 'none (no checkpoint saved yet)'}. Lower train.lr, check the data, or try "
               f"train.autocast=off")
        if self.info.is_main:
            self._write_meta("diverged", error=msg, failed_step=step)
        raise TrainingDiverged(msg)

    # -- evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Per-token NLL on the held-out examples (response tokens only), sharded over processes."""
        if not self.data.eval:
            return None
        from tunelab.data import collate

        self.model.eval()
        total, count = 0.0, 0
        bs = self.cfg.train.batch_size
        order = sorted(range(len(self.data.eval)), key=lambda i: len(self.data.eval[i].input_ids))
        batches = [order[i: i + bs] for i in range(0, len(order), bs)]
        shards = batches[self.info.rank:: self.info.world_size]
        rounds = -(-len(batches) // self.info.world_size)  # FSDP: every process runs the same number of forwards
        for k in range(rounds if self.sharded else len(shards)):
            idx = shards[k] if k < len(shards) else batches[0]
            batch = move_batch(collate([self.data.eval[i] for i in idx], self.pad_id), self.device)
            with self.autocast:
                s, n = nll_sum(self.model, batch)
            if k < len(shards):
                total, count = total + float(s), count + n
        self.model.train()
        total, count = all_reduce_sum([total, count], self.info)
        return {"eval_loss": mean_nll(total, int(count)), "eval_target_tokens": int(count)}

    # -- main loop -------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train; the main process holds the run directory's lock throughout (a second trainer is refused)."""
        with RunLock(self.run_dir) if self.info.is_main else contextlib.nullcontext():
            return self._run_locked()

    def _run_locked(self) -> TrainResult:
        self.setup()
        self.counters: dict[str, Any] = {"tokens": 0, "target_tokens": 0, "seconds": 0.0, "last_loss": float("nan")}
        start = self.prepare_run_dir()
        self.autocast = autocast_context(self.cfg.train.autocast, self.base_dtype, self.device)
        self.trackers = self._open_trackers()
        try:
            result = self._loop(start)
        except BaseException as e:
            if self.info.is_main and not isinstance(e, TrainingDiverged):
                self._write_meta("failed", error=f"{type(e).__name__}: {e}")
            if self.trackers is not None:
                self.trackers.close("FAILED")
            raise
        finally:
            self._restore_attention()
            self._restore_fused()
        if self.trackers is not None:
            self.trackers.close()
        return result

    def _open_trackers(self) -> Any:
        """train.report_to's trackers (tunelab.train.tracking), on the main process; None without any."""
        if not (self.cfg.train.report_to and self.info.is_main):
            return None
        from tunelab.train.tracking import Trackers

        params = {"trainable": self.num_trainable, "total": self.total_params}
        return Trackers(self.cfg.train.report_to, self.run_dir, self.run_dir.name, self.cfg.to_dict(), params)

    def _log_row(self, row: dict[str, Any]) -> None:
        """One row of metrics.jsonl (main process), and the same scalars to the trackers."""
        append_jsonl(self.run_dir / METRICS_FILE, row)
        if self.trackers is not None:
            self.trackers.log(row)

    def _loop(self, start: int) -> TrainResult:
        t = self.cfg.train
        self.model.train()
        bar = _progress(self.total_steps, start, t.progress and self.info.is_main)
        eval_metrics = None
        for step in range(start, self.total_steps):
            t0 = time.perf_counter()
            m = self._step(step)
            dt = time.perf_counter() - t0
            self._count(m, dt)
            done = step + 1
            if self.info.is_main and (done % t.log_every == 0 or done == self.total_steps):
                row = {"step": done, **m, "lr": self.scheduler.get_last_lr()[0], "step_s": dt,
                       "tokens_per_s": m["tokens"] / dt}
                self._log_row(row)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{self.counters['tokens'] / self.counters['seconds']:.0f}")
            if t.eval_every and done % t.eval_every == 0 and done < self.total_steps:
                self._log_eval(done)
            if t.save_every and done % t.save_every == 0 and done < self.total_steps:
                self._save_checkpoint(done)
        bar.close()
        eval_metrics = self._log_eval(self.total_steps)
        return self._finish(eval_metrics)

    def _count(self, m: dict[str, float], dt: float) -> None:
        c = self.counters
        c["tokens"] += m["tokens"]
        c["target_tokens"] += m["target_tokens"]
        c["seconds"] += dt
        c["last_loss"] = m["loss"]

    def _log_eval(self, step: int) -> dict[str, float] | None:
        metrics = self.evaluate()
        if metrics is not None and metrics["eval_target_tokens"]:  # no targets: nan means "no value", not divergence
            self._check_finite(step, "eval loss", metrics["eval_loss"])
        if metrics is not None and self.info.is_main:
            self._log_row({"step": step, **metrics})
        return metrics

    def _save_checkpoint(self, step: int) -> None:
        trainable, optimizer = self.handle.state_dict(), self.optimizer.state_dict()
        if self.sharded:  # every process takes part in gathering the shards; the main one writes them
            trainable, optimizer = _gathered(trainable), _gathered_optimizer(optimizer)
        if self.info.is_main:
            state = ckpt.TrainingState(
                step=step, trainable=trainable, optimizer=optimizer,
                scheduler=self.scheduler.state_dict(), rng=ckpt.rng_state(), counters=dict(self.counters))
            self.last_checkpoint = ckpt.save_checkpoint(self.ckpt_root, state, self.param_order,
                                                        keep=self.cfg.train.keep_checkpoints)
        barrier(self.info)

    def _check_weights(self) -> None:
        """The trained weights are finite (a last step can blow them up after its loss was computed)."""
        for name, p in self.params.items():
            if not bool(torch.isfinite(p.detach()).all()):
                self._diverged(self.total_steps, f"trained weight {name} is not finite")

    def state_bytes(self) -> dict[str, int]:
        """Bytes this process holds of the trained parameters and their optimizer states (local shards only)."""
        params = sum(tensor_bytes(p) for p in self.params.values())
        states = sum(tensor_bytes(v) for st in self.optimizer.state.values()
                     for v in st.values() if isinstance(v, torch.Tensor) and v.ndim > 0)
        return {"trained_params": params, "optimizer_states": states}

    def _finish(self, eval_metrics: dict[str, float] | None) -> TrainResult:
        self.final_state_bytes = self.state_bytes()  # before the final gather
        self.rank_peak_rss_mb = [round(v, 1) for v in gather_value(peak_rss_mb(), self.info)]
        if self.sharded:
            self._unshard()
            self.params = self.handle.trainable_parameters()
        self._check_weights()
        c = self.counters
        result = TrainResult(
            run_dir=self.run_dir, steps=self.total_steps, train_loss=c["last_loss"],
            eval_loss=eval_metrics["eval_loss"] if eval_metrics else None, tokens=int(c["tokens"]),
            target_tokens=int(c["target_tokens"]), seconds=c["seconds"],
            tokens_per_s=c["tokens"] / c["seconds"] if c["seconds"] else 0.0, peak_rss_mb=peak_rss_mb(),
            device=str(self.device), peak_device_mb=peak_device_memory_mb(self.device),
            trainable_params=self.num_trainable, total_params=self.total_params,
        )
        if self.info.is_main:
            atomic_write_bytes(self.run_dir / ADAPTER_FILE, st_save(
                {k: v.detach().cpu().contiguous() for k, v in self.handle.inference_state_dict().items()},
                metadata={"method": self.handle.name, "format": "tunelab"}))
            quant_base.save_run_quantization(self.quant, self.run_dir)
            for fmt in self.method.CAPABILITIES.exports:  # peer formats (peft), loadable by that library
                self.method.export(self.handle, self.run_dir / fmt, self.base_id)
            metrics = {k: v for k, v in dataclasses.asdict(result).items() if k != "run_dir"}
            self._write_meta("complete", metrics=metrics)
        barrier(self.info)
        return result


def _full(t: Any) -> Any:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _gathered(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors of FSDP shards (a collective: every process calls it with the same keys in the same order)."""
    return {k: _full(v).detach() for k, v in state.items()}


def _gathered_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    return {"state": {i: {k: _full(v) for k, v in per.items()} for i, per in state["state"].items()},
            "param_groups": state["param_groups"]}


def _like(full: torch.Tensor, ref: Any) -> torch.Tensor:
    """``full`` as a DTensor sharded like ``ref`` (a plain tensor stays plain)."""
    if ref is None or not hasattr(ref, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(ref.dtype), ref.device_mesh, ref.placements)


def _progress(total: int, initial: int, enabled: bool):
    from tunelab import progress

    return progress.bar(total=total, initial=initial, enabled=enabled, desc="train", unit="step")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = [row for row in read_jsonl(path) if row.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in keep))


def train(cfg: RunConfig, *, resume: bool = False, model: Any = None, tokenizer: Any = None) -> TrainResult:
    """Train ``cfg`` (any registered method) and write the run directory; see the module docstring."""
    return Trainer(cfg, resume=resume, model=model, tokenizer=tokenizer).run()
