"""Row formats (mc-text, mawps), the equation and option parsers, decontamination, and the trained-format items."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tunelab.data import DataError, FieldMap, Record, load_source, tokenize_records
from tunelab.data.contamination import keys, normalise, overlap, question_key
from tunelab.data.formats import mc_text_prompt
from tunelab.eval.parsers import eval_arithmetic, make_parser, parse_equation, parse_option

ARC = ("Please choose the correct answer to the question: Which factor will most likely cause a fever?\n\n"
       "Answer1: a leg muscle relaxing Answer2: a bacterial population in the bloodstream Answer3: viral particles "
       "on the skin\n\nAnswer format: answer1/answer2/answer3")
BOOLQ = ("Please answer the following question with true or false, question: is the sky blue?\n\n"
         "Answer format: true/false")


def _write(tmp_path, rows, name="d.jsonl"):
    """JSONL: row k is on line k."""
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mc_text_targets_the_option_text(tmp_path):
    path = _write(tmp_path, [{"instruction": ARC, "output": "the correct answer is answer2", "answer": "answer2"},
                             {"instruction": BOOLQ, "output": "the correct answer is false"}])
    (arc, boolq), bad = load_source(path, format="mc-text")
    assert not bad
    assert arc.output == "a bacterial population in the bloodstream" and arc.line == 1
    assert arc.options == ("a leg muscle relaxing", "a bacterial population in the bloodstream",
                           "viral particles on the skin")
    assert arc.instruction == mc_text_prompt("Which factor will most likely cause a fever?", arc.options)
    assert arc.instruction.startswith("Question: Which factor") and "- viral particles on the skin\n" in arc.instruction
    # BoolQ: no options listed in the record; yes/no, the gold read from the end of the response
    assert boolq.options == ("yes", "no") and boolq.output == "no" and boolq.instruction.startswith("Question: is the sky")


def test_mc_text_errors_name_file_and_line(tmp_path):
    path = _write(tmp_path, [{"instruction": ARC, "answer": "answer2", "output": "x"},
                             {"instruction": "What is 2 + 2?", "output": "4", "answer": "4"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: not a multiple-choice record for format mc-text"):
        load_source(path, format="mc-text")
    records, bad = load_source(path, format="mc-text", skip_bad_rows=True)
    assert len(records) == 1 and bad[0].line == 2
    dup = ARC.replace("viral particles on the skin", "a leg muscle relaxing")
    with pytest.raises(DataError, match="two options have the same text"):
        load_source(_write(tmp_path, [{"instruction": dup, "answer": "answer1", "output": "x"}]), format="mc-text")
    with pytest.raises(DataError, match="gold answer 'answer7'"):
        load_source(_write(tmp_path, [{"instruction": ARC, "answer": "answer7", "output": "x"}]), format="mc-text")


def test_mawps_format_reads_the_raw_layout(tmp_path):
    rows = [{"original_text": "A waiter had 22 customers . 14 left ; 4 per table . How many tables ?",
             "equation": "X=((22.0-14.0)/4.0)", "ans": 2.0},
            {"original_text": "Solve .", "equation": "(7.0*x)+4.0=20.0", "ans": "4"},
            {"original_text": "No answer .", "equation": "x=1+1", "ans": "two"}]
    path = _write(tmp_path, rows)
    records, bad = load_source(path, format="mawps", skip_bad_rows=True)
    assert [r.output for r in records] == ["x=((22.0-14.0)/4.0)"]
    assert records[0].instruction.startswith("A waiter") and records[0].line == 1
    assert "does not start with 'x='" in bad[0].reason and "'ans'" in bad[1].reason
    with pytest.raises(DataError, match="unknown data format 'mawp'"):
        load_source(path, format="mawp")


def test_unknown_data_format_in_a_config_names_the_nearest():
    from tunelab.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="Did you mean 'mc-text'"):
        config_from_dict({"data": {"train": "x.json", "format": "mc_text"}})
    # as-is (the default) leaves the resolved config, and so every earlier run's config hash, as it was
    assert "format" not in config_from_dict({"data": {"train": "x.json"}}).to_dict()["data"]
    assert config_from_dict({"data": {"train": "x.json", "format": "mawps"}}).to_dict()["data"]["format"] == "mawps"


def test_equation_parser_evaluates_arithmetic_only():
    assert parse_equation("x=((22.0-14.0)/4.0)") == pytest.approx(2.0)
    assert parse_equation("x = 3 * -2 + 1\nmore text") == pytest.approx(-5.0)
    assert parse_equation("The answer is 18.") == 18.0  # no equation: the last number
    assert eval_arithmetic("__import__('os').system('echo hi')") is None
    assert eval_arithmetic("2**1000000") is None and eval_arithmetic("1/0") is None
    assert eval_arithmetic("(" * 300 + "1" + ")" * 300) is None  # too deep / too long: no answer, no crash
    parser = make_parser("equation")
    assert parser.is_correct("x=(10.0-4.0)/3.0", "2.0") and not parser.is_correct("x=10.0-4.0", "2.0")


def test_option_parser_matches_the_options():
    opts = ("a leg muscle relaxing", "a bacterial population in the bloodstream", "viral particles")
    assert parse_option("A bacterial population in the bloodstream.", opts) == opts[1]
    assert parse_option("viral particles, because they spread", opts) == opts[2]
    assert parse_option("a bacterial pop", opts) == opts[1]  # stopped early, one option fits
    assert parse_option("a", opts) is None  # too short to tell
    assert parse_option("something else", opts) is None and parse_option("", opts) is None
    assert parse_option("\n\nyes", ("yes", "no")) == "yes"


def test_contamination_keys_ignore_case_spacing_and_punctuation():
    a = Record("There are 7 crayons in the drawer . Mary took 3 . How many now ? ", "", "4")
    b = Record("there are 7 crayons in the drawer. Mary took 3. How many now?", "", "x=7-3")
    c = Record("There are 8 crayons in the drawer . Mary took 3 . How many now ?", "", "5")
    assert question_key(a) == question_key(b) != question_key(c)
    assert normalise("  A,  b!") == "a b"
    assert overlap([a, c], keys([b])) == [a]


def test_decontaminated_task_reports_what_it_removed(tmp_path):
    from tunelab.eval.tasks import TaskSpec, select_examples

    test = _write(tmp_path, [{"instruction": f"Problem {k} ?", "answer": str(k)} for k in range(5)], "test.jsonl")
    spec = TaskSpec(name="t", data=str(test), parser={"name": "equation"})
    seen = keys([Record("problem 1?", "", "x=1"), Record("Problem 3 .", "", "x=3")])
    records, removed = select_examples(spec, None, None, seen)
    assert removed == 2 and [r.output for r in records] == ["0", "2", "4"]
    assert select_examples(spec, None, 2, seen)[0][-1].output == "2"  # the limit applies after decontamination


def test_trained_items_score_options_after_the_training_prompt(tmp_path):
    """Loglik style 'trained': log p(option text | the mc-text training prompt), checked against scoring by hand;
    the generation task reads each record's own options, and the rows carry predicted and gold positions."""
    from tunelab.data.templates import render_prompt
    from tunelab.eval.harness import EvalOptions, evaluate_task
    from tunelab.eval.loglik import continuation_logprobs
    from tunelab.eval.tasks import TaskChoices, TaskGeneration, TaskSpec

    from conftest import tiny

    data = _write(tmp_path, [{"instruction": ARC, "input": "", "answer": "answer2"}] * 2)
    model, tok = tiny()
    spec = TaskSpec(name="ll", data=str(data), kind="loglik", format="mc-text", choices=TaskChoices(style="trained"))
    summary = evaluate_task(model, tok, spec, EvalOptions(out_dir=str(tmp_path)), default_template="alpaca")
    assert summary["n"] == 2 and summary["template"] == "alpaca"
    row = json.loads((tmp_path / "ll.jsonl").read_text().splitlines()[0])
    (record,), _ = load_source(_write(tmp_path, [{"instruction": ARC, "answer": "answer2"}], "one.jsonl"),
                               FieldMap(output="answer"), format="mc-text")
    # by hand: the training tokens (prompt ids, then the option's response ids) through the plain model, the
    # option's log-probabilities summed (training's EOS is not scored)
    by_hand = []
    for option in record.options:
        [ex], _ = tokenize_records([dataclasses.replace(record, output=option)], tok, template="alpaca")
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = [(k, t) for k, t in enumerate(ex.labels[1:]) if t != -100][:-1]  # the EOS target left out
        by_hand.append(sum(float(logp[k, t]) for k, t in targets))
    assert row["logprobs"] == pytest.approx(by_hand, abs=1e-4)
    assert row["gold_index"] == 1 and row["pred_index"] in (0, 1, 2)
    # the texts tokenised the lm-eval way move the prompt's final newline into every continuation: another number
    lm_eval_way = continuation_logprobs(model, tok, [(render_prompt(record, "alpaca"), o) for o in record.options])
    assert abs(lm_eval_way[0][0] - by_hand[0]) > 1e-3

    gen = TaskSpec(name="gen", data=str(data), format="mc-text", parser={"name": "option"},
                   generation=TaskGeneration(max_new_tokens=4))
    summary = evaluate_task(model, tok, gen, EvalOptions(out_dir=str(tmp_path)), default_template="alpaca")
    row = json.loads((tmp_path / "gen.jsonl").read_text().splitlines()[0])
    assert row["gold_index"] == 1 and "parsed_fraction" in summary
    assert row["pred_index"] is None or row["parsed"] == record.options[row["pred_index"]]


