"""Training throughput and peak memory of tunelab LoReFT against pyreft 0.1.0, on the embedded model.

    python bench/reft_throughput.py [--steps N] [--only NAME,NAME] [--out results.json] [--warmup W]

Settings (issue 5): LoReFT r=4 on all 30 layers, positions f7+l7 (the first 7 and last 7 of the 64 prompt tokens of
each row), tied weights; batch 8 x 128 tokens (the data of bench/train_throughput.py: 64 prompt tokens with label
-100, then 64 response tokens). Every configuration runs in a fresh child process (``--worker NAME``) so that its
peak RSS is its own; the parent imports only the standard library. The pyreft loop is what pyreft's
``ReftTrainerForCausalLM.compute_loss`` does: ``reft_model(base, unit_locations=..., labels=...)`` and the loss of the
intervened outputs. Progress goes to stderr; the JSON result to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness as h

REPO = Path(__file__).resolve().parent.parent
REFT = {"r": 4, "layers": "all", "positions": "f7+l7", "tied": True}
FIRST, LAST = 7, 7
LR = 2e-3
TARGET = 2.0  # tunelab LoReFT tokens/s >= 2x pyreft's
CONFIGS: dict[str, str] = {
    "tunelab-loreft": "tunelab loop, LoReFT r=4 all layers f7+l7 tied, dtype auto (bf16 frozen base, fp32 "
                      "interventions, bf16 autocast)",
    "pyreft-loreft-fp32": "pyreft 0.1.0 LoreftIntervention (fp32) on the fp32 model, same settings, plain loop",
    "pyreft-loreft-bf16autocast": "pyreft 0.1.0 as above, forward under bf16 autocast",
}


# ============================================================================================================
# Workers (child processes; these import torch)
# ============================================================================================================


def worker_tunelab(workdir: Path, steps: int) -> dict[str, Any]:
    """tunelab's loop on the shared data (harness.train_tunelab)."""
    return h.train_tunelab(workdir, "loreft", {"name": "loreft", **REFT}, steps=steps, lr=LR)


def pyreft_model(model: Any) -> Any:
    """pyreft's ReftModel with one LoReFT intervention (r=4, fp32) on every layer's block output."""
    import pyreft
    import torch

    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    reps = [{"layer": i, "component": "block_output", "low_rank_dimension": REFT["r"],
             "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=REFT["r"],
                                                       dtype=torch.float32)} for i in range(layers)]
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))
    reft_model.set_device("cpu")
    return reft_model


def locations(layers: int) -> list[list[list[int]]]:
    """pyreft's unit_locations for f7+l7 tied over a 64-token prompt: per intervention, per row, the positions."""
    row = list(range(FIRST)) + list(range(h.PROMPT_LEN - LAST, h.PROMPT_LEN))
    return [[row] * h.BATCH] * layers


