"""Fault injection on the training side (issue 19): each test breaks something on purpose — a second trainer on
a live run folder, a holder killed with -9, a diverging step, a misspelt target, a torn metrics line, a damaged
checkpoint, bad rows, a pickle where weights belong, a user error — and checks the one clear answer to it."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import yaml

from test_train import cfg_dict
from tunelab.cli import main
from tunelab.config import ConfigError
from tunelab.methods.core import MethodError
from tunelab.models import ModelError, load_model

from conftest import tiny


def write_cfg(tmp_path: Path, **over) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg_dict(tmp_path, **over)))
    return path


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
