"""The scaling-lab commands of ``tunelab``: sweep, runs, fit, report, pretrain, lab (parsers and thin handlers)."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """
  tunelab lab toy --out runs/lab-toy             the whole toy replication (world, pretraining, grid, fits, report)
  tunelab sweep configs/scaling-toy.yaml --workers 2          run a sweep spec's grid (resumes where it stopped)
  tunelab runs runs/lab-toy                      list a study's runs
  tunelab fit runs/lab-toy                       fit both laws, print verdicts with bootstrap intervals
  tunelab report runs/lab-toy                    markdown + plots in STUDY/report/
  tunelab advise runs/lab-toy --examples 500 --budget-hours 1     which method and PET size for 500 examples
  tunelab pretrain WORLD --size xs --size s --out MODELS      pretrain tiny Llamas on a toy world
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="run a scaling sweep spec's grid with worker processes (resumable)")
    s.add_argument("spec", help="sweep spec YAML (see configs/scaling-*.yaml)")
    s.add_argument("--workers", type=int, default=1,
                   help="runs at once: worker processes (local) or Ray tasks in flight (ray)")
    s.add_argument("--threads", type=int, help="torch threads per run (default: this machine's cores // workers)")
    s.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: worker processes on this machine; ray: tasks on a Ray cluster, this process alone "
                        "writes the store")
    s.add_argument("--address", help="Ray cluster to join, HEAD_IP:PORT (default: RAY_ADDRESS, else a local Ray)")
    s.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    s.add_argument("--check", action="store_true", help="validate the spec, print the grid size and exit")
    s.add_argument("--ledger", metavar="DIR",
                   help="a folder to commit with the results: every finished run is also written there as JSON, "
                        "and runs found there are not run again (a fresh clone continues the study from it)")
    s.add_argument("--import-only", action="store_true",
                   help="with --ledger: take its finished runs into the store and exit (then fit or report)")

    r = sub.add_parser("runs", help="list the runs of a study")
    r.add_argument("study", help="study folder, its study.sqlite, or its sweep spec")
    r.add_argument("--limit", type=int)

    for name, what in (("fit", "fit the scaling laws of a study (bootstrap intervals, verdicts)"),
                       ("report", "write a study's report: markdown, plots, verdicts on the paper's claims")):
        f = sub.add_parser(name, help=what)
        f.add_argument("study", help="study folder, its study.sqlite, or its sweep spec")
        f.add_argument("--bootstrap", type=int, help="bootstrap replicates (default: the spec's fit.bootstrap)")
        f.add_argument("--no-heldout", action="store_true", help="fit on every point (no held-out points)")
        if name == "report":
            f.add_argument("--out", help="report folder (default STUDY/report)")

    a = sub.add_parser("advise", help="which method and PET size for N examples and a budget, from a fitted study")
    a.add_argument("study", help="study folder, its study.sqlite, or its sweep spec")
    a.add_argument("--examples", type=int, help="your number of fine-tuning examples (D_f)")
    a.add_argument("--budget-hours", type=float, help="the most training time you can spend (hours)")
    a.add_argument("--memory-gib", type=float, help="the most memory (peak RSS, GiB) a run may take")
    a.add_argument("--model", help="the study's model to advise for (default: its PET-axis model, else the largest)")
    a.add_argument("--bootstrap", type=int, help="bootstrap replicates (default: the spec's fit.bootstrap)")
    a.add_argument("--check", action="store_true", help="replay the advice on the 3 largest D_f values held out")
    a.add_argument("--json", action="store_true", help="print the advice as JSON")

    p = sub.add_parser("pretrain", help="pretrain tiny Llama models of the toy family on a toy world's corpus")
    p.add_argument("world", help="toy world folder (written by `tunelab lab toy` or tunelab.scaling.toyworld)")
    p.add_argument("--size", action="append", required=True, help="family size: xs, s, m, l, xl (repeatable)")
    p.add_argument("--out", required=True, help="models folder: SIZE/init, SIZE/ckpt-F")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--checkpoints", default="0.125,0.25,0.5,1", help="fractions of the budget to export")
    p.add_argument("--threads", type=int)

    lab = sub.add_parser("lab", help="one-command studies: `tunelab lab toy`")
    lab.add_argument("study", choices=["toy"])
    lab.add_argument("--out", default="runs/lab-toy")
    lab.add_argument("--scale", default="full", help="full (≤ 60 min on 2 cores) or mini (≈ 1–2 min)")
    lab.add_argument("--workers", type=int, default=2)
    lab.add_argument("--no-check", action="store_true", help="run the grid even if pretraining loss does not "
                                                             "fall with model size")


