"""LoRA against independent references: plain torch from the paper's equation, and peft when installed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tunelab.methods import lora
from tunelab.methods.core import MethodError

from conftest import batch_for, tiny


def test_lora_linear_matches_equation():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = lora.LoraLinear(base, r=4, scaling=2.5, dropout=0.0, init="kaiming")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 16)
    # h = W x + b + s · B A x
    expected = x @ base.weight.T + base.bias + 2.5 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    merged = base.weight + 2.5 * layer.lora_B @ layer.lora_A
    layer.merge()
    torch.testing.assert_close(base.weight, merged)
    layer.unmerge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_scaling_and_rslora():
    assert lora.Config(r=8, alpha=16).scaling == 2.0
    assert lora.Config(r=16, alpha=8, rslora=True).scaling == pytest.approx(8 / math.sqrt(16))


def test_init_b_zero_a_kaiming_like_nn_linear():
    torch.manual_seed(0)
    layer = lora.LoraLinear(nn.Linear(256, 64), r=8, scaling=1.0, dropout=0.0, init="kaiming")
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=√5) bound for fan_in 256
    assert layer.lora_A.abs().max() <= bound + 1e-6
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    g = lora.LoraLinear(nn.Linear(256, 64), r=8, scaling=1.0, dropout=0.0, init="gaussian")
    assert g.lora_A.std().item() == pytest.approx(1 / 8, rel=0.1)


def test_gpt2_conv1d_lora_matches_equation():
    model, tok = tiny("tiny-gpt2")
    handle = lora.apply(model, lora.Config(r=2, alpha=2, targets=["c_attn"]))
    layer = next(iter(handle.layers.values()))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, layer.base_layer.weight.shape[0])
    expected = x @ layer.base_layer.weight + layer.base_layer.bias + x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_rank_larger_than_layer_is_refused():
    model, _ = tiny("tiny-llama")
    with pytest.raises(MethodError, match=r"r=100 is larger than layer .*k_proj \(64 -> 32\)"):
        lora.apply(model, lora.Config(r=100, targets=["k_proj"]))


def test_unmatched_target_lists_linear_layers():
    model, _ = tiny("tiny-llama")
    with pytest.raises(MethodError) as e:
        lora.apply(model, lora.Config(targets=["qkv_proj"]))
    msg = str(e.value)
    assert "matched no linear layer" in msg and "model.layers.*.self_attn.q_proj" in msg and "mlp.down_proj" in msg


def _randomised(arch: str, **cfg):
    model, tok = tiny(arch)
    handle = lora.apply(model, lora.Config(**cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in handle.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    model.eval()
    return model, tok, handle


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("cfg", [dict(r=4, alpha=8), dict(r=4, alpha=3, rslora=True, targets="attention-list")])
def test_peft_export_loads_with_same_logits(tmp_path, arch, cfg):
    peft = pytest.importorskip("peft")
    if cfg.get("targets") == "attention-list":  # a list of suffixes; each must exist in the architecture
        cfg = {**cfg, "targets": ["q_proj", "v_proj"] if arch == "tiny-llama" else ["c_attn"]}
    model, tok, handle = _randomised(arch, **cfg)
    batch = batch_for(tok)
    with torch.no_grad():
        ours = model(**batch).logits
    lora.export(handle, tmp_path / "peft", base_model_id=arch)
    base, _ = tiny(arch)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_same_as_peft_get_peft_model_with_same_weights():
    peft = pytest.importorskip("peft")
    model, tok, handle = _randomised("tiny-llama", r=4, alpha=16, targets="all-linear")
    base, _ = tiny("tiny-llama")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, layer in handle.layers.items():
            peft_layer = pm.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    pm.eval()
    batch = batch_for(tok)
    with torch.no_grad():
        torch.testing.assert_close(pm(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == handle.num_trainable()


def _autograd_lora(layer: lora.LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The same layer through autograd's graph (what LoraLinear runs off the fast path)."""
    base = layer.base_layer
    return base(x) + layer.scaling * nn.functional.linear(nn.functional.linear(x, layer.lora_A), layer.lora_B)


