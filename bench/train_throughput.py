"""Training throughput and peak memory of tunelab against a plain transformers/peft loop, on the embedded model.

    python bench/train_throughput.py [--steps N] [--only NAME,NAME] [--out results.json] [--repeats R]

Every configuration runs in a fresh child process (``--worker NAME``) so that its peak RSS is its own; the parent
imports only the standard library (see ``bench/harness.py`` for why that matters). All configurations train on the
same token ids: 8 rows x 128 tokens per step, the first 64 tokens of each row a prompt (label -100) and the last 64
the response. Progress goes to stderr; the JSON result goes to stdout (and to ``--out``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _shape_before_import() -> None:
    """--shape BxL sets TUNELAB_BENCH_SHAPE before harness is imported (its constants are the workload's shape,
    and the child processes inherit the variable)."""
    for i, arg in enumerate(sys.argv):
        if arg == "--shape" and i + 1 < len(sys.argv):
            os.environ["TUNELAB_BENCH_SHAPE"] = sys.argv[i + 1]
        elif arg.startswith("--shape="):
            os.environ["TUNELAB_BENCH_SHAPE"] = arg.split("=", 1)[1]


_shape_before_import()

from harness import (  # noqa: E402
    BATCH,
    CLEAN_FOREIGN_CORES,
    MAX_NOISY_SHARE,
    MODEL,
    PROMPT_LEN,
    REPO,
    RESPONSE_LEN,
    RESULT_PREFIX,
    SEQ_LEN,
    Probes,
    add_common_args,
    cpu_info,
    environment,
    load_average,
    log,
    measure,
    median,
    memory_report,
    model_flops,
    noise,
    ratio,
    rounded,
    run_child_process,
    train_tunelab,
    wait_for_idle,
    worker_matmul,
    worker_prepare,
    write_result,
)

LORA = {"r": 8, "alpha": 16, "targets": "all-linear"}
VIRTUAL_TOKENS = 20  # prompt and prefix tuning (peft's and tunelab's), LLM-Adapters' prefix setting
BOTTLENECK = 36  # series / parallel adapters: 576 / 16, AdapterHub's reduction_factor 16 on this model
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "full": {}, "lora": LORA, "prompt": {"num_tokens": VIRTUAL_TOKENS, "init": "vocab"},
    "prefix": {"num_tokens": VIRTUAL_TOKENS}, "series": {"bottleneck": BOTTLENECK, "targets": "mlp"},
    "parallel": {"bottleneck": BOTTLENECK, "targets": "mlp"},
}
LR = {"full": 1e-5, "lora": 2e-4, "prompt": 3e-2, "prefix": 1e-2, "series": 1e-3, "parallel": 1e-3}
TARGETS = {"lora_tokens_per_s_vs_peft": 2.0, "lora_peak_rss_vs_peft_max": 0.6, "full_tokens_per_s_vs_plain": 1.5,
           "pet_tokens_per_s_vs_peer": 2.0}
# glibc's environment form of tunelab.train.memory.keep_freed_memory (KEEP_TRIM_THRESHOLD, KEEP_MMAP_THRESHOLD)
KEEP_FREED_MEMORY_ENV = {"MALLOC_TRIM_THRESHOLD_": str(2**31 - 1), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
# AdapterHub `adapters` 1.x needs transformers 4.x: its worker runs under this interpreter (a venv with torch,
# transformers 4.57 and adapters 1.3; see bench/README.md). Unset or missing: the adapters rows are skipped.
ADAPTERS_PYTHON = os.environ.get("TUNELAB_ADAPTERS_PYTHON", "")


@dataclass(frozen=True)
class Spec:
    """One benchmarked configuration."""

    kind: str  # "tunelab" | "peft" | "plain" | "adapters" | "trl"
    method: str  # a key of METHOD_OPTIONS
    description: str
    dtype: str = "auto"  # model load dtype
    autocast: bool = False  # peer loops only; tunelab decides itself (auto: bf16 autocast with bf16 weights)
    compile: bool = False  # tunelab only: train.compile
    checkpointing: bool = False  # activation checkpointing (tunelab: train.activation_checkpointing; peers:
    # transformers' gradient checkpointing, non-reentrant)
    keep_freed_memory: bool = False  # peer loops only: glibc set (by environment) as train.keep_freed_memory sets it


def _tunelab(method: str, what: str) -> Spec:
    return Spec("tunelab", method, f"tunelab loop, {what}, dtype auto (bf16 frozen base, fp32 trainable "
                                   "weights, bf16 autocast, fp32 attention)")


CONFIGS: dict[str, Spec] = {
    "tunelab-full": Spec("tunelab", "full", "tunelab loop, full tuning, dtype auto (bf16 frozen copy; trainable "
                                            "weights fp32 + bf16 autocast)"),
    "tunelab-lora": _tunelab("lora", "LoRA r=8 alpha=16 all-linear"),
    "tunelab-full-compile": Spec("tunelab", "full", "as tunelab-full with train.compile: true", compile=True),
    "tunelab-lora-compile": Spec("tunelab", "lora", "as tunelab-lora with train.compile: true", compile=True),
    "tunelab-full-ckpt": Spec("tunelab", "full", "as tunelab-full with train.activation_checkpointing: true",
                              checkpointing=True),
    "tunelab-lora-ckpt": Spec("tunelab", "lora", "as tunelab-lora with train.activation_checkpointing: true",
                              checkpointing=True),
    "peft-lora-fp32": Spec("peft", "lora", "peft LoRA r=8 alpha=16 all-linear on the fp32 model, plain loop",
                           dtype="fp32"),
    "peft-lora-bf16": Spec("peft", "lora", "peft LoRA on the bf16 model (adapters as peft creates them), forward "
                                           "under bf16 autocast", dtype="bf16", autocast=True),
    # trl's SFTTrainer with a peft LoRA config (what most users run): the fp32 model, fp32 or with SFTConfig(bf16=True)
    # (accelerate's bf16 autocast; fp32 master weights); trl's default gradient checkpointing off, as every other row,
    # and on in "-defaults" (SFTConfig's defaults otherwise too: completion-only loss from the completion mask)
    "trl-lora-fp32": Spec("trl", "lora", "trl SFTTrainer + peft LoRA r=8 alpha=16 all-linear, fp32 model, "
                                         "gradient checkpointing off", dtype="fp32"),
    "trl-lora-bf16": Spec("trl", "lora", "trl SFTTrainer + peft LoRA, fp32 model, SFTConfig(bf16=True) (autocast), "
                                         "gradient checkpointing off", dtype="fp32", autocast=True),
    "trl-lora-bf16-defaults": Spec("trl", "lora", "as trl-lora-bf16 with SFTConfig's default gradient checkpointing "
                                                  "(on)", dtype="fp32", autocast=True, checkpointing=True),
    "plain-full-fp32": Spec("plain", "full", "transformers + torch loop, full tuning, fp32", dtype="fp32"),
    "plain-full-bf16autocast": Spec("plain", "full", "transformers + torch loop, full tuning, fp32 weights, "
                                                     "forward under bf16 autocast", dtype="fp32", autocast=True),
    "peft-lora-bf16-keepmem": Spec("peft", "lora", "as peft-lora-bf16, with glibc keeping freed memory as "
                                                   "tunelab's train.keep_freed_memory does", dtype="bf16",
                                   autocast=True, keep_freed_memory=True),
    "plain-full-bf16autocast-keepmem": Spec("plain", "full", "as plain-full-bf16autocast, with glibc keeping freed "
                                                             "memory as tunelab's train.keep_freed_memory does",
                                            dtype="fp32", autocast=True, keep_freed_memory=True),
    "tunelab-prompt": _tunelab("prompt", f"prompt tuning, {VIRTUAL_TOKENS} soft tokens"),
    "peft-prompt-fp32": Spec("peft", "prompt", f"peft prompt tuning, {VIRTUAL_TOKENS} virtual tokens, fp32 model",
                             dtype="fp32"),
    "peft-prompt-bf16": Spec("peft", "prompt", "peft prompt tuning on the bf16 model under bf16 autocast",
                             dtype="bf16", autocast=True),
    "tunelab-prefix": _tunelab("prefix", f"prefix tuning, {VIRTUAL_TOKENS} virtual tokens, no reparameterisation"),
    "peft-prefix-fp32": Spec("peft", "prefix", f"peft prefix tuning, {VIRTUAL_TOKENS} virtual tokens, fp32 model",
                             dtype="fp32"),
    "peft-prefix-bf16": Spec("peft", "prefix", "peft prefix tuning on the bf16 model under bf16 autocast",
                             dtype="bf16", autocast=True),
    "tunelab-series": _tunelab("series", f"series adapter after the MLP, bottleneck {BOTTLENECK}"),
    "adapters-series-fp32": Spec("adapters", "series", f"AdapterHub adapters SeqBnConfig (after the FFN), "
                                                       f"bottleneck {BOTTLENECK}, fp32 model", dtype="fp32"),
    "adapters-series-bf16": Spec("adapters", "series", "AdapterHub SeqBn on the bf16 model under bf16 autocast",
                                 dtype="bf16", autocast=True),
    "tunelab-parallel": _tunelab("parallel", f"parallel adapter beside the MLP, bottleneck {BOTTLENECK}"),
    "adapters-parallel-fp32": Spec("adapters", "parallel", f"AdapterHub adapters ParBnConfig (beside the FFN), "
                                                           f"bottleneck {BOTTLENECK}, fp32 model", dtype="fp32"),
    "adapters-parallel-bf16": Spec("adapters", "parallel", "AdapterHub ParBn on the bf16 model under bf16 "
                                                           "autocast", dtype="bf16", autocast=True),
}


# ============================================================================================================
# Workers (run in child processes; these import torch)
# ============================================================================================================


def worker_tunelab(spec: Spec, workdir: Path, name: str, steps: int) -> dict[str, Any]:
    """tunelab's loop on the shared data (harness.train_tunelab)."""
    train = {**({"compile": True} if spec.compile else {}),
             **({"activation_checkpointing": True} if spec.checkpointing else {})}
    return train_tunelab(workdir, name, {"name": spec.method, **METHOD_OPTIONS[spec.method]}, steps=steps,
                         lr=LR[spec.method], dtype=spec.dtype, train=train or None)


