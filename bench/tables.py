"""The tables of bench/README.md's "All results" section, generated from bench/results/*.json (never edited).

    python bench/tables.py            # rewrite the section between the markers in bench/README.md
    python bench/tables.py --check    # exit 1 when the section is not what the result files give (CI test)

Also the headline block of the README (between its bench-headline markers): the issue's targets against the newest
`make bench` record (bench/all.py) of each kind of machine — with bf16 units (AMX, AVX512-BF16) and without, where
bf16 is emulated and the issue's targets are the fp32 ones. One table per benchmark: a row per result file (a `make bench` record adds a
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


def has_bf16_units(env: dict[str, Any]) -> bool:
    """Whether the record's CPU has bf16 units (AMX or AVX512-BF16); without them bf16 is emulated."""
    flags = set((env.get("cpu") or {}).get("flags") or [])
    return bool(flags & {"amx_bf16", "avx512_bf16"})


# The two kinds of machine issue 18 holds to different targets: (key, heading, training-ratio target, MFU target)
KINDS = (("bf16", "CPU with bf16 units", "≥ 2×", "≥ 35% of the bf16 peak at 8 × 128"),
         ("fp32", "CPU without bf16 units (bf16 emulated)", "≥ 1.5× (its fp32 configuration)",
          "≥ 60% of the fp32 peak"))


def _headline_rows(data: dict[str, Any]) -> dict[str, str]:
    """{measured item: value cell} of one `make bench` record."""
    bench = data.get("benchmarks") or {}

    def result(name: str) -> dict[str, Any]:
        entry = bench.get(name) or {}
        return entry.get("result") or {} if entry.get("status") == "ok" else {}

    train, quant, gen = result("train-throughput"), result("quant-bench"), result("eval-throughput")
    ratios, configs = train.get("ratios") or {}, train.get("configs") or {}
    lora, full = ratios.get("tunelab-lora vs best peft-lora") or {}, ratios.get("tunelab-full vs best plain-full") or {}

    def vs(r: dict[str, Any], key: str) -> str:
        return _x(r.get(key)) + (f" ({r['vs']})" if r.get("vs") and r.get(key) is not None else "")

    rows = {"LoRA tokens/s ÷ fastest peft LoRA": vs(lora, "tokens_per_s_ratio"),
            "LoRA peak RSS ÷ that peer": _x(lora.get("peak_rss_ratio")),
            "full tuning tokens/s ÷ fastest plain loop": vs(full, "tokens_per_s_ratio")}
    for name in ("tunelab-lora", "tunelab-full"):
        c = configs.get(name) or {}
        rows[f"{name} MFU (of the peak of the dtype it trains in)"] = (
            f"{c['mfu']:.0%} ({c.get('compute_dtype')})" if isinstance(c.get("mfu"), int | float) else "–")
    q = (quant.get("summary") or {}).get("qlora_nf4_vs_bf16_lora") or {}
    rows["QLoRA-NF4 tokens/s ÷ bf16 LoRA"] = _x(q.get("tokens_per_s_ratio"))
    if isinstance(gen.get("best"), dict):
        for key, what in (("best", "fastest mode"), ("best_fp32", "fastest fp32 mode")):
            g = gen.get(key) or {}
            if g:
                rows[f"greedy generation, {what} ({gen.get('prompts')} prompts)"] = (
                    f"{_num(g['tokens_per_s'], 1)} tok/s (×{g['vs_issue_baseline_52.8']}; {g['mode']}; outputs "
                    f"identical to fp32 one at a time: {g['agreement']:.0%})")
    elif gen:
        rows[f"greedy generation, batched ({gen.get('prompts')} prompts)"] = (
            f"{_num((gen.get('batched') or {}).get('tokens_per_s'), 1)} tok/s ({gen.get('dtype')})")
    ll = result("loglik-vs-lm-eval")
    if ll:
        rows["log-likelihood MC scoring ÷ lm-eval (ARC-Easy)"] = (
            f"{_x(ll.get('speedup_vs_lm_eval'))} ({ll.get('items')} items, {ll.get('dtype')})")
        rows["its accuracy − lm-eval's (points)"] = _num(ll.get("acc_difference_points"), 2)
    return rows


def _target(item: str, kind: tuple[str, str, str, str]) -> str:
    if item.startswith(("LoRA tokens", "full tuning tokens")):
        return kind[2]
    if "MFU" in item:
        return kind[3]
    return {"LoRA peak RSS ÷ that peer": "≤ 0.6×", "QLoRA-NF4 tokens/s ÷ bf16 LoRA": "≥ 0.9×",
            "its accuracy − lm-eval's (points)": "within ±0.5"}.get(
        item, "≥ 3×" if item.startswith("log-likelihood") else "≥ 5 × 52.8 tok/s" if "generation" in item else "")


def headline(results: Path = RESULTS) -> str:
    """The README's headline numbers: the issue's targets against the newest `make bench` record of each kind of
    machine (with bf16 units, and without: there the targets are the fp32 ones)."""
    newest: dict[str, tuple[tuple[str, str], Path, dict[str, Any]]] = {}
    for path in sorted(results.glob("bench-all*.json")):
        data = json.loads(path.read_text())
        env = data.get("environment") or {}
        kind = "bf16" if has_bf16_units(env) else "fp32"
        order = (env.get("date", ""), path.name)
        if kind not in newest or order > newest[kind][0]:
            newest[kind] = (order, path, data)
    out = [HEAD_BEGIN]
    if not newest:
        out += ["", "No `make bench` record yet: run `make bench` (or `make bench-quick`).", "", HEAD_END]
        return "\n".join(out)
    kinds = [k for k in KINDS if k[0] in newest]
    out.append("")
    for kind in kinds:
        _, path, data = newest[kind[0]]
        env, git = data.get("environment") or {}, (data.get("environment") or {}).get("git") or {}
        out.append(f"- {kind[1]}: [{path.name}](bench/results/{path.name}) — `{data.get('command')}`, "
                   f"{env.get('date', '?')}, commit {git.get('commit', '?')}, {machine(env)}"
                   + (" (quick: a few steps per configuration, read as a smoke measurement)"
                      if data.get("mode") == "quick" else ""))
    values = {k[0]: _headline_rows(newest[k[0]][2]) for k in kinds}
    items = list(dict.fromkeys(i for k in kinds for i in values[k[0]]))
    if len(kinds) == 1:
        header = ["measured", kinds[0][1], "target (issue 18)"]
        body = [[i, values[kinds[0][0]].get(i, "–"), _target(i, kinds[0])] for i in items]
    else:
        header = ["measured", *[k[1] for k in kinds], *[f"target: {k[1]}" for k in kinds]]
        body = [[i, *[values[k[0]].get(i, "–") for k in kinds], *[_target(i, k) for k in kinds]] for i in items]
    out += ["", "| " + " | ".join(header) + " |", "|---|" + "---:|" * len(kinds) + "---|" * (len(header) - 1 - len(kinds)),
            *["| " + " | ".join(row) + " |" for row in body], "", HEAD_END]
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