def cmd_sweep(args: argparse.Namespace) -> int:
    from tunelab.scaling.runner import sweep, threads_per_worker
    from tunelab.scaling.spec import expand, load_spec

    spec = load_spec(args.spec)
    if args.check:
        print(f"{args.spec}: OK ({len(expand(spec))} runs; store {spec.store_path})")
        return 0
    if args.address and args.executor != "ray":
        from tunelab.errors import ConfigError

        raise ConfigError("--address names a Ray cluster: add --executor ray")
    if args.import_only:
        from tunelab.errors import ConfigError
        from tunelab.scaling.runner import prepare

        if not args.ledger:
            raise ConfigError("--import-only takes the runs of a ledger: add --ledger DIR")
        counts = prepare(spec, ledger=args.ledger).counts()
        print(f"{spec.store_path}: {counts}")
        return 0
    threads = args.threads or threads_per_worker(args.workers)
    print(f"sweep {spec.name}: {args.workers} {'Ray task' if args.executor == 'ray' else 'worker'}(s) × {threads} "
          f"thread(s), store {spec.store_path}")
    result = sweep(spec, workers=args.workers, executor=args.executor, retry_failed=args.retry_failed,
                   threads=threads, address=args.address, ledger=args.ledger)
    print(f"done in {result.seconds:.0f} s: {result.counts}" +
          (f" ({result.replaced_workers} worker(s) replaced)" if result.replaced_workers else ""))
    if result.nodes is not None:
        print("runs finished per Ray node: " + ", ".join(f"{n[:12]}… {k}" for n, k in sorted(result.nodes.items())))
    return 0 if result.counts["failed"] == 0 and result.counts["pending"] == 0 else 1


def cmd_runs(args: argparse.Namespace) -> int:
    from tunelab.scaling.report import runs_table
    from tunelab.scaling.store import open_study

    print(runs_table(open_study(args.study), args.limit))
    return 0


def _fit_options(args: argparse.Namespace, store) -> dict:
    spec = store.info("spec", {}) or {}
    fit = spec.get("fit", {})
    replicates = args.bootstrap if args.bootstrap is not None else int(fit.get("bootstrap", 200))
    return {"bootstrap_replicates": replicates, "delta": float(fit.get("delta", 1e-3)),
            "heldout": not args.no_heldout and bool(fit.get("heldout", True))}


def cmd_fit(args: argparse.Namespace) -> int:
    from tunelab.scaling.report import fit_summary_text
    from tunelab.scaling.store import open_study

    store = open_study(args.study)
    print(fit_summary_text(store, **_fit_options(args, store)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tunelab.scaling.report import write_report
    from tunelab.scaling.store import open_study

    store = open_study(args.study)
    path = write_report(store, args.out or store.path.parent / "report", **_fit_options(args, store))
    print(f"report: {path}")
    return 0


def cmd_advise(args: argparse.Namespace) -> int:
    import json

    from tunelab.errors import ConfigError
    from tunelab.scaling.advise import advise, check, render, render_check
    from tunelab.scaling.store import open_study

    store = open_study(args.study)
    limits = {"budget_hours": args.budget_hours, "memory_gib": args.memory_gib, "model": args.model,
              "replicates": args.bootstrap}
    if args.check:
        entries = check(store, **limits)
        print(json.dumps(entries, indent=1) if args.json else render_check(entries, store.path.parent))
        return 0
    if args.examples is None:
        raise ConfigError("tunelab advise: give --examples N (your number of fine-tuning examples), or --check")
    result = advise(store, args.examples, **limits)
    print(json.dumps(result.as_dict(), indent=1) if args.json else render(result), end="" if not args.json else "\n")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from tunelab.scaling.pretrain import PretrainConfig, pretrain

    fractions = [float(f) for f in args.checkpoints.split(",") if f.strip()]
    world = Path(args.world)
    for size in args.size:
        cfg = PretrainConfig(corpus=str(world / "corpus.jsonl"), tokenizer=str(world / "tokenizer"), size=size,
                             out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             checkpoints=fractions, threads=args.threads, progress=True)
        result = pretrain(cfg)
        print(f"{size}: N = {result.non_embedding_params:,}  eval loss {result.eval_loss:.4f}  "
              f"{result.seconds:.0f} s  checkpoints: {', '.join(str(p) for p in result.checkpoints.values())}")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from tunelab.scaling.lab import run_toy

    report = run_toy(args.out, scale=args.scale, workers=args.workers, check=not args.no_check)
    print(f"report: {report}")
    return 0


COMMANDS = {"sweep": cmd_sweep, "advise": cmd_advise, "runs": cmd_runs, "fit": cmd_fit, "report": cmd_report, "pretrain": cmd_pretrain,
            "lab": cmd_lab}
