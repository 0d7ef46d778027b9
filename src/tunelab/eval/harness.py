"""The evaluation harness: one entry point that runs any task (generate / loglik / loss) on any model or run.

Every task writes ``OUT/<task>.jsonl`` (one row per example: prompt, raw output, parsed answer, gold, correct) and a
summary (accuracy with a bootstrap 95% interval, n, tokens generated, wall time); ``OUT/summary.json`` collects
them. The numbers come from ``tunelab.eval.metrics`` and ``tunelab.train.objective``, the same code every report uses.

An evaluation stopped part-way resumes: a task whose summary in OUT was written with the same *settings* (the
model's identity — a run's weights digest or a model name — the resolved dtype, the task's definition, template,
batch size, and a digest of the exact items scored) is kept and not run again; any difference runs it afresh
(``fresh=True``, ``tunelab eval --fresh``, always does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.data import Record, encode_prompts, encode_responses, tokenize_records
from tunelab.errors import ConfigError
from tunelab.eval.generate import GenerationSettings, generate_ids
from tunelab.eval.metrics import perplexity, summarize_accuracy
from tunelab.eval.parsers import PARSERS
from tunelab.eval.tasks import TaskSpec, discover_tasks, get_task, select_examples
from tunelab.files import atomic_write_json, atomic_write_text


@dataclass
class EvalOptions:
    data_dir: str | None = None
    limit: int | None = None
    batch_size: int = 16
    template: str | None = None  # overrides the task's template (a run's training template by default)
    out_dir: str | None = None
    exclude: frozenset[str] = frozenset()  # normalised question texts to leave out (tunelab.data.contamination)
    fresh: bool = False  # run every task again even where OUT holds its summary with the same settings


def _rows_to_jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _parser(spec: TaskSpec):
    options = {k: v for k, v in spec.parser.items() if k != "name"}
    name = spec.parser.get("name", "exact")
    if name not in PARSERS:
        raise ConfigError(f"task '{spec.name}' ({spec.source_file}): unknown parser '{name}'; "
                         f"valid: {', '.join(PARSERS)}")
    return PARSERS[name], options


def _generation_settings(spec: TaskSpec, opts: EvalOptions) -> GenerationSettings:
    g = spec.generation
    return GenerationSettings(max_new_tokens=g.max_new_tokens, num_beams=g.num_beams, stop=list(g.stop),
                              batch_size=opts.batch_size)


def run_generate(model: Any, tok: Any, spec: TaskSpec, records: list[Record], opts: EvalOptions,
                 template: str, on_prefill: Any = None) -> tuple[list[dict], dict]:
    parser, options = _parser(spec)
    prompt_ids = encode_prompts(records, tok, template=template)
    outputs = generate_ids(model, tok, prompt_ids, _generation_settings(spec, opts), on_prefill=on_prefill)
    takes_choices = "choices" in parser.parse_options  # the option parser reads each record's own options
    rows = []
    for i, (r, ids, out) in enumerate(zip(records, prompt_ids, outputs, strict=True)):
        row_options = {**options, "choices": r.options} if takes_choices else options
        answer = parser.parse(out.text, **row_options)
        row = {"i": i, "line": r.line, "prompt": tok.decode(ids), "output": out.text, "parsed": answer,
               "gold": r.output, "correct": bool(parser.score(answer, r.output, **row_options)),
               "n_tokens": out.n_tokens}
        if r.options:
            row.update(pred_index=r.options.index(answer) if answer in r.options else None,
                       gold_index=r.options.index(r.output))
        rows.append(row)
    summary = summarize_accuracy([row["correct"] for row in rows])
    summary["parsed_fraction"] = sum(row["parsed"] not in (None, "") for row in rows) / max(1, len(rows))
    summary["tokens_generated"] = sum(row["n_tokens"] for row in rows)
    return rows, summary


def mc_items(spec: TaskSpec, records: list[Record], tok: Any, template: str) -> list[Any]:
    """The multiple-choice items of a loglik task: neutral-context styles, or the trained answers after the prompt
    rendered with ``template`` (the run's training template) for styles ``label-words`` and ``trained`` — those on
    the training tokenisation (``tunelab.eval.choices.as_trained``: the prompt's positions as training saw them)."""
    from tunelab.data.templates import render_prompt
    from tunelab.eval.choices import (
        LABEL_WORDS,
        TRAINED,
        as_trained,
        label_word_item,
        mc_item_from_record,
        trained_item,
    )

    if spec.choices.style == LABEL_WORDS:
        items = [label_word_item(render_prompt(r, template, tok), r.instruction, r.output, spec.choices.prefix,
                                 where=f"{r.source}:{r.line}") for r in records]
    elif spec.choices.style == TRAINED:
        items = [trained_item(render_prompt(r, template, tok), r.options, r.output, where=f"{r.source}:{r.line}")
                 for r in records]
    else:
        return [mc_item_from_record(r.instruction, r.output, spec.choices.style, where=f"{r.source}:{r.line}")
                for r in records]
    prompt_ids = encode_prompts(records, tok, template=template)
    return [as_trained(item, ids, encode_responses(item.options, tok))
            for item, ids in zip(items, prompt_ids, strict=True)]


def run_loglik(model: Any, tok: Any, spec: TaskSpec, records: list[Record], opts: EvalOptions,
               template: str) -> tuple[list[dict], dict]:
    from tunelab.eval.loglik import score_multiple_choice

    items = mc_items(spec, records, tok, template)
    return _loglik_rows(records, items, score_multiple_choice(model, tok, items, batch_size=opts.batch_size))


def _loglik_rows(records: list[Record], items: list[Any], results: list[Any]) -> tuple[list[dict], dict]:
    rows = []
    for i, (r, item, res) in enumerate(zip(records, items, results, strict=True)):
        rows.append({"i": i, "line": r.line, "labels": item.labels, "logprobs": res.logprobs,
                     "pred": item.labels[res.pred], "pred_norm": item.labels[res.pred_norm], "gold": r.output,
                     "pred_index": res.pred, "gold_index": item.gold,
                     "correct": res.correct, "correct_norm": res.correct_norm})
    summary = summarize_accuracy([row["correct"] for row in rows])
    norm = summarize_accuracy([row["correct_norm"] for row in rows])
    summary.update({"accuracy_norm": norm["accuracy"], "ci_low_norm": norm["ci_low"], "ci_high_norm": norm["ci_high"]})
    return rows, summary


@torch.no_grad()
def run_loss(model: Any, tok: Any, spec: TaskSpec, records: list[Record], opts: EvalOptions,
             template: str) -> tuple[list[dict], dict]:
    """Per-token NLL of the gold responses (the quantity the training loop and the scaling lab use)."""
    from tunelab.data import collate
    from tunelab.devices import move_batch
    from tunelab.train.objective import mean_nll, nll_sum

    examples, _ = tokenize_records(records, tok, template=template, max_length=4096)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for i, ex in enumerate(examples):
        s, n = nll_sum(model, move_batch(collate([ex], pad), device))
        rows.append({"i": i, "line": ex.line, "nll_sum": float(s), "n_targets": n})
    total, count = sum(r["nll_sum"] for r in rows), sum(r["n_targets"] for r in rows)
    loss = mean_nll(total, count)
    return rows, {"loss": loss, "perplexity": perplexity(loss), "n": len(rows), "n_target_tokens": count}


RUNNERS = {"generate": run_generate, "loglik": run_loglik, "loss": run_loss}


def task_settings(spec: TaskSpec, records: list[Record], template: str, opts: EvalOptions,
                  identity: dict[str, Any] | None) -> str:
    """A digest of everything a task's result depends on besides the code: the model's identity, the task's
    definition (less the file it was read from), the template, the batch size and the exact items scored."""
    spec_fields = {k: v for k, v in dataclasses.asdict(spec).items() if k != "source_file"}
    items = [[r.instruction, r.input, r.output, list(r.options)] for r in records]
    blob = json.dumps({"model": identity, "task": spec_fields, "template": template,
                       "batch_size": opts.batch_size, "items": items}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _finished(out: Path, spec: TaskSpec, settings: str) -> dict[str, Any] | None:
    """The summary of this task written earlier under ``out`` with the same settings (and its rows), else None."""
    summary, rows = out / f"{spec.name}.summary.json", out / f"{spec.name}.jsonl"
    if not (summary.is_file() and rows.is_file()):
        return None
    try:
        done = json.loads(summary.read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) and done.get("settings") == settings else None


@dataclass
class _Prepared:
    spec: TaskSpec
    template: str
    records: list[Record]
    removed: int
    settings: str | None
    done: dict[str, Any] | None  # the summary of this task finished earlier with the same settings


def _prepare(spec: TaskSpec, opts: EvalOptions, default_template: str | None,
             identity: dict[str, Any] | None) -> _Prepared:
    template = opts.template or default_template or spec.template
    records, removed = select_examples(spec, opts.data_dir, opts.limit, opts.exclude)
    settings = task_settings(spec, records, template, opts, identity) if identity is not None else None
    done = None
    if opts.out_dir and settings and not opts.fresh:
        done = _finished(Path(opts.out_dir), spec, settings)
    return _Prepared(spec, template, records, removed, settings, done)


def _finish(task: _Prepared, rows: list[dict], summary: dict[str, Any], seconds: float, opts: EvalOptions,
            **extra: Any) -> dict[str, Any]:
    spec = task.spec
    summary = {"task": spec.name, "kind": spec.kind, **summary, "seconds": seconds,
               "template": task.template if spec.kind != "loglik" or spec.choices.style in ("label-words", "trained")
               else None, "limit": opts.limit, "removed_overlap": task.removed, **extra}
    if task.settings:
        summary["settings"] = task.settings
    if opts.out_dir:
        out = Path(opts.out_dir)
        atomic_write_text(out / f"{spec.name}.jsonl", _rows_to_jsonl(rows))
        atomic_write_json(out / f"{spec.name}.summary.json", summary)
    return summary


def _kept(task: _Prepared, opts: EvalOptions) -> dict[str, Any]:
    print(f"[eval] {task.spec.name}: finished earlier with the same settings; kept ({opts.out_dir})", flush=True)
    return task.done  # type: ignore[return-value]


def evaluate_task(model: Any, tok: Any, spec: TaskSpec, opts: EvalOptions,
                  default_template: str | None = None, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one task; write its rows and summary under opts.out_dir (if given); return the summary.

    With an ``identity`` of the model (``model_identity``) a task finished earlier under opts.out_dir with the same
    settings is returned as it was, not run again (unless ``opts.fresh``)."""
    task = _prepare(spec, opts, default_template, identity)
    return _kept(task, opts) if task.done else _run_alone(model, tok, task, opts)


def _run_alone(model: Any, tok: Any, task: _Prepared, opts: EvalOptions) -> dict[str, Any]:
    t0 = time.perf_counter()
    rows, summary = RUNNERS[task.spec.kind](model, tok, task.spec, task.records, opts, task.template)
    return _finish(task, rows, summary, time.perf_counter() - t0, opts)


def can_share_prefill(model: Any, gen: _Prepared, ll: _Prepared, opts: EvalOptions) -> bool:
    """Whether a generation task and a log-likelihood task can score from one pass over their prompts: the same
    items and template, a trained-format loglik style (its contexts are the generation prompts' tokens), greedy
    decoding by tunelab's own loop, every option within the model's positions, and no sliding attention window
    (the standalone scorer batches only equal lengths there)."""
    from tunelab.eval.choices import LABEL_WORDS, TRAINED
    from tunelab.eval.generate import _own_loop_applies
    from tunelab.eval.loglik import _max_length, _sliding_window

    if gen.spec.kind != "generate" or ll.spec.kind != "loglik" or ll.spec.choices.style not in (TRAINED, LABEL_WORDS):
        return False
    if gen.template != ll.template or gen.records != ll.records:
        return False
    return _own_loop_applies(model, _generation_settings(gen.spec, opts)) and \
        _sliding_window(model) >= _max_length(model)


def run_generate_and_loglik(model: Any, tok: Any, gen: _Prepared, ll: _Prepared, opts: EvalOptions
                            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both tasks from one pass over the prompts: generation's prefill of each batch also scores that batch's
    options (``tunelab.eval.loglik.options_after_prefill`` on the prefill's cache), then decoding goes on. Options
    of a batch that the loop could not serve (a model without a cache) are scored by the standalone scorer. The
    summaries' ``seconds``: the decoding and the option passes, each with its share; ``shared_prefill_with`` names
    the other task."""
    from tunelab.eval.loglik import _max_length, mc_result, options_after_prefill, score_multiple_choice

    items = mc_items(ll.spec, ll.records, tok, ll.template)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    limit = _max_length(model)
    scores: list[list[float] | None] = [None] * len(items)
    fits = [all(len(c) + len(o) <= limit for c, o in item.encoded) for item in items]
    in_prefill = [0.0]  # seconds spent scoring options inside generation's prefill hook

    def on_prefill(idx: list[int], hidden: Any, cache: Any, is_hidden: bool, mask: Any) -> None:
        t0 = time.perf_counter()
        if all(fits[i] for i in idx):
            conts = [[list(o) for _, o in items[i].encoded] for i in idx]
            for i, lps in zip(idx, options_after_prefill(model, hidden, cache, is_hidden, mask, conts, pad_id),
                              strict=True):
                scores[i] = lps
        in_prefill[0] += time.perf_counter() - t0

    t0 = time.perf_counter()
    gen_rows, gen_summary = run_generate(model, tok, gen.spec, gen.records, opts, gen.template, on_prefill)
    gen_seconds = time.perf_counter() - t0 - in_prefill[0]
    t1 = time.perf_counter()
    rest = [i for i, sc in enumerate(scores) if sc is None]
    if rest:
        results = score_multiple_choice(model, tok, [items[i] for i in rest], batch_size=opts.batch_size)
        for i, res in zip(rest, results, strict=True):
            scores[i] = res.logprobs
    ll_seconds = in_prefill[0] + time.perf_counter() - t1
    results = [mc_result(item, sc) for item, sc in zip(items, scores, strict=True)]  # type: ignore[arg-type]
    ll_rows, ll_summary = _loglik_rows(ll.records, items, results)
    return (_finish(gen, gen_rows, gen_summary, gen_seconds, opts, shared_prefill_with=ll.spec.name),
            _finish(ll, ll_rows, ll_summary, ll_seconds, opts, shared_prefill_with=gen.spec.name,
                    scored_after_prefill=len(items) - len(rest)))


def evaluate_tasks(model: Any, tok: Any, specs: Sequence[TaskSpec], opts: EvalOptions,
                   default_template: str | None = None, identity: dict[str, Any] | None = None
                   ) -> list[dict[str, Any]]:
    """Every task, in order; a generation task and a trained-format log-likelihood task on the same items run
    together (:func:`run_generate_and_loglik`: one pass over the prompts for both) unless one of them is kept from
    an earlier run."""
    tasks = [_prepare(spec, opts, default_template, identity) for spec in specs]
    partner: dict[int, int] = {}
    for j, ll in enumerate(tasks):
        if ll.done or ll.spec.kind != "loglik":
            continue
        for i, gen in enumerate(tasks):
            if i not in partner and i not in partner.values() and not gen.done and \
                    can_share_prefill(model, gen, ll, opts):
                partner[i] = j
                break
    summaries: dict[int, dict[str, Any]] = {}
    for i, task in enumerate(tasks):
        if i in summaries:
            continue
        if task.done:
            summaries[i] = _kept(task, opts)
        elif i in partner:
            summaries[i], summaries[partner[i]] = run_generate_and_loglik(model, tok, task, tasks[partner[i]], opts)
        else:
            summaries[i] = _run_alone(model, tok, task, opts)
    return [summaries[i] for i in range(len(tasks))]


def model_identity(target: str, dtype: str) -> dict[str, Any]:
    """What names the weights an evaluation of ``target`` scores: a run directory by the sha256 of its adapter
    file and its config (so a run trained again is a different model), a model spec by its name; and the dtype."""
    from tunelab.rundir import ADAPTER_FILE, CONFIG_FILE, is_run_dir

    if is_run_dir(target):
        h = hashlib.sha256()
        for name in (ADAPTER_FILE, CONFIG_FILE):
            path = Path(target) / name
            if path.is_file():
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
            h.update(b"\0")
        return {"run": h.hexdigest(), "dtype": dtype}
    path = Path(target)  # a model folder or file: its files' sizes and times (a name alone for an alias)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    stamp = [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns]
             for p in files]
    return {"model": target, "files": stamp, "dtype": dtype}


def load_target(target: str, dtype: str = "fp32", allow_base_mismatch: bool = False):
    """(model, tokenizer, training template or None, description) for a run directory or a model spec."""
    from tunelab.loading import load_base, load_run
    from tunelab.rundir import is_run_dir

    if is_run_dir(target):
        model, tok, _handle, cfg = load_run(target, dtype=dtype, allow_base_mismatch=allow_base_mismatch)
        return model, tok, cfg.data.template, f"run {target}"
    model, tok = load_base(target, dtype)
    return model, tok, None, f"model {target}"


def evaluate(target: str, task_names: Sequence[str], opts: EvalOptions, *, dtype: str = "fp32",
             tasks_dirs: Sequence[str] = (), allow_base_mismatch: bool = False, model: Any = None,
             tokenizer: Any = None, default_template: str | None = None, device: str = "auto") -> list[dict[str, Any]]:
    """Evaluate a run directory or a model on several tasks; returns the task summaries. ``device`` (auto, cpu,
    cuda, cuda:N; tunelab.devices) is where a model loaded here runs; a ``model`` passed in stays where it is."""
    tasks = discover_tasks(tuple(tasks_dirs))
    specs = [get_task(n, tasks) for n in task_names]
    resolved = None
    if model is None:
        from tunelab.models import dtype_name, resolve_dtype

        resolved = dtype_name(resolve_dtype(dtype))  # `auto`: bf16 only where it is fast here
        model, tokenizer, default_template, _ = load_target(target, dtype, allow_base_mismatch)
        from tunelab.devices import resolve_device

        where = resolve_device(device, where="--device")
        if where.type != "cpu":
            model.to(where)
    from tunelab.quant.linear import inference_weights

    identity = model_identity(target, resolved) if resolved is not None else None  # a model passed in: no resume
    with inference_weights(model):  # quantized bases: dequantize once for the whole evaluation, not per call
        summaries = evaluate_tasks(model, tokenizer, specs, opts, default_template, identity)
    if opts.out_dir:
        atomic_write_json(Path(opts.out_dir) / "summary.json", {"target": target, "dtype": resolved,
                                                                  "tasks": summaries})
    return summaries


def format_summary(s: dict[str, Any]) -> str:
    """One line per task for the terminal."""
    if "accuracy" in s:
        line = f"{s['task']:<18} acc {100 * s['accuracy']:5.1f}% [{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]"
        if "accuracy_norm" in s:
            line += f"  acc_norm {100 * s['accuracy_norm']:5.1f}% [{100 * s['ci_low_norm']:.1f}, {100 * s['ci_high_norm']:.1f}]"
        if "tokens_generated" in s:
            line += f"  tokens {s['tokens_generated']}"
    else:
        line = f"{s['task']:<18} loss {s['loss']:.4f}  ppl {s['perplexity']:.2f}"
    return line + f"  n={s['n']}  {s['seconds']:.1f}s"
