"""Studies: the protocol that makes rows comparable, and the commands built on it.

``compare`` (several methods, one budget, one table), ``lr_search`` (each method at a grid of rates, the best
kept on a dev split: `tunelab lr-search`), ``suite`` (a real-data suite run through the resumable store: LR search,
seeds, decontaminated test sets, base and trivial baselines, paired intervals: `tunelab suite`). The numbers
(intervals, paired differences) come from ``tunelab.eval.metrics``; the protocol's rules from ``protocol``.
"""
