"""The data facts behind docs/evaluation.md's root cause of the label-format collapse and its decontamination table.

    python bench/data_facts.py --data-dir ../shared/data/llm-adapters > docs/data-facts.json

Prints JSON: the SmolLM2 token count of the LLM-Adapters label target and of the mc-text targets of ARC-Easy's
training set, ln 4 / tokens (the loss of guessing among four labels, per target token), the gold-label counts of
ARC-Easy train/test, and how many test problems of each math set also occur in the MAWPS training + validation
files (``tunelab.data.contamination``).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
from pathlib import Path

from tunelab.data import FieldMap, load_source
from tunelab.data.contamination import keys, overlap
from tunelab.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    d = Path(ap.parse_args().data_dir)
    _, tok = load_model("smollm2-135m", "bf16")
    n_label = len(tok("the correct answer is answer2", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    arc, _ = load_source(d / "ARC-Easy" / "train.json", format="mc-text")
    text_tokens = [len(tok(r.output, add_special_tokens=False)["input_ids"]) + 1 for r in arc]
    labels = {split: collections.Counter(r["answer"] for r in json.loads((d / "ARC-Easy" / f"{split}.json").read_text()))
              for split in ("train", "test")}
    seen = keys([r for name in ("trainset", "validset")
                 for r in load_source(d / "mawps" / f"{name}.json", format="mawps", skip_bad_rows=True)[0]])
    overlaps = {}
    for name in ("mawps", "AddSub", "SingleEq", "MultiArith", "SVAMP"):
        test, _ = load_source(d / name / "test.json", FieldMap(output="answer"))
        overlaps[name] = {"test": len(test), "also_in_mawps_train_or_valid": len(overlap(test, seen))}
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "label_target_tokens_with_eos": n_label,
        "label_guess_loss_per_token": math.log(4) / n_label,
        "arc_easy_train_mc_text_target_tokens": {"mean": sum(text_tokens) / len(text_tokens),
                                                 "total": sum(text_tokens), "questions": len(arc)},
        "arc_easy_gold_labels": {k: dict(v.most_common()) for k, v in labels.items()},
        "math_test_overlap": overlaps,
    }, indent=1))


if __name__ == "__main__":
    main()