def peer_model(spec: Spec, workdir: Path) -> Any:
    """The peer's model with its method applied: peft (LoRA, prompt, prefix), plain full tuning, or AdapterHub
    (in its own interpreter with transformers 4.x: tunelab is not imported there, the model is read from the
    safetensors directory the prepare step recorded)."""
    import torch

    if spec.kind == "adapters":
        import adapters
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            (workdir / "model_dir.txt").read_text().strip(),
            dtype=torch.bfloat16 if spec.dtype == "bf16" else torch.float32, attn_implementation="sdpa")
        adapters.init(model)
        reduction = model.config.hidden_size / BOTTLENECK
        cls = adapters.SeqBnConfig if spec.method == "series" else adapters.ParBnConfig
        model.add_adapter("bench", config=cls(reduction_factor=reduction))
        model.train_adapter("bench")
        return model
    from tunelab.models import load_model

    model, _ = load_model(MODEL, spec.dtype)
    if spec.kind == "plain":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    import peft

    configs = {
        "lora": lambda: peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                                        lora_dropout=0.0, task_type="CAUSAL_LM"),
        "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, task_type="CAUSAL_LM"),
        "prefix": lambda: peft.PrefixTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, task_type="CAUSAL_LM"),
    }
    return peft.get_peft_model(model, configs[spec.method]())


