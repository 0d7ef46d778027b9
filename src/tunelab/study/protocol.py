"""The comparison protocol, in one place: what every row of a study shares and how its numbers are judged.

* **Budget** — every row trains on the same examples (one materialised training file), for the same number of
  steps of the same batch size; rows may differ only in the method, its learning rate and optimiser settings
  (``BUDGET_KEYS`` may not be set per row).
* **Learning rate** — chosen per method on a dev split carved from the training data (never a test set), from a
  grid of at least ``MIN_GRID_RATES`` rates spanning at least ``MIN_GRID_DECADES`` orders of magnitude, by the
  lowest dev loss per target token (``DEV_LOSS``); a choice at the grid's edge is flagged (:func:`at_edge`), since
  the best rate may lie outside it.
* **Seeds** — the final runs repeat each row at its chosen rate for every seed of the study.
* **Intervals** — accuracy over seeds and items with the two-level bootstrap of
  ``tunelab.eval.metrics.seed_item_ci``; differences between rows are paired over the same items
  (seed-averaged per item, ``paired_bootstrap_diff`` per task, ``stratified_paired_diff`` for an average).
* **Collapse** — a trained multiple-choice row must predict every option position, with no position taking more
  than ``MAX_LABEL_SHARE_RATIO`` times its share of the gold answers (:func:`label_shares`); on math, at least
  ``MIN_PARSED`` of outputs must parse and no answer shape take more than ``MAX_SHAPE_SHARE`` of them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

BUDGET_KEYS = ("max_steps", "epochs", "batch_size", "grad_accum", "seed")
DEV_LOSS = "eval_loss"
MIN_GRID_RATES = 4
MIN_GRID_DECADES = 2.0
MAX_LABEL_SHARE_RATIO = 1.5
MIN_PARSED = 0.95
MAX_SHAPE_SHARE = 0.40


def grid_problems(lrs: Sequence[float]) -> list[str]:
    """Why a learning-rate grid is too narrow for the protocol (empty when it is fine)."""
    problems = []
    if len(set(lrs)) < MIN_GRID_RATES:
        problems.append(f"{len(set(lrs))} rates (the protocol asks for at least {MIN_GRID_RATES})")
    if lrs and min(lrs) > 0 and math.log10(max(lrs) / min(lrs)) < MIN_GRID_DECADES - 1e-9:
        problems.append(f"a span of {math.log10(max(lrs) / min(lrs)):.2g} decades "
                        f"(the protocol asks for at least {MIN_GRID_DECADES:g})")
    return problems


def at_edge(lrs: Sequence[float], chosen: float | None) -> bool:
    """Whether the chosen rate is the smallest or the largest of the grid (the optimum may lie beyond it)."""
    return chosen is not None and len(lrs) > 1 and chosen in (min(lrs), max(lrs))


MAX_GRID_EXTENSIONS = 2  # rates a row's search may add beyond the edge of its configured grid


def grid_extension(scores: dict[float, float | None]) -> float | None:
    """The next rate to search when the lowest finite dev loss sits at the grid's edge: one grid step beyond that
    edge (the grid's mean ratio between neighbouring rates), rounded to 2 significant digits. None when the best
    rate is interior — including when the rate beyond it was tried and diverged — or nothing has finished."""
    best = best_rate(scores)
    lrs = sorted(scores)
    if best is None or len(lrs) < 2 or not at_edge(lrs, best):
        return None
    step = (lrs[-1] / lrs[0]) ** (1 / (len(lrs) - 1))  # the grid's mean ratio (its rates are rounded)
    return float(f"{best * step if best == lrs[-1] else best / step:.2g}")


def best_rate(scores: dict[float, float | None]) -> float | None:
    """The rate with the lowest finite score — the dev loss — (the lower rate on a tie); None when none finished."""
    finite = {lr: s for lr, s in scores.items() if s is not None and math.isfinite(s)}
    if not finite:
        return None
    low = min(finite.values())
    return min(lr for lr, s in finite.items() if s == low)


def label_shares(pred: Sequence[int | None], gold: Sequence[int]) -> dict[str, Any]:
    """How predictions spread over option positions against the gold answers.

    Returns ``{"max_ratio": max over positions of share(pred) / share(gold), "missing": positions that are gold
    somewhere but never predicted, "top": the most predicted position and its share, "collapsed": bool}``, on the
    items with a prediction. ``collapsed`` follows the protocol: a missing position or a ratio above
    ``MAX_LABEL_SHARE_RATIO``.
    """
    answered = [p for p in pred if p is not None]
    if not answered:
        return {"max_ratio": math.inf, "missing": sorted(set(gold)), "top": None, "collapsed": True}
    p_count, g_count = Counter(answered), Counter(gold)
    ratios = {k: (p_count[k] / len(answered)) / (g_count[k] / len(gold)) for k in g_count}
    ratios.update({k: math.inf for k in p_count if k not in g_count})
    missing = sorted(k for k in g_count if p_count[k] == 0)
    top, n_top = p_count.most_common(1)[0]
    max_ratio = max(ratios.values())
    return {"max_ratio": max_ratio, "missing": missing, "top": [top, n_top / len(answered)],
            "collapsed": bool(missing) or max_ratio > MAX_LABEL_SHARE_RATIO}


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def answer_shape(output: str) -> str:
    """An output with its numbers replaced by N (``x=(22.0-14.0)/4.0`` -> ``x=(N-N)/N``): its shape."""
    first = next((line for line in output.splitlines() if line.strip()), "")
    return _NUMBER.sub("N", first.strip())


def shape_shares(outputs: Sequence[str], parsed: Sequence[Any]) -> dict[str, Any]:
    """Parse rate and the most common answer shape of generated math answers, with the protocol's verdict."""
    n = len(outputs)
    if n == 0:
        return {"parsed": math.nan, "top_shape": None, "collapsed": True}
    parsed_fraction = sum(p is not None for p in parsed) / n
    shape, count = Counter(answer_shape(o) for o in outputs).most_common(1)[0]
    return {"parsed": parsed_fraction, "top_shape": [shape, count / n],
            "collapsed": parsed_fraction < MIN_PARSED or count / n > MAX_SHAPE_SHARE}
