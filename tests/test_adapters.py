"""Series and parallel (bottleneck) adapters against a plain-torch reference written from the equations.

    series:    h ← h + s·(W_up f(W_down h + b_down) + b_up)          after a module's output h
    parallel:  y = module(x) + s·(W_up f(W_down x + b_down) + b_up)   beside a module with input x

The reference runs an untouched copy of the tiny model with forward hooks doing exactly that, with the adapter's
weights as plain tensors; the target names are written out per architecture here, not taken from the method.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.config import ConfigError
from tunelab.eval.generate import GenerationSettings, generate_ids
from tunelab.methods import build_method_config, get_method, method_options
from tunelab.methods.core import MethodError

from conftest import batch_for, tiny

ARCHS = ["tiny-llama", "tiny-gpt2"]
LAYERS = 2  # both tiny models

# f written out independently of the method's own table
ACT = {
    "relu": lambda z: z.clamp_min(0),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "silu": lambda z: z * torch.sigmoid(z),
    "tanh": lambda z: (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z)),
}


def expected_names(arch: str, where: str) -> list[str]:
    """Full module names for a placement, written out per architecture."""
    block = "model.layers.{}" if arch == "tiny-llama" else "transformer.h.{}"
    attn = "self_attn" if arch == "tiny-llama" else "attn"
    suffixes = {
        "mlp": ["mlp"],
        "attention": [attn],
        "both": [attn, "mlp"],
        "layer0-mlp": ["mlp"],
        "linears": ["self_attn.q_proj", "self_attn.v_proj"] if arch == "tiny-llama" else ["attn.c_attn"],
    }[where]
    layers = [0] if where == "layer0-mlp" else range(LAYERS)
    return sorted(f"{block.format(i)}.{s}" for i in layers for s in suffixes)


TARGETS = {
    "mlp": "mlp",
    "attention": "attention",
    "both": "both",
    "layer0-mlp": r"(model\.layers|transformer\.h)\.0\.mlp",  # a regex on full names
    "linears": {"tiny-llama": ["q_proj", "v_proj"], "tiny-gpt2": ["c_attn"]},  # every name of a list must match
}


def targets_for(where: str, arch: str):
    t = TARGETS[where]
    return t[arch] if isinstance(t, dict) else t


def adapted(arch: str, method: str, seed: int = 0, **options):
    """A tiny model with the method applied and every adapter weight given a random non-zero value."""
    model, tok = tiny(arch)
    cfg = build_method_config({"name": method, **options})
    handle = get_method(method).apply(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval()
    return model, tok, handle, cfg


def delta(x: torch.Tensor, w: dict[str, torch.Tensor], act: str, s: float) -> torch.Tensor:
    """s·(W_up f(W_down x + b_down) + b_up), from plain tensors."""
    z = x @ w["down.weight"].T + w.get("down.bias", 0)
    return s * (ACT[act](z) @ w["up.weight"].T + w.get("up.bias", 0))


def reference_logits(arch: str, method: str, weights: dict[str, dict[str, torch.Tensor]], act: str, s: float,
                     batch) -> torch.Tensor:
    """Logits of an untouched model with hooks implementing the equation at each named module."""
    model, _ = tiny(arch)
    model.eval()

    def series_hook(w):
        def hook(_mod, _args, out):
            if isinstance(out, tuple):
                return (out[0] + delta(out[0], w, act, s), *out[1:])
            return out + delta(out, w, act, s)
        return hook

    def parallel_hook(w):
        def hook(_mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            if isinstance(out, tuple):
                return (out[0] + delta(x, w, act, s), *out[1:])
            return out + delta(x, w, act, s)
        return hook

    handles = []
    for name, w in weights.items():
        module = model.get_submodule(name)
        if method == "series":
            handles.append(module.register_forward_hook(series_hook(w)))
        else:
            handles.append(module.register_forward_hook(parallel_hook(w), with_kwargs=True))
    with torch.no_grad():
        out = model(**batch).logits
    for h in handles:
        h.remove()
    return out


def adapter_weights(handle) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach() for k, v in layer.adapter.state_dict().items()}
            for name, layer in handle.layers.items()}


SERIES_CASES = [("mlp", "tanh", 1.0, True), ("attention", "relu", 2.0, True), ("both", "gelu", 0.5, False),
                ("layer0-mlp", "silu", 1.0, True), ("linears", "tanh", 1.0, True)]
PARALLEL_CASES = [("mlp", "tanh", 1.0, True), ("linears", "relu", 4.0, True), ("attention", "silu", 1.0, False),
                  ("both", "gelu", 2.0, True)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("method", "where", "act", "s", "bias"),
                         [("series", *c) for c in SERIES_CASES] + [("parallel", *c) for c in PARALLEL_CASES])
def test_matches_plain_torch_reference(arch, method, where, act, s, bias):
    model, tok, handle, _ = adapted(arch, method, bottleneck=5, targets=targets_for(where, arch), activation=act, scaling=s,
                                    bias=bias)
    assert sorted(handle.layers) == expected_names(arch, where)
    batch = batch_for(tok)
    with torch.no_grad():
        ours = model(**batch).logits
        base = tiny(arch)[0](**batch).logits
    assert not torch.allclose(ours, base, atol=1e-3), "the adapters should change the output"
    theirs = reference_logits(arch, method, adapter_weights(handle), act, s, batch)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["series", "parallel"])
def test_zero_init_is_identity_and_normal_init_is_not(arch, method):
    base, tok = tiny(arch)
    batch = batch_for(tok)
    with torch.no_grad():
        base_logits = base(**batch).logits
    for init, identity in (("zero", True), ("normal", False)):
        model, _ = tiny(arch)
        handle = get_method(method).apply(model, build_method_config({"name": method, "init": init,
                                                                      "targets": "both"}))
        model.eval()
        with torch.no_grad():
            logits = model(**batch).logits
        assert torch.equal(logits, base_logits) == identity, init
        for layer in handle.layers.values():
            a = layer.adapter
            assert torch.count_nonzero(a.down.bias) == 0 and torch.count_nonzero(a.up.bias) == 0
            if init == "zero":
                assert torch.count_nonzero(a.up.weight) == 0
                assert a.down.weight.abs().max() <= 1 / math.sqrt(a.down.in_features) + 1e-6  # Kaiming-uniform
            else:
                for w in (a.down.weight, a.up.weight):
                    assert w.std().item() == pytest.approx(0.02, rel=0.15) and abs(w.mean().item()) < 0.005


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["series", "parallel"])
def test_save_load_round_trip_through_a_file(tmp_path, arch, method):
    model, tok, handle, cfg = adapted(arch, method, bottleneck=6, targets="both", bias=False)
    batch = batch_for(tok)
    with torch.no_grad():
        expected = model(**batch).logits
    path = tmp_path / "adapter.safetensors"
    save_file({k: v.contiguous() for k, v in handle.state_dict().items()}, str(path))
    fresh, _ = tiny(arch)
    get_method(method).apply(fresh, cfg).load_state_dict(load_file(str(path)))
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected, atol=0, rtol=0)
    other, _ = tiny(arch)
    mismatched = get_method(method).apply(other, build_method_config({"name": method, "bottleneck": 6,
                                                                      "bias": False}))
    with pytest.raises(MethodError, match="unexpected .*(self_attn|attn)"):
        mismatched.load_state_dict(load_file(str(path)))


def _prompts(tok):
    texts = ["hi", "What is 12 + 30?", "Reverse the letters: planet", "a", "The quick brown fox jumps"]
    return [tok(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("method", "targets"), [("series", "both"), ("parallel", "both"),
                                                  ("parallel", "linears")])
def test_generation_batched_equals_one_at_a_time_and_no_cache(arch, method, targets):
    model, tok, _, _ = adapted(arch, method, bottleneck=4, targets=targets_for(targets, arch))
    prompts = _prompts(tok)
    batched = generate_ids(model, tok, prompts, GenerationSettings(max_new_tokens=8, batch_size=5))
    single = [generate_ids(model, tok, [p], GenerationSettings(max_new_tokens=8, batch_size=1))[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single]
    base, _ = tiny(arch)
    assert [g.text for g in batched] != [g.text for g in generate_ids(base, tok, prompts,
                                                                     GenerationSettings(max_new_tokens=8))]
    ids = torch.tensor([prompts[1]])  # the KV-cache path equals a full forward per token
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[0, -1].argmax().view(1, 1)], dim=1)
    manual = ids[0, len(prompts[1]):].tolist()
    if tok.eos_token_id in manual:
        manual = manual[: manual.index(tok.eos_token_id) + 1]
    assert batched[1].text == tok.decode(manual, skip_special_tokens=True)


@pytest.mark.parametrize("method", ["series", "parallel"])
def test_bf16_model_keeps_its_dtype_with_fp32_adapters(method):
    model, tok = tiny("tiny-llama", "bf16")
    handle = get_method(method).apply(model, build_method_config({"name": method, "targets": "both"}))
    handle.upcast_trainable()
    assert {p.dtype for p in handle.trainable_parameters().values()} == {torch.float32}
    seen = []
    hook = model.model.layers[0].mlp.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    with torch.no_grad():
        logits = model(**batch_for(tok)).logits
    hook.remove()
    assert seen == [torch.bfloat16] and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["series", "parallel"])
@pytest.mark.parametrize(("options", "message"), [
    ({"bottleneck": 0}, "bottleneck must be at least 1"),
    ({"activation": "swish"}, "valid values: relu, gelu, silu, tanh"),
    ({"init": "bert"}, "valid values: zero, normal"),
    ({"scaling": 0}, "scaling must be a finite non-zero number"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"targets": []}, "targets must be a non-empty list"),
    ({"bottleneck": 8, "bootleneck": 4}, "Did you mean 'bottleneck'"),
])
def test_config_errors(method, options, message):
    with pytest.raises(ConfigError, match=message):
        build_method_config({"name": method, **options})


@pytest.mark.parametrize("method", ["series", "parallel"])
def test_placement_errors_name_the_modules(method):
    module = get_method(method)
    model, _ = tiny("tiny-llama")
    with pytest.raises(MethodError) as e:
        module.apply(model, module.Config(targets=["ffn"]))
    assert "matched no module" in str(e.value) and "model.layers.*.mlp" in str(e.value)
    with pytest.raises(MethodError, match=r"model.layers.0.mlp contains other targets .*mlp.up_proj"):
        module.apply(model, module.Config(targets=["mlp", "up_proj"]))
    assert not any(p.requires_grad is False for p in model.parameters()), "a refused apply must not freeze"


def test_tunelab_methods_lists_the_options():
    names = [o[0] for o in method_options("series")]
    assert names == ["bottleneck", "activation", "scaling", "dropout", "init", "bias", "targets"]
    assert [o[0] for o in method_options("parallel")] == names
    assert dict((o[0], o[2]) for o in method_options("parallel"))["targets"] == "mlp"
