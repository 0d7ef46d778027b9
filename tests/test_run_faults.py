"""Fault injection on the training side (issue 19): each test breaks something on purpose — a second trainer on
a live run folder, a holder killed with -9, a diverging step, a misspelt target, a torn metrics line, a damaged
checkpoint, bad rows, a pickle where weights belong, a user error — and checks the one clear answer to it."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_train import cfg_dict
from tunelab.cli import main
from tunelab.config import ConfigError, config_from_dict
from tunelab.errors import RunError
from tunelab.files import read_jsonl
from tunelab.methods.core import MethodError
from tunelab.models import ModelError, load_model
from tunelab.rundir import LOCK_FILE, RunLock
from tunelab.train.loop import Trainer, TrainingDiverged, train

from conftest import REPO, tiny


def write_cfg(tmp_path: Path, **over) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg_dict(tmp_path, **over)))
    return path


# -- the run folder lock -----------------------------------------------------------------------------------------


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the run folder's lock until it is killed."""
    code = ("import sys, time; from tunelab.rundir import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_trainer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    cfg = write_cfg(tmp_path, train__max_steps=1)
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        assert main(["train", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert f"is in use: pid {holder.pid} on {os.uname().nodename} (since " in err and "Traceback" not in err
        assert not (run_dir / "meta.json").exists()  # the refused process wrote nothing into the holder's run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(["train", str(cfg)]) == 0  # the kernel released the dead holder's lock; its record is left behind
    err = capsys.readouterr().err
    assert f"taking over the lock left by pid {holder.pid}" in err and "that process is gone" in err
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "complete"
    assert (run_dir / LOCK_FILE).read_text() == ""  # released cleanly: no record, no warning for the next one


def test_run_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path), pytest.raises(RunError, match=f"pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # free again after the with block


# -- divergence: never `complete` --------------------------------------------------------------------------------


def test_diverged_eval_loss_fails_the_cli_with_the_step_and_value(tmp_path, capsys):
    """lr=1e30 for one step: the training loss was finite, the evaluation after the step is NaN."""
    cfg = write_cfg(tmp_path, data__eval="synthetic:arith:dev:8")
    code = main(["train", str(cfg), "--set", "train.lr=1e30", "--set", "train.max_steps=1",
                 "--set", "train.warmup_steps=0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "training diverged at step 1: eval loss is nan" in err and len(err.strip().splitlines()) == 1
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["status"] == "diverged" and meta["failed_step"] == 1
    assert not (tmp_path / "run" / "adapter.safetensors").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("eval_loss" not in r for r in rows)  # no NaN row for a reader to take as a result


def test_non_finite_weights_after_the_last_step_raise_from_trainer_run(tmp_path):
    """No eval set: the last update overflows the weights to inf; Trainer.run() (the sweep runner's call) raises."""
    cfg = config_from_dict(cfg_dict(tmp_path, train__lr=1e39, train__max_steps=1, train__warmup_steps=0))
    with pytest.raises(TrainingDiverged, match=r"at step 1: trained weight .*lora.* is not finite"):
        Trainer(cfg).run()
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["status"] == "diverged"


def test_a_sweep_records_a_diverged_run_as_failed_not_done(tmp_path):
    from tunelab.scaling.runner import _execute_claim
    from tunelab.scaling.store import Store

    config = {"model": {"name": "tiny-llama", "dtype": "fp32"}, "method": {"name": "lora", "r": 2, "alpha": 4},
              "data": {"train": "synthetic:reverse:train:8", "eval": "synthetic:reverse:dev:4", "template": "plain",
                       "max_length": 64},
              "train": {"batch_size": 4, "max_steps": 1, "lr": 1e30, "warmup_steps": 0, "seed": 0,
                        "progress": False}}
    store = Store(tmp_path / "study.sqlite")
    store.add_runs([("nan-run", config, {"method": "lora"})])
    _execute_claim(store, store.claim(), tmp_path / "runs" / "nan-run", threads=1)
    (row,) = store.rows()
    assert row.status == "failed" and row.metrics is None and "eval loss is nan" in row.error


# -- targets -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [{"name": "lora", "r": 2}, {"name": "series", "bottleneck": 4}])
def test_every_name_of_a_target_list_must_match(method):
    from tunelab.methods import get_method

    model, _ = tiny()
    module = get_method(method["name"])
    targets = ["q_proj", "nonexistent"] if method["name"] == "lora" else ["mlp", "nonexistent"]
    with pytest.raises(MethodError) as err:
        module.apply(model, module.Config(**{k: v for k, v in method.items() if k != "name"}, targets=targets))
    msg = str(err.value)
    assert "target 'nonexistent' (in" in msg and "LlamaForCausalLM" in msg and "mlp" in msg
    assert "'q_proj'" not in msg.split("(in")[0]  # only the name that matched nothing is blamed


def test_target_list_typo_is_one_line_from_the_cli(tmp_path, capsys):
    assert main(["train", str(write_cfg(tmp_path)), "--set", "method.targets=[q_proj,nonexistent]"]) == 2
    err = capsys.readouterr().err
    assert "'nonexistent'" in err and "self_attn.q_proj" in err and "Traceback" not in err


# -- resume: a torn metrics line, damaged checkpoints -------------------------------------------------------------


def _interrupted_run(tmp_path: Path, monkeypatch, steps: int = 4) -> Path:
    """A run stopped after its last step, before it was saved: checkpoints at steps 2 and 3, status 'failed'."""
    def stop(self, _metrics):
        raise RuntimeError("stopped before the end")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_finish", stop)
        with pytest.raises(RuntimeError, match="stopped"):
            train(config_from_dict(cfg_dict(tmp_path, train__max_steps=steps, train__save_every=1)))
    return tmp_path / "run"


def _straight_weights(tmp_path: Path, steps: int = 4) -> dict[str, torch.Tensor]:
    res = train(config_from_dict(cfg_dict(tmp_path / "straight", train__max_steps=steps)))
    return load_file(str(res.run_dir / "adapter.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torn_last_metrics_line_is_dropped_with_a_warning_on_resume(tmp_path, monkeypatch, capsys):
    run = _interrupted_run(tmp_path, monkeypatch)
    metrics = run / "metrics.jsonl"
    n_lines = len(metrics.read_text().splitlines())
    with open(metrics, "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # a process killed inside its write
    res = train(config_from_dict(cfg_dict(tmp_path, train__max_steps=4, train__save_every=1)), resume=True)
    assert f"{metrics}:{n_lines + 1}: dropped a torn last line" in capsys.readouterr().err
    assert [r["step"] for r in read_jsonl(metrics) if "loss" in r] == [1, 2, 3, 4] and res.steps == 4


def test_a_damaged_line_before_the_last_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(RunError, match=rf"{path}:2: not a JSON row"):
        read_jsonl(path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


@pytest.mark.parametrize("damage", ["truncated newest", "no state.json anywhere"])
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, monkeypatch, capsys, damage):
    run = _interrupted_run(tmp_path, monkeypatch)
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-00000002", "step-00000003"]
    if damage == "truncated newest":
        _truncate(ckpts[-1] / "trainable.safetensors")
    else:
        for p in ckpts:
            (p / "state.json").unlink()
    capsys.readouterr()
    resumed = train(config_from_dict(cfg_dict(tmp_path, train__max_steps=4, train__save_every=1)), resume=True)
    err = capsys.readouterr().err
    assert f"checkpoint {ckpts[-1]} is damaged" in err and "Traceback" not in err
    if damage == "truncated newest":
        assert "trainable.safetensors: not a readable safetensors file" in err
        assert (run / "checkpoints" / "step-00000003.damaged").is_dir()  # set aside, kept for inspection
    else:
        assert "state.json: file missing" in err and "no complete checkpoint" in err and "from step 0" in err
    _assert_same(load_file(str(resumed.run_dir / "adapter.safetensors")), _straight_weights(tmp_path))
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


# -- bad rows on the console -------------------------------------------------------------------------------------
# (tests/test_cli.py::test_skip_bad_rows_reports_lines checks the console line with meta.json)


# -- pickles where weights belong --------------------------------------------------------------------------------


class _Payload:
    """Unpickling this would create a file: the tests check it never exists."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": _Payload(marker)}, protocol=4))


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.safetensors"])
def test_a_pickle_in_a_model_folder_is_refused_naming_the_file(tmp_path, filename):
    model, tok = tiny()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    _write_pickle(folder / filename, tmp_path / "ran")
    with pytest.raises(ModelError) as err:
        load_model(str(folder), "fp32")
    msg = str(err.value)
    assert msg.startswith(f"{folder / filename}: refused: a pickle file") and "weights_only" not in msg
    assert not (tmp_path / "ran").exists()


def test_a_pickle_as_adapter_file_is_one_line_from_generate(tmp_path, capsys):
    res = train(config_from_dict(cfg_dict(tmp_path, train__max_steps=1)))
    adapter = res.run_dir / "adapter.safetensors"
    _write_pickle(adapter, tmp_path / "ran")
    capsys.readouterr()
    assert main(["generate", str(res.run_dir), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{adapter}: refused: this is a pickle" in err and "weights_only" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "ran").exists()


# -- user errors: one line and exit 2, the traceback with --debug -------------------------------------------------


def test_damaged_meta_json_is_named(tmp_path, capsys):
    (tmp_path / "meta.json").write_text('{"status": "comp')
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'meta.json'}: damaged" in err and "Traceback" not in err


def test_a_file_system_error_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["train", str(write_cfg(tmp_path, output_dir=str(tmp_path / "afile" / "run")))]) == 2
    err = capsys.readouterr().err
    assert "afile" in err and "--debug shows the traceback" in err and len(err.strip().splitlines()) == 1


def test_non_utf8_config_is_one_line(tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_bytes(b"\xff\xfe model: x\n")
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
    assert "cfg.yaml: not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    args = ["train", str(write_cfg(tmp_path)), "--set", "train.bach_size=2"]
    with pytest.raises(ConfigError, match="bach_size"):
        main(["--debug", *args] if where == "before" else [*args, "--debug"])
