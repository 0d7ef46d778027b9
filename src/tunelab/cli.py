"""The ``tunelab`` command: thin — parse arguments, load a config, call one library function per command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tunelab.scaling.cli import COMMANDS as SCALING_COMMANDS
from tunelab.scaling.cli import EXAMPLES as SCALING_EXAMPLES
from tunelab.scaling.cli import add_parsers as add_scaling_parsers

EPILOG = """examples:
  tunelab demo                                   fine-tune the embedded model with LoRA, before/after
  tunelab train configs/lora-arith.yaml          train a run (any method) from a YAML config
  tunelab train CONFIG --set train.lr=1e-4 --set method.r=16
  tunelab train CONFIG --resume                  continue an interrupted run from its last checkpoint
  tunelab generate runs/lora --prompt "What is 12 + 30?"
  tunelab eval runs/lora --task synth-date-format --task arc-easy-ll --data-dir DATA --limit 200
  tunelab compare configs/compare-date.yaml      several methods, same budget, one table (md, csv, png)
  tunelab lr-search configs/lr-search-mask-arc-easy.yaml   each method at a grid of rates, best on a dev split
  tunelab tasks                                  list evaluation tasks
  tunelab methods                                list methods with their options and defaults
  tunelab quantize smollm2-135m --bits 2 --init loftq --rank 16 --alpha 16 --out runs/nf2-loftq
  tunelab export runs/lora --format merged --out exported/   a transformers folder with the update merged in