def _counting_fast_path(run, layer):
    """run(layer), counting the calls of the hand-written fast path: (its result, the number of calls)."""
    calls = []
    real = lora._LoraMatmul.apply
    lora._LoraMatmul.apply = lambda *a: calls.append(1) or real(*a)
    try:
        return run(layer), len(calls)
    finally:
        lora._LoraMatmul.apply = real


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24)])
def test_fast_path_under_autocast_matches_autograd_and_an_fp32_reference(bias, shape):
    """The hand-written forward/backward (_LoraMatmul) against (a) autograd on the same bf16 expression and
    (b) plain fp32 torch: output and the gradients of x, A and B."""
    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=bias).to(torch.bfloat16).requires_grad_(False)
    layer = lora.LoraLinear(base, r=4, scaling=2.0, dropout=0.0, init="kaiming")
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape[:-1], 20)

    def run(fn):
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
        y.float().backward(g)
        return [y.float(), x.grad, layer.lora_A.grad, layer.lora_B.grad]

    fast, calls = _counting_fast_path(run, layer)
    assert calls, "the fast path was not taken"
    assert fast[1].dtype == torch.float32 and fast[2].dtype == torch.float32
    slow = run(lambda t: _autograd_lora(layer, t))
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b.float(), atol=2e-2, rtol=2e-2)
    # fp32 reference by hand: y = x Wᵀ + b + s (x Aᵀ) Bᵀ, and its gradients
    w = base.weight.float()
    xr, ar, br = x.detach().clone().requires_grad_(), layer.lora_A.detach().clone().requires_grad_(), \
        layer.lora_B.detach().clone().requires_grad_()
    yr = xr @ w.T + (base.bias.float() if bias else 0) + 2.0 * (xr @ ar.T) @ br.T
    yr.backward(g)
    for a, b in zip(fast, [yr, xr.grad, ar.grad, br.grad], strict=True):
        assert (a - b).abs().max() <= 0.02 * b.abs().max() + 1e-3


def test_fast_path_is_skipped_where_it_does_not_apply():
    torch.manual_seed(0)
    base = nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False)
    layer = lora.LoraLinear(base, r=2, scaling=1.0, dropout=0.1, init="kaiming")
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lora._fast_path(layer, x)  # dropout on the low-rank branch while training
        layer.eval()
        assert lora._fast_path(layer, x)
        base.weight.requires_grad_(True)
        assert not lora._fast_path(layer, x)  # a trained base weight needs its own gradient
        base.weight.requires_grad_(False)
        layer.base_layer = base.float()
        assert not lora._fast_path(layer, x)  # fp32 weights: autocast's own path
    assert lora._fast_path(layer, x)  # no autocast, everything in fp32: the fp32 fast path
    assert not lora._fast_path(layer, x.double())  # an input in another dtype: autograd's casts
    layer.base_layer = nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False)  # bf16 weights, no autocast
    assert not lora._fast_path(layer, x)


@pytest.mark.parametrize("bias", [False, True])
def test_fast_path_in_fp32_matches_autograd(bias):
    """Without autocast (fp32 training on a CPU without bf16 units) the fast path is taken and gives autograd's
    output and gradients of x, A and B to fp32 rounding."""
    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=bias).requires_grad_(False)
    layer = lora.LoraLinear(base, r=4, scaling=2.0, dropout=0.0, init="kaiming")
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(2, 5, 24, requires_grad=True)
    g = torch.randn(2, 5, 20)

    def run(fn):
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
        y = fn(x)
        y.backward(g)
        return [y, x.grad, layer.lora_A.grad, layer.lora_B.grad]

    fast, calls = _counting_fast_path(run, layer)
    assert calls, "the fast path was not taken in fp32"
    slow = run(lambda t: _autograd_lora(layer, t))
    for a, b in zip(fast, slow, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