def worker_peer(spec: Spec, workdir: Path, steps: int) -> dict[str, Any]:
    """The idiomatic loop: model(..., labels=labels).loss.backward(); AdamW step; zero_grad."""
    import torch

    probes = Probes()
    torch.manual_seed(0)
    model = peer_model(spec, workdir)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR[spec.method])
    rows = json.loads((workdir / "tokens.json").read_text())
    batches = [rows[i: i + BATCH] for i in range(0, len(rows), BATCH)]
    step_s, losses = [], []
    for step in range(steps):
        batch = batches[step % len(batches)]
        input_ids = torch.tensor([r[0] for r in batch])
        labels = torch.tensor([r[1] for r in batch])
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if spec.autocast else contextlib.nullcontext():
            out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        step_s.append(time.perf_counter() - t0)
        losses.append(out.loss.detach().item())
        log(f"  step {step + 1}/{steps}: {step_s[-1]:.3f} s, loss {losses[-1]:.4f}")
    import transformers

    return {
        "step_s": step_s, "tokens": [BATCH * SEQ_LEN] * steps, "loss": losses,
        "lm_head_positions": BATCH * SEQ_LEN,  # transformers computes logits at every position
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_dtypes": sorted({str(p.dtype) for p in params}),
        "transformers_version": transformers.__version__,
        **memory_report(probes),
    }


