"""The invariants matrix: one row per registered method configuration, the same checks on every row.

Checks: output unchanged at init (where the method claims it); merged == unmerged; disabled == base; only the
method's parameters receive gradients and change after a step; save -> load round trip; trainable-parameter count
equals the closed form written here from the paper's formula (independent of the method's own counter).
Where a property does not apply the row says why, and the check asserts that the method refuses it clearly.
Every check runs on tiny random models of nine families (tunelab.models.tiny): Llama, GPT-2, Qwen2, Qwen3, Mistral,
Gemma 2, Phi-3, GPT-NeoX and OLMo 2.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load, save

from tunelab.devices import available_devices, move_batch
from tunelab.methods import REGISTRY, build_method_config, get_method
from tunelab.methods.core import MethodError
from tunelab.models import TINY_MODELS
from tunelab.train.objective import nll_sum

from conftest import batch_for, tiny

ARCHS = list(TINY_MODELS)  # Llama, GPT-2, Qwen2, Qwen3, Mistral, Gemma 2, Phi-3, GPT-NeoX, OLMo 2
# the families whose attention has separate q/k/v projections named q_proj/v_proj (or GPT-2's c_attn)
NAMED_QV = [a for a in ARCHS if a not in ("tiny-phi3", "tiny-gpt-neox")]


def _linear_dims(cfg) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each decoder linear of one layer, from the model config (written independently of the
    models' code, per family: separate q/k/v, GPT-2's and GPT-NeoX's fused qkv, Phi-3's fused qkv and gate/up)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    if cfg.model_type == "gpt2":
        i = cfg.n_inner or 4 * h
        return {"c_attn": (h, 3 * h), "c_proj": (h, h), "c_fc": (h, i), "mlp.c_proj": (i, h)}
    if cfg.model_type == "gpt_neox":
        i = cfg.intermediate_size
        return {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, i), "dense_4h_to_h": (i, h)}
    hd = getattr(cfg, "head_dim", None) or h // heads
    q, kv, i = heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    if cfg.model_type == "phi3":
        return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


MLP_KEYS = {"gate_proj", "up_proj", "down_proj", "c_fc", "mlp.c_proj", "dense_h_to_4h", "dense_4h_to_h",
            "gate_up_proj"}


def lora_closed_form(r: int, which: Callable[[str], bool] = lambda _: True) -> Callable[[Any], int]:
    def count(model) -> int:
        cfg = model.config
        per_layer = sum(r * (a + b) for k, (a, b) in _linear_dims(cfg).items() if which(k))
        return per_layer * cfg.num_hidden_layers
    return count


def full_closed_form(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def bottleneck_closed_form(b: int, dims: Callable[[Any], list[tuple[int, int]]], bias: bool = True):
    """Series/parallel adapters: per adapter b·d_in + b·d_out (+ b + d_out biases); dims(cfg) lists one layer's."""
    def count(model) -> int:
        cfg = model.config
        per_layer = sum(b * (i + o) + ((b + o) if bias else 0) for i, o in dims(cfg))
        return per_layer * cfg.num_hidden_layers
    return count


def _blocks(n: int) -> Callable[[Any], list[tuple[int, int]]]:
    """n adapters per layer on the residual stream (after/beside MLP and/or attention): d -> d."""
    return lambda cfg: [(cfg.hidden_size, cfg.hidden_size)] * n


def _beside_linears(cfg) -> list[tuple[int, int]]:
    return [d for k, d in _linear_dims(cfg).items() if k in ("q_proj", "v_proj", "c_attn")]


@dataclass
class Row:
    id: str
    method: str
    options: dict[str, Any]
    closed_form: Callable[[Any], int]
    identity_at_init: bool = True
    mergeable: bool = True
    mergeable_why: str = ""
    disable: bool = True
    disable_why: str = ""
    atol: float = 1e-5
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    quantize: dict[str, Any] | None = None  # a run config's quantize section: the base is quantized first


def _qv(name: str) -> bool:
    return name in ("q_proj", "v_proj")


def prompt_closed_form(p: int) -> Callable[[Any], int]:
    """Lester et al.: P soft tokens of the model width d."""
    return lambda model: p * model.config.hidden_size


