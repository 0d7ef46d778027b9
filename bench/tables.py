"""The tables of bench/README.md's "All results" section, generated from bench/results/*.json (never edited).

    python bench/tables.py            # rewrite the section between the markers in bench/README.md
    python bench/tables.py --check    # exit 1 when the section is not what the result files give (CI test)

Also the headline block of the README (between its bench-headline markers): the issue's targets against the newest
`make bench` record (bench/all.py). One table per benchmark: a row per result file (a `make bench` record adds a
row to each of its benchmarks' tables) (date, commit, CPU and its bf16 units, settings) with each
configuration's tokens/s and peak RSS, and the benchmark's ratios against its peers with the target each ratio is
held to. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
BEGIN, END = "<!-- results:begin (bench/tables.py writes this section) -->", "<!-- results:end -->"


def _num(x: Any, digits: int = 0) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int | float):
        return f"{x:,.{digits}f}"
    return str(x)


def machine(env: dict[str, Any]) -> str:
    """CPU model, cores and its bf16 units (AMX, AVX512-BF16, or none: bf16 emulated)."""
    cpu = env.get("cpu") or {}
    if not cpu:
        return "not recorded"
    flags = set(cpu.get("flags") or [])
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags] or ["no bf16 units"]
    name = cpu.get("model_name") or env.get("platform") or "unknown CPU"
    cores = cpu.get("logical_cpus")
    return f"{name}{f', {cores} cores' if cores else ''} ({', '.join(units)})"


def provenance(path: Path, data: dict[str, Any]) -> list[str]:
    env = data.get("environment") or data.get("env") or {}
    git = env.get("git") or {}
    stem = path.stem.split("-")
    date = env.get("date") or next((f"{a}-{b}-{c}" for a, b, c in zip(stem, stem[1:], stem[2:], strict=False)
                                    if a.isdigit() and len(a) == 4), "?")
    commit = (git.get("commit") or "?") + (" (src dirty)" if git.get("src_dirty") else "")
    return [f"[{path.name}](results/{path.name})", date, commit, machine(env)]


def config_cells(configs: dict[str, Any]) -> str:
    parts = []
    for name, c in configs.items():
        if not isinstance(c, dict):
            continue
        if c.get("status") not in (None, "ok"):
            parts.append(f"{name}: {c.get('status')}")
            continue
        tps = c.get("tokens_per_s") or (c.get("measured") or {}).get("tokens_per_s")
        rss = c.get("peak_rss_mib", c.get("peak_rss_mib_max_rank"))  # distributed: the largest rank's
        if tps is None and rss is None:
            continue
        mfu, dtype = c.get("mfu"), c.get("compute_dtype")
        if mfu is None:  # results before the per-dtype peak: against the bf16 matmul peak
            mfu, dtype = c.get("mfu_vs_measured_bf16_mm"), "bf16 peak"
        extra = f", MFU {mfu:.0%} ({dtype})" if isinstance(mfu, int | float) else ""
        parts.append(f"{name}: {_num(tps)} tok/s, {_num(rss)} MiB{extra}")
    return "<br>".join(parts) or "–"


def ratio_cells(data: dict[str, Any]) -> str:
    ratios = data.get("ratios") or {}
    if "tunelab vs best pyreft" in data:
        ratios = {"tunelab-loreft vs best pyreft": data["tunelab vs best pyreft"]}
    parts = []
    for key, r in ratios.items():
        if not isinstance(r, dict) or r.get("available") is False:
            continue
        shown = {k: v for k, v in r.items() if (k.endswith("ratio") or "_vs_" in k) and isinstance(v, int | float)}
        met = r.get("target_met")
        verdict = ""
        if isinstance(met, dict):
            verdict = "; " + ", ".join(f"{k}: {'met' if v else 'not met' if v is False else '?'}"
                                       for k, v in met.items())
        elif isinstance(met, bool):
            verdict = f"; target {'met' if met else 'not met'}"
        vs = f" ({r['vs']})" if r.get("vs") else ""
        parts.append(f"{key}{vs}: " + ", ".join(f"{k.replace('_ratio', '')} ×{v:.2f}" for k, v in shown.items())
                     + verdict)
    summary = data.get("summary")
    if isinstance(summary, dict):
        parts += [f"{k}: {json.dumps(v) if isinstance(v, dict) else _num(v, 3)}" for k, v in summary.items()]
    if "speedup_vs_lm_eval" in data:
        rows = data.get("rows") or {}
        acc = ", ".join(f"{k} acc {_num(100 * r['acc'], 1)}" for k, r in rows.items() if isinstance(r.get("acc"), float))
        parts.append(f"×{data['speedup_vs_lm_eval']} lm-eval (×{data.get('speedup_vs_lm_eval_loglikelihood_only')} "
                     f"its loglikelihood call alone), ×{data.get('speedup_from_sharing')} from sharing contexts; "
                     f"{acc}; same predictions {data.get('same_acc_prediction')}")
    if isinstance(data.get("best"), dict):
        b, f = data["best"], data.get("best_fp32") or {}
        parts.append(f"best {b['mode']} {_num(b['tokens_per_s'], 1)} tok/s (×{b['vs_issue_baseline_52.8']} the 52.8 "
                     f"baseline, agreement {b['agreement']:.0%})"
                     + (f"; best fp32 {f['mode']} {_num(f['tokens_per_s'], 1)} tok/s (agreement {f['agreement']:.0%})"
                        if f else ""))
    if "speedup_batched" in data:
        parts.append(f"batched {_num(data['batched']['tokens_per_s'], 1)} tok/s, ×{data['speedup_batched']} "
                     f"one-at-a-time; identical outputs {data.get('identical_outputs')}")
    return "<br>".join(parts) or "–"


def settings_cell(data: dict[str, Any]) -> str:
    s = data.get("settings") or {}
    keys = ("batch", "seq_len", "steps", "repeats", "warmup_steps_excluded")
    shown = [f"{k} {s[k]}" for k in keys if k in s]
    if "items" in data and "options" in data:
        shown.append(f"{data['items']} items / {data['options']} options, batch {data.get('batch_size')}, "
                     f"{data.get('repeats')} repeats, {data.get('dtype')}")
    if "prompts" in data:
        shown.append(f"{data['prompts']} prompts × {data.get('max_new_tokens')} new tokens, {data.get('dtype')}")
    return ", ".join(shown) or "–"


def render(results: Path = RESULTS) -> str:
    by_bench: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data.get("benchmarks"), dict):  # a `make bench` record: each benchmark in its own table
            for sub, entry in data["benchmarks"].items():
                if isinstance(entry, dict) and entry.get("status") == "ok":
                    by_bench.setdefault(sub, []).append((path, entry["result"]))
            continue
        name = str(data.get("benchmark") or path.stem.rsplit("-", 4)[0]).replace("_", "-")
        by_bench.setdefault(name, []).append((path, data))
    out = [BEGIN, "", "Generated by `python bench/tables.py` from every file in bench/results/ (one row per run; "
                      "compare rows only within one file: the machines differ).", ""]
    for bench, rows in sorted(by_bench.items()):
        out += [f"### {bench}", "", "| result | date | commit | machine | settings | configurations | against the peer "
                "(target) |", "|---|---|---|---|---|---|---|"]
        for path, data in sorted(rows, key=lambda r: r[0].name):
            cells = [*provenance(path, data), settings_cell(data), config_cells(data.get("configs") or {}),
                     ratio_cells(data)]
            out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        out.append("")
    out.append(END)
    return "\n".join(out)


HEAD_BEGIN = "<!-- bench-headline:begin (bench/tables.py writes this block from the newest `make bench` record) -->"
HEAD_END = "<!-- bench-headline:end -->"
ROOT_README = HERE.parent / "README.md"


def _x(v: Any) -> str:
    return f"×{v:.2f}" if isinstance(v, int | float) else "–"


def headline(results: Path = RESULTS) -> str:
    """The README's headline numbers: the issue's targets against the newest `make bench` record."""
    records = []
    for path in sorted(results.glob("bench-all*.json")):
        data = json.loads(path.read_text())
        records.append(((data.get("environment") or {}).get("date", ""), path.name, path, data))
    out = [HEAD_BEGIN]
    if not records:
        out += ["", "No `make bench` record yet: run `make bench` (or `make bench-quick`).", "", HEAD_END]
        return "\n".join(out)
    _, _, path, data = max(records, key=lambda r: (r[0], r[1]))
    env = data.get("environment") or {}
    bench = data.get("benchmarks") or {}

    def result(name: str) -> dict[str, Any]:
        entry = bench.get(name) or {}
        return entry.get("result") or {} if entry.get("status") == "ok" else {}

    train, quant, gen = result("train-throughput"), result("quant-bench"), result("eval-throughput")
    ratios, configs = train.get("ratios") or {}, train.get("configs") or {}
    lora, full = ratios.get("tunelab-lora vs best peft-lora") or {}, ratios.get("tunelab-full vs best plain-full") or {}
    rows = [("LoRA tokens/s ÷ fastest peft LoRA" + (f" ({lora['vs']})" if lora.get("vs") else ""),
             _x(lora.get("tokens_per_s_ratio")), "≥ 2×"),
            ("LoRA peak RSS ÷ that peer", _x(lora.get("peak_rss_ratio")), "≤ 0.6×"),
            ("full tuning tokens/s ÷ fastest plain loop" + (f" ({full['vs']})" if full.get("vs") else ""),
             _x(full.get("tokens_per_s_ratio")), "≥ 2×")]
    for name in ("tunelab-lora", "tunelab-full"):
        c = configs.get(name) or {}
        if isinstance(c.get("mfu"), int | float):
            rows.append((f"{name} MFU (peak of {c.get('compute_dtype')})", f"{c['mfu']:.0%}", "≥ 35% at 8 × 128"))
    q = (quant.get("summary") or {}).get("qlora_nf4_vs_bf16_lora") or {}
    rows.append(("QLoRA-NF4 tokens/s ÷ bf16 LoRA", _x(q.get("tokens_per_s_ratio")), "≥ 0.9×"))
    if isinstance(gen.get("best"), dict):
        for key in ("best", "best_fp32"):
            g = gen.get(key) or {}
            if g:
                rows.append((f"greedy generation, {g['mode']} ({gen.get('prompts')} prompts; outputs identical to "
                             f"fp32 one at a time: {g['agreement']:.0%})",
                             f"{_num(g['tokens_per_s'], 1)} tok/s (×{g['vs_issue_baseline_52.8']})", "≥ 5 × 52.8 tok/s"))
    elif gen:
        rows.append((f"greedy generation, batched ({gen.get('prompts')} prompts, {gen.get('dtype')})",
                     f"{_num((gen.get('batched') or {}).get('tokens_per_s'), 1)} tok/s", "≥ 5 × 52.8 tok/s"))
    ll = result("loglik-vs-lm-eval")
    if ll:
        rows.append((f"log-likelihood MC scoring ÷ lm-eval ({ll.get('items')} ARC-Easy items, {ll.get('dtype')})",
                     _x(ll.get("speedup_vs_lm_eval")), "≥ 3×"))
        rows.append(("its accuracy − lm-eval's (points)", _num(ll.get("acc_difference_points"), 2), "within ±0.5"))
    git = env.get("git") or {}
    out += ["", f"Newest `make bench` record: [{path.name}](bench/results/{path.name}) — `{data.get('command')}`, "
                f"{env.get('date', '?')}, commit {git.get('commit', '?')}, {machine(env)}"
                + (" (quick: a few steps per configuration, read as a smoke measurement)"
                   if data.get("mode") == "quick" else "") + ".", "",
            "| measured | value | target (issue 18) |", "|---|---:|---|",
            *[f"| {a} | {b} | {c} |" for a, b, c in rows], "", HEAD_END]
    return "\n".join(out)


def splice_headline(text: str, block: str) -> str:
    if HEAD_BEGIN in text and HEAD_END in text:
        head, rest = text.split(HEAD_BEGIN, 1)
        return head + block + rest.split(HEAD_END, 1)[1]
    return text


def splice(text: str, section: str) -> str:
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + section + rest.split(END, 1)[1]
    return text.rstrip() + "\n\n## All results\n\n" + section + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when bench/README.md's section is out of date")
    args = p.parse_args(argv)
    text = README.read_text()
    new = splice(text, render())
    root = ROOT_README.read_text()
    new_root = splice_headline(root, headline())
    if args.check:
        stale = [str(p) for p, a, b in ((README, text, new), (ROOT_README, root, new_root)) if a != b]
        if stale:
            print(f"{', '.join(stale)}: the generated results are out of date; run python bench/tables.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    if new_root != root:
        ROOT_README.write_text(new_root)
    print(f"wrote the results section of {README} ({len(list(RESULTS.glob('*.json')))} result files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