def worker_trl(spec: Spec, workdir: Path, steps: int) -> dict[str, Any]:
    """trl's SFTTrainer on the same token ids (a processed dataset: input_ids + completion_mask, so the loss is on the
    response, as in every row); step times from a callback around each optimizer step."""
    import datasets
    import peft
    import torch
    import transformers
    import trl

    probes = Probes()
    torch.manual_seed(0)
    from tunelab.models import load_model

    model, tokenizer = load_model(MODEL, spec.dtype)
    rows = json.loads((workdir / "tokens.json").read_text())
    data = datasets.Dataset.from_dict({"input_ids": [r[0] for r in rows],
                                       "completion_mask": [[int(t != -100) for t in r[1]] for r in rows]})
    times: list[float] = []
    losses: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001 - transformers' callback signature
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            times.append(time.perf_counter() - self.t0)
            log(f"  step {len(times)}/{steps}: {times[-1]:.3f} s")

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    config = trl.SFTConfig(
        output_dir=str(workdir / f"trl-{os.getpid()}"), report_to="none", use_cpu=True, bf16=spec.autocast,
        per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR[spec.method], logging_steps=1,
        save_strategy="no", max_length=SEQ_LEN, packing=False, gradient_checkpointing=spec.checkpointing,
        dataloader_num_workers=0, seed=0, lr_scheduler_type="constant", warmup_steps=0)
    lora = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear", lora_dropout=0.0,
                           task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             peft_config=lora, callbacks=[Timer()])
    trainer.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    return {
        "step_s": times, "tokens": [BATCH * SEQ_LEN] * len(times), "loss": losses or [float("nan")],
        "lm_head_positions": BATCH * SEQ_LEN,  # logits at every position
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in trainer.model.parameters()),
        "trainable_dtypes": sorted({str(p.dtype) for p in params}),
        "transformers_version": transformers.__version__, "trl_version": trl.__version__,
        **memory_report(probes),
    }


def run_worker(name: str, workdir: Path, steps: int) -> dict[str, Any]:
    if name == "prepare":
        return worker_prepare(workdir, steps)
    if name == "matmul":
        return worker_matmul()
    spec = CONFIGS[name]
    if spec.kind == "tunelab":
        out = worker_tunelab(spec, workdir, name, steps)
    elif spec.kind == "trl":
        out = worker_trl(spec, workdir, steps)
    else:
        out = worker_peer(spec, workdir, steps)
    import torch

    out["torch_threads"] = torch.get_num_threads()
    return out


# ============================================================================================================
# Parent: run the children one after another, then summarise
# ============================================================================================================


def run_child(name: str, workdir: Path, steps: int, timeout: float, env: dict[str, str] | None = None
              ) -> dict[str, Any]:
    """Run ``--worker name`` in a fresh interpreter (AdapterHub rows under ``TUNELAB_ADAPTERS_PYTHON``)."""
    python = ADAPTERS_PYTHON if name in CONFIGS and CONFIGS[name].kind == "adapters" else sys.executable
    load_before = load_average()
    res = run_child_process(__file__, ["--worker", name, "--workdir", str(workdir), "--steps", str(steps)],
                     timeout=timeout, python=python, env=env)
    return {**res, "load_average_before": load_before, "load_average_after": load_average()}


PER_RUN_KEYS = ("peak_rss_mib", "peak_rss_train_mib", "vm_hwm_mib", "rss_before_training_mib", "process_wall_s")


def compute_dtype(spec: Spec, prep: dict[str, Any]) -> str:
    """The dtype a configuration's matmuls run in: tunelab's ``auto`` decides per machine (bf16 where bf16 is
    fast), a peer under autocast or on a bf16 model runs bf16, else fp32."""
    if spec.kind == "tunelab":
        return "bf16" if "bfloat16" in str(prep.get("model_dtype_auto")) else "fp32"
    return "bf16" if spec.autocast or spec.dtype == "bf16" else "fp32"


