"""The toy world, the tiny Llama family and its pretraining, the sweep spec (shipped config included), and the
miniature toy study end to end (`tunelab lab toy --scale mini`, then `tunelab runs / fit / report`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from tunelab.cli import main
from tunelab.config import ConfigError
from tunelab.models import load_model
from tunelab.scaling.lab import SCALES, get_scale, toy_spec
from tunelab.scaling.pretrain import FAMILY, PretrainConfig, build_model, non_embedding_params, pretrain
from tunelab.scaling.spec import expand, load_spec, spec_from_dict
from tunelab.scaling.toyworld import TASKS, World, WorldConfig, build_tokenizer, task_template, write_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    return write_world(WorldConfig(), tmp_path_factory.mktemp("world"), documents=200, task_train=64, task_test=16)


def test_world_is_deterministic_and_languages_differ():
    a, b = World.build(WorldConfig()), World.build(WorldConfig())
    clause = a.clause(random.Random(1))
    assert a.sentence(clause, 0, random.Random(2)) == b.sentence(clause, 0, random.Random(2))
    renderings = {a.sentence(clause, lang, random.Random(3)) for lang in range(4)}
    assert len(renderings) == 4 and len({lang.order for lang in a.languages}) == 4
    words = [set(w for syn in lang.nouns for w in syn) for lang in a.languages]
    assert not words[0] & words[1]  # own lexicons


def test_tokenizer_covers_every_token_of_corpus_and_tasks(world_files):
    tok = build_tokenizer(World.build(WorldConfig()).vocabulary())
    unk = tok.unk_token_id
    lines = world_files.corpus.read_text().splitlines()
    parallel = sum("<aa>" in json.loads(line)["output"] or "<bb>" in json.loads(line)["output"] for line in lines)
    assert 0 < parallel < len(lines) * 0.2  # a small share of incidental parallel text
    for path in [world_files.corpus, *(p for t in world_files.tasks.values() for p in t.values())]:
        for line in path.read_text().splitlines()[:50]:
            row = json.loads(line)
            ids = tok(row["instruction"] + " " + row["output"])["input_ids"]
            assert unk not in ids and ids[0] == tok.bos_token_id
    assert tok.decode(tok("<aa> da .")["input_ids"][1:]) == "<aa> da ."


def test_tasks_have_the_documented_format(world_files):
    world = World.build(WorldConfig())
    row = json.loads(world_files.tasks["translate"]["train"].read_text().splitlines()[0])
    assert row["instruction"].endswith(" .") and row["output"].endswith(" .")
    assert task_template(world, "translate") == "<aa> {instruction} <bb>" and set(TASKS) == set(world_files.tasks)
    with pytest.raises(ValueError, match="toy tasks"):
        task_template(world, "nope")


def test_family_sizes_match_the_closed_form_and_span_25k_to_1m(tmp_path):
    tok = build_tokenizer(World.build(WorldConfig()).vocabulary())
    counts = [s.non_embedding_params() for s in FAMILY.values()]
    assert 25_000 <= counts[0] < counts[-1] <= 1_000_000 and counts == sorted(counts) and len(counts) >= 5
    model = build_model(FAMILY["s"], tok)
    model.save_pretrained(tmp_path / "s")
    assert non_embedding_params(tmp_path / "s") == FAMILY["s"].non_embedding_params()
    embedding = model.get_input_embeddings().weight.numel()
    assert sum(p.numel() for p in model.parameters()) - embedding == FAMILY["s"].non_embedding_params()


def test_pretraining_lowers_loss_and_exports_loadable_checkpoints(world_files, tmp_path):
    cfg = PretrainConfig(corpus=str(world_files.corpus), tokenizer=str(world_files.tokenizer), size="xs",
                         out=str(tmp_path), steps=12, batch_size=8, max_length=96, lr=1e-2, checkpoints=[0.5, 1.0],
                         threads=1)
    result = pretrain(cfg)
    metrics = [json.loads(x) for x in (tmp_path / "xs" / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0] - 0.5
    half = json.loads((result.checkpoints[0.5] / "pretrain.json").read_text())
    full = json.loads((result.checkpoints[1.0] / "pretrain.json").read_text())
    assert half["step"] == 6 and full["tokens"] > half["tokens"] > 0
    # held-out loss at every checkpoint (the precondition "pretraining has flattened" compares them)
    assert half["eval_loss"] > full["eval_loss"] > 0
    model, tok = load_model(str(result.checkpoints[1.0]), "fp32")
    batch = tok(["<aa> da ."], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    assert not (tmp_path / "xs" / "run" / "checkpoints").exists()


def test_shipped_spec_is_the_full_toy_study():
    shipped = REPO / "configs" / "scaling-toy.yaml"
    spec = load_spec(shipped)
    world = World.build(get_scale("full").world)
    templates = {t: task_template(world, t) for t in TASKS}
    out = Path("runs/lab-toy")
    expected = toy_spec(get_scale("full"), out, out / "world", out / "models", templates)
    assert yaml.safe_load(shipped.read_text()) == expected
    assert spec.pet_model == "l" and len(spec.models.sizes) == 4


def test_shipped_real_model_spec_and_its_rate_search_validate():
    """The real-model study (issue 17): one model, PET axes for LoRA rank and prompt length, D_f 32..4096 in mc-text."""
    from tunelab.study.lr_search import load_search

    spec = load_spec(REPO / "configs" / "scaling-smollm2-obqa.yaml")
    runs = expand(spec)
    assert len(runs) == 112 and spec.d_f[0] == 32 and spec.d_f[-1] == 4096 and spec.seeds == [0, 1]
    assert {r.config["data"]["format"] for r in runs} == {"mc-text"}
    assert {(r.factors["method"], r.factors["pet_size"]) for r in runs if "pet" in r.factors["axes"]} == {
        ("lora", 4), ("lora", 16), ("lora", 64), ("prompt", 10), ("prompt", 50), ("prompt", 200)}
    search = load_search(REPO / "configs" / "lr-search-scaling-obqa.yaml")
    assert [m.label for m in search.methods] == ["full", "lora-r16", "prompt-50"]
    assert all(len(m.lrs) >= 4 and max(m.lrs) / min(m.lrs) > 99.9 for m in search.methods)


def test_spec_errors_name_the_key(tmp_path):
    base = {"name": "x", "output_dir": str(tmp_path), "task": {"train": "synthetic:reverse:train:8",
            "test": "synthetic:reverse:dev:8"}, "models": {"sizes": [{"label": "t", "model": "tiny-llama"}]},
            "methods": [{"label": "lora", "method": {"name": "lora"}, "pet": {"key": "rank", "sizes": [8]}}],
            "d_f": [4], "pet_model": "t"}
    with pytest.raises(ConfigError, match="pet.key 'rank' is not an option of method 'lora'.*r,"):
        spec_from_dict(base)
    base["methods"][0]["pet"]["key"] = "r"
    assert len(expand(spec_from_dict(base))) == 1  # the PET point at the default r is the model-axis run
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**base, "budjet": {}}))
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: unknown key 'budjet'.*'budget'"):
        load_spec(bad)
    with pytest.raises(ConfigError, match="toy scale"):
        get_scale("huge")
    assert set(SCALES) == {"full", "mini"}


def test_expansion_shares_runs_between_axes(tmp_path):
    spec = spec_from_dict({
        "name": "x", "output_dir": str(tmp_path), "task": {"train": "a.jsonl", "test": "b.jsonl"},
        "models": {"sizes": [{"label": "a", "model": "tiny-llama", "params": 10},
                             {"label": "b", "model": "tiny-gpt2", "params": 20}],
                   "pretraining": [{"label": "b@1", "model": "tiny-gpt2", "params": 20, "tokens": 99}]},
        "methods": [{"label": "lora", "method": {"name": "lora", "r": 4}, "pet": {"key": "r", "sizes": [2, 4]}}],
        "pet_model": "b", "d_f": [8, 16], "seeds": [0]})
    runs = expand(spec)
    axes = sorted(tuple(r.factors["axes"]) for r in runs)
    assert len(runs) == 6 and axes.count(("model", "pet", "pretrain")) == 2
    assert {r.config["train"]["max_steps"] for r in runs} == {20}  # min_steps of the default budget


def test_full_scale_pretrains_smaller_models_at_higher_rates():
    lab = get_scale("full")
    rates = [lab.lr_for(s) for s in sorted(lab.sizes, key=lambda s: FAMILY[s].non_embedding_params())]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == len(rates)
    assert get_scale("mini").lr_for("xs") == get_scale("mini").lr_for("m")  # one rate for all
    with pytest.raises(ConfigError, match="no pretraining learning rate for size 'xxl'"):
        lab.lr_for("xxl")


def test_lab_refuses_a_folder_holding_another_world(tmp_path):
    """Models and runs of another world must not be mixed into this scale's study: the error names world.json."""
    from tunelab.scaling.lab import run_toy

    write_world(WorldConfig(nouns=5), tmp_path / "lab" / "world", documents=10, task_train=4, task_test=2)
    with pytest.raises(ConfigError, match=r"world\.json: this folder holds another toy world"):
        run_toy(tmp_path / "lab", scale="mini", log=lambda *_: None)
    assert not (tmp_path / "lab" / "models").exists()


