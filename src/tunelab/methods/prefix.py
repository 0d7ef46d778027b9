"""Prefix tuning: trainable keys and values of P virtual tokens in every attention layer (Li & Liang, 2021).

For layer l with frozen projections, an input token at position t attends over the P learned prefix entries and the
causal past of the input:

    h_t = Attn(q_t, [K_l^pre ; K_l(x_≤t)], [V_l^pre ; V_l(x_≤t)]),   K_l^pre, V_l^pre ∈ ℝ^{H_kv × P × d_head}

so the trainable state is one tensor ``prefix`` ∈ ℝ^{L × 2 × H_kv × P × d_head} (2·L·P·d_kv numbers, d_kv =
H_kv·d_head: the key/value width, smaller than the model width under grouped-query attention). The learned keys are
used as they are (no rotary embedding is applied to them). With ``reparam`` (Li & Liang §4.3) the prefix is produced
during training by an MLP from a smaller table, as in peft's ``prefix_projection``:

    [K^pre ; V^pre] = reshape(W_2 · tanh(W_1 · E + b_1) + b_2),
    E ∈ ℝ^{P × d_kv},  W_1 ∈ ℝ^{h × d_kv},  W_2 ∈ ℝ^{2·L·d_kv × h},  h = reparam_hidden

and ``fold()`` replaces the MLP by the plain prefix it computes, so a finished run saves only the prefix.

Mechanism (shared with prompt tuning, see ``PrefixInjector``): a forward pre-hook on the decoder body puts the prefix
into the transformers ``Cache`` as P already-seen tokens, extends the attention mask by P ones on the left and shifts
explicit ``position_ids`` by P, so the input tokens sit at positions P, P+1, ... exactly as if the P virtual tokens
had been decoded first (the convention of the original implementation and of peft). Hidden states and logits exist
only for the input tokens, so labels stay aligned and the loss needs no change; ``generate`` works unchanged because
the prefix stays in the cache it carries from step to step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.contract import Capabilities
from tunelab.methods.core import (
    MethodError,
    MethodHandle,
    embedding_device,
    embedding_dtype,
    freeze,
    write_peft_adapter,
)

DESCRIPTION = "Prefix tuning: learned keys/values of P virtual tokens in every attention layer (optional MLP reparam)"
PAPER = ("Li & Liang, 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation, "
         "https://arxiv.org/abs/2101.00190")
# transformers drops the key/value cache — which carries the prefix — in blocks under gradient checkpointing
CAPABILITIES = Capabilities(exports=("peft",), activation_checkpointing=False)
NO_MERGE = ("the prefix adds P attention entries (keys/values) in every layer; attention over them is not a linear "
            "map of the input, so there is no weight update to fold into the base model")
MODULE_NAME = "prefix_tuning"

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values), each [batch, H_kv, P, d_head]


@dataclass(frozen=True)
class Config:
    num_tokens: int = 30  # P, the number of virtual tokens (LLM-Adapters' default)
    # random: N(0, 1) like peft; vocab / text: the frozen model's own keys/values of real tokens
    init: Literal["random", "vocab", "text"] = "random"
    init_text: str = ""  # for init: text (tokens repeated or cut to P)
    vocab_top: int = 5000  # for init: vocab, sample among the first ids of the vocabulary
    reparam: bool = False  # produce the prefix with an MLP during training (folded when saved)
    reparam_hidden: int = 512  # h, the MLP's hidden width (mid_dim = 512 in Li & Liang's code)

    def __post_init__(self) -> None:
        check_virtual_tokens("prefix", self.num_tokens, self.init, self.init_text, self.vocab_top)
        if self.reparam and self.init != "random":
            raise ConfigError(f"prefix: init '{self.init}' sets the prefix itself, which the reparameterisation MLP "
                              f"computes; use init: random with reparam: true, or reparam: false")
        if self.reparam_hidden < 1:
            raise ConfigError(f"prefix: reparam_hidden must be at least 1, got {self.reparam_hidden}")


def check_virtual_tokens(method: str, num_tokens: int, init: str, init_text: str, vocab_top: int) -> None:
    """Validation shared by prompt and prefix tuning configs."""
    if num_tokens < 1:
        raise ConfigError(f"{method}: num_tokens must be at least 1, got {num_tokens}")
    if init == "text" and not init_text:
        raise ConfigError(f"{method}: init: text needs init_text (the text whose tokens initialise the "
                          f"{num_tokens} virtual tokens)")
    if init != "text" and init_text:
        raise ConfigError(f"{method}: init_text is only used with init: text (init is '{init}')")
    if vocab_top < 1:
        raise ConfigError(f"{method}: vocab_top must be at least 1, got {vocab_top}")


# --------------------------------------------------------------------------------------------------------------
# Model geometry and initial tokens
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    layers: int  # L
    kv_heads: int  # H_kv (= query heads without GQA)
    head_dim: int  # d_head
    hidden: int  # model width d
    max_positions: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def geometry(model: nn.Module) -> Geometry:
    """Attention shapes of a transformers causal LM, read from its config (Llama, GPT-2, and alike)."""
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    return Geometry(
        layers=cfg.num_hidden_layers,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        hidden=cfg.hidden_size,
        max_positions=getattr(cfg, "max_position_embeddings", None) or 0,
    )


def check_fits(method: str, model: nn.Module, num_tokens: int) -> None:
    limit = geometry(model).max_positions
    if limit and num_tokens >= limit:
        raise MethodError(f"{method}: num_tokens={num_tokens} leaves no room for the input: the virtual tokens take "
                          f"positions 0..{num_tokens - 1} of the model's {limit}; use num_tokens < {limit}")


def initial_token_ids(model: nn.Module, num_tokens: int, init: str, init_text: str, vocab_top: int,
                      tokenizer: Any = None) -> torch.Tensor:
    """The P token ids whose embeddings (prompt) or keys/values (prefix) initialise the virtual tokens.

    vocab: uniform over the first ``vocab_top`` ids (Lester et al. sample the 5,000 most common tokens; BPE and
    SentencePiece vocabularies list frequent tokens first), special tokens excluded, without replacement when P
    allows. text: the tokens of ``init_text``, repeated or cut to P (Lester et al.'s class-label / text init).
    """
    if init == "text":
        ids = _text_ids(model, init_text, tokenizer)
        reps = -(-num_tokens // len(ids))
        return torch.tensor((ids * reps)[:num_tokens], dtype=torch.long)
    vocab = model.get_input_embeddings().num_embeddings
    special = {getattr(model.config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    pool = torch.tensor([i for i in range(min(vocab_top, vocab)) if i not in special], dtype=torch.long)
    if num_tokens <= len(pool):
        return pool[torch.randperm(len(pool))[:num_tokens]]
    return pool[torch.randint(len(pool), (num_tokens,))]


def _text_ids(model: nn.Module, text: str, tokenizer: Any) -> list[int]:
    if tokenizer is None:
        raise MethodError("init: text needs the model's tokenizer: the caller passes it (apply(model, config, "
                          "tokenizer=tok); `tunelab train` and load_run do), or use init: vocab or random")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise MethodError(f"init_text {text!r} has no tokens")
    return ids


def input_embeddings(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    emb = model.get_input_embeddings()
    return emb(ids.to(embedding_device(emb)))


def run_kv(body: nn.Module, embeds: torch.Tensor) -> KV:
    """Keys/values of every layer when the decoder runs on ``embeds`` [P, d] alone (positions 0..P-1).

    Under causal attention these are exactly the keys/values the same P vectors would produce at the front of
    any longer input, which makes prompt tuning a prefix computed from soft tokens.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=body.config)
    body(inputs_embeds=embeds[None], cache=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


# --------------------------------------------------------------------------------------------------------------
# The injection hook (shared with prompt tuning)
# --------------------------------------------------------------------------------------------------------------


class PrefixInjector:
    """Forward pre-hook on the decoder body that serves ``source`` as P already-seen tokens.

    ``source`` is a module with ``num_tokens``, ``enabled`` and ``past_key_values(body, dtype) -> KV`` (batch 1).
    On each call of the body:

    - a cache without the prefix (none, or empty: training, the prefill of ``generate``) gets it, expanded to the
      batch; a cache that already holds it (decode steps) is used as it is; a non-empty cache without it is refused;
    - a 2-D attention mask as wide as the real tokens gets P ones on the left (a mask that already covers the
      prefix is kept); packed rows (``position_ids`` restarting, no mask) get a 4-D mask in which every packed
      sequence sees the prefix and itself only;
    - explicit ``position_ids`` (counted from the first real token, as ``generate`` and packing make them) are
      shifted by P; without them transformers counts from the cache length, which already includes P.
    """

    def __init__(self, body: nn.Module, source: nn.Module) -> None:
        self.body = body
        self.source = source
        self.signature = inspect.signature(body.forward)
        self.var_kwargs = next((n for n, p in self.signature.parameters.items() if p.kind is p.VAR_KEYWORD), "")
        self.max_positions = geometry(body).max_positions
        self._busy = False

    def register(self) -> Any:
        return self.body.register_forward_pre_hook(self, with_kwargs=True)

    def prefix_kv(self, dtype: torch.dtype) -> KV:
        """The source's keys/values; the hook stays out of the decoder runs the source itself makes."""
        self._busy = True
        try:
            return self.source.past_key_values(self.body, dtype)
        finally:
            self._busy = False

    def __call__(self, body: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if self._busy or not self.source.enabled:
            return None
        self._refuse_checkpointing()
        kw = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        kw.update(kw.pop(self.var_kwargs, {}))
        if "past_key_values" in kw:  # the pre-5 name of `cache`
            kw["cache"] = kw.pop("past_key_values")
        inputs = kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]
        batch, q_len = inputs.shape[0], inputs.shape[1]
        kw["cache"] = self._cache_with_prefix(kw.get("cache"), batch, inputs.device)
        past = kw["cache"].get_seq_length()
        p = self.source.num_tokens
        position_ids = kw.get("position_ids")
        kw["attention_mask"] = self._mask(kw.get("attention_mask"), position_ids, past, q_len, batch)
        if position_ids is not None:
            kw["position_ids"] = position_ids + p
        self._check_positions(kw.get("position_ids"), past + q_len)
        return (), kw

    # -- the cache ---------------------------------------------------------------------------------------------
    def _cache_with_prefix(self, cache: Any, batch: int, device: torch.device) -> Any:
        if cache is not None and getattr(cache, "tunelab_prefix", None) == id(self):
            return cache
        if cache is not None and cache.get_seq_length() > 0:
            raise MethodError(f"{self.source.method}: the cache passed to the model already holds "
                              f"{cache.get_seq_length()} tokens but not the method's prefix (was it filled with "
                              f"the method disabled?); start from an empty cache")
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.body.config)
        for layer, (k, v) in enumerate(self.prefix_kv(compute_dtype(self.body, device))):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), layer)
        cache.tunelab_prefix = id(self)
        return cache

    # -- the mask ----------------------------------------------------------------------------------------------
    def _mask(self, mask: torch.Tensor | None, position_ids: torch.Tensor | None, past: int, q_len: int,
              batch: int) -> torch.Tensor | None:
        p = self.source.num_tokens
        if mask is None:
            if position_ids is None or past != p:
                return None
            return self._packed_mask(position_ids.expand(batch, -1), p)
        if mask.ndim != 2:
            raise MethodError(f"{self.source.method}: needs a 2-D attention mask (got {mask.ndim}-D, as generate "
                              f"builds for static/compiled caches); use the default dynamic cache")
        width = mask.shape[1]
        if width == past + q_len:
            return mask
        if width == past + q_len - p:
            return torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)
        raise MethodError(f"{self.source.method}: attention mask has {width} columns; with {past - p} cached tokens "
                          f"and {q_len} new ones it should have {past + q_len - p} (or {past + q_len} including "
                          f"the {p} prefix positions)")

    def _packed_mask(self, position_ids: torch.Tensor, p: int) -> torch.Tensor | None:
        from transformers.masking_utils import find_packed_sequence_indices

        seq = find_packed_sequence_indices(position_ids)
        if seq is None:
            return None
        impl = self.body.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise MethodError(f"{self.source.method}: packed rows need the sdpa or eager attention, not {impl!r}; "
                              f"set data.packing: false")
        q_len = seq.shape[1]
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=seq.device).tril()
        own = (seq[:, :, None] == seq[:, None, :]) & causal
        allowed = torch.cat([own.new_ones(seq.shape[0], q_len, p), own], dim=2)[:, None]
        if impl == "sdpa":
            return allowed
        dtype = compute_dtype(self.body, seq.device)
        return torch.zeros(allowed.shape, dtype=dtype, device=seq.device).masked_fill(~allowed,
                                                                                        torch.finfo(dtype).min)

    # -- checks ------------------------------------------------------------------------------------------------
    def _check_positions(self, position_ids: torch.Tensor | None, end: int) -> None:
        limit = self.max_positions
        last = int(position_ids.max()) if position_ids is not None else end - 1
        if limit and last >= limit:
            raise MethodError(f"{self.source.method}: position {last} is past the model's {limit} positions: the "
                              f"{self.source.num_tokens} virtual tokens come first, so inputs may have at most "
                              f"{limit - self.source.num_tokens} tokens (fewer num_tokens or shorter inputs)")

    def _refuse_checkpointing(self) -> None:
        if not (self.body.training and torch.is_grad_enabled()):
            return
        name = "is_activation_checkpointing" if hasattr(type(self.body), "is_activation_checkpointing") \
            else "is_gradient_checkpointing"  # renamed in transformers 5.x
        if getattr(self.body, name, False):
            raise MethodError(f"{self.source.method}: transformers drops the cache (and so the prefix) under "
                              f"gradient checkpointing; turn gradient checkpointing off")