def combine(name: str, runs: list[dict[str, Any]], shapes: dict[str, Any], peaks: dict[str, float], dtype: str,
            warmup: int) -> dict[str, Any]:
    """Per-config result: medians across repeats of each repeat's median step statistics."""
    spec = CONFIGS[name]
    ok = [r for r in runs if r["status"] == "ok"]
    entry: dict[str, Any] = {"description": spec.description, "status": "ok" if ok else "failed",
                             "repeats_ok": len(ok), "repeats_failed": len(runs) - len(ok)}
    if not ok:
        entry["errors"] = [r.get("error_tail") for r in runs]
        return entry
    per_run = [measure(r, warmup) for r in ok]
    first = ok[0]
    flops = model_flops(shapes, full=spec.method == "full", loss_positions=first["lm_head_positions"],
                        tokens=BATCH * SEQ_LEN, lora_params=first["trainable_params"] if spec.method == "lora" else 0)
    step_med = median([m["step_s"]["median"] for m in per_run])
    tflops = flops["total"] / step_med / 1e12
    entry.update({
        "tokens_per_s": median([m["tokens_per_s"] for m in per_run]),
        "tokens_per_s_clean_steps": median([m["tokens_per_s_clean_steps"] for m in per_run
                                            if m["tokens_per_s_clean_steps"] is not None]),
        "clean_steps": sum(m["clean_steps"] for m in per_run),
        "foreign_cpu_cores_median": median([m["foreign_cpu_cores"]["median"] for m in per_run
                                            if m["foreign_cpu_cores"]["median"] is not None]),
        "foreign_cpu_cores_max": max((m["foreign_cpu_cores"]["max"] for m in per_run
                                      if m["foreign_cpu_cores"]["max"] is not None), default=None),
        "step_s": {"median": step_med, "min": min(m["step_s"]["min"] for m in per_run),
                   "max": max(m["step_s"]["max"] for m in per_run)},
        "tokens_per_step": per_run[0]["tokens_per_step"],
        "measured_steps_per_repeat": per_run[0]["measured_steps"],
        "warmup_steps": per_run[0]["warmup_steps"],
        "warmup_s": median([m["warmup_s"] for m in per_run]),
        "warmup_overhead_s": median([m["warmup_overhead_s"] for m in per_run]),
        **{k: median([r[k] for r in ok if r.get(k) is not None]) for k in PER_RUN_KEYS},
        "trainable_params": first["trainable_params"], "total_params": first["total_params"],
        "model_flops_per_step": flops["total"], "model_flops_terms": flops["terms"],
        "lm_head_positions": flops["lm_head_positions"],
        "achieved_tflops": tflops, "compute_dtype": dtype,
        "mfu": tflops / peaks[dtype] if peaks.get(dtype) else None,  # against the matmul peak of its own dtype
        "mfu_vs_measured_bf16_mm": tflops / peaks["bf16"] if peaks.get("bf16") else None,
        "loss_first_last": [first["loss"][0], first["loss"][-1]],
        "torch_threads": first.get("torch_threads"),
        "per_repeat": [{"tokens_per_s": m["tokens_per_s"], "step_s_median": m["step_s"]["median"],
                        "peak_rss_mib": r["peak_rss_mib"], "all_step_s": r["step_s"],
                        "foreign_cpu_cores": r.get("foreign_cpu_cores"), "idle_wait": r.get("idle_wait"),
                        "load_average_before": r["load_average_before"],
                        "discarded_attempts": r.get("discarded_attempts")} for m, r in zip(per_run, ok, strict=True)],
    })
    for key in ("trainable_dtypes", "tunelab_reported_peak_rss_mib", "train_call_s"):
        if key in first:
            entry[key] = first[key]
    return entry


def _best(configs: dict[str, Any], names: tuple[str, ...]) -> str | None:
    done = [n for n in names if configs.get(n, {}).get("status") == "ok"]
    return max(done, key=lambda n: configs[n]["tokens_per_s"]) if done else None


def _compare(configs: dict[str, Any], mine: str, peers: tuple[str, ...], memory_vs: str | None) -> dict[str, Any]:
    best = _best(configs, peers)
    if configs.get(mine, {}).get("status") != "ok" or best is None:
        return {"available": False}
    a, b = configs[mine], configs[best]
    out = {"vs": best, "tokens_per_s_ratio": ratio(a["tokens_per_s"], b["tokens_per_s"]),
           "tokens_per_s_ratio_clean_steps": ratio(a["tokens_per_s_clean_steps"], b["tokens_per_s_clean_steps"]),
           "peak_rss_ratio": ratio(a["peak_rss_mib"], b["peak_rss_mib"]),
           "peak_rss_train_ratio": ratio(a["peak_rss_train_mib"], b["peak_rss_train_mib"])}
    if memory_vs and configs.get(memory_vs, {}).get("status") == "ok":
        out[f"peak_rss_ratio_vs_{memory_vs}"] = ratio(a["peak_rss_mib"], configs[memory_vs]["peak_rss_mib"])
        out[f"peak_rss_train_ratio_vs_{memory_vs}"] = ratio(a["peak_rss_train_mib"],
                                                            configs[memory_vs]["peak_rss_train_mib"])
    return out