def test_builtin_suite_tasks_read_the_real_data(shared_data):
    """Every mc-text and equation task loads its file from the real data folder (skipped without it)."""
    from tunelab.eval.tasks import discover_tasks, load_examples

    tasks = discover_tasks()
    for name in ("arc-easy-text", "boolq-text", "winogrande-text-ll", "piqa-text", "siqa-text-ll", "mawps-eq",
                 "svamp-eq"):
        records = load_examples(tasks[name], shared_data, limit=20)
        assert len(records) == 20
        if tasks[name].format == "mc-text":
            assert all(r.output in r.options for r in records)


def test_a_task_left_without_items_is_an_error(tmp_path):
    from tunelab.eval.tasks import TaskSpec, select_examples

    test = _write(tmp_path, [{"instruction": "Problem 1 ?", "answer": "1"}], "test.jsonl")
    spec = TaskSpec(name="t", data=str(test))
    with pytest.raises(DataError, match=r"task 't': no item of .*test\.jsonl is left to score \(1 read, 0 unre"):
        select_examples(spec, None, None, keys([Record("problem 1", "", "x")]))


def test_a_generation_and_a_loglik_task_on_the_same_items_share_one_pass(tmp_path, capsys):
    """`evaluate` runs an mc-text generation task and its trained-format log-likelihood task together (one pass over
    the prompts scores the options and starts the decoding) with the numbers of each run alone; a task kept from
    an earlier run leaves its partner to run alone."""
    from tunelab.eval.harness import EvalOptions, evaluate

    data = _write(tmp_path, [{"instruction": ARC, "input": "", "answer": f"answer{k}"} for k in (1, 2, 3, 2)])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "g.yaml").write_text(f"name: g\ndata: {data}\nformat: mc-text\nparser: {{name: option}}\n"
                                  "generation: {max_new_tokens: 6}\n")
    (tasks / "l.yaml").write_text(f"name: l\ndata: {data}\nkind: loglik\nformat: mc-text\n"
                                  "choices: {style: trained}\n")
    alone = [evaluate("tiny-llama", [t], EvalOptions(batch_size=2, out_dir=str(tmp_path / f"alone-{t}")),
                      tasks_dirs=[str(tasks)])[0] for t in ("g", "l")]
    out = tmp_path / "both"
    g, c = evaluate("tiny-llama", ["g", "l"], EvalOptions(batch_size=2, out_dir=str(out)), tasks_dirs=[str(tasks)])
    assert g["shared_prefill_with"] == "l" and c["shared_prefill_with"] == "g" and c["scored_after_prefill"] == 4
    assert "shared_prefill_with" not in alone[0] and "shared_prefill_with" not in alone[1]
    assert g["accuracy"] == alone[0]["accuracy"] and c["accuracy"] == alone[1]["accuracy"]
    rows = [json.loads(x) for x in (out / "l.jsonl").read_text().splitlines()]
    before = [json.loads(x) for x in (tmp_path / "alone-l" / "l.jsonl").read_text().splitlines()]
    for a, b in zip(rows, before, strict=True):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
    (out / "g.jsonl").unlink()  # the generation task's rows lost: it runs again, alone; the loglik task is kept
    g2, c2 = evaluate("tiny-llama", ["g", "l"], EvalOptions(batch_size=2, out_dir=str(out)), tasks_dirs=[str(tasks)])
    assert "shared_prefill_with" not in g2 and c2 == c and "l: finished earlier" in capsys.readouterr().out
