"""Tasks as data: a task is a small YAML record discovered from a folder, so adding one needs no code.

    name: gsm8k
    kind: generate               # generate (parse + score the output) | loglik (multiple choice) | loss (NLL)
    data: gsm8k/test.json        # relative to --data-dir, an absolute path, or synthetic:TASK:SPLIT:N
    fields: {instruction: instruction, input: input, answer: answer}
    template: alpaca             # prompt template for generate / loss tasks
    parser: {name: number}       # see tunelab.eval.parsers.PARSERS
    generation: {max_new_tokens: 256, stop: ["### Instruction"]}
    choices: {style: labeled}    # loglik tasks: how to read options from the record (tunelab.eval.choices)

Built-in tasks live in ``tunelab/eval/tasks/``; ``--tasks-dir`` adds a folder of your own (same names override).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunelab.config import ConfigError, build, read_yaml, suggest
from tunelab.data import DataError, FieldMap, Record, load_source, parse_synthetic_spec

BUILTIN_DIR = Path(__file__).parent / "tasks"


@dataclass
class TaskFields:
    instruction: str = "instruction"
    input: str = "input"
    answer: str = "answer"


@dataclass
class TaskGeneration:
    max_new_tokens: int = 64
    num_beams: int = 1
    stop: list[str] = field(default_factory=list)


@dataclass
class TaskChoices:
    style: str = "labeled"  # labeled | boolq | winogrande | label-words | trained (tunelab.eval.choices)
    prefix: str = ""  # label-words: the fixed start of the trained answer, e.g. "the correct answer is"


@dataclass
class TaskSpec:
    name: str
    data: str
    kind: Literal["generate", "loglik", "loss"] = "generate"
    description: str = ""
    group: str = ""
    fields: TaskFields = field(default_factory=TaskFields)
    template: str = "alpaca"
    format: str = "as-is"  # row format of the data file (tunelab.data.formats): as-is, mc-text, mawps
    parser: dict[str, Any] = field(default_factory=lambda: {"name": "exact"})
    generation: TaskGeneration = field(default_factory=TaskGeneration)
    choices: TaskChoices = field(default_factory=TaskChoices)
    source_file: str = ""

    def needs_data_dir(self) -> bool:
        return parse_synthetic_spec(self.data) is None and not Path(self.data).is_absolute()


def load_task_file(path: Path) -> TaskSpec:
    data, lines = read_yaml(path)
    spec = build(TaskSpec, {**data, "source_file": str(path)}, "", lines)
    if spec.name != path.stem:
        raise ConfigError(f"{path}: task name '{spec.name}' must match the file name '{path.stem}'")
    return spec


def discover_tasks(extra_dirs: tuple[str | Path, ...] = ()) -> dict[str, TaskSpec]:
    """Built-in tasks plus every ``*.yaml`` in ``extra_dirs`` (later folders override earlier ones)."""
    tasks: dict[str, TaskSpec] = {}
    for folder in (BUILTIN_DIR, *map(Path, extra_dirs)):
        if not folder.is_dir():
            raise ConfigError(f"tasks folder not found: {folder}")
        for path in sorted(folder.glob("*.yaml")):
            spec = load_task_file(path)
            tasks[spec.name] = spec
    return tasks


def get_task(name: str, tasks: dict[str, TaskSpec]) -> TaskSpec:
    if name not in tasks:
        raise ConfigError(f"unknown task '{name}'.{suggest(name, tasks)} Run `tunelab tasks` to list them.")
    return tasks[name]


def resolve_data(spec: TaskSpec, data_dir: str | Path | None) -> str:
    """The data source of a task: synthetic specs and absolute paths as they are, others under data_dir."""
    if not spec.needs_data_dir():
        return spec.data
    if data_dir is None:
        raise DataError(f"task '{spec.name}' reads {spec.data} from a data directory: pass --data-dir DIR "
                        f"(a folder in the LLM-Adapters layout, e.g. DIR/{spec.data})")
    path = Path(data_dir) / spec.data
    if not path.is_file():
        raise DataError(f"task '{spec.name}': {path} not found (--data-dir {data_dir}); expected the "
                        f"LLM-Adapters layout DIR/{spec.data}")
    return str(path)


def load_examples(spec: TaskSpec, data_dir: str | Path | None, limit: int | None = None) -> list[Record]:
    """The task's records; ``Record.output`` holds the gold answer (the ``answer`` field by default)."""
    return select_examples(spec, data_dir, limit)[0]


def select_examples(spec: TaskSpec, data_dir: str | Path | None, limit: int | None = None,
                    exclude: frozenset[str] = frozenset()) -> tuple[list[Record], int]:
    """(the task's records less those whose question is in ``exclude``, then the first ``limit``; how many were
    left out). ``exclude`` holds normalised question texts (``tunelab.data.contamination.question_key``)."""
    from tunelab.data.contamination import question_key

    fields = FieldMap(instruction=spec.fields.instruction, input=spec.fields.input, output=spec.fields.answer)
    # A row format may find rows it cannot score (an mc-text question with two identical options): those are left
    # out with a warning naming them; files read as they are stay strict.
    lenient = spec.format != "as-is"
    records, bad = load_source(resolve_data(spec, data_dir), fields, format=spec.format, skip_bad_rows=lenient)
    if bad:
        shown = "; ".join(map(str, bad[:3])) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        print(f"warning: task '{spec.name}': {len(bad)} rows cannot be scored in format {spec.format} and are left "
              f"out: {shown}", file=sys.stderr)
    kept = [r for r in records if question_key(r) not in exclude] if exclude else records
    if not kept:
        raise DataError(f"task '{spec.name}': no item of {resolve_data(spec, data_dir)} is left to score "
                        f"({len(records)} read, {len(bad)} unreadable in format {spec.format}, "
                        f"{len(records) - len(kept)} also in the training data)")
    return (kept[:limit] if limit is not None else kept), len(records) - len(kept)
