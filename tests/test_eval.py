"""Generation and the evaluation harness: batched == one at a time, tasks as data, end-to-end evaluations."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.config import ConfigError
from tunelab.data import DataError
from tunelab.eval.generate import GenerationSettings, cut_at_stop, generate_ids
from tunelab.eval.harness import EvalOptions, evaluate, format_summary
from tunelab.eval.tasks import BUILTIN_DIR, discover_tasks, get_task, load_task_file

from conftest import tiny


def _prompts(tok, n=7):
    texts = ["hi", "What is 12 + 30?", "Reverse the letters: planet", "a", "Convert 2023-07-14 please, now",
             "The quick brown fox jumps over the lazy dog again and again", "xyz"]
    return [tok(t)["input_ids"] for t in texts[:n]]


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_batched_generation_equals_one_at_a_time(arch):
    model, tok = tiny(arch)
    prompts = _prompts(tok)
    batched = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=12, batch_size=7))
    single = [generate_ids(model, tok, [p], GenerationSettings(max_new_tokens=12, batch_size=1))[0]
              for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.n_tokens for g in batched] == [g.n_tokens for g in single]


def test_greedy_generation_equals_manual_argmax_without_cache():
    model, tok = tiny()
    prompt = tok("Reverse: abc")["input_ids"]
    out = generate_ids(model, tok, [prompt], GenerationSettings(max_new_tokens=6))[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(6):
            nxt = model(ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    manual = ids[0, len(prompt):]
    eos = tok.eos_token_id
    if eos in manual.tolist():
        manual = manual[: manual.tolist().index(eos) + 1]
    assert out.text == tok.decode(manual, skip_special_tokens=True)


def test_beam_search_runs_and_stop_strings_cut():
    model, tok = tiny()
    out = generate_ids(model, tok, _prompts(tok, 2), GenerationSettings(max_new_tokens=5, num_beams=2))
    assert len(out) == 2
    assert cut_at_stop("answer 42\n\n### Instruction", ["\n\n### "]) == "answer 42"
    assert cut_at_stop("abc", ["", "zz"]) == "abc"


def test_stop_strings_end_rows_at_the_stop():
    """A row stops at the token whose text completes a stop string (and leaves the batch): its text is the output
    generated without stop strings cut at the first stop, and its token count ends at that token.
    (transformers' ``generate`` also matches stop strings that begin in the prompt: prompt "hi", stop "ii" ends
    its row after one "i", whose cut text is then "i" where the generated text "ii..." cut at "ii" is empty.)"""
    model, tok = tiny()
    prompts = _prompts(tok)
    plain = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=12, engine="transformers"))
    stop = [plain[1].text[3:5]]  # from the middle of a row's output, so at least that row stops early
    assert stop[0].strip()
    got = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=12, stop=stop))
    assert [g.text for g in got] == [cut_at_stop(g.text, stop) for g in plain]
    assert got[1].n_tokens < plain[1].n_tokens
    for g, full, p in zip(got, plain, prompts, strict=True):
        if stop[0] in full.text:  # the first prefix of the output that holds the stop
            ids = generate_ids(model, tok, [p], GenerationSettings(max_new_tokens=g.n_tokens, engine="transformers"))
            shorter = generate_ids(model, tok, [p], GenerationSettings(max_new_tokens=g.n_tokens - 1,
                                                                       engine="transformers"))
            assert stop[0] in ids[0].text and stop[0] not in shorter[0].text
        else:
            assert g.n_tokens == full.n_tokens


def test_engine_choice_and_its_errors(monkeypatch):
    from tunelab.eval import generate as gen

    model, tok = tiny()
    prompts = _prompts(tok, 3)
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or real(**kw))
    generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=4))
    assert calls == []  # greedy: tunelab's loop
    generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=4, num_beams=2))
    assert len(calls) == 1  # beam search: transformers
    with pytest.raises(ValueError, match="beam search runs with engine 'transformers'"):
        gen._own_loop_applies(model, GenerationSettings(num_beams=2, engine="tunelab"))
    with pytest.raises(ValueError, match="generation engine 'fast'"):
        gen._own_loop_applies(model, GenerationSettings(engine="fast"))
    model.generation_config.repetition_penalty = 1.3  # a logit processor: auto leaves it to generate
    assert not gen._own_loop_applies(model, GenerationSettings())
    with pytest.raises(ValueError, match="repetition_penalty"):
        gen._own_loop_applies(model, GenerationSettings(engine="tunelab"))
    calls.clear()
    generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=4))
    assert len(calls) == 1


def test_every_builtin_task_validates():
    tasks = discover_tasks()
    assert {"gsm8k", "svamp", "addsub", "multiarith", "singleeq", "aqua", "mawps", "boolq", "piqa", "siqa",
            "hellaswag", "winogrande", "arc-easy", "arc-challenge", "obqa", "arc-easy-ll", "boolq-ll",
            "obqa-ll", "synth-arith", "synth-reverse", "synth-date-format"} <= set(tasks)
    for path in BUILTIN_DIR.glob("*.yaml"):
        spec = load_task_file(path)
        assert spec.description


def test_task_errors_are_clear(tmp_path):
    (tmp_path / "mine.yaml").write_text("name: mine\ndata: synthetic:arith:test:5\nkind: generat\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml:3: 'kind' got 'generat'"):
        discover_tasks((tmp_path,))
    with pytest.raises(ConfigError, match="Did you mean 'gsm8k'"):
        get_task("gsm8", discover_tasks())
    with pytest.raises(DataError, match="--data-dir"):
        evaluate("tiny-llama", ["gsm8k"], EvalOptions(limit=2))


def test_a_task_folder_adds_a_task_without_code(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"instruction": "Say 7", "answer": "7"}\n{"instruction": "Say 8", "answer": "8"}\n')
    (tmp_path / "mine.yaml").write_text(f"name: mine\ndata: {data}\nparser: {{name: number}}\n"
                                        "generation: {max_new_tokens: 4}\n")
    out = tmp_path / "out"
    [s] = evaluate("tiny-llama", ["mine"], EvalOptions(out_dir=str(out)), tasks_dirs=[str(tmp_path)])
    assert s["n"] == 2 and 0 <= s["accuracy"] <= 1
    rows = [json.loads(x) for x in (out / "mine.jsonl").read_text().splitlines()]
    assert {"prompt", "output", "parsed", "gold", "correct"} <= set(rows[0])
    assert json.loads((out / "summary.json").read_text())["tasks"][0]["task"] == "mine"


def test_synthetic_generate_loss_and_summary_line(tmp_path):
    opts = EvalOptions(limit=6, out_dir=str(tmp_path), batch_size=4)
    tasks_dir = tmp_path / "t"
    tasks_dir.mkdir()
    (tasks_dir / "rev-loss.yaml").write_text("name: rev-loss\nkind: loss\ndata: synthetic:reverse:test:6\n"
                                             "template: plain\n")
    summaries = evaluate("tiny-llama", ["synth-reverse", "rev-loss"], opts, tasks_dirs=[str(tasks_dir)])
    gen, loss = summaries
    assert gen["n"] == 6 and gen["tokens_generated"] > 0 and gen["ci_low"] <= gen["accuracy"] <= gen["ci_high"]
    assert loss["loss"] > 0 and loss["perplexity"] == pytest.approx(__import__("math").exp(loss["loss"]))
    assert "acc" in format_summary(gen) and "ppl" in format_summary(loss)


@pytest.mark.parametrize("task", ["arc-easy", "gsm8k", "aqua", "boolq-ll", "winogrande-lw"])
def test_real_slice_end_to_end(shared_data, tmp_path, task):
    """A 20-example slice of a real LLM-Adapters set evaluates end to end (skipped when the data is absent)."""
    [s] = evaluate("tiny-llama", [task], EvalOptions(data_dir=str(shared_data), limit=20, out_dir=str(tmp_path),
                                                     batch_size=10))
    assert s["n"] == 20
    rows = [json.loads(x) for x in (tmp_path / f"{task}.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(r["gold"] for r in rows)


def test_an_interrupted_evaluation_keeps_the_tasks_it_finished(tmp_path, monkeypatch, capsys):
    """A task whose summary OUT holds with the same settings is kept; other settings, or --fresh, run it again."""
    from tunelab.eval import harness

    opts = EvalOptions(limit=4, out_dir=str(tmp_path), batch_size=4)
    first = evaluate("tiny-llama", ["synth-reverse", "synth-arith"], opts)
    ran = []
    real = dict(harness.RUNNERS)
    monkeypatch.setitem(harness.RUNNERS, "generate",
                        lambda *a, **k: (ran.append(a[2].name), real["generate"](*a, **k))[1])
    again = evaluate("tiny-llama", ["synth-reverse", "synth-arith"], opts)
    assert ran == [] and again == first and "finished earlier with the same settings" in capsys.readouterr().out
    evaluate("tiny-llama", ["synth-reverse"], EvalOptions(limit=3, out_dir=str(tmp_path), batch_size=4))
    assert ran == ["synth-reverse"]  # other items: run again
    evaluate("tiny-llama", ["synth-reverse"], EvalOptions(limit=3, out_dir=str(tmp_path), batch_size=2))
    assert ran == ["synth-reverse"] * 2  # another batch size
    evaluate("tiny-llama", ["synth-reverse"], EvalOptions(limit=3, out_dir=str(tmp_path), batch_size=2, fresh=True))
    assert ran == ["synth-reverse"] * 3
    (tmp_path / "synth-arith.jsonl").unlink()  # rows lost: the summary alone is not kept
    evaluate("tiny-llama", ["synth-arith"], opts)
    assert ran == ["synth-reverse"] * 3 + ["synth-arith"]


def test_a_run_trained_again_is_evaluated_again(tmp_path):
    from tunelab.eval.harness import model_identity
    from tunelab.rundir import ADAPTER_FILE, CONFIG_FILE, META_FILE

    run = tmp_path / "run"
    run.mkdir()
    for name, text in ((META_FILE, "{}"), (CONFIG_FILE, "a: 1\n"), (ADAPTER_FILE, "w1")):
        (run / name).write_text(text)
    before = model_identity(str(run), "fp32")
    assert model_identity(str(run), "fp32") == before and model_identity(str(run), "bf16") != before
    (run / ADAPTER_FILE).write_text("w2")
    assert model_identity(str(run), "fp32") != before
    model = tmp_path / "model.gguf"
    model.write_text("x")
    stamp = model_identity(str(model), "fp32")
    model.write_text("xy")
    assert model_identity(str(model), "fp32") != stamp
