"""A generation task and its trained-format log-likelihood task run alone, then together (one pass over the prompts
for both: ``tunelab.eval.harness.run_generate_and_loglik``), interleaved, on the same items of a real data set.

    python bench/shared_prefill.py --data-dir ../shared/data/llm-adapters [--items 48] [--repeats 2]
        [--tasks arc-easy-text,arc-easy-text-ll] [--model smollm2-135m] [--dtype fp32]

Prints JSON: per repeat and mode the wall time, each task's seconds and accuracy (the accuracies must be equal), and
the median ratio together ÷ alone of the two tasks' summed seconds; with the CPU's bf16 units and the load average.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from harness import REPO, environment, load_average


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--items", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tasks", default="arc-easy-text,arc-easy-text-ll")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    from tunelab.eval.harness import EvalOptions, evaluate

    gen, ll = args.tasks.split(",")
    runs: dict[str, list[dict]] = {"alone": [], "together": []}
    env = {**environment(REPO), "load_average_before": load_average()}
    for _ in range(args.repeats):
        for mode in runs:
            with tempfile.TemporaryDirectory() as out:
                def opts(folder: str) -> EvalOptions:
                    return EvalOptions(data_dir=args.data_dir, limit=args.items, batch_size=args.batch_size,
                                       out_dir=folder)
                t0 = time.perf_counter()
                if mode == "together":
                    s = evaluate(args.model, [gen, ll], opts(out), dtype=args.dtype)
                else:
                    s = [evaluate(args.model, [t], opts(f"{out}/{t}"), dtype=args.dtype)[0] for t in (gen, ll)]
                runs[mode].append({"wall_s": round(time.perf_counter() - t0, 1),
                                   "task_seconds": {x["task"]: round(x["seconds"], 1) for x in s},
                                   "accuracy": {x["task"]: x["accuracy"] for x in s},
                                   "shared_prefill_with": {x["task"]: x.get("shared_prefill_with") for x in s}})
    tasks_s = {m: [sum(r["task_seconds"].values()) for r in rs] for m, rs in runs.items()}
    env["load_average_after"] = load_average()
    print(json.dumps({"benchmark": "shared_prefill", "settings": vars(args), "runs": runs,
                      "together_vs_alone_task_seconds": round(statistics.median(tasks_s["together"])
                                                              / statistics.median(tasks_s["alone"]), 3),
                      "same_accuracy": all(a["accuracy"] == b["accuracy"]
                                           for a, b in zip(runs["alone"], runs["together"], strict=True)),
                      "environment": env}, indent=1))


if __name__ == "__main__":
    main()
