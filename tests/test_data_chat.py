"""Chat-format records ({messages: [{role, content}, ...]}): rendered with the tokenizer's chat template, the loss on
the assistant turns only (their content and the end-of-turn marker), several turns per row; bad turns are named."""

from __future__ import annotations

import json

import pytest

from tunelab.data import load_source, tokenize_records
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import DataError

from conftest import tiny

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
                  {"role": "assistant", "content": "5"}, {"role": "user", "content": "times 2?"},
                  {"role": "assistant", "content": "10"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
]


def _write(tmp_path, rows):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_loss_is_on_the_assistant_turns_only(tmp_path):
    _, tok = tiny("tiny-llama")
    records, _ = load_source(_write(tmp_path, CHAT))
    assert records[0].instruction == "2 + 3?" and records[0].output == "10" and len(records[0].messages) == 5
    examples, stats = tokenize_records(records, tok, template="chat")
    whole = tok.apply_chat_template(CHAT[0]["messages"], tokenize=False)
    assert tok.decode(examples[0].input_ids) == whole
    # independent reference: the text of every labelled run of tokens, in order
    runs, current = [], []
    for token, label in zip(examples[0].input_ids, examples[0].labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    assert runs == ["5<|im_end|>\n", "10<|im_end|>\n"]
    assert sum(t != IGNORE_INDEX for t in examples[0].labels[1:]) == sum(len(tok.encode(r)) for r in runs)
    assert stats.n_target_tokens == sum(sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in examples)


def test_bad_turns_are_named(tmp_path):
    cases = [({"messages": []}, "field 'messages' is an empty list"),
             ({"messages": [{"role": "user", "content": "x"}]}, "field 'messages' has no non-empty assistant turn"),
             ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]\.role is 'bot'"),
             ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
              r"messages\[0\]\.content is a JSON number")]
    for row, match in cases:
        with pytest.raises(DataError, match=r"chat\.jsonl:2: " + match):
            load_source(_write(tmp_path, [CHAT[1], row]))


def test_chat_rows_train(tmp_path):
    from tunelab.config import load_config
    from tunelab.train.loop import train

    path = _write(tmp_path, CHAT * 4)
    cfg = load_config(None, ["model.name=tiny-llama", "method.name=lora", f"data.train={path}", "data.template=chat",
                             "train.max_steps=2", "train.batch_size=2", "train.progress=false",
                             f"output_dir={tmp_path / 'run'}"])
    assert train(cfg).steps == 2