def test_mini_toy_study_end_to_end(tmp_path, capsys, monkeypatch):
    """World, pretraining of 3 sizes, the grid for full/prompt/LoRA over D_f with 2 workers, fits, report."""
    monkeypatch.setenv("TUNELAB_PROGRESS", "0")
    out = tmp_path / "lab"
    assert main(["lab", "toy", "--scale", "mini", "--out", str(out), "--workers", "2", "--no-check"]) == 0
    report = (out / "report" / "report.md").read_text()
    assert "## The paper's findings at this scale" in report and "β_FMT > β_PET" in report
    page = (out / "report" / "report.html").read_text()
    assert page.count("<table>") >= 3 and page.count("data:image/png;base64,") >= 3 and 'src="loss' not in page
    # the preconditions come first, measured: the mini scale meets few of them and says so
    assert report.index("## Preconditions") < report.index("## The paper's findings")
    pre = json.loads((out / "report" / "preconditions.json").read_text())
    sizes, flat, seeds = (next(r for r in pre if word in r["condition"]) for word in ("sizes", "flattened", "seeds"))
    assert sizes["ok"] is False and sizes["measured"].startswith("3 sizes")
    assert seeds["ok"] is False and seeds["measured"] == "1"
    assert flat["ok"] is not None and "s " in flat["measured"]  # measured from the checkpoints' held-out losses
    assert "precondition(s) not met" in report
    assert "α_m > α_p" in report and "critical D_f" in report and "Whole study wall time" in report
    assert "Machine: " in report and "Reproduce: `tunelab sweep" in report and "Filled in" not in report
    for png in ("loss_vs_df_full.png", "loss_vs_df_lora.png", "predicted_vs_observed.png"):
        assert (out / "report" / png).stat().st_size > 5000
    fit = json.loads((out / "report" / "fit.json").read_text())
    assert set(fit["methods"]) == {"full", "prompt", "lora"} and fit["bootstrap_replicates"] == 10
    capsys.readouterr()
    assert main(["runs", str(out)]) == 0
    listing = capsys.readouterr().out
    assert "done: 42" in listing and "failed: 0" in listing
    assert main(["fit", str(out / "spec.yaml"), "--bootstrap", "2"]) == 0
    assert "power law in D_f" in capsys.readouterr().out


def test_one_run_reports_test_nll_and_exact_match(tmp_path):
    from tunelab.scaling.runner import execute_run

    config = {"model": {"name": "tiny-llama", "dtype": "fp32"}, "method": {"name": "lora", "r": 2, "alpha": 4},
              "data": {"train": "synthetic:reverse:train:16", "eval": "synthetic:reverse:dev:8", "limit": 8,
                       "eval_max_examples": 8, "template": "plain", "max_length": 64},
              "train": {"batch_size": 4, "max_steps": 2, "lr": 1e-2, "seed": 0, "progress": False},
              "eval": {"generation": 4, "max_new_tokens": 8}}
    metrics = execute_run(config, tmp_path / "run", threads=1)
    assert metrics["test_nll"] > 0 and 0.0 <= metrics["exact_match"] <= 1.0 and metrics["steps"] == 2
    assert metrics["model_params"] < metrics["trainable_params"] * 1000 and not list((tmp_path / "run").glob("*.safetensors"))
