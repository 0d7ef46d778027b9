"""The benchmark harness (bench/harness.py): the parent side imports no torch, results are named by benchmark, date
and commit, step statistics and noise accounting, and bench/README.md's results tables match bench/results/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = ["train_throughput", "distributed", "reft_throughput", "masking_throughput", "quant_bench", "tables",
           "long_sequences", "loglik_vs_lm_eval", "eval_throughput", "all"]


@pytest.fixture
def harness(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import harness

    return harness


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_parents_import_no_torch(script):
    """A parent that imported torch would raise every child's peak RSS to its own size (see harness.py)."""
    code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import {script}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_result_files_are_named_by_benchmark_date_and_commit(harness, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    env = {"date": "2026-12-07", "git": {"commit": "abc1234", "src_dirty": False}}
    first = harness.write_result("train-throughput", {"environment": dict(env), "configs": {}})
    assert first.name == "train-throughput-2026-12-07-abc1234.json"
    second = harness.write_result("train-throughput", {"environment": dict(env)})
    assert second.name == "train-throughput-2026-12-07-abc1234-2.json"
    dirty = harness.result_path("quant", {"date": "2026-12-07", "git": {"commit": "abc1234", "src_dirty": True}})
    assert dirty.name == "quant-2026-12-07-abc1234-dirty.json"
    data = json.loads(first.read_text())
    assert data["benchmark"] == "train-throughput" and data["environment"]["git"]["commit"] == "abc1234"


def test_step_statistics_drop_warmup_and_count_disturbed_steps(harness):
    raw = {"step_s": [5.0, 3.0, 1.0, 1.0, 2.0], "tokens": [1024] * 5,
           "foreign_cpu_cores": [0.0, 0.0, 0.1, 0.9, 0.0], "status": "ok"}
    m = harness.measure(raw, warmup=2)
    assert m["measured_steps"] == 3 and m["warmup_steps"] == 2
    assert m["tokens_per_s"] == pytest.approx(1024.0)  # median of 1024, 1024, 512
    assert m["clean_steps"] == 2 and m["tokens_per_s_clean_steps"] == pytest.approx((1024 + 512) / 2)
    assert harness.noise(raw, warmup=2) == pytest.approx(1 / 3)


def test_every_result_file_names_its_benchmark_and_commit():
    files = sorted((BENCH / "results").glob("*.json"))
    assert files, "bench/results/ holds the measured results"
    for path in files:
        data = json.loads(path.read_text())
        assert data.get("benchmark"), path
        recorded = ((data.get("environment") or {}).get("git") or {}).get("commit")
        parts = path.stem.split("-")  # BENCH-YYYY-MM-DD-COMMIT[-dirty][-N]; a short hash may be all digits
        assert "nocommit" in parts or (recorded and recorded in parts), path


def test_readme_tables_are_generated_from_the_results():
    out = subprocess.run([sys.executable, str(BENCH / "tables.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_make_bench_record_feeds_the_readme_headline_and_the_tables(tmp_path, monkeypatch):
    """A `make bench` record (bench/all.py) gives the README's headline block its numbers, and each of its
    benchmarks a row in that benchmark's table; without a record the block says how to make one."""
    monkeypatch.syspath_prepend(str(BENCH))
    import tables

    assert "No `make bench` record yet" in tables.headline(tmp_path)
    train = {"benchmark": "train_throughput", "environment": {"date": "2026-12-07", "git": {"commit": "abc1234"}},
             "configs": {"tunelab-lora": {"status": "ok", "tokens_per_s": 700.0, "peak_rss_mib": 1800.0, "mfu": 0.31,
                                          "compute_dtype": "bf16"}},
             "ratios": {"tunelab-lora vs best peft-lora": {"vs": "peft-lora-bf16", "tokens_per_s_ratio": 1.8,
                                                           "peak_rss_ratio": 0.6}}}
    quant = {"benchmark": "quant", "summary": {"qlora_nf4_vs_bf16_lora": {"tokens_per_s_ratio": 0.8}}}
    record = {"benchmark": "bench-all", "mode": "quick", "command": "python bench/all.py --quick",
              "environment": {"date": "2026-12-07", "git": {"commit": "abc1234"},
                              "cpu": {"model_name": "AMD EPYC", "logical_cpus": 2, "flags": ["avx512_bf16"]}},
              "benchmarks": {"train-throughput": {"status": "ok", "result": train},
                             "quant-bench": {"status": "ok", "result": quant},
                             "long-sequences": {"status": "skipped"}}}
    (tmp_path / "bench-all-quick-2026-12-07-abc1234.json").write_text(json.dumps(record))
    block = tables.headline(tmp_path)
    assert "bench-all-quick-2026-12-07-abc1234.json" in block and "AMD EPYC, 2 cores (avx512_bf16)" in block
    assert "| LoRA tokens/s ÷ fastest peft LoRA | ×1.80 (peft-lora-bf16) | ≥ 2× |" in block
    assert "| tunelab-lora MFU (of the peak of the dtype it trains in) | 31% (bf16) |" in block
    assert "| QLoRA-NF4 tokens/s ÷ bf16 LoRA | ×0.80 |" in block and "quick" in block
    # a record from a machine without bf16 units gets its own column, held to the fp32 targets; the older record
    # of the same kind is not shown
    import copy

    for date, ratio in (("2026-12-06", 9.0), ("2026-12-08", 1.4)):
        other = copy.deepcopy(record)
        other["environment"].update(date=date, cpu={"model_name": "Xeon", "logical_cpus": 2, "flags": ["avx2"]})
        lora = other["benchmarks"]["train-throughput"]["result"]["ratios"]["tunelab-lora vs best peft-lora"]
        lora.update(vs="peft-lora-fp32", tokens_per_s_ratio=ratio)
        other["benchmarks"]["train-throughput"]["result"]["configs"]["tunelab-lora"]["compute_dtype"] = "fp32"
        (tmp_path / f"bench-all-quick-{date}-abc1234.json").write_text(json.dumps(other))
    both = tables.headline(tmp_path)
    assert "CPU without bf16 units (bf16 emulated): [bench-all-quick-2026-12-08-abc1234.json]" in both
    assert "| LoRA tokens/s ÷ fastest peft LoRA | ×1.80 (peft-lora-bf16) | ×1.40 (peft-lora-fp32) | ≥ 2× | " \
           "≥ 1.5× (its fp32 configuration) |" in both and "×9.00" not in both
    assert "| 31% (bf16) | 31% (fp32) | ≥ 35% of the bf16 peak at 8 × 128 | ≥ 60% of the fp32 peak |" in both
    page = tables.render(tmp_path)
    assert "### train-throughput" in page and "tunelab-lora: 700 tok/s" in page and "### long-sequences" not in page
    readme = f"intro\n{tables.HEAD_BEGIN}\nold\n{tables.HEAD_END}\nrest"
    assert tables.splice_headline(readme, block) == f"intro\n{block}\nrest"


def test_make_bench_refuses_an_unknown_benchmark():
    out = subprocess.run([sys.executable, str(BENCH / "all.py"), "--only", "train-throughput,nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown benchmark(s) nope" in out.stderr


def test_emulated_bf16_peers_are_skipped_only_without_bf16_units(monkeypatch, tmp_path):
    """train_throughput --skip-emulated-bf16: on a CPU without bf16 units the peers' bf16 configurations are
    recorded as skipped (with the measured matmul peaks); tunelab's own rows and the fp32 peers still run; with
    bf16 units nothing is skipped."""
    monkeypatch.syspath_prepend(str(BENCH))
    import train_throughput as tt

    names = ["tunelab-lora", "peft-lora-fp32", "peft-lora-bf16", "plain-full-bf16autocast"]
    ran = []

    def child(name, workdir, steps, timeout):
        if name == "prepare":
            return {"status": "ok", "compile_available": True, "model_dtype_auto": "torch.float32"}
        return {"status": "ok", "peak_bf16_tflops": 0.01, "peak_fp32_tflops": 0.06}

    monkeypatch.setattr(tt, "run_child", child)
    monkeypatch.setattr(tt, "run_config", lambda args, name, workdir, rep: ran.append(name) or {"status": "ok"})
    args = tt.parse_args(["--skip-emulated-bf16", "--wait-idle", "0"])
    for has_units, skipped in ((False, {"peft-lora-bf16", "plain-full-bf16autocast"}), (True, set())):
        ran.clear()
        monkeypatch.setattr(tt, "has_bf16_units", lambda has_units=has_units: has_units)
        raw = tt.run_all(args, names, tmp_path)
        assert set(raw["skipped"]) == skipped and ran == [n for n in names if n not in skipped]
        assert all("bf16 0.010 vs fp32 0.060 TFLOP/s" in why for why in raw["skipped"].values())
