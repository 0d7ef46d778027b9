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
import yaml

from test_train import cfg_dict
from tunelab.cli import main
from tunelab.config import ConfigError, config_from_dict
from tunelab.methods.core import MethodError
from tunelab.models import ModelError, load_model
from tunelab.runs import LOCK_FILE, RunError, RunLock
from tunelab.train.loop import Trainer, TrainingDiverged

from conftest import REPO, tiny


def write_cfg(tmp_path: Path, **over) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg_dict(tmp_path, **over)))
    return path


# -- the run folder lock -----------------------------------------------------------------------------------------


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the run folder's lock until it is killed."""
    code = ("import sys, time; from tunelab.runs import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
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


# -- user errors: one line and exit 2, the traceback with --debug -------------------------------------------------


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