def ratios(configs: dict[str, Any]) -> dict[str, Any]:
    # LoRA's peers: peft in a plain loop and under trl's SFTTrainer (the fastest of those that ran)
    peft, plain = ("peft-lora-fp32", "peft-lora-bf16", "trl-lora-fp32", "trl-lora-bf16"), \
        ("plain-full-fp32", "plain-full-bf16autocast")
    out: dict[str, Any] = {}
    peers = {"prompt": ("peft-prompt-fp32", "peft-prompt-bf16"), "prefix": ("peft-prefix-fp32", "peft-prefix-bf16"),
             "series": ("adapters-series-fp32", "adapters-series-bf16"),
             "parallel": ("adapters-parallel-fp32", "adapters-parallel-bf16")}
    for method, names in peers.items():
        out[f"tunelab-{method} vs best {names[0].rsplit('-', 1)[0]}"] = _compare(configs, f"tunelab-{method}",
                                                                                 names, None)
    for suffix in ("", "-compile", "-ckpt"):
        out[f"tunelab-lora{suffix} vs best peft-lora"] = _compare(configs, f"tunelab-lora{suffix}", peft,
                                                                  "peft-lora-fp32")
        out[f"tunelab-full{suffix} vs best plain-full"] = _compare(configs, f"tunelab-full{suffix}", plain, None)
    # the peers given the allocator setting that tunelab's loop makes by default (what is left of the lead)
    out["tunelab-lora vs peft-lora-bf16-keepmem"] = _compare(configs, "tunelab-lora", ("peft-lora-bf16-keepmem",),
                                                             None)
    out["tunelab-full vs plain-full-bf16autocast-keepmem"] = _compare(configs, "tunelab-full",
                                                                      ("plain-full-bf16autocast-keepmem",), None)
    for key, value in out.items():
        if value.get("available") is not False:
            value["target_met"] = target_met(key, value)
    return {k: v for k, v in out.items() if v.get("available") is not False or not ("compile" in k or "ckpt" in k)}


def target_met(key: str, value: dict[str, Any]) -> dict[str, bool | None]:
    def at_least(x: float | None, bound: float) -> bool | None:
        return None if x is None else x >= bound

    if key.split(" ")[0] in ("tunelab-prompt", "tunelab-prefix", "tunelab-series", "tunelab-parallel"):
        return {"tokens_per_s >= 2x": at_least(value["tokens_per_s_ratio"], TARGETS["pet_tokens_per_s_vs_peer"])}
    if "lora" in key:
        rss = value["peak_rss_ratio"]
        return {"tokens_per_s >= 2x": at_least(value["tokens_per_s_ratio"], TARGETS["lora_tokens_per_s_vs_peft"]),
                "peak_rss <= 0.6x": None if rss is None else rss <= TARGETS["lora_peak_rss_vs_peft_max"]}
    return {"tokens_per_s >= 1.5x": at_least(value["tokens_per_s_ratio"], TARGETS["full_tokens_per_s_vs_plain"])}


def select(only: str | None) -> list[str]:
    if not only:  # the checkpointing variants only where named (bench/long_sequences.py runs them)
        return [n for n in CONFIGS if not CONFIGS[n].checkpointing]
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    return [n for n in CONFIGS if n in names]


def child_env(args: argparse.Namespace, name: str, workdir: Path, rep: int, attempt: int) -> dict[str, str]:
    """Compile variants get an empty TorchInductor cache of their own unless --warm-compile-cache; peer loops
    marked keep_freed_memory get glibc's trim and mmap thresholds of tunelab.train.memory.keep_freed_memory
    through glibc's environment variables."""
    env = dict(KEEP_FREED_MEMORY_ENV) if CONFIGS[name].keep_freed_memory else {}
    if CONFIGS[name].compile and not args.warm_compile_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(workdir / f"inductor-cache-{name}-{rep}-{attempt}")
    return env


def run_config(args: argparse.Namespace, name: str, workdir: Path, rep: int) -> dict[str, Any]:
    """One run of a configuration; rerun (up to --retry-noisy times) when other processes disturbed more than
    MAX_NOISY_SHARE of its measured steps (one busy foreign core slows a 2-thread step several times over).

    The attempt with the fewest disturbed steps is kept; the others are summarised under ``discarded_attempts``.
    """
    warmup = args.warmup_compile if CONFIGS[name].compile else args.warmup
    attempts: list[dict[str, Any]] = []
    for attempt in range(1 + args.retry_noisy):
        idle = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
        log(f"repeat {rep + 1}/{args.repeats}: {name} ({args.steps} steps; attempt {attempt + 1}; "
            f"idle check {idle})")
        res = run_child(name, workdir, args.steps, args.timeout, child_env(args, name, workdir, rep, attempt))
        res["idle_wait"] = idle
        attempts.append(res)
        if res["status"] != "ok":
            log(f"  {name} FAILED (rc {res['returncode']})")
            break
        share = noise(res, warmup)
        log(f"  {name}: steps {', '.join(f'{t:.2f}' for t in res['step_s'])} s; peak RSS "
            f"{res['peak_rss_mib']:.0f} MiB; measured steps disturbed by other processes: "
            f"{'?' if share is None else f'{share:.0%}'}")
        if share is None or share <= MAX_NOISY_SHARE:
            break
    best = min(attempts, key=lambda r: noise(r, warmup) if noise(r, warmup) is not None else float("inf"))
    best["discarded_attempts"] = [{"step_s": r.get("step_s"), "foreign_cpu_cores": r.get("foreign_cpu_cores"),
                                   "disturbed_share": noise(r, warmup), "status": r["status"]}
                                  for r in attempts if r is not best]
    return best


