"""Smoke tests: the real CLI on tiny models — train, generate, methods, errors a user can act on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main

from conftest import REPO


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tunelab.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def tiny_cfg(tmp_path: Path, **data) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "tiny-smoke.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "run")
    cfg["train"]["progress"] = False
    cfg["data"].update(data)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_then_generate_end_to_end(tmp_path):
    out = run_cli("train", str(tiny_cfg(tmp_path)), "--set", "train.max_steps=3")
    assert out.returncode == 0, out.stderr
    assert "run saved to" in out.stdout and "trainable" in out.stdout
    gen = run_cli("generate", str(tmp_path / "run"), "--prompt", "Reverse the letters: abc", "--template", "plain",
                  "--max-new-tokens", "5")
    assert gen.returncode == 0, gen.stderr
    assert "### Reverse the letters: abc" in gen.stdout


def test_methods_lists_registry_with_options(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "lora:" in out and "full:" in out and "alpha" in out and "arxiv.org" in out


def test_check_validates_without_training(tmp_path, capsys):
    assert main(["train", str(tiny_cfg(tmp_path)), "--check"]) == 0
    assert "OK" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_unknown_key_is_one_clear_line(tmp_path, capsys):
    code = main(["train", str(tiny_cfg(tmp_path)), "--set", "train.bach_size=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown key 'bach_size' in section 'train'. Did you mean 'batch_size'?" in err
    assert "Traceback" not in err


def _bad_data(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    rows = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say yo"},
            {"instruction": "Say ok", "output": "ok"}]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_row_stops_with_file_line_field(tmp_path, capsys):
    data = _bad_data(tmp_path)
    code = main(["train", str(tiny_cfg(tmp_path, train=str(data), eval=None))])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data}:2:" in err and "'output'" in err and "--skip-bad-rows" in err
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_skip_bad_rows_reports_lines(tmp_path, capsys):
    data = _bad_data(tmp_path)
    code = main(["train", str(tiny_cfg(tmp_path, train=str(data), eval=None)), "--skip-bad-rows",
                 "--set", "train.max_steps=1"])
    assert code == 0
    err = capsys.readouterr().err  # on the console, not only in meta.json
    assert f"skipped 2 bad rows: {data}:2: " in err and f"; {data}:4: " in err and "meta.json" in err
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["data"]["train_examples"] == 2
    assert [b.split(": ")[0] for b in meta["bad_rows"]] == [f"{data}:2", f"{data}:4"]


def test_target_matching_nothing_lists_layers(tmp_path, capsys):
    code = main(["train", str(tiny_cfg(tmp_path)), "--set", "method.targets=[qkv]"])
    err = capsys.readouterr().err
    assert code == 2 and "matched no linear layer" in err and "self_attn.q_proj" in err
    meta = tmp_path / "run" / "meta.json"
    assert not meta.exists() or json.loads(meta.read_text())["status"] != "complete"


def test_demo_pipeline_on_tiny_model(tmp_path, capsys):
    from tunelab.demo import run_demo

    result = run_demo(model="tiny-llama", steps=3, output_dir=str(tmp_path / "demo"), n_test=4, show=2)
    out = capsys.readouterr().out
    assert "before fine-tuning" in out and "after LoRA" in out and "run saved to" in out
    assert 0.0 <= result["before"] <= 1.0 and (tmp_path / "demo" / "adapter.safetensors").is_file()


@pytest.mark.slow
def test_real_demo_gains(tmp_path):
    from tunelab.demo import run_demo

    result = run_demo(output_dir=str(tmp_path / "demo"))
    assert result["after"] - result["before"] >= 0.30
    assert result["seconds"] <= 300