"""
EPILOG += SCALING_EXAMPLES.lstrip("\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab", description="Fine-tuning research on language models.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a run from a YAML config (one loop for every method)")
    t.add_argument("config", nargs="?", help="YAML run config (see configs/); omit to use only --set values")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    t.add_argument("--skip-bad-rows", action="store_true", help="skip malformed data rows and report them")
    t.add_argument("--check", action="store_true", help="validate the config and exit")

    g = sub.add_parser("generate", help="generate from a trained run or a base model")
    g.add_argument("target", help="run directory, or a model (alias, HF directory, GGUF file, tiny-llama)")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    g.add_argument("--template", default="chat", help="prompt template: chat (default), alpaca, plain, none")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--allow-base-mismatch", action="store_true",
                   help="load a run onto a base model whose weights differ from the one it was trained on")

    sub.add_parser("methods", help="list the methods with their options and defaults")

    x = sub.add_parser("export", help="write a finished run in a format other tools load: merged (a transformers "
                                      "folder with the update folded in) or peft")
    x.add_argument("run", help="run directory")
    x.add_argument("--format", default="merged", choices=("merged", "peft", "gguf"),
                   help="merged: save_pretrained folder (full, LoRA, random masking, QLoRA/LoftQ dequantized); "
                        "peft: the adapter in peft's format (LoRA, prompt, prefix); gguf: the merged model as one GGUF "
                        "file (Llama architecture)")
    x.add_argument("--out", required=True, help="output folder")

    e = sub.add_parser("eval", help="evaluate a run or a model on tasks (accuracy with 95%% intervals)")
    e.add_argument("target", help="run directory, or a model (alias, HF directory, GGUF file, tiny-llama)")
    e.add_argument("--task", action="append", required=True, help="task name (repeatable); see `tunelab tasks`")
    e.add_argument("--data-dir", help="folder of the LLM-Adapters data sets (e.g. DIR/gsm8k/test.json)")
    e.add_argument("--tasks-dir", action="append", default=[], help="extra folder of task YAML files")
    e.add_argument("--limit", type=int, help="evaluate only the first N examples of each task")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--template", help="prompt template (default: the run's training template, else the task's)")
    e.add_argument("--dtype", default="fp32", help="fp32 (default: batch-invariant greedy decoding), bf16, or auto "
                                                   "(bf16 where this machine has bf16 units, else fp32)")
    e.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N")
    e.add_argument("--out", help="output folder for per-example JSONL and summaries (default: RUN/eval or eval/)")
    e.add_argument("--allow-base-mismatch", action="store_true")
    e.add_argument("--fresh", action="store_true",
                   help="run every task again; by default a task whose results OUT already holds with the same "
                        "settings (same weights, dtype, task, template, batch size and items) is kept, so an "
                        "interrupted evaluation continues")
    e.add_argument("--decontaminate", action="append", default=[], metavar="FILE",
                   help="leave out test questions that also occur in this training/dev file (normalised text; "
                        "repeatable; a JSONL of instruction records, as `tunelab suite` writes)")

    c = sub.add_parser("compare", help="train several methods on the same data and budget; one table")
    c.add_argument("config", help="compare YAML (see configs/compare-*.yaml)")
    c.add_argument("--rerun", action="store_true", help="redo rows that finished earlier")

    sw = sub.add_parser("lr-search", aliases=["sweep-lr"],
                        help="train each method at a grid of learning rates; keep the best on a dev split "
                             "(sweep-lr: its former name)")
    sw.add_argument("config", help="LR-search YAML (see configs/lr-search-*.yaml and tunelab.study.lr_search)")
    sw.add_argument("--rerun", action="store_true", help="redo points that finished earlier")

    su = sub.add_parser("suite", help="a real-data suite under the protocol: LR search on a dev split, seeds, "
                                      "decontaminated tests, base and baselines, paired intervals (resumable)")
    su.add_argument("config", help="suite YAML (configs/suites/*.yaml; see tunelab.study.suite)")
    su.add_argument("--data-dir", required=True, help="folder of the data sets (LLM-Adapters layout)")
    su.add_argument("--scale", default="small", help="which of the suite's scales to run (default: small)")
    su.add_argument("--out", help="study folder (default: runs/suite-NAME-SCALE); rerun to continue")
    su.add_argument("--rows", help="comma-separated row labels to run now (default: the scale's rows)")
    su.add_argument("--report-only", action="store_true", help="rebuild the report from the store; train nothing")
    su.add_argument("--report-dir", help="also write the report (results.json, table.md, chart.png) here")
    su.add_argument("--retry-failed", action="store_true", help="run failed units again")
    su.add_argument("--ledger", metavar="DIR",
                    help="a folder to commit with the results (e.g. docs/compare/NAME/units): every finished unit "
                         "is also written there as JSON, and units found there are not run again — so a fresh "
                         "clone continues the suite, or rebuilds its report with --report-only, from it")
    su.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="run N units at once, each with 1/N of the threads (default 1; on a 2-core CPU, 2 gave "
                         "1.25-1.41x the training steps per hour; memory: N units' peak RSS)")
    su.add_argument("--worker-of", type=int, metavar="PID", help=argparse.SUPPRESS)  # a --jobs helper process
    ts = sub.add_parser("tasks", help="list the evaluation tasks")
    ts.add_argument("--tasks-dir", action="append", default=[], help="extra folder of task YAML files")

    _quantize_parser(sub)

    d = sub.add_parser("demo", help="fine-tune the embedded model with LoRA and show before/after")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--output-dir", default=None)
    add_scaling_parsers(sub)
    for command in {id(c): c for c in sub.choices.values()}.values():
        # --debug after the command works too; SUPPRESS keeps the top-level value when it is not given there
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _quantize_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="quantize a model's linear layers (QLoRA, LoftQ init): write a quantized "
                                        "base and print the per-layer error table")
    q.add_argument("model", help="model to quantize (alias, HF directory, GGUF file, tiny-llama)")
    q.add_argument("--bits", type=int, choices=(2, 4, 8), default=4)
    q.add_argument("--quant", choices=("nf", "int"), default="nf", help="NormalFloat or symmetric INT-k codes")
    q.add_argument("--init", choices=("loftq", "qlora"), default="loftq")
    q.add_argument("--iters", type=int, default=1, help="LoftQ alternations T (the paper also uses 5)")
    q.add_argument("--method", default="lora",
                   help="the method whose low-rank update LoftQ initialises (one with LoftQ init: lora)")
    q.add_argument("--rank", type=int, default=16, help="LoRA rank r the LoftQ factors are computed for")
    q.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling alpha/r is folded in)")
    q.add_argument("--rslora", action="store_true", help="LoRA scaling alpha/sqrt(r)")
    q.add_argument("--targets", default="all-linear", help="LoRA targets: all-linear or a regex")
    q.add_argument("--block", type=int, default=64, help="values per absmax scale")
    q.add_argument("--double-quant", action="store_true", help="quantize the scales too (INT-8, blocks of 256)")
    q.add_argument("--mixed", type=int, default=0, help="first K decoder layers at --mixed-bits")
    q.add_argument("--mixed-bits", type=int, choices=(2, 4, 8), default=4)
    q.add_argument("--embeddings", action="store_true",
                   help="also quantize the token embedding and the output head (a tied head shares its codes)")
    q.add_argument("--embedding-bits", type=int, choices=(2, 4, 8), default=0,
                   help="bits of the embedding table with --embeddings (default: --bits)")
    q.add_argument("--out", help="output directory (default runs/quant-MODEL-QUANTBITS-INIT)")


def cmd_quantize(args: argparse.Namespace) -> int:
    from tunelab.config import QuantizeSection, build
    from tunelab.errors import ConfigError
    from tunelab.methods import build_method_config, get_method
    from tunelab.quant.base import quantize_to_dir
    from tunelab.quant.model import format_report

    section = build(QuantizeSection, {"bits": args.bits, "quant": args.quant, "block": args.block,
                                      "double_quant": args.double_quant, "init": args.init, "iters": args.iters,
                                      "mixed": args.mixed, "mixed_bits": args.mixed_bits,
                                      "embeddings": args.embeddings, "embedding_bits": args.embedding_bits},
                    "quantize")
    method = get_method(args.method)
    if not method.CAPABILITIES.loftq_init:
        raise ConfigError(f"--method {args.method}: LoftQ initialises a low-rank update and this method has none; "
                          f"use --method lora (the quantized base itself works with every adapter method)")
    options = {"name": args.method, "r": args.rank, "alpha": args.alpha, "rslora": args.rslora, "targets": args.targets}
    low_rank = method.low_rank(build_method_config(options))
    out = args.out or f"runs/quant-{Path(args.model).name}-{args.quant}{args.bits}-{args.init}"
    state, memory = quantize_to_dir(args.model, section, low_rank, out)
    print(format_report(state.report, memory))
    trained = f", method: {args.method}, r: {args.rank}, alpha: {args.alpha:g})" if state.factors else ")"
    print(f"quantized in {state.seconds:.1f} s; quantized base written to {out}/ (train on it with "
          f"model.name: {out}" + trained)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.train.dist import shutdown
    from tunelab.train.loop import train

    overrides = list(args.overrides) + (["data.skip_bad_rows=true"] if args.skip_bad_rows else [])
    cfg = load_config(args.config, overrides)
    if args.check:
        print(f"{args.config or 'config'}: OK (method {cfg.method_name()})")
        return 0
    try:
        result = train(cfg, resume=args.resume)
    finally:
        shutdown()
    print(f"run saved to {result.run_dir}")
    print(f"steps {result.steps}  train loss {result.train_loss:.4f}"
          + (f"  eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
          + f"  tokens/s {result.tokens_per_s:.0f}  peak RSS {result.peak_rss_mb:.0f} MiB"
          + (f"  peak {result.device} {result.peak_device_mb:.0f} MiB" if result.peak_device_mb is not None else "")
          + f"  trainable {result.trainable_params:,} ({100 * result.trainable_params / result.total_params:.3f}%)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tunelab.data import Record, render_prompt
    from tunelab.eval.generate import generate
    from tunelab.loading import load_base, load_run
    from tunelab.rundir import is_run_dir

    if is_run_dir(args.target):
        model, tokenizer, _handle, _cfg = load_run(args.target, allow_base_mismatch=args.allow_base_mismatch)
    else:
        model, tokenizer = load_base(args.target)
    if args.template == "none":
        prompts = list(args.prompt)
    else:
        prompts = [render_prompt(Record(instruction=p, input="", output=""), args.template, tokenizer)
                   for p in args.prompt]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                       add_special_tokens=args.template != "chat")
    for prompt, out in zip(args.prompt, outputs, strict=True):
        print(f"### {prompt}\n{out.strip()}\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tunelab.export import export_run

    out = export_run(args.run, args.out, args.format)
    print(f"exported {args.run} as {args.format} to {out}/")
    return 0


def seen_questions(paths: Sequence[str]) -> frozenset[str]:
    """Question keys of the records in ``paths`` (tunelab.data.contamination), for --decontaminate."""
    from tunelab.data import load_source
    from tunelab.data.contamination import keys

    return frozenset().union(*(keys(load_source(p)[0]) for p in paths))


def cmd_eval(args: argparse.Namespace) -> int:
    from tunelab.eval.harness import EvalOptions, evaluate, format_summary
    from tunelab.rundir import is_run_dir

    out = args.out or (str(Path(args.target) / "eval") if is_run_dir(args.target) else "eval")
    opts = EvalOptions(data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
                       template=args.template, out_dir=out, exclude=seen_questions(args.decontaminate),
                       fresh=args.fresh)
    summaries = evaluate(args.target, args.task, opts, dtype=args.dtype, tasks_dirs=args.tasks_dir,
                         allow_base_mismatch=args.allow_base_mismatch, device=args.device)
    for s in summaries:
        print(format_summary(s))
    print(f"per-example outputs and summaries in {out}/")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tunelab.study.compare import compare, load_compare

    results = compare(args.config, rerun=args.rerun)
    out = Path(load_compare(args.config).output_dir)
    print((out / "table.md").read_text())
    print(f"table: {out / 'table.md'}, {out / 'table.csv'}, chart: {out / 'chart.png'}")
    return 0 if all("error" not in r for r in results) else 1


def cmd_lr_search(args: argparse.Namespace) -> int:
    from tunelab.study.lr_search import format_best, load_search, search

    best = search(args.config, rerun=args.rerun)
    print(format_best(Path(load_search(args.config).output_dir)))
    return 0 if all("error" not in r for r in best) else 1


def cmd_suite(args: argparse.Namespace) -> int:
    from tunelab.scaling.store import Store
    from tunelab.study.report import write_report
    from tunelab.study.suite import attach_ledger, open_suite, prepare_data, run_suite

    run = open_suite(args.config, args.data_dir, args.scale, args.out)
    if args.worker_of is not None:  # a helper of `--jobs`: run the driver's pending units, then end
        from tunelab.scaling.ledger import Ledger
        from tunelab.study.suite import ledger_fingerprint, work

        if args.ledger:  # bound without syncing: the driver synced it before starting the helpers
            run.ledger = Ledger(args.ledger, ledger_fingerprint(run))
        work(Store(run.out / "study.sqlite", create=False), run.ledger, args.worker_of)
        return 0
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = sorted(set(wanted) - {r.label for r in run.cfg.rows})
        if unknown:
            print(f"error: --rows names unknown rows {unknown}; rows: {[r.label for r in run.cfg.rows]}",
                  file=sys.stderr)
            return 2
        run.scale.rows = wanted
    if not args.report_only:
        run_suite(run, retry_failed=args.retry_failed, ledger=args.ledger, jobs=args.jobs)
    elif args.ledger:  # the report from the ledger (and whatever the folder has)
        prepare_data(run)
        attach_ledger(run, Store(run.out / "study.sqlite"), args.ledger)
    store = Store(run.out / "study.sqlite", create=False)
    command = "tunelab " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("tunelab") else None
    folder = write_report(run, store, command=command)
    if args.report_dir:
        write_report(run, store, Path(args.report_dir), command=command)
    print((folder / "table.md").read_text())
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from tunelab.eval.tasks import discover_tasks

    for name, spec in discover_tasks(tuple(args.tasks_dir)).items():
        print(f"{name:<20} {spec.kind:<9} {spec.data:<28} {spec.description}")
    return 0


def cmd_methods(_args: argparse.Namespace) -> int:
    from tunelab.methods import REGISTRY, get_method, method_options

    for name in REGISTRY:
        module = get_method(name)
        print(f"{name}: {module.DESCRIPTION}\n  paper: {module.PAPER}")
        for opt, typ, default in method_options(name):
            print(f"    {opt:<14} {typ:<28} default: {default!r}")
        print()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tunelab.demo import run_demo

    run_demo(model=args.model, steps=args.steps, output_dir=args.output_dir)
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "compare": cmd_compare, "tasks": cmd_tasks,
            "methods": cmd_methods, "export": cmd_export, "demo": cmd_demo, "quantize": cmd_quantize, "lr-search": cmd_lr_search, "sweep-lr": cmd_lr_search,
            "suite": cmd_suite,
            **SCALING_COMMANDS}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    from tunelab.errors import USER_ERRORS

    try:
        return COMMANDS[args.command](args)
    except (*USER_ERRORS, OSError) as e:  # the user's to fix (an OSError names its file): one line, no traceback
        if args.debug:
            raise
        hint = " (--debug shows the traceback)" if isinstance(e, OSError) else ""
        print(f"tunelab {args.command}: error: {e}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
