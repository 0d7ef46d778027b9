"""Fuzzing what parses user input (hypothesis): run configs and --set overrides, data files, answer parsers, task
YAMLs and quantizer inputs. Whatever arrives, the answer is a result or one of the user errors (a message, never a
raw exception), and the invariants of a successful parse hold."""

from __future__ import annotations

import json
import math
import os
import string
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tunelab.config import apply_overrides, config_from_dict, dump_config, load_config
from tunelab.data import load_records
from tunelab.errors import USER_ERRORS, ConfigError, QuantError
from tunelab.eval.parsers import PARSERS
from tunelab.eval.tasks import load_task_file
from tunelab.methods import REGISTRY
from tunelab.quant.quantizers import QuantSpec, dequantize, max_half_gap, quantize

# TUNELAB_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py: a longer hunt than the default suite's.
EXAMPLES = int(os.environ.get("TUNELAB_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Plain data as YAML and JSON carry it.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
keys = st.one_of(st.sampled_from(["model", "method", "data", "train", "name", "lr", "r", "path", "output_dir",
                                  "quantize", "bits", "targets", "epochs", "max_steps", "batch_size", "template"]),
                 st.text(string.ascii_lowercase + "_", min_size=1, max_size=8))
plain = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(keys, inner, max_size=5)), max_leaves=20)

# ------------------------------------------------------------------------------------------------ run configs

sections = st.fixed_dictionaries({}, optional={
    "model": st.dictionaries(st.sampled_from(["name", "dtype", "trust_remote_code"]), plain, max_size=3),
    "method": st.one_of(plain, st.fixed_dictionaries({"name": st.sampled_from(sorted(REGISTRY))},
                                                     optional={"r": plain, "targets": plain, "num_tokens": plain,
                                                               "fraction": plain, "bottleneck": plain})),
    "data": st.dictionaries(st.sampled_from(["path", "template", "max_length", "eval_path", "format"]), plain,
                            max_size=3),
    "train": st.dictionaries(st.sampled_from(["lr", "epochs", "max_steps", "batch_size", "seed", "schedule"]),
                             plain, max_size=4),
    "quantize": plain,
    "output_dir": plain,
    "junk": plain,
})


@FUZZ
@given(sections)
def test_any_config_mapping_builds_or_says_what_is_wrong(data):
    try:
        cfg = config_from_dict(json.loads(json.dumps(data, default=str)) if _jsonable(data) else data)
    except ConfigError as e:
        assert str(e)  # a message for the person who wrote it
        return
    # a config that builds round-trips through the YAML written next to every run
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again.to_dict() == cfg.to_dict()


def _jsonable(data) -> bool:
    try:
        json.dumps(data, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


override_text = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["train.lr", "method.r", "method.name", "model.name",
                                                         "train.epochs", "data.max_length", "train.lr.x", "a",
                                                         "method", "quantize.bits"]),
              st.text(max_size=10)),
    st.text(max_size=20),
)


@FUZZ
@given(st.lists(override_text, max_size=4))
def test_any_set_overrides_apply_or_say_what_is_wrong(overrides):
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        assert str(e)
        return
    assert cfg.method_name() in REGISTRY


@FUZZ
@given(st.lists(override_text, max_size=4))
def test_overrides_only_touch_the_keys_they_name(overrides):
    base = {"train": {"lr": 1e-3}, "keep": {"x": 1}}
    try:
        out = apply_overrides(json.loads(json.dumps(base)), overrides)
    except ConfigError:
        return
    if not any(o.split("=", 1)[0].strip().split(".")[0] == "keep" for o in overrides if "=" in o):
        assert out["keep"] == {"x": 1}


# ------------------------------------------------------------------------------------------------ data files

records = st.lists(st.one_of(plain, st.fixed_dictionaries({"instruction": plain, "output": plain},
                                                          optional={"input": plain})), max_size=5)


@FUZZ
@given(body=st.one_of(records.map(json.dumps), records.map(lambda rs: "\n".join(json.dumps(r) for r in rs)),
                      st.text(max_size=80), st.binary(max_size=60).map(lambda b: b.decode("latin-1"))),
       skip=st.booleans())
