"""Tiny random models for tests, built in-process from transformers config classes (nothing is downloaded), with a
byte-level tokenizer; identical on every load."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders
from tokenizers import models as tokenizer_models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from tunelab.models.directories import with_sdpa

# Byte-level tiny tokenizer: ids 0..255 are the bytes themselves, then the special tokens. The chat markers
# mirror SmolLM2 (bos = <|im_start|>, eos = <|im_end|>) so chat formatting and loss masks behave alike on the
# tiny models and the embedded one; the pad token is distinct from eos so padding bugs show up in tests.
_TINY_PAD, _TINY_BOS, _TINY_EOS = "<|pad|>", "<|im_start|>", "<|im_end|>"
_TINY_SPECIALS = (_TINY_PAD, _TINY_BOS, _TINY_EOS)
_TINY_VOCAB = 256 + len(_TINY_SPECIALS)
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_SEED = 0


def _tiny_token_ids() -> dict[str, int]:
    return {"pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}


def tiny_llama_config() -> PretrainedConfig:
    """2-layer Llama, width 64, 4 query heads sharing 2 key/value heads (GQA); embeddings tied like SmolLM2."""
    return LlamaConfig(
        vocab_size=_TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **_tiny_token_ids(),
    )


def tiny_gpt2_config() -> PretrainedConfig:
    """2-layer GPT-2, width 64, 4 heads (MLP 4 x 64, tied embeddings: the GPT-2 defaults)."""
    return GPT2Config(
        vocab_size=_TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, **_tiny_token_ids()
    )


# The other families: width 64, 2 layers, 4 query heads over 2 key/value heads where the family has GQA, the
# family's own defaults otherwise (its norms, activations, rotary settings, biases, fused projections).
_SMALL = {"vocab_size": _TINY_VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 512}
_FAMILIES: dict[str, tuple[str, dict]] = {
    "tiny-qwen2": ("Qwen2Config", {"num_key_value_heads": 2, "tie_word_embeddings": True}),  # q/k/v biases
    "tiny-qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True}),  # q/k norms
    "tiny-mistral": ("MistralConfig", {"num_key_value_heads": 2, "tie_word_embeddings": False}),  # untied head
    "tiny-gemma2": ("Gemma2Config", {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 64}),  # soft caps
    "tiny-phi3": ("Phi3Config", {"num_key_value_heads": 2, "pad_token_id": 256}),  # fused qkv_proj, gate_up_proj
    "tiny-gpt-neox": ("GPTNeoXConfig", {"rotary_pct": 0.25, "tie_word_embeddings": False}),  # fused query_key_value
    "tiny-olmo2": ("Olmo2Config", {"num_key_value_heads": 2, "tie_word_embeddings": False}),  # norms after blocks
}


def _family_config(class_name: str, options: dict) -> Callable[[], PretrainedConfig]:
    def build() -> PretrainedConfig:
        return getattr(transformers, class_name)(**{**_SMALL, **_tiny_token_ids(), **options})

    build.__doc__ = f"2-layer {class_name.removesuffix('Config')}, width 64 (see _FAMILIES)."
    return build


TINY_MODELS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-llama": tiny_llama_config,
    "tiny-gpt2": tiny_gpt2_config,
    **{name: _family_config(cls, options) for name, (cls, options) in _FAMILIES.items()},
}


def load_tiny(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build a tiny random model with the same weights every time, leaving the global RNG untouched.

    Weights are drawn in float32 and then cast, so the bf16 model is the rounding of the fp32 one.
    """
    config = TINY_MODELS[name]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = with_sdpa(AutoModelForCausalLM.from_config, config, dtype=torch.float32)
    return model.to(dtype), _tiny_tokenizer()


def _byte_symbols() -> list[str]:
    """The printable stand-in character for each byte 0..255, as GPT-2's byte-level BPE defines them."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def _tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (token id == byte value, no merges) that round-trips any UTF-8 text."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    backend = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in _TINY_SPECIALS]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=_TINY_PAD,
        bos_token=_TINY_BOS,
        eos_token=_TINY_EOS,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer
