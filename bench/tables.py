"""The tables of bench/README.md's "All results" section, generated from bench/results/*.json (never edited).

    python bench/tables.py            # rewrite the section between the markers in bench/README.md
    python bench/tables.py --check    # exit 1 when the section is not what the result files give (CI test)

One table per benchmark: a row per result file (date, commit, CPU and its bf16 units, settings) with each
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
    if "speedup_batched" in data:
        parts.append(f"batched {_num(data['batched']['tokens_per_s'], 1)} tok/s, ×{data['speedup_batched']} "
                     f"one-at-a-time; identical outputs {data.get('identical_outputs')}")
    return "<br>".join(parts) or "–"


def settings_cell(data: dict[str, Any]) -> str:
    s = data.get("settings") or {}
    keys = ("batch", "seq_len", "steps", "repeats", "warmup_steps_excluded")
    shown = [f"{k} {s[k]}" for k in keys if k in s]
    if "prompts" in data:
        shown.append(f"{data['prompts']} prompts × {data.get('max_new_tokens')} new tokens, {data.get('dtype')}")
    return ", ".join(shown) or "–"


def render(results: Path = RESULTS) -> str:
    by_bench: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
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
    if args.check:
        if new != text:
            print("bench/README.md: the results section is out of date; run python bench/tables.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    print(f"wrote the results section of {README} ({len(list(RESULTS.glob('*.json')))} result files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