def test_any_data_file_loads_or_names_the_file(tmp_path_factory, body, skip):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text(body, encoding="utf-8")
    try:
        rows, bad = load_records(path, skip_bad_rows=skip)
    except USER_ERRORS as e:
        assert str(path) in str(e) or path.name in str(e)
        return
    for r in rows:
        assert isinstance(r.instruction, str) and isinstance(r.output, str) and isinstance(r.input, str)
        assert r.line >= 1


# ------------------------------------------------------------------------------------------------ answer parsers

texts = st.one_of(st.text(max_size=120),
                  st.builds(lambda a, n, b: f"{a} {n} {b}", st.text(max_size=20),
                            st.one_of(st.integers(-10**9, 10**9).map(str), st.floats(allow_nan=True).map(str),
                                      st.sampled_from(["1,234.5", "3/4", "-0.0", "1e308", "1e999", "(2+3)*4",
                                                       "10**10**10", "The answer is B", "answer1", "x = 2 + 3"])),
                            st.text(max_size=20)))

PARSER_OPTIONS = {"label": {"labels": ["true", "false"]}, "option": {"choices": ["answer1", "answer2"]}}


@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(name=st.sampled_from(sorted(PARSERS)), text=texts, gold=st.one_of(st.text(max_size=8), st.integers(0, 99)))
def test_parsers_never_raise_and_scores_are_booleans(name, text, gold):
    spec = PARSERS[name]
    options = {k: v for k, v in PARSER_OPTIONS.get(name, {}).items()}
    try:
        answer = spec.parse(text, **options)
    except TypeError:  # the parser takes no such option
        answer = spec.parse(text)
        options = {}
    if isinstance(answer, float):
        assert not math.isnan(answer)
    try:
        verdict = spec.score(answer, str(gold), **options)
    except ValueError as e:  # a gold answer the parser cannot score is the task's data error, named as such
        assert "gold answer" in str(e)
        return
    assert verdict in (True, False)


# ------------------------------------------------------------------------------------------------ task YAMLs

task_maps = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.just("t"), st.text(max_size=5)),
    "data": st.one_of(st.just("synthetic:arith:test:4"), st.text(max_size=10), plain),
    "kind": st.one_of(st.sampled_from(["generate", "loglik", "loss"]), plain),
    "parser": st.one_of(st.sampled_from(sorted(PARSERS)), st.dictionaries(st.sampled_from(["name", "labels"]), plain),
                        plain),
    "fields": plain, "generation": plain, "choices": plain, "template": plain, "junk": plain,
})


@FUZZ
@given(task_maps)
def test_any_task_yaml_loads_or_names_its_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("tasks") / "t.yaml"
    try:
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
    except yaml.YAMLError:
        assume(False)
    try:
        spec = load_task_file(Path(path))
    except (*USER_ERRORS, ValueError) as e:
        assert str(e)
        return
    assert spec.name == "t"


# ------------------------------------------------------------------------------------------------ quantizer inputs

specs = st.builds(QuantSpec, quant=st.sampled_from(["nf", "int"]), bits=st.sampled_from([2, 4, 8]),
                  block=st.sampled_from([4, 8, 16, 64]), double_quant=st.booleans())
shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)


@settings(max_examples=EXAMPLES, deadline=None)
@given(spec=specs, shape=shapes, scale=st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e4, 1e30]),
       seed=st.integers(0, 2**16))
def test_quantize_roundtrip_within_the_code_book_bound(spec, shape, scale, seed):
    """|W − Ŵ| ≤ s_b·g/2 for every block (s_b its absmax; double quantization adds the error of s_b itself)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * scale
    qt = quantize(w, spec)
    back = dequantize(qt)
    assert back.shape == w.shape and torch.isfinite(back).all()
    bound = float(w.abs().max()) * max_half_gap(spec)
    slack = float(w.abs().max()) * (0.02 if spec.double_quant else 1e-6) + 1e-30
    assert float((w - back).abs().max()) <= bound + slack


@settings(max_examples=max(10, EXAMPLES // 2), deadline=None)
@given(spec=specs, shape=shapes, bad=st.sampled_from([math.nan, math.inf, -math.inf]), seed=st.integers(0, 999))
def test_quantize_refuses_nan_and_inf(spec, shape, bad, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    w.view(-1)[seed % w.numel()] = bad
    with pytest.raises(QuantError, match="NaN or infinite"):
        quantize(w, spec)
