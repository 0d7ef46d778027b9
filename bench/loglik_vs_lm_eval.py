"""Log-likelihood multiple-choice scoring against lm-evaluation-harness on the same ARC-Easy items.

    python bench/loglik_vs_lm_eval.py [--data-dir ../shared/data/llm-adapters] [--items 500] [--repeats 3]
                                      [--batch-size 16] [--dtype fp32] [--overheads 0,16,256]

Both score the same (context, option) strings with the same model object in the same process: the first N
ARC-Easy test items as tunelab builds them ("Question: <stem>\\nAnswer:" and " <option text>",
``tunelab.eval.choices``). lm-eval runs them as a local-JSON ``multiple_choice`` task (written to a temporary
folder: ``dataset_path: json``, ``target_delimiter: ""``, so its continuations are tunelab's option strings) through
``simple_evaluate`` with its HF backend (``HFLM`` around the loaded model). Rows, interleaved per repeat:

* ``lm-eval``: the whole ``simple_evaluate`` call, and its ``loglikelihood`` call alone;
* ``tunelab``: ``score_multiple_choice`` (each context run once, its KV cache shared by its options);
* ``tunelab-unshared``: the same with ``share_context=False`` (every pair one sequence: what sharing saves);
* ``tunelab@overhead=N`` (``--overheads N,...``): the shared path with another value of the call cost that splits
  the option passes (``loglik.CALL_OVERHEAD_POSITIONS``), to calibrate it.

Each tunelab row also records its model calls and the padded positions they ran.

Reported: seconds (median over repeats), items/s, the speed ratios, acc and acc_norm of each, and the per-item
agreement of the predictions. lm-eval's acc_norm divides by the option's characters, tunelab's by its UTF-8 bytes
with the leading space (``tunelab.eval.loglik``), so acc_norm may differ on near-ties; acc must agree.
Writes bench/results/loglik-vs-lm-eval-DATE-COMMIT.json (and stdout). Needs ``pip install lm-eval``
(the ``bench`` extra) and the data directory; exits 2 with a message when either is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, environment, log, write_result

TASK = "tunelab_arc_easy_bench"


def _items(data_dir: Path, n: int) -> list:
    from tunelab.eval.choices import mc_item_from_record, style_for_dataset

    path = data_dir / "ARC-Easy" / "test.json"
    records = json.loads(path.read_text())[:n]
    return [mc_item_from_record(r["instruction"], r["answer"], style_for_dataset("ARC-Easy")) for r in records]


def _write_task(folder: Path, items: list) -> None:
    with (folder / "items.jsonl").open("w") as f:
        for it in items:
            f.write(json.dumps({"context": it.context, "choices": it.options, "gold": it.gold}) + "\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'items.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )


def _run_lm_eval(model, tok, folder: Path, batch_size: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    inner = {"seconds": 0.0}
    real = lm.loglikelihood

    def timed(requests, *a, **kw):
        t0 = time.perf_counter()
        try:
            return real(requests, *a, **kw)
        finally:
            inner["seconds"] += time.perf_counter() - t0

    lm.loglikelihood = timed
    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(folder)),
                          log_samples=True, num_fewshot=0, bootstrap_iters=0)
    seconds = time.perf_counter() - t0
    metrics = out["results"][TASK]
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    preds = [max(range(len(s["resps"])), key=lambda k: (float(s["resps"][k][0][0]), -k)) for s in samples]
    return {"seconds": seconds, "loglikelihood_seconds": inner["seconds"], "acc": metrics["acc,none"],
            "acc_norm": metrics["acc_norm,none"], "preds": preds}


def _run_tunelab(model, tok, items: list, batch_size: int, share: bool, overhead: int | None = None) -> dict:
    """One timed scoring; also counts the model calls and the (padded) positions they ran."""
    from tunelab.eval import loglik

    real_body, real_overhead = loglik._run_body, loglik.CALL_OVERHEAD_POSITIONS
    counts = {"calls": 0, "positions": 0}

    def counted(model, ids, *a, **kw):
        counts["calls"] += 1
        counts["positions"] += ids.numel()
        return real_body(model, ids, *a, **kw)

    loglik._run_body = counted
    if overhead is not None:
        loglik.CALL_OVERHEAD_POSITIONS = overhead
    try:
        t0 = time.perf_counter()
        results = loglik.score_multiple_choice(model, tok, items, batch_size=batch_size, share_context=share)
        seconds = time.perf_counter() - t0
    finally:
        loglik._run_body, loglik.CALL_OVERHEAD_POSITIONS = real_body, real_overhead
    s = loglik.summarize(results)
    return {"seconds": seconds, "acc": s["accuracy"], "acc_norm": s["accuracy_norm"],
            "preds": [r.pred for r in results], **counts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "llm-adapters")
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--overheads", default="",
                    help="comma-separated values of loglik.CALL_OVERHEAD_POSITIONS to time as extra shared rows "
                         "(tunelab@overhead=N): how the option passes' split was calibrated")
    ap.add_argument("--out", type=Path, help="default: bench/results/loglik-vs-lm-eval-DATE-COMMIT.json")
    args = ap.parse_args()
    if not (args.data_dir / "ARC-Easy" / "test.json").is_file():
        print(f"no ARC-Easy/test.json under {args.data_dir}: pass --data-dir", file=sys.stderr)
        return 2
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("lm-eval is not installed: pip install -e '.[bench]' (or pip install lm-eval)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from tunelab.eval.loglik import CALL_OVERHEAD_POSITIONS
    from tunelab.models import load_model

    model, tok = load_model(args.model, args.dtype)
    items = _items(args.data_dir, args.items)
    runs: dict[str, list[dict]] = {"lm-eval": [], "tunelab": [], "tunelab-unshared": []}
    overheads = {f"tunelab@overhead={v}": int(v) for v in args.overheads.split(",") if v.strip()}
    runs.update({name: [] for name in overheads})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write_task(folder, items)
        _run_tunelab(model, tok, items[:8], args.batch_size, True)  # warm-up (first-call allocations)
        for r in range(args.repeats):
            for name in runs:
                log(f"repeat {r + 1}/{args.repeats}: {name}")
                if name == "lm-eval":
                    runs[name].append(_run_lm_eval(model, tok, folder, args.batch_size))
                else:
                    runs[name].append(_run_tunelab(model, tok, items, args.batch_size, name != "tunelab-unshared",
                                                   overheads.get(name)))
    rows = {}
    for name, reps in runs.items():
        sec = statistics.median(x["seconds"] for x in reps)
        row = {"seconds_median": round(sec, 2), "seconds": [round(x["seconds"], 2) for x in reps],
               "items_per_s": round(len(items) / sec, 1), "acc": reps[0]["acc"], "acc_norm": reps[0]["acc_norm"],
               "same_predictions_every_repeat": all(x["preds"] == reps[0]["preds"] for x in reps)}
        if name != "lm-eval":
            row["model_calls"], row["model_positions_padded"] = reps[0]["calls"], reps[0]["positions"]
        if name == "lm-eval":
            row["loglikelihood_seconds_median"] = round(statistics.median(x["loglikelihood_seconds"] for x in reps), 2)
        rows[name] = row
    lm_preds, tl_preds = runs["lm-eval"][0]["preds"], runs["tunelab"][0]["preds"]
    ours = rows["tunelab"]["seconds_median"]
    report = {
        "benchmark": "loglik_vs_lm_eval", "model": args.model, "dtype": args.dtype, "items": len(items),
        "options": sum(len(it.options) for it in items), "batch_size": args.batch_size, "repeats": args.repeats,
        "call_overhead_positions": CALL_OVERHEAD_POSITIONS,
        "rows": rows,
        "speedup_vs_lm_eval": round(rows["lm-eval"]["seconds_median"] / ours, 2),
        "speedup_vs_lm_eval_loglikelihood_only": round(rows["lm-eval"]["loglikelihood_seconds_median"] / ours, 2),
        "speedup_from_sharing": round(rows["tunelab-unshared"]["seconds_median"] / ours, 2),
        "acc_difference_points": round(100 * (rows["tunelab"]["acc"] - rows["lm-eval"]["acc"]), 2),
        "acc_norm_difference_points": round(100 * (rows["tunelab"]["acc_norm"] - rows["lm-eval"]["acc_norm"]), 2),
        "same_acc_prediction": f"{sum(a == b for a, b in zip(lm_preds, tl_preds, strict=True))}/{len(items)}",
        "targets": {"acc_within_0.5_points": abs(rows["tunelab"]["acc"] - rows["lm-eval"]["acc"]) <= 0.005,
                    "at_least_3x_faster": rows["lm-eval"]["seconds_median"] / ours >= 3.0},
        "environment": {**environment(REPO), "torch_threads": torch.get_num_threads(),
                        "lm_eval": lm_eval_version()},
    }
    write_result("loglik-vs-lm-eval", report, args.out)
    return 0


def lm_eval_version() -> str | None:
    from harness import package_version

    return package_version("lm-eval") or package_version("lm_eval")


if __name__ == "__main__":
    sys.exit(main())
