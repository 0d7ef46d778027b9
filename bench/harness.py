"""The benchmark harness every benchmark under bench/ uses: the shared workload, the worker-side timing loop and
memory probes, the matmul peak that MFU is measured against, noise accounting, child processes, the result writer.

A benchmark is a short file of its configurations (what each row trains, against which peer) and the workers that
only it needs (a peer library's loop); everything that decides how a number is measured lives here, once.

Importing this module imports the standard library only (torch is imported inside the worker functions). The parent
process of a benchmark must stay small: on Linux a child started with fork/vfork + exec inherits the parent's
``ru_maxrss`` (the kernel carries the old address space's high-water mark across exec), so a parent that imported
torch would raise every child's reported peak RSS to its own size.

The shared workload: the embedded model, 8 rows x 128 tokens per step, the first 64 tokens of each row a prompt
(label -100) and the last 64 the response (``worker_prepare`` writes it once per benchmark run; every
configuration trains on the same token ids).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"


def _shape(text: str) -> tuple[int, int]:
    """TUNELAB_BENCH_SHAPE "BxL": rows per step and tokens per row of the shared workload (default 8x128)."""
    try:
        b, length = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"TUNELAB_BENCH_SHAPE={text!r}: give rows x tokens, e.g. 8x128 or 2x2048") from None
    if b < 1 or length < 16:
        raise SystemExit(f"TUNELAB_BENCH_SHAPE={text!r}: at least 1 row of 16 tokens")
    return b, length


# the workload's shape; set by the environment so that every child process of a benchmark sees the same one
BATCH, SEQ_LEN = _shape(os.environ.get("TUNELAB_BENCH_SHAPE", "8x128"))
PROMPT_LEN = SEQ_LEN // 2  # the first half of each row is the prompt (label -100)
RESPONSE_LEN = SEQ_LEN - PROMPT_LEN  # response words + EOS
CLEAN_FOREIGN_CORES = 0.25  # a step is "clean" when other processes used fewer cores than this
MAX_NOISY_SHARE = 0.25  # rerun a configuration when more of its measured steps than this were not clean
RESULT_PREFIX = "BENCH_RESULT "  # a worker prints exactly one line starting with this, then its JSON

MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """median, min and max of ``values`` (None when empty)."""
    return {
        "median": median(values),
        "min": min(values) if values else None,
        "max": max(values) if values else None,
    }


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or not den:
        return None
    return num / den


def rounded(obj: Any, digits: int = 4) -> Any:
    """Round floats recursively to ``digits`` significant digits (for readable JSON)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------- memory


def ru_maxrss_mib() -> float:
    """getrusage(RUSAGE_SELF).ru_maxrss in MiB (Linux reports KiB); includes a parent's peak inherited at exec."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM, ...) in MiB; None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------------------------------- CPU load


def cpu_busy_seconds() -> tuple[float, float]:
    """(busy, steal) CPU-seconds of the whole machine since boot, summed over cores, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / hz, steal / hz


def foreign_cpu(start: tuple[float, float, float], end: tuple[float, float, float]) -> float | None:
    """Cores used by *other* processes between two ``(wall, machine busy, own CPU)`` samples."""
    wall = end[0] - start[0]
    if wall <= 0:
        return None
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / wall)


def cpu_sample() -> tuple[float, float, float]:
    """(wall clock, machine busy CPU-seconds, this process's CPU-seconds): see ``foreign_cpu``."""
    return time.perf_counter(), cpu_busy_seconds()[0], time.process_time()


