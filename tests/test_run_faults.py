"""Fault injection on the training side (issue 19): each test breaks something on purpose — a second trainer on
a live run folder, a holder killed with -9, a diverging step, a misspelt target, a torn metrics line, a damaged
checkpoint, bad rows, a pickle where weights belong, a user error — and checks the one clear answer to it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from test_train import cfg_dict
from tunelab.cli import main
from tunelab.methods.core import MethodError

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