def prefix_closed_form(p: int, reparam_hidden: int = 0) -> Callable[[Any], int]:
    """Li & Liang: keys and values of P tokens in L layers, 2·L·P·d_kv (d_kv = kv heads · head dim); with the MLP
    reparameterisation the trained parameters are E [P, d_kv] + Linear(d_kv, h) + Linear(h, 2·L·d_kv)."""
    def count(model) -> int:
        cfg = model.config
        heads = cfg.num_attention_heads
        d_kv = getattr(cfg, "num_key_value_heads", heads) * (cfg.hidden_size // heads)
        out = 2 * cfg.num_hidden_layers * d_kv
        if not reparam_hidden:
            return p * out
        h = reparam_hidden
        return p * d_kv + d_kv * h + h + h * out + out
    return count


def reft_closed_form(r: int, interventions_per_layer: int, layers: int | None = None) -> Callable[[Any], int]:
    """Wu et al. (2024): W, R (or W₁, W₂) ∈ ℝ^{r×d} and b ∈ ℝ^r, so 2rd + r per intervention; one per chosen layer
    when tied, one per span (first n / last m) when untied."""
    def count(model) -> int:
        cfg = model.config
        n_layers = cfg.num_hidden_layers if layers is None else layers
        return (2 * r * cfg.hidden_size + r) * interventions_per_layer * n_layers
    return count


REFT_NO_MERGE = "ReFT edits hidden states at chosen prompt positions only: no weight update equals it"

def mask_closed_form(fraction: float, which: Callable[[str], bool] | None = None) -> Callable[[Any], int]:
    """Random masking: ⌊f·N + ½⌋ entries for a budget on the whole model (N its parameters, which=None), else
    Σ over the targeted matrices of ⌊f·d_in·d_out + ½⌋ (a per-matrix density)."""
    def count(model) -> int:
        if which is None:
            return int(fraction * full_closed_form(model) + 0.5)
        cfg = model.config
        per_layer = sum(int(fraction * a * b + 0.5) for k, (a, b) in _linear_dims(cfg).items() if which(k))
        return per_layer * cfg.num_hidden_layers
    return count


# q/v projections of either architecture: a regex, since every name of a target list must exist in the model
QV_CATTN = r".*\.(q_proj|v_proj|c_attn)"

ROWS = [
    Row("full", "full", {}, full_closed_form, mergeable=False,
        mergeable_why="full tuning writes into the base weights: nothing separate to merge",
        disable=False, disable_why="no base copy is kept: disabling would need a second model in memory"),
    Row("lora-all-linear", "lora", {"r": 4, "alpha": 8}, lora_closed_form(4)),
    Row("lora-qv-rslora-gaussian", "lora",
        {"r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"], "rslora": True, "init": "gaussian"},
        lora_closed_form(2, _qv), archs=["tiny-llama"]),
    Row("lora-regex-dropout", "lora", {"r": 3, "alpha": 3, "targets": r".*\.mlp\..*", "dropout": 0.1},
        lora_closed_form(3, lambda k: k in MLP_KEYS)),
    # target presets by role: the linears of every block's attention module, whatever the family names them
    Row("lora-attention-preset", "lora", {"r": 2, "alpha": 4, "targets": "attention"},
        lora_closed_form(2, lambda k: k not in MLP_KEYS)),
    Row("series-mlp", "series", {"bottleneck": 8}, bottleneck_closed_form(8, _blocks(1)), mergeable=False,
        mergeable_why="the bottleneck's activation is nonlinear: no weight update equals it"),
    # init=normal is LLM-Adapters' N(0, 0.02) init of both projections: the output changes at init by design
    Row("series-both-normal-nobias", "series",
        {"bottleneck": 4, "targets": "both", "init": "normal", "bias": False, "activation": "relu", "scaling": 2.0},
        bottleneck_closed_form(4, _blocks(2), bias=False), identity_at_init=False, mergeable=False,
        mergeable_why="the bottleneck's activation is nonlinear: no weight update equals it"),
    Row("parallel-mlp", "parallel", {"bottleneck": 8}, bottleneck_closed_form(8, _blocks(1)), mergeable=False,
        mergeable_why="the bottleneck's activation is nonlinear: no weight update equals it"),
    Row("parallel-qv-cattn-dropout", "parallel",
        {"bottleneck": 4, "targets": QV_CATTN, "activation": "gelu", "dropout": 0.1,
         "scaling": 4.0},
        bottleneck_closed_form(4, _beside_linears), mergeable=False,
        mergeable_why="the bottleneck's activation is nonlinear: no weight update equals it", archs=NAMED_QV),
    # prompt / prefix tuning add attention entries: no initial value leaves every output as it was (a zero value
    # vector still takes softmax mass from the real tokens), so the output changes at init by design
    Row("prompt", "prompt", {"num_tokens": 5}, prompt_closed_form(5), identity_at_init=False, mergeable=False,
        mergeable_why="soft tokens are attended to, not added to weights: no weight update equals them"),
    Row("prefix", "prefix", {"num_tokens": 4}, prefix_closed_form(4), identity_at_init=False, mergeable=False,
        mergeable_why="prefix keys/values are attended to, not added to weights: no weight update equals them"),
    # what is trained (and counted) under reparam is the embedding + MLP; a finished run saves the folded prefix
    Row("prefix-reparam", "prefix", {"num_tokens": 3, "reparam": True, "reparam_hidden": 16},
        prefix_closed_form(3, reparam_hidden=16), identity_at_init=False, mergeable=False,
        mergeable_why="prefix keys/values are attended to, not added to weights: no weight update equals them"),
    # ReFT starts from pyreft's init (R / W₂ orthonormal, W and b nn.Linear-random): the output changes at init
    Row("loreft-tied", "loreft", {"r": 2, "positions": "f2+l2"}, reft_closed_form(2, 1),
        identity_at_init=False, mergeable=False, mergeable_why=REFT_NO_MERGE),
    Row("loreft-untied-layer1-gelu-dropout", "loreft",
        {"r": 3, "layers": [1], "positions": "f3+l2", "tied": False, "activation": "gelu", "dropout": 0.1},
        reft_closed_form(3, 2, layers=1), identity_at_init=False, mergeable=False, mergeable_why=REFT_NO_MERGE),
    Row("direft-tied", "direft", {"r": 2, "positions": "f2+l2"}, reft_closed_form(2, 1),
        identity_at_init=False, mergeable=False, mergeable_why=REFT_NO_MERGE),
    Row("direft-untied-last-only", "direft", {"r": 2, "positions": "l3", "tied": False}, reft_closed_form(2, 1),
        identity_at_init=False, mergeable=False, mergeable_why=REFT_NO_MERGE, archs=["tiny-llama"]),
    # LoRA on a quantized base (tunelab.quant): "base" is the quantized model; merging yields dense dequantized
    # layers (unmerge restores the codes), so merged == unmerged holds to fp32 rounding
    Row("qlora-nf4", "lora", {"r": 4, "alpha": 8}, lora_closed_form(4), quantize={"bits": 4}),
    Row("qlora-int8-dq-qv", "lora", {"r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]},
        lora_closed_form(2, _qv), quantize={"bits": 8, "quant": "int", "double_quant": True, "block": 32},
        archs=["tiny-llama"]),
    # quantize.embeddings: the token embedding and the tied head (QuantEmbedding / QuantHead) are codes too
    Row("qlora-nf4-embeddings", "lora", {"r": 4, "alpha": 8}, lora_closed_form(4),
        quantize={"bits": 4, "embeddings": True}),
    Row("prompt-on-nf4-embeddings", "prompt", {"num_tokens": 5}, prompt_closed_form(5), identity_at_init=False,
        mergeable=False, mergeable_why="soft tokens are attended to, not added to weights: no weight update equals them",
        quantize={"bits": 4, "embeddings": True}, archs=["tiny-llama"]),
    # LoftQ sets B != 0 so that Q + s·B·A approximates the full-precision W: the output moves away from the
    # quantized base at init by design (towards the unquantized model: tests/test_quant.py checks that)
    Row("loftq-nf2-alpha-ne-r", "lora", {"r": 4, "alpha": 16}, lora_closed_form(4), identity_at_init=False,
        quantize={"bits": 2, "init": "loftq", "iters": 2}),
    Row("random-mask-all-linear", "random-mask", {"fraction": 0.01}, mask_closed_form(0.01)),
    Row("random-mask-equal-mlp", "random-mask", {"fraction": 0.02, "spread": "equal", "targets": r".*\.mlp\..*",
                                                 "seed": 7}, mask_closed_form(0.02)),
    Row("random-mask-qv-matrix", "random-mask",
        {"fraction": 0.05, "budget": "matrix", "targets": QV_CATTN},
        mask_closed_form(0.05, lambda k: k in ("q_proj", "v_proj", "c_attn")), archs=NAMED_QV),
]

DEVICES = available_devices()  # the CPU always; CUDA too where torch sees a GPU (then ids end in "-cuda")
CASES = [pytest.param(row, arch, dev, id=f"{row.id}-{arch}" + ("" if dev == "cpu" else f"-{dev}"))
         for row in ROWS for arch in row.archs for dev in DEVICES]


def test_every_registered_method_has_a_row():
    assert {r.method for r in ROWS} == set(REGISTRY)


def _quantize(row: Row, model, cfg):
    """Quantize the base as the row's quantize section says (None for unquantized rows)."""
    if row.quantize is None:
        return None
    from tunelab.config import QuantizeSection, build
    from tunelab.quant.model import quantize_model

    module = get_method(row.method)
    low_rank = module.low_rank(cfg) if module.CAPABILITIES.loftq_init else None
    return quantize_model(model, build(QuantizeSection, row.quantize, "quantize"), low_rank)


def _apply(row: Row, model, cfg, state):
    module = get_method(row.method)
    handle = module.apply(model, cfg)
    if state is not None:
        state.init_adapters(handle, module)  # LoftQ's A/B
    return handle


def _setup(row: Row, arch: str, device: str = "cpu"):
    """The row's method applied on ``device`` (the base quantized on the CPU first, as the trainer does)."""
    model, tok = tiny(arch)
    batch = move_batch(batch_for(tok), torch.device(device))
    cfg = build_method_config({"name": row.method, **row.options})
    state = _quantize(row, model, cfg)  # the base of a quantized row is the quantized model
    model.to(device)
    with torch.no_grad():
        base_logits = model(**batch).logits
    handle = _apply(row, model, cfg, state)
    model.eval()  # dropout off: the checks compare outputs
    return model, tok, batch, base_logits, handle, cfg


def _perturb(handle, seed: int = 0) -> None:
    """Give every trainable parameter a random non-trivial value (LoRA's B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.05)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize(("row", "arch", "device"), CASES)
def test_identity_at_init(row, arch, device):
    model, _, batch, base_logits, _, _ = _setup(row, arch, device)
    if row.identity_at_init:
        torch.testing.assert_close(_logits(model, batch), base_logits, atol=row.atol, rtol=0)
    else:  # the row says the method changes the output at init: check that it really does
        assert not torch.allclose(_logits(model, batch), base_logits, atol=1e-4)


@pytest.mark.parametrize(("row", "arch", "device"), CASES)
def test_merged_equals_unmerged(row, arch, device):
    model, _, batch, _, handle, _ = _setup(row, arch, device)
    _perturb(handle)
    if not row.mergeable:
        assert not handle.supports_merge
        with pytest.raises(MethodError, match="cannot merge"):
            handle.merge()
        return
    adapted = _logits(model, batch)
    handle.merge()
    torch.testing.assert_close(_logits(model, batch), adapted, atol=row.atol, rtol=1e-4)
    handle.unmerge()
    torch.testing.assert_close(_logits(model, batch), adapted, atol=row.atol, rtol=1e-4)
    plain = handle.merge_and_unload()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain, batch), adapted, atol=row.atol, rtol=1e-4)


@pytest.mark.parametrize(("row", "arch", "device"), CASES)
def test_disabled_equals_base(row, arch, device):
    model, _, batch, base_logits, handle, _ = _setup(row, arch, device)
    _perturb(handle)
    if not row.disable:
        assert row.disable_why
        return
    adapted = _logits(model, batch)
    assert not torch.allclose(adapted, base_logits, atol=1e-4), "perturbed method should change the output"
    with handle.disabled():
        torch.testing.assert_close(_logits(model, batch), base_logits, atol=row.atol, rtol=0)
    torch.testing.assert_close(_logits(model, batch), adapted, atol=row.atol, rtol=0)
    handle.remove()
    torch.testing.assert_close(_logits(model, batch), base_logits, atol=row.atol, rtol=0)


@pytest.mark.parametrize(("row", "arch", "device"), CASES)
def test_only_method_parameters_train(row, arch, device):
    model, tok, batch, _, handle, _ = _setup(row, arch, device)
    model.train()
    _perturb(handle)
    trainable = handle.trainable_parameters()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    total, count = nll_sum(model, {**batch, "labels": labels})
    (total / count).backward()
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable), f"{n}: changed={changed}, trainable={n in trainable}"


@pytest.mark.parametrize(("row", "arch", "device"), CASES)
def test_save_load_round_trip(row, arch, device):
    model, _, batch, _, handle, cfg = _setup(row, arch, device)
    _perturb(handle, seed=3)
    expected = _logits(model, batch)
    blob = save({k: v.contiguous() for k, v in handle.state_dict().items()})
    fresh, _ = tiny(arch)
    cfg2 = copy.deepcopy(cfg)
    state2 = _quantize(row, fresh, cfg2)
    fresh.to(device)
    handle2 = _apply(row, fresh, cfg2, state2)
    fresh.eval()
    handle2.load_state_dict(load(blob))
    torch.testing.assert_close(_logits(fresh, batch), expected, atol=row.atol, rtol=0)


@pytest.mark.parametrize(("row", "arch", "device"), CASES)
def test_parameter_count_closed_form(row, arch, device):
    model, _, _, _, handle, cfg = _setup(row, arch, device)
    fresh, _ = tiny(arch)
    expected = row.closed_form(fresh)
    assert handle.num_trainable() == expected
    assert get_method(row.method).num_parameters(fresh, cfg) == expected


def _grads_and_block_calls(model, handle, batch) -> tuple[dict[str, torch.Tensor], int]:
    """One loss + backward from a fixed RNG state: the trainable gradients and how many times the modules inside
    the first decoder block were called (twice as many when the block is recomputed in the backward)."""
    from tunelab.methods.reft import decoder_layers

    calls = [0]
    block = decoder_layers(model)[0]
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for m in block.modules() if m is not block]
    params = handle.trainable_parameters()
    for p in params.values():
        p.grad = None
    torch.manual_seed(11)  # the same dropout masks in both passes (checkpointing replays the RNG state)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    total, count = nll_sum(model, {**batch, "labels": labels})
    (total / count).backward()
    for h in hooks:
        h.remove()
    return {n: p.grad.detach().clone() for n, p in params.items()}, calls[0]


@pytest.mark.parametrize(("row", "arch", "device"), CASES)
def test_activation_checkpointing_same_gradients(row, arch, device):
    """train.activation_checkpointing recomputes each block in the backward pass and leaves every gradient as it
    was; a method that cannot train with it (prefix and prompt tuning, which reach the model as its key/value
    cache: transformers drops the cache in checkpointed blocks) is refused when the config is read."""
    from tunelab.config import ConfigError, load_config
    from tunelab.train.loop import enable_activation_checkpointing

    if not get_method(row.method).CAPABILITIES.activation_checkpointing:
        with pytest.raises(ConfigError, match=f"train.activation_checkpointing: method '{row.method}' cannot train"):
            load_config(None, [f"method.name={row.method}", "train.activation_checkpointing=true"])
        return
    model, _, batch, _, handle, _ = _setup(row, arch, device)
    model.train()
    _perturb(handle)
    plain, plain_calls = _grads_and_block_calls(model, handle, batch)
    enable_activation_checkpointing(model)
    checkpointed, calls = _grads_and_block_calls(model, handle, batch)
    # the block really ran again in the backward pass (torch stops a recomputation once it has every saved tensor)
    assert 0 < plain_calls < calls <= 2 * plain_calls
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=row.atol, rtol=1e-4, msg=n)


SHARED_PAIRS = [("Question: which of these floats on water?\nAnswer:", o) for o in (" a dry stick", " iron", " x")]
SHARED_PAIRS += [("Q: a second, longer question context that needs left padding?\nA:", o) for o in (" yes it does", " no")]


@pytest.mark.parametrize(("row", "arch", "device"), CASES)
def test_shared_context_scoring_equals_scoring_alone(row, arch, device):
    """Log-likelihood scoring runs a multiple-choice context once and its options on its KV cache (left-padded
    contexts, then a cached pass like a decode step of several tokens): every method gives the numbers of scoring
    each (context, option) alone as one sequence — position-aware methods edit the same context positions, prefix
    and prompt tuning keep their prefix in the repeated cache."""
    from tunelab.eval.loglik import continuation_logprobs

    model, tok, _, _, handle, _ = _setup(row, arch, device)
    _perturb(handle)
    together = continuation_logprobs(model, tok, SHARED_PAIRS, batch_size=8)
    alone = [continuation_logprobs(model, tok, [pair])[0] for pair in SHARED_PAIRS]
    for (a, n), (b, m) in zip(together, alone, strict=True):
        assert n == m
        assert a == pytest.approx(b, abs=max(row.atol, 1e-5) * 10 * n)


GEN_PROMPTS = ["The cat sat on", "A much longer prompt, one that needs left padding in the batch:", "Q: 2 + 3 =", "x"]


@pytest.mark.parametrize(("row", "arch", "device"), CASES)
def test_own_greedy_loop_equals_transformers_generate(row, arch, device):
    """tunelab's greedy loop (prefill, then one token per row on the cache, finished rows dropped from the batch
    and the cache) gives transformers' ``generate`` tokens for every method; the end token is chosen among the
    tokens ``generate`` produces, so rows finish at different steps and leave the batch while the others go on."""
    from tunelab.eval.generate import GenerationSettings, _left_pad, generate_ids

    model, tok, _, _, handle, _ = _setup(row, arch, device)
    _perturb(handle)
    prompts = [tok(p)["input_ids"] for p in GEN_PROMPTS]
    hf = GenerationSettings(max_new_tokens=8, batch_size=4, engine="transformers")
    ours = GenerationSettings(max_new_tokens=8, batch_size=4, engine="tunelab")
    first = generate_ids(model, tok, prompts, hf)
    assert [g.text for g in generate_ids(model, tok, prompts, ours)] == [g.text for g in first]
    ids, mask = _left_pad(prompts, tok.pad_token_id)
    dev = next(model.parameters()).device
    with torch.no_grad():
        new = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=3,
                             do_sample=False, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    model.generation_config.eos_token_id = int(new[0, -1])  # row 0 now ends after <= 3 tokens
    want, got = generate_ids(model, tok, prompts, hf), generate_ids(model, tok, prompts, ours)
    assert [(g.text, g.n_tokens) for g in got] == [(g.text, g.n_tokens) for g in want]
    assert min(g.n_tokens for g in got) < 8  # some row really finished early


MC_RECORDS = [("Which of these floats on water? Options: a dry stick; iron; a stone", ("a dry stick", "iron", "a stone")),
              ("Pick the even one. Options: 3; 8", ("3", "8")),
              ("A much longer question, one that needs left padding in its batch: which is a colour? Options: red; "
               "seven; loud", ("red", "seven", "loud"))]


@pytest.mark.parametrize(("row", "arch", "device"), CASES)
def test_generation_and_loglik_share_the_prefill(row, arch, device):
    """A generation task and a trained-format log-likelihood task on the same items run from one pass over the
    prompts (tunelab.eval.harness.run_generate_and_loglik): every method gives the texts and option scores of the
    two tasks run alone, and every item's options were scored after generation's prefill."""
    from tunelab.data import Record
    from tunelab.eval.harness import (
        EvalOptions,
        _Prepared,
        can_share_prefill,
        run_generate,
        run_generate_and_loglik,
        run_loglik,
    )
    from tunelab.eval.tasks import TaskChoices, TaskGeneration, TaskSpec

    model, tok, _, _, handle, _ = _setup(row, arch, device)
    _perturb(handle)
    records = [Record(q, "", opts[0], options=opts) for q, opts in MC_RECORDS]
    gen = TaskSpec(name="g", data="x", format="mc-text", parser={"name": "option"},
                   generation=TaskGeneration(max_new_tokens=5))
    ll = TaskSpec(name="l", data="x", kind="loglik", format="mc-text", choices=TaskChoices(style="trained"))
    opts = EvalOptions(batch_size=2)
    pair = (_Prepared(gen, "alpaca", records, 0, None, None), _Prepared(ll, "alpaca", records, 0, None, None))
    if not can_share_prefill(model, *pair, opts):  # a sliding attention window: the tasks run alone (see there)
        from tunelab.eval.loglik import _max_length, _sliding_window

        assert _sliding_window(model) < _max_length(model)
        return
    gen_rows, _ = run_generate(model, tok, gen, records, opts, "alpaca")
    ll_rows, _ = run_loglik(model, tok, ll, records, opts, "alpaca")
    with tempfile.TemporaryDirectory() as out:
        g, c = run_generate_and_loglik(model, tok, *pair, EvalOptions(batch_size=2, out_dir=out))
        joint_gen = [json.loads(x) for x in Path(out, "g.jsonl").read_text().splitlines()]
        joint_ll = [json.loads(x) for x in Path(out, "l.jsonl").read_text().splitlines()]
    assert c["scored_after_prefill"] == len(records) and c["shared_prefill_with"] == "g"
    assert [r["output"] for r in joint_gen] == [r["output"] for r in gen_rows]
    assert g["accuracy"] == pytest.approx(sum(r["correct"] for r in gen_rows) / len(records))
    for a, b in zip(joint_ll, ll_rows, strict=True):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=max(row.atol, 1e-5) * 50)
        assert a["pred_index"] == b["pred_index"]