def wait_for_idle(max_wait: float, threshold: float = 0.3, sample_s: float = 2.0) -> dict[str, Any]:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` cores over ``sample_s``."""
    t0 = time.perf_counter()
    while True:
        a = cpu_sample()
        time.sleep(sample_s)
        busy = foreign_cpu(a, cpu_sample()) or 0.0
        waited = time.perf_counter() - t0
        if busy < threshold or waited >= max_wait:
            return {"waited_s": round(waited, 1), "foreign_cpu_cores_at_start": round(busy, 2)}


# --------------------------------------------------------------------------------------------------- environment


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_info() -> dict[str, Any]:
    """CPU model name and the bf16-relevant ISA flags from /proc/cpuinfo."""
    name, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name in ("unknown", "", platform.machine()):
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")
    return {"model_name": name, "logical_cpus": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_state(repo: Path) -> dict[str, Any]:
    """Commit and whether src/ has uncommitted changes (results depend on the working tree)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "src_dirty": bool(git("status", "--porcelain", "--", "src"))}


def environment(repo: Path) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "tunelab": package_version("tunelab"),
        "cpu": cpu_info(),
        "git": git_state(repo),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_CACHE_DIR",
                                           "ONEDNN_MAX_CPU_ISA") if k in os.environ},
    }


# --------------------------------------------------------------------------------------------------- FLOPs


def model_flops(shapes: dict[str, Any], *, full: bool, loss_positions: int, tokens: int,
                lora_params: int = 0) -> dict[str, Any]:
    """Matmul FLOPs of one training step, term by term.

    ``shapes`` comes from the model (see ``describe_model`` in train_throughput.py): ``body_matmul_params`` (the
    linear layers of the decoder blocks), ``lm_head_params``, ``layers``, ``hidden``, ``seq_len``.

    * decoder linears: forward 2·N·T; backward 2·N·T for the input gradient plus 2·N·T for the weight gradient
      when the weights are trained (full: 6·N·T), none when frozen (LoRA: 4·N·T);
    * lm_head (tied to the embedding here): the same factors, on the ``loss_positions`` rows where logits are
      computed — tunelab only on target positions, Hugging Face on every position;
    * LoRA adapters: 6·N_lora·T (their A and B are trained);
    * attention scores and values: 12·L·d·S per token (PaLM's convention: the whole S×S square, not halved for the
      causal mask, forward 4 + backward 8); the softmax, norms and element-wise ops are not counted.
    """
    n_body, n_head = shapes["body_matmul_params"], shapes["lm_head_params"]
    factor = 6 if full else 4
    terms = {
        "decoder_linears": factor * n_body * tokens,
        "lm_head": factor * n_head * loss_positions,
        "lora_adapters": 6 * lora_params * tokens,
        "attention": 12 * shapes["layers"] * shapes["hidden"] * shapes["seq_len"] * tokens,
    }
    return {"total": sum(terms.values()), "terms": terms,
            "lm_head_positions": loss_positions, "weight_grad_factor": factor}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_child_process(script: str | Path, args: Sequence[str], *, timeout: float | None = None,
               python: str | None = None, env: dict[str, str] | None = None, echo: bool = True,
               cwd: Path | None = None) -> dict[str, Any]:
    """Run ``python script *args`` (a benchmark's ``--worker`` child) in a fresh interpreter.

    The child's output is passed through to stderr (``echo``) except its result line (``RESULT_PREFIX`` + JSON),
    which is parsed. Returns ``{"status": "ok", **result, "process_wall_s"}`` or ``{"status": "failed",
    "returncode", "error_tail"}`` (the last 8 lines) when the child fails, times out or prints no result.
    """
    import collections

    cmd = [python or sys.executable, str(Path(script).resolve()), *args]
    tail: collections.deque[str] = collections.deque(maxlen=20)
    result, t0 = None, time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=cwd or Path(script).resolve().parent.parent,
                          env={**os.environ, **(env or {})}) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
                continue
            tail.append(line.rstrip())
            if echo:
                print(f"    {line}", end="", file=sys.stderr, flush=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0 or result is None:
        return {"status": "failed", "returncode": rc, "error_tail": list(tail)[-8:], "process_wall_s": wall}
    return {"status": "ok", **result, "process_wall_s": wall}


# --------------------------------------------------------------------------------------------------- log


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- the workload


def interleaved_runs(script: str | Path, args: Any, names: Sequence[str],
                     run_one: Any) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any], float]:
    """Prepare the shared data in a child (``--worker prepare``), then run every configuration ``args.repeats``
    times, the order rotated each repeat, each after waiting up to ``args.wait_idle`` s for the machine to be
    idle. ``run_one(name, workdir, repeat)`` returns one run's dict. Returns (runs per name, the preparation's
    result, wall seconds)."""
    t0 = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        prep = run_child_process(script, ["--worker", "prepare", "--workdir", tmp, "--steps", str(args.steps)],
                                 timeout=args.timeout)
        if prep["status"] != "ok":
            raise SystemExit(f"data preparation failed: {prep}")
        for repeat in range(args.repeats):
            for name in list(names[repeat % len(names):]) + list(names[:repeat % len(names)]):
                idle = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
                log(f"{name} (repeat {repeat + 1}/{args.repeats}; idle check {idle})")
                res = run_one(name, Path(tmp), repeat)
                res["idle_wait"] = idle
                runs[name].append(res)
    return runs, prep, time.perf_counter() - t0


def worker_prepare(workdir: Path, steps: int) -> dict[str, Any]:
    """Write the shared data (JSONL records for tunelab, token ids for the peer loops); describe the model."""
    import dataclasses

    import torch

    from tunelab.config import TrainSection
    from tunelab.data import tokenize_records
    from tunelab.models import load_model

    model, tokenizer = load_model(MODEL)
    records = build_records(tokenizer, BATCH * steps)
    examples, stats = tokenize_records(records, tokenizer, template="plain", max_length=SEQ_LEN)
    lengths = {len(e.input_ids) for e in examples}
    targets = {sum(t != -100 for t in e.labels[1:]) for e in examples}
    if lengths != {SEQ_LEN} or targets != {RESPONSE_LEN} or stats.n_truncated:
        raise RuntimeError(f"synthetic data is off: lengths {lengths}, targets {targets}, {stats}")
    with open(workdir / "records.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"instruction": r.instruction, "input": "", "output": r.output}) + "\n")
    (workdir / "tokens.json").write_text(json.dumps([[e.input_ids, e.labels] for e in examples]))
    # the safetensors copy of the embedded model, which the adapters venv (transformers 4.x) loads directly
    from tunelab.models.embedded import cache_root

    (workdir / "model_dir.txt").write_text(str(cache_root() / "models" / MODEL))
    return {
        "model": describe_model(model),
        "model_dtype_auto": str(next(model.parameters()).dtype),
        "compile_available": "compile" in {f.name for f in dataclasses.fields(TrainSection)},
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "data": {"examples": len(examples), "tokens_per_row": SEQ_LEN, "prompt_tokens": PROMPT_LEN,
                 "response_tokens_incl_eos": RESPONSE_LEN, "target_positions_per_row": RESPONSE_LEN,
                 "template": "plain"},
    }


def build_records(tokenizer: Any, n: int, seed: int = 0) -> list[Any]:
    """``n`` records of random vocabulary words whose prompt and response are exactly PROMPT_LEN and
    RESPONSE_LEN tokens (response including the EOS tunelab appends), checked with tunelab's own tokenisation."""
    import random

    from tunelab.data import Record, encode_prompts

    pool = single_token_words(tokenizer)
    rng = random.Random(seed)

    def prompt_len(text: str) -> int:
        return len(encode_prompts([Record(text, "", "x")], tokenizer, template="plain")[0])

    def response_len(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1

    return [Record(fit_text(rng, pool, prompt_len, PROMPT_LEN), "", fit_text(rng, pool, response_len, RESPONSE_LEN),
                   line=i + 1) for i in range(n)]


def single_token_words(tokenizer: Any) -> list[str]:
    """Lower-case words that are one token with a leading space ('Ġword' in the byte-level vocabulary)."""
    words = sorted(tok[1:] for tok in tokenizer.get_vocab() if tok.startswith("Ġ") and tok[1:].isascii()
                   and tok[1:].isalpha() and tok[1:].islower() and 3 <= len(tok) - 1 <= 8)
    ids = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    return [w for w, i in zip(words, ids, strict=True) if len(i) == 1]


def fit_text(rng: Any, pool: list[str], count: Any, target: int) -> str:
    """Random words, added or removed one at a time until ``count(text) == target``."""
    words = [rng.choice(pool) for _ in range(target - 2)]
    for _ in range(10 * target):
        n = count(" ".join(words))
        if n == target:
            return " ".join(words)
        if n < target:
            words.append(rng.choice(pool))
        else:
            words.pop()
    raise RuntimeError(f"could not build a text of exactly {target} tokens")


def describe_model(model: Any) -> dict[str, Any]:
    """The shapes that FLOP accounting needs, read from the loaded model."""
    from torch import nn

    body = model.get_decoder()
    linears = [m for m in body.modules() if isinstance(m, nn.Linear)]
    head = model.get_output_embeddings()
    cfg = model.config
    return {
        "name": MODEL,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "intermediate": cfg.intermediate_size,
        "vocab": cfg.vocab_size,
        "seq_len": SEQ_LEN,
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "body_matmul_params": sum(m.weight.numel() for m in linears),
        "lm_head_params": head.weight.numel(),
        "total_params": sum(p.numel() for p in model.parameters()),
        "linear_shapes": sorted({(m.in_features, m.out_features) for m in linears}),
    }


# --------------------------------------------------------------------------------------------------- worker probes


class Probes:
    """Global hooks that need no access to the training loop's internals.

    * at the first module forward: RSS after model load, method set-up and data preparation;
    * after every optimizer step: the peak RSS so far (the training phase, before any final saving), and a CPU
      sample from which the cores used by other processes during that step are estimated (the machine is shared).
    """

    def __init__(self) -> None:
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.rss_before_training: float | None = None
        self.peak_after_steps: list[float] = []
        self.samples: list[tuple[float, float, float]] = []
        self._pre = register_module_forward_pre_hook(self._first_forward)
        self._post = register_optimizer_step_post_hook(self._after_step)

    def _first_forward(self, *_: Any) -> None:
        self.rss_before_training = proc_status_mib("VmRSS")
        self.samples.append(cpu_sample())
        self._pre.remove()

    def _after_step(self, *_: Any) -> None:
        self.samples.append(cpu_sample())
        self.peak_after_steps.append(proc_status_mib("VmHWM") or ru_maxrss_mib())

    def close(self) -> dict[str, Any]:
        self._post.remove()
        foreign = [foreign_cpu(a, b) for a, b in itertools.pairwise(self.samples)]
        return {"rss_before_training_mib": self.rss_before_training,
                "peak_rss_train_mib": self.peak_after_steps[-1] if self.peak_after_steps else None,
                "foreign_cpu_cores": foreign}


def memory_report(probes: Probes) -> dict[str, Any]:
    return {**probes.close(), "peak_rss_mib": ru_maxrss_mib(), "vm_hwm_mib": proc_status_mib("VmHWM")}


def train_tunelab(workdir: Path, label: str, method: dict[str, Any], *, steps: int, lr: float,
                  dtype: str = "auto", train: dict[str, Any] | None = None, quantize: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """tunelab's one training loop on the shared workload (``workdir/records.jsonl``); per-step times and token
    counts from the run's metrics.jsonl (they cover the whole step: forward, backward, clipping, AdamW, schedule),
    memory from the probes."""
    import torch

    from tunelab.config import config_from_dict
    from tunelab.train.loop import train as run_training

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{safe}-", dir=workdir)) / "run"  # fresh per repeat/attempt
    data = {
        "model": {"name": MODEL, "dtype": dtype},
        "method": method,
        "data": {"train": str(workdir / "records.jsonl"), "template": "plain", "max_length": SEQ_LEN,
                 "group_by_length": False},
        "train": {"max_steps": steps, "batch_size": BATCH, "lr": lr, "progress": False, "log_every": 1, "seed": 0,
                  **(train or {})},
        "output_dir": str(run_dir),
    }
    if quantize:
        data["quantize"] = quantize
    cfg = config_from_dict(data)
    probes = Probes()
    t0 = time.perf_counter()
    result = run_training(cfg)
    wall = time.perf_counter() - t0
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "step_s" in r]
    return {
        "step_s": [r["step_s"] for r in rows], "tokens": [r["tokens"] for r in rows],
        "loss": [r["loss"] for r in rows], "lm_head_positions": rows[0]["target_tokens"],
        "trainable_params": result.trainable_params, "total_params": result.total_params,
        "train_call_s": wall, "tunelab_reported_peak_rss_mib": result.peak_rss_mb,
        "torch_threads": torch.get_num_threads(), **memory_report(probes),
    }


# --------------------------------------------------------------------------------------------------- matmul peak (MFU)


MM_SHAPES = [  # (name, rows M, in K, out N, count per forward pass for the FLOP mix)
    ("q_proj,o_proj 576->576", 1024, 576, 576, 60),
    ("k_proj,v_proj 576->192", 1024, 576, 192, 60),
    ("gate_proj,up_proj 576->1536", 1024, 576, 1536, 60),
    ("down_proj 1536->576", 1024, 1536, 576, 30),
    ("lm_head 576->49152 (512 rows)", 512, 576, 49152, 1),
]


def worker_matmul() -> dict[str, Any]:
    """Best achieved TFLOP/s of torch.mm at the model's shapes, bf16 (and fp32 for reference)."""
    import torch

    start = cpu_sample()
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "shapes": {}}
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        flops_mix, seconds_mix, best = 0.0, 0.0, 0.0
        for name, m, k, n, count in MM_SHAPES:
            tflops = time_mm(torch, m, k, n, dtype)
            out["shapes"].setdefault(name, {})[f"{dtype_name}_tflops"] = tflops
            flops = 2 * m * k * n * count
            flops_mix, seconds_mix = flops_mix + flops, seconds_mix + flops / (tflops * 1e12)
            best = max(best, tflops)
            if dtype_name == "bf16":  # for information: F.linear, the call the model makes
                out["shapes"][name]["bf16_F.linear_tflops"] = time_mm(torch, m, k, n, dtype, linear=True)
        out[f"peak_{dtype_name}_tflops"] = best
        out[f"mix_{dtype_name}_tflops"] = flops_mix / seconds_mix / 1e12
    out["foreign_cpu_cores"] = foreign_cpu(start, cpu_sample())
    return out


def time_mm(torch: Any, m: int, k: int, n: int, dtype: Any, trials: int = 5, linear: bool = False) -> float:
    """TFLOP/s of the fastest of ``trials`` timings of torch.mm(x, W.T) (W stored [out, in], as nn.Linear),
    or of F.linear(x, W) with ``linear``."""
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    wt = w.t()

    def call() -> Any:
        return torch.nn.functional.linear(x, w) if linear else torch.mm(x, wt)

    for _ in range(3):
        call()
    t0 = time.perf_counter()
    call()
    reps = max(1, int(0.05 / max(time.perf_counter() - t0, 1e-6)))
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * m * k * n / best / 1e12


# --------------------------------------------------------------------------------------------------- step statistics, noise


def measure(raw: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Step statistics from one child's per-step times, warm-up steps excluded."""
    times, tokens = raw["step_s"], raw["tokens"]
    warmup = min(warmup, max(len(times) - 1, 0))
    measured = times[warmup:]
    med = median(measured)
    rates = [n / t for n, t in zip(tokens[warmup:], measured, strict=True)]
    foreign = (raw.get("foreign_cpu_cores") or [])[warmup:len(times)]
    clean = [r for r, f in zip(rates, foreign, strict=False) if f is not None and f < CLEAN_FOREIGN_CORES]
    return {
        "tokens_per_step": round(median(tokens[warmup:])),
        "tokens_per_s": median(rates),
        "tokens_per_s_clean_steps": median(clean),
        "clean_steps": len(clean),
        "foreign_cpu_cores": spread([f for f in foreign if f is not None]),
        "step_s": spread(measured),
        "measured_steps": len(measured),
        "warmup_steps": warmup,
        "warmup_s": sum(times[:warmup]),
        "warmup_overhead_s": sum(times[:warmup]) - warmup * med if med is not None else None,
    }


def noise(res: dict[str, Any], warmup: int) -> float | None:
    """Share of a run's measured steps during which other processes used >= CLEAN_FOREIGN_CORES cores."""
    if res["status"] != "ok":
        return None
    foreign = [f for f in (res.get("foreign_cpu_cores") or [])[warmup:] if f is not None]
    return sum(f >= CLEAN_FOREIGN_CORES for f in foreign) / len(foreign) if foreign else None


# --------------------------------------------------------------------------------------------------- options


def add_common_args(p: Any, configs: Sequence[str], benchmark: str, *, steps: int = 12, warmup: int = 2,
                    wait_idle: float = 120) -> None:
    """The options every benchmark takes: steps, warm-up, a subset of its configurations, the output file, the
    idle wait, the child timeout, and the hidden ones of a worker child."""
    import argparse

    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps per configuration (default {steps})")
    p.add_argument("--warmup", type=int, default=warmup,
                   help=f"steps left out of the median (default {warmup})")
    p.add_argument("--only", help="comma-separated subset of: " + ", ".join(configs).replace("%", "%%"))
    p.add_argument("--out", type=Path, help=f"write the JSON result here (default: bench/results/{benchmark}-DATE-"
                                            "COMMIT.json)")
    p.add_argument("--wait-idle", type=float, default=wait_idle,
                   help=f"before each configuration wait up to this many seconds until other processes use < 0.3 "
                        f"cores (0: do not wait; default {wait_idle:g})")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per child process")
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)


# --------------------------------------------------------------------------------------------------- results


def result_path(benchmark: str, env: dict[str, Any]) -> Path:
    """``bench/results/BENCHMARK-DATE-COMMIT.json`` (``-dirty`` when src/ had uncommitted changes; a second run on
    the same day and commit gets ``-2``, ``-3``, …)."""
    git = env.get("git") or {}
    stem = f"{benchmark}-{env.get('date') or time.strftime('%Y-%m-%d')}-{git.get('commit') or 'nocommit'}"
    stem += "-dirty" if git.get("src_dirty") else ""
    path, n = RESULTS_DIR / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = RESULTS_DIR / f"{stem}-{n}.json"
    return path


def write_result(benchmark: str, result: dict[str, Any], out: Path | None = None) -> Path:
    """Print the result JSON on stdout and write it (atomically) to ``out`` or ``result_path``; the JSON carries the
    benchmark's name, the date, the commit and the machine (``environment``)."""
    env = result.setdefault("environment", {})
    env.setdefault("date", time.strftime("%Y-%m-%d"))
    env.setdefault("git", git_state(REPO))
    result.setdefault("benchmark", benchmark)
    text = json.dumps(result, indent=1)
    print(text)
    path = out or result_path(benchmark, env)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    log(f"wrote {path}")
    return path
