"""Config: typed sections, YAML + overrides, errors naming file:line and the nearest key, example configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.config import ConfigError, apply_overrides, dump_config, load_config

from conftest import REPO

CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml")
                 if not p.name.startswith(("compare-", "lr-search-", "scaling-")))  # scaling specs: test_scaling_*
COMPARE_CONFIGS = sorted((REPO / "configs").glob("compare-*.yaml"))
SWEEP_CONFIGS = sorted((REPO / "configs").glob("lr-search-*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_validate(path):
    cfg = load_config(path)
    assert cfg.method_name()
    assert load_config(path, ["train.lr=1e-4"]).train.lr == 1e-4
    cfg.method_config()


@pytest.mark.parametrize("path", COMPARE_CONFIGS, ids=[p.name for p in COMPARE_CONFIGS])
def test_example_compare_configs_validate(path):
    from tunelab.study.compare import load_compare

    cfg = load_compare(path)
    assert len(cfg.methods) >= 2 and cfg.eval.tasks


@pytest.mark.parametrize("path", SWEEP_CONFIGS, ids=[p.name for p in SWEEP_CONFIGS])
def test_example_sweep_configs_validate(path):
    from tunelab.study.lr_search import load_search

    cfg = load_search(path)
    assert cfg.methods and all(r.lrs for r in cfg.methods) and cfg.eval.tasks


def test_there_are_example_configs():
    assert len(CONFIGS) >= 3


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_file_line_and_nearest(tmp_path):
    p = _write(tmp_path, "model:\n  name: tiny-llama\ntrain:\n  lr: 0.1\n  bacth_size: 4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:5: unknown key 'bacth_size' in section 'train'\. Did you mean 'batch_size'\?"):
        load_config(p)


def test_unknown_section_and_method_option(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'train'"):
        load_config(_write(tmp_path, "trian:\n  lr: 1\n"))
    with pytest.raises(ConfigError, match=r"c\.yaml:1: .*unknown key 'rank' in section 'method'. Valid keys: r, alpha"):
        load_config(_write(tmp_path, "method: {name: lora, rank: 8}\n"))
    with pytest.raises(ConfigError, match="unknown method 'loar'. Did you mean 'lora'"):
        load_config(_write(tmp_path, "method: {name: loar}\n"))


def test_type_errors_and_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.batch_size' got 'eight', expected int"):
        load_config(None, ["train.batch_size=eight"])
    with pytest.raises(ConfigError, match="schedule"):
        load_config(None, ["train.schedule=cosin"])
    with pytest.raises(ConfigError, match="r must be at least 1"):
        load_config(None, ["method.name=lora", "method.r=0"])
    assert load_config(None, ["train.lr=1e-4"]).train.lr == 1e-4  # YAML reads 1e-4 as a string


def test_overrides_nest_and_dump_round_trip(tmp_path):
    d = apply_overrides({}, ["method.name=lora", "method.targets=[q_proj, v_proj]", "data.train=x.json"])
    assert d == {"method": {"name": "lora", "targets": ["q_proj", "v_proj"]}, "data": {"train": "x.json"}}
    cfg = load_config(None, ["method.name=lora", "method.r=16", "data.train=x.json"])
    p = _write(tmp_path, dump_config(cfg))
    again = load_config(p)
    assert again == cfg and again.method_config().r == 16


def test_yaml_is_loaded_safely(tmp_path):
    p = _write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