def compute_dtype(body: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype the layers compute in: autocast's when it is on, else the frozen weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return embedding_dtype(body.get_input_embeddings())


def attach(model: nn.Module, source: nn.Module, name: str, config: Any, *, merge_note: str,
           fold: Callable[[], None] | None = None) -> MethodHandle:
    """Freeze ``model``, add ``source`` as ``model.<name>`` and hook it into the decoder body; returns the handle.

    ``source`` sits in ``handle.layers`` (its ``unwrap()`` is None: remove() deletes it), so enable/disable toggles
    its ``enabled`` flag, which the hook reads.
    """
    freeze(model)
    for p in source.parameters():
        p.requires_grad_(True)
    model.add_module(name, source)
    injector = PrefixInjector(model.base_model, source)
    handle = MethodHandle(name=source.method, model=model, config=config, layers={name: source},
                          merge_note=merge_note, fold=fold)
    handle.add_hook(injector.register())
    return handle


# --------------------------------------------------------------------------------------------------------------
# Prefix tuning
# --------------------------------------------------------------------------------------------------------------


class PrefixKV(nn.Module):
    """The learned prefix ``prefix`` [L, 2, H_kv, P, d_head]; under reparam ``embedding`` [P, d_kv] and ``mlp``."""

    method = "prefix"

    def __init__(self, geo: Geometry, num_tokens: int, reparam_hidden: int | None, device: torch.device) -> None:
        super().__init__()
        self.geo, self.num_tokens, self.enabled = geo, num_tokens, True
        shape = (geo.layers, 2, geo.kv_heads, num_tokens, geo.head_dim)
        if reparam_hidden is None:
            self.prefix = nn.Parameter(torch.randn(shape, device=device))  # nn.Embedding's N(0, 1), as peft
            return
        d = geo.kv_dim
        self.embedding = nn.Parameter(torch.randn(num_tokens, d, device=device))
        h = reparam_hidden
        self.mlp = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, 2 * geo.layers * d)).to(device)

    @property
    def reparam(self) -> bool:
        return "prefix" not in self._parameters

    def table(self) -> torch.Tensor:
        """The prefix [L, 2, H_kv, P, d_head] (computed by the MLP under reparam)."""
        if not self.reparam:
            return self.prefix
        g = self.geo
        flat = self.mlp(self.embedding)  # [P, 2·L·d_kv], laid out (layer, key/value, head, d_head) as peft's
        return flat.view(self.num_tokens, g.layers, 2, g.kv_heads, g.head_dim).permute(1, 2, 3, 0, 4)

    def past_key_values(self, body: nn.Module, dtype: torch.dtype) -> KV:
        t = self.table().to(dtype)
        return [(t[i, 0][None], t[i, 1][None]) for i in range(self.geo.layers)]

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparameterisation by the prefix it computes (outputs unchanged; no MLP left)."""
        if not self.reparam:
            return
        table = self.table().detach().clone()
        trainable = self.embedding.requires_grad
        del self.embedding, self.mlp
        self.prefix = nn.Parameter(table.contiguous(), requires_grad=trainable)

    def unwrap(self) -> None:
        return None  # added to the model, not wrapping a module: remove() deletes it

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, reparam={self.reparam}"


def apply(model: nn.Module, config: Config, *, tokenizer: Any = None) -> MethodHandle:
    """Add a learned prefix of ``config.num_tokens`` keys/values to every attention layer.

    ``tokenizer`` (the model's) is needed for ``init: text``.
    """
    check_fits("prefix", model, config.num_tokens)
    geo = geometry(model)
    device = embedding_device(model.get_input_embeddings())
    source = PrefixKV(geo, config.num_tokens, config.reparam_hidden if config.reparam else None, device)
    if config.init != "random":
        ids = initial_token_ids(model, config.num_tokens, config.init, config.init_text, config.vocab_top, tokenizer)
        with torch.no_grad():
            kv = run_kv(model.base_model, input_embeddings(model, ids))
            source.prefix.copy_(torch.stack([torch.stack([k[0], v[0]]) for k, v in kv]))
    return attach(model, source, MODULE_NAME, config, merge_note=NO_MERGE, fold=source.fold)


def num_parameters(model: nn.Module, config: Config) -> int:
    """Closed form: 2·L·P·d_kv; with reparam P·d_kv + (d_kv·h + h) + (h·2L·d_kv + 2L·d_kv) (what is trained)."""
    g = geometry(model)
    p, d, out = config.num_tokens, g.kv_dim, 2 * g.layers * g.kv_dim
    if not config.reparam:
        return p * out
    h = config.reparam_hidden
    return p * d + (d * h + h) + (h * out + out)


# --------------------------------------------------------------------------------------------------------------
# peft interoperability
# --------------------------------------------------------------------------------------------------------------


def export(handle: MethodHandle, out_dir: Path, base_model_id: str = "") -> Path:
    """Write the prefix in peft's PREFIX_TUNING format: ``prompt_embeddings`` [P, 2·L·d_kv] in adapter_model.safetensors
    laid out (layer, key/value, head, d_head) per virtual token, as peft's PrefixEncoder table (a
    reparameterised prefix is exported folded: the table its MLP computes, prefix_projection false); token_dim, num_layers and num_attention_heads are left for peft to read from the base model's config,
    as it does for a new PrefixTuningConfig, so ``PeftModel.from_pretrained(base, out_dir)`` gives the same logits."""
    source = handle.layers[MODULE_NAME]
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_id,
              "num_virtual_tokens": source.num_tokens, "num_transformer_submodules": 1, "token_dim": None,
              "num_layers": None, "num_attention_heads": None, "inference_mode": True, "prefix_projection": False}
    return write_peft_adapter(out_dir, config, {"prompt_embeddings": _peft_table(source)})


def _peft_table(source: PrefixKV) -> torch.Tensor:
    with torch.no_grad():
        table = source.table()  # [L, 2, H_kv, P, d_head]
    return table.permute(3, 0, 1, 2, 4).reshape(source.num_tokens, -1)
