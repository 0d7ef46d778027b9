"""Prompt tuning: P trainable soft-token embeddings prepended to the input (Lester et al., 2021).

With input embeddings X = E[x] ∈ ℝ^{n × d} and the soft prompt S ∈ ℝ^{P × d}, the frozen model reads

    [S ; X] ∈ ℝ^{(P + n) × d},   the soft tokens at positions 0..P-1 and the input at P..P+n-1,

and the loss is taken on the input tokens only. Only S is trained: P·d parameters.

Implementation: under causal attention the soft tokens attend only to each other, so their keys/values in every
layer do not depend on the input. Each forward therefore runs the frozen decoder once on S alone (batch 1, with
gradient to S) and serves the resulting keys/values to the real forward as P already-seen tokens, through the same
hook as prefix tuning (``tunelab.methods.prefix.PrefixInjector``: cache, mask and position handling). This equals the
concatenation above exactly — for training, padded batches, packed rows, the KV cache and batched generation — while
hidden states and logits exist only for the input tokens, so labels stay aligned and the loss needs no change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tunelab.methods.contract import Capabilities
from tunelab.methods.core import MethodHandle, embedding_dtype, write_peft_adapter
from tunelab.methods.prefix import (
    KV,
    attach,
    check_fits,
    check_virtual_tokens,
    initial_token_ids,
    input_embeddings,
    run_kv,
)

DESCRIPTION = "Prompt tuning: P trainable soft-token embeddings before the input"
PAPER = ("Lester et al., 2021, The Power of Scale for Parameter-Efficient Prompt Tuning, "
         "https://arxiv.org/abs/2104.08691")
# the soft prompt's keys/values come from running the blocks outside the model's forward, where FSDP does not
# gather their parameters; they reach the model as its key/value cache, which transformers drops in blocks under
# gradient checkpointing
CAPABILITIES = Capabilities(exports=("peft",), fsdp=False, activation_checkpointing=False)
NO_MERGE = ("soft tokens are extra inputs that every layer attends to; attention over them is not a linear map "
            "of the input, so there is no weight update to fold into the base model")
MODULE_NAME = "prompt_tuning"


@dataclass(frozen=True)
class Config:
    num_tokens: int = 20  # P, the prompt length (the PET size of the scaling-law study)
    # vocab: embeddings of sampled vocabulary tokens; text: of init_text's tokens; random: N(0, σ_E²)
    init: Literal["random", "vocab", "text"] = "vocab"
    init_text: str = ""  # for init: text (tokens repeated or cut to P)
    vocab_top: int = 5000  # for init: vocab, sample among the first ids of the vocabulary (Lester et al.'s 5,000)

    def __post_init__(self) -> None:
        check_virtual_tokens("prompt", self.num_tokens, self.init, self.init_text, self.vocab_top)


class SoftPrompt(nn.Module):
    """The soft prompt S [P, d]; its keys/values come from running the frozen decoder on it."""

    method = "prompt"

    def __init__(self, embedding: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Parameter(embedding)
        self.num_tokens = embedding.shape[0]
        self.enabled = True

    def past_key_values(self, body: nn.Module, dtype: torch.dtype) -> KV:
        # the soft tokens enter like real embeddings: in the embedding table's dtype
        return run_kv(body, self.embedding.to(embedding_dtype(body.get_input_embeddings())))

    def unwrap(self) -> None:
        return None  # added to the model, not wrapping a module: remove() deletes it

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}"


def initial_prompt(model: nn.Module, config: Config, tokenizer: Any = None) -> torch.Tensor:
    """S at initialisation [P, d] in fp32: token embeddings (vocab / text) or N(0, σ_E²) with σ_E the std of the
    embedding table (random: soft tokens on the scale of real ones; peft's RANDOM uses N(0, 1))."""
    table = model.get_input_embeddings().weight
    if config.init == "random":
        return torch.randn(config.num_tokens, table.shape[1], device=table.device) * table.float().std()
    ids = initial_token_ids(model, config.num_tokens, config.init, config.init_text, config.vocab_top, tokenizer)
    return input_embeddings(model, ids).detach().float().clone()


def apply(model: nn.Module, config: Config, *, tokenizer: Any = None) -> MethodHandle:
    """Prepend ``config.num_tokens`` trainable soft tokens to every input of ``model``.

    ``tokenizer`` (the model's) is needed for ``init: text``.
    """
    check_fits("prompt", model, config.num_tokens)
    source = SoftPrompt(initial_prompt(model, config, tokenizer))
    return attach(model, source, MODULE_NAME, config, merge_note=NO_MERGE)


def num_parameters(model: nn.Module, config: Config) -> int:
    """Closed form: P·d (d = the input-embedding width)."""
    return config.num_tokens * model.get_input_embeddings().embedding_dim


# --------------------------------------------------------------------------------------------------------------
# peft interoperability
# --------------------------------------------------------------------------------------------------------------


def export(handle: MethodHandle, out_dir: Path, base_model_id: str = "") -> Path:
    """Write the soft prompt in peft's PROMPT_TUNING format: ``prompt_embeddings`` [P, d] in adapter_model.safetensors
    (the soft tokens, as peft's prompt encoder holds them); token_dim, num_layers and num_attention_heads are left for peft to read from the base model's config,
    as it does for a new PromptTuningConfig, so ``PeftModel.from_pretrained(base, out_dir)`` gives the same logits."""
    source = handle.layers[MODULE_NAME]
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_id,
              "num_virtual_tokens": source.num_tokens, "num_transformer_submodules": 1, "token_dim": None,
              "num_layers": None, "num_attention_heads": None, "inference_mode": True, "prompt_tuning_init": "RANDOM"}
    return write_peft_adapter(out_dir, config, {"prompt_embeddings": source.embedding})