def has_bf16_units() -> bool:
    return bool(set(cpu_info().get("flags") or []) & {"amx_bf16", "avx512_bf16"})


def run_all(args: argparse.Namespace, names: list[str], workdir: Path) -> dict[str, Any]:
    log(f"preparing data and model description in {workdir}")
    prep = run_child("prepare", workdir, args.steps, args.timeout)
    if prep["status"] != "ok":
        raise SystemExit(f"data preparation failed: {prep}")
    log("timing torch.mm at the model's shapes")
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    mm = [run_child("matmul", workdir, args.steps, args.timeout)]
    skipped: dict[str, str] = {}
    if not prep["compile_available"]:
        skipped = {n: "TrainSection has no 'compile' field in this tunelab" for n in names if CONFIGS[n].compile}
    if not (ADAPTERS_PYTHON and Path(ADAPTERS_PYTHON).exists()):
        skipped.update({n: "set TUNELAB_ADAPTERS_PYTHON to a Python with adapters 1.x + transformers 4.x (see "
                           "bench/README.md)" for n in names if CONFIGS[n].kind == "adapters"})
    if args.skip_emulated_bf16 and not has_bf16_units():
        m = mm[0] if mm[0].get("status") == "ok" else {}
        measured = (f"; matmul peak here bf16 {m['peak_bf16_tflops']:.3f} vs fp32 {m['peak_fp32_tflops']:.3f} "
                    "TFLOP/s" if m else "")
        skipped.update({n: "bf16 is emulated on this CPU (no AMX or AVX512-BF16 units" + measured + "): a peer in "
                           "bf16 runs several times slower than in fp32, and the targets on such a machine are "
                           "against the peers' fp32 configurations (--skip-emulated-bf16)"
                        for n in names if CONFIGS[n].kind != "tunelab" and compute_dtype(CONFIGS[n], prep) == "bf16"})
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names if n not in skipped}
    for rep in range(args.repeats):
        for name in runs:
            runs[name].append(run_config(args, name, workdir, rep))
    log("timing torch.mm again (the machine is noisy)")
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    mm.append(run_child("matmul", workdir, args.steps, args.timeout))
    return {"prep": prep, "mm": mm, "runs": runs, "skipped": skipped}


def report(args: argparse.Namespace, raw: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    prep, mm, shapes = raw["prep"], [m for m in raw["mm"] if m["status"] == "ok"], raw["prep"]["model"]
    peak = max((m["peak_bf16_tflops"] for m in mm), default=0.0)
    peaks = {d: max((m[f"peak_{d}_tflops"] for m in mm), default=0.0) for d in ("bf16", "fp32")}
    configs: dict[str, Any] = {}
    for name, runs in raw["runs"].items():
        warmup = args.warmup_compile if CONFIGS[name].compile else args.warmup
        configs[name] = combine(name, runs, shapes, peaks, compute_dtype(CONFIGS[name], prep), warmup)
    for name, why in raw["skipped"].items():
        configs[name] = {"description": CONFIGS[name].description, "status": "skipped", "note": why}
    configs = {n: configs[n] for n in CONFIGS if n in configs}
    return {
        "benchmark": "train_throughput",
        "settings": {"model": MODEL, "batch": BATCH, "seq_len": SEQ_LEN, "tokens_per_step": BATCH * SEQ_LEN,
                     "prompt_tokens_per_row": PROMPT_LEN, "target_positions_per_row": RESPONSE_LEN,
                     "steps": args.steps, "warmup_steps_excluded": args.warmup,
                     "warmup_steps_excluded_compile": args.warmup_compile, "repeats": args.repeats,
                     "method_options": METHOD_OPTIONS, "lr": LR, "data": prep["data"], "wait_idle_s": args.wait_idle,
                     "retry_noisy": args.retry_noisy,
                     "compile_cache": "user's TorchInductor cache" if args.warm_compile_cache
                     else "empty cache per compile run (cold compilation)"},
        "environment": {**env, "torch_threads": prep["torch_threads"],
                        "torch_cpu_capability": prep["torch_cpu_capability"],
                        "model_dtype_auto": prep["model_dtype_auto"],
                        "compile_option_available": prep["compile_available"]},
        "matmul": {"peak_bf16_tflops": peak, "peak_fp32_tflops": peaks["fp32"], "runs": [{k: v for k, v in m.items() if k != "status"} for m in mm],
                   "note": "torch.mm(x, W.T), best of 5 timings per shape; the peak is the max over shapes and "
                           "both runs (start and end of the benchmark)"},
        "flops_accounting": {
            "model": shapes,
            "rule": "decoder linears: 6*N*T full, 4*N*T frozen (forward 2, input-grad 2, weight-grad 2); lm_head "
                    "(tied embedding) with the same factor on the positions where logits are computed: tunelab "
                    "the target positions only, transformers/peft all positions; LoRA adapters 6*N_lora*T; "
                    "attention 12*L*d*S per token (whole SxS square, PaLM convention). Element-wise ops, norms, "
                    "softmax and the optimizer are not counted.",
            "mfu": "achieved_tflops = model_flops_per_step / median step_s; mfu = achieved_tflops / the measured "
                   "matmul peak of the configuration's compute_dtype (bf16 or fp32); mfu_vs_measured_bf16_mm = "
                   "achieved_tflops / matmul.peak_bf16_tflops (kept for the earlier results; misleading on a "
                   "machine without bf16 units, where the bf16 peak is emulated)",
        },
        "configs": configs,
        "ratios": ratios(configs),
        "targets": {"tunelab-lora tokens/s vs peft-lora": ">= 2x", "tunelab-lora peak RSS vs peft-lora": "<= 0.6x",
                    "tunelab-full tokens/s vs plain loop": ">= 1.5x",
                    "tunelab prompt/prefix tokens/s vs peft": ">= 2x",
                    "tunelab series/parallel tokens/s vs AdapterHub adapters": ">= 2x"},
        "notes": [
            "peak_rss_mib: ru_maxrss of the configuration's own child process (the parent imports no torch, "
            "so nothing is inherited across exec); peak_rss_train_mib: VmHWM right after the last optimizer "
            "step, i.e. before tunelab writes its run directory (the full-tuning save adds a copy of the weights)",
            "tokens_per_s: median over measured steps of tokens/step_s, then the median across repeats; "
            "tunelab step_s is read from metrics.jsonl and covers its whole step (forward, backward, clipping, "
            "AdamW, scheduler); the peer loops time forward, backward, AdamW step and zero_grad",
            "the machine is shared: before each configuration the parent waits (up to --wait-idle s) until other "
            "processes use < 0.3 cores; foreign_cpu_cores is the number of cores other processes used during each "
            "step (machine-wide busy time from /proc/stat minus the child's own CPU time); "
            f"tokens_per_s_clean_steps is the median over the measured steps with foreign load < "
            f"{CLEAN_FOREIGN_CORES} cores; a configuration with more than {MAX_NOISY_SHARE:.0%} of its measured "
            "steps above that is rerun (up to --retry-noisy times) and the quietest attempt kept (see "
            "per_repeat[].discarded_attempts); ratios also give tokens_per_s_ratio_clean_steps",
            "the matmul reference and FLOP counts are in flops_accounting; the parent's torch.mm timing runs in a "
            "child too, so that the parent never imports torch",
        ],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, list(CONFIGS), "train-throughput", steps=12, warmup=2, wait_idle=120)
    p.add_argument("--shape", default=os.environ.get("TUNELAB_BENCH_SHAPE", "8x128"),
                   help="rows x tokens per step of the shared workload (default 8x128; half of each row is prompt)")
    p.add_argument("--repeats", type=int, default=1, help="run the whole sequence R times, interleaved")
    p.add_argument("--warmup-compile", type=int, default=3,
                   help="steps excluded for the compile variants (they include compilation; default 3)")
    p.add_argument("--retry-noisy", type=int, default=2,
                   help=f"rerun a configuration up to this many times when other processes used >= "
                        f"{CLEAN_FOREIGN_CORES} cores during more than {100 * MAX_NOISY_SHARE:.0f}%% of its measured steps "
                        "(default 2)")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="let compile variants use the user's TorchInductor cache (default: an empty cache per "
                        "run, so the reported compile time is that of a first compilation)")
    p.add_argument("--skip-emulated-bf16", action="store_true",
                   help="on a CPU without bf16 units (no AMX / AVX512-BF16), leave out the peers' bf16 "
                        "configurations (recorded as skipped, with the measured matmul peaks): there bf16 is "
                        "emulated, each such step takes minutes, and the targets are against fp32 (make bench "
                        "passes this)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(args.worker, args.workdir, args.steps)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    names = select(args.only)
    env = environment(REPO)
    env["load_average_before"] = load_average()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        raw = run_all(args, names, Path(tmp))
    env["load_average_after"] = load_average()
    env["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    write_result("train-throughput", rounded(report(args, raw, env)), args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