def worker_pyreft(workdir: Path, steps: int, autocast: bool) -> dict[str, Any]:
    import torch

    from tunelab.models import load_model

    probes = h.Probes()
    torch.manual_seed(0)
    model, _ = load_model(h.MODEL, "fp32")
    reft_model = pyreft_model(model)
    reft_model.model.train()
    params = [p for p in reft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    rows = json.loads((workdir / "tokens.json").read_text())
    batches = [rows[i: i + h.BATCH] for i in range(0, len(rows), h.BATCH)]
    where = {"sources->base": (None, locations(model.config.num_hidden_layers))}
    step_s, losses = [], []
    for step in range(steps):
        batch = batches[step % len(batches)]
        ids, labels = torch.tensor([r[0] for r in batch]), torch.tensor([r[1] for r in batch])
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            _, out = reft_model({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, unit_locations=where,
                                labels=labels, subspaces=None)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        step_s.append(time.perf_counter() - t0)
        losses.append(out.loss.detach().item())
        h.log(f"  step {step + 1}/{steps}: {step_s[-1]:.3f} s, loss {losses[-1]:.4f}")
    return {"step_s": step_s, "tokens": [h.BATCH * h.SEQ_LEN] * steps, "loss": losses,
            "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters()), **h.memory_report(probes)}


def run_worker(name: str, workdir: Path, steps: int) -> dict[str, Any]:
    if name == "prepare":
        return h.worker_prepare(workdir, steps)
    if name == "tunelab-loreft":
        out = worker_tunelab(workdir, steps)
    else:
        out = worker_pyreft(workdir, steps, autocast=name.endswith("bf16autocast"))
    import torch

    out["torch_threads"] = torch.get_num_threads()
    return out


# ============================================================================================================
# Parent
# ============================================================================================================


def run_child(name: str, workdir: Path, steps: int, timeout: float) -> dict[str, Any]:
    """``--worker name`` in a fresh interpreter; stderr passed through, the result line parsed."""
    return h.run_child_process(__file__, ["--worker", name, "--workdir", str(workdir), "--steps", str(steps)], timeout=timeout)


def summarise(name: str, raw: dict[str, Any], warmup: int) -> dict[str, Any]:
    if raw["status"] != "ok":
        return {"description": CONFIGS[name], **raw}
    keep = ("peak_rss_mib", "peak_rss_train_mib", "rss_before_training_mib", "trainable_params", "total_params",
            "torch_threads", "process_wall_s")
    return {"description": CONFIGS[name], "status": "ok", **h.measure(raw, warmup),
            **{k: raw.get(k) for k in keep}, "loss_first_last": [raw["loss"][0], raw["loss"][-1]],
            "all_step_s": raw["step_s"]}


def comparison(configs: dict[str, Any]) -> dict[str, Any]:
    mine = configs.get("tunelab-loreft", {})
    peers = [n for n in configs if n.startswith("pyreft") and configs[n].get("status") == "ok"]
    if mine.get("status") != "ok" or not peers:
        return {"available": False}
    best = max(peers, key=lambda n: configs[n]["tokens_per_s"])
    speed = h.ratio(mine["tokens_per_s"], configs[best]["tokens_per_s"])
    return {"vs": best, "tokens_per_s_ratio": speed,
            "peak_rss_ratio": h.ratio(mine["peak_rss_mib"], configs[best]["peak_rss_mib"]),
            "target": f"tokens/s >= {TARGET}x", "target_met": None if speed is None else speed >= TARGET}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    h.add_common_args(p, list(CONFIGS), "reft-throughput", steps=12, warmup=2, wait_idle=120)
    return p.parse_args(argv)


def run_all(args: argparse.Namespace, names: list[str], workdir: Path) -> dict[str, Any]:
    prep = run_child("prepare", workdir, args.steps, args.timeout)
    if prep["status"] != "ok":
        raise SystemExit(f"data preparation failed: {prep}")
    configs = {}
    for name in names:
        idle = h.wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
        h.log(f"{name} ({args.steps} steps; idle check {idle})")
        configs[name] = {**summarise(name, run_child(name, workdir, args.steps, args.timeout), args.warmup),
                         "idle_wait": idle}
    return configs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(h.RESULT_PREFIX + json.dumps(run_worker(args.worker, args.workdir, args.steps)), flush=True)
        return 0
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    env = {**h.environment(REPO), "pyreft": h.package_version("pyreft"), "pyvene": h.package_version("pyvene"),
           "load_average_before": h.load_average()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-reft-") as tmp:
        configs = run_all(args, names, Path(tmp))
    env["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    result = h.rounded({
        "benchmark": "reft_throughput",
        "settings": {"model": h.MODEL, "batch": h.BATCH, "seq_len": h.SEQ_LEN, "prompt_tokens_per_row": h.PROMPT_LEN,
                     "reft": REFT, "lr": LR, "steps": args.steps, "warmup_steps_excluded": args.warmup},
        "h.environment": env, "configs": configs, "tunelab vs best pyreft": comparison(configs),
        "median_tokens_per_s": {n: c.get("tokens_per_s") for n, c in configs.items()},
        "notes": ["tokens_per_s: median over measured steps of tokens/step_s; tunelab step_s covers its whole step "
                  "(forward, backward, clipping, AdamW, scheduler), the pyreft loop forward, backward, AdamW, "
                  "zero_grad", "peak_rss_mib: ru_maxrss of the configuration's own child process"],
    })
    h.write_result("reft-throughput", result, args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
