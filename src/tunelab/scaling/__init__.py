"""The scaling-law lab: toy world, pretraining, sweep spec and runner, results store, law fitting, reports.

Modules: ``toyworld`` (synthetic multilingual corpus and tasks), ``pretrain`` (tiny Llama family), ``spec`` (sweep
spec → runs), ``store`` (SQLite results store), ``runner`` (worker processes / Ray), ``fit`` (the laws and their
fitting), ``analysis`` (study → fits → bootstrap → verdicts), ``report`` (markdown + plots), ``lab`` (one command),
``cli`` (the commands). See docs/scaling.md.
"""

from tunelab.errors import AnalysisError as AnalysisError
