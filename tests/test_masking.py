"""Random masking (tunelab.methods.masking): a dense plain-torch oracle W₀ + M⊙Δ, sampling, budgets, the proof that
no dense d_out×d_in tensor is created, exact merge/unmerge, and runs through the training loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tunelab.config import ConfigError, config_from_dict
from tunelab.loading import load_run
from tunelab.methods import build_method_config
from tunelab.methods.core import MethodError
from tunelab.methods.masking import (
    Config,
    MaskedLinear,
    allocate,
    apply,
    entry_gradient,
    matrix_seed,
    num_parameters,
    sample_indices,
)
from tunelab.train.loop import train

from conftest import batch_for, tiny

# --------------------------------------------------------------------------------------------------------------
# The oracle: the paper's equation with dense tensors, W = W₀ + M ⊙ Δ
# --------------------------------------------------------------------------------------------------------------


def dense_oracle(w0: torch.Tensor, indices: torch.Tensor, values: torch.Tensor):
    """(mask M, trainable dense Δ) with Δ = v on the selected entries; W = W₀ + M ⊙ Δ is formed by the caller."""
    mask = torch.zeros(w0.numel())
    mask[indices] = 1.0
    delta = torch.zeros(w0.numel())
    delta[indices] = values.detach().float()
    return mask.view_as(w0), delta.view_as(w0).requires_grad_(True)


def _layer(d_in=24, d_out=40, k=37, bias=True, seed=0) -> MaskedLinear:
    torch.manual_seed(seed)
    layer = MaskedLinear(nn.Linear(d_in, d_out, bias=bias).requires_grad_(False),
                         sample_indices(d_in * d_out, k, torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        layer.values.normal_(0, 0.3)
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_the_dense_oracle(bias):
    layer = _layer(bias=bias)
    x = torch.randn(3, 5, 24, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    w0 = layer.base_layer.weight
    mask, delta = dense_oracle(w0, layer.indices, layer.values)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, w0 + mask * delta, layer.base_layer.bias)
    (y2 * g).sum().backward()
    assert torch.equal(y, y2)  # the same fp32 sums W₀[I] + v: bitwise
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.values.grad, delta.grad.view(-1)[layer.indices], rtol=1e-5, atol=1e-6)
    assert layer.base_layer.weight.grad is None


def test_conv1d_layout_matches_the_oracle():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(40, 24).requires_grad_(False)  # nf=out 40, nx=in 24, weight [24, 40]
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    layer = MaskedLinear(conv, sample_indices(24 * 40, 50, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(4, 24)
    y = layer(x)
    y.sum().backward()
    mask, delta = dense_oracle(torch.empty(40, 24), layer.indices, layer.values)
    y2 = F.linear(x, conv.weight.t() + mask * delta, conv.bias)
    y2.sum().backward()
    torch.testing.assert_close(y, y2, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.values.grad, delta.grad.view(-1)[layer.indices], rtol=1e-5, atol=1e-5)


def test_bf16_weights_under_autocast_match_the_fp32_oracle():
    layer = _layer(d_in=64, d_out=48, k=100)
    w32 = layer.base_layer.weight.detach().clone()
    layer.base_layer.weight.data = w32.to(torch.bfloat16)
    x = torch.randn(6, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    mask, delta = dense_oracle(w32, layer.indices, layer.values)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, w32 + mask * delta, layer.base_layer.bias)
    y2.sum().backward()
    torch.testing.assert_close(y.float(), y2, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(layer.values.grad, delta.grad.view(-1)[layer.indices], rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(x.grad, x2.grad, rtol=2e-2, atol=5e-2)
    assert torch.equal(layer.base_layer.weight.float(), w32.to(torch.bfloat16).float())  # restored bitwise


def test_entry_gradient_is_the_same_in_any_chunking():
    g, x = torch.randn(50, 30), torch.randn(50, 20)
    idx = sample_indices(600, 77, torch.Generator().manual_seed(0))
    rows, cols = idx // 20, idx % 20
    full = (g.t() @ x).view(-1)[idx]
    for chunk in (1, 50, 333, 1 << 22):
        torch.testing.assert_close(entry_gradient(g, x, rows, cols, chunk), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_entry_gradient_equals_the_dense_product(dtype, monkeypatch):
    """The compiled kernel (forced on a small case) gives the dense product's entries, in fp32, for bf16 inputs
    too; and the layer's flag reaches it (a MaskedLinear with fused_gradient off never calls it)."""
    import tunelab.methods.masking as masking

    if masking._fused_kernel() is None:
        pytest.skip("torch.compile is not available here (the eager path is tested above)")
    monkeypatch.setattr(masking, "FUSED_MIN_WORK", 1)
    g, x = torch.randn(64, 48).to(dtype), torch.randn(64, 40).to(dtype)
    idx = sample_indices(48 * 40, 300, torch.Generator().manual_seed(3))
    rows, cols = idx // 40, idx % 40
    full = (g.float().t() @ x.float()).view(-1)[idx]
    fused = entry_gradient(g, x, rows, cols, fused=True)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-4)
    calls = []
    monkeypatch.setattr(masking, "_fused_kernel", lambda: calls.append(1) or masking._gather_dot)
    for flag, expected in ((False, 0), (True, 1)):
        layer = MaskedLinear(nn.Linear(40, 48).requires_grad_(False), idx, fused_gradient=flag)
        layer(torch.randn(2, 5, 40)).sum().backward()
        assert len(calls) == expected
        calls.clear()


# --------------------------------------------------------------------------------------------------------------
# Sampling and budget
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(10, 10), (10, 7), (1000, 3), (1000, 500), (50_000 * 50_000, 2000)])
def test_sample_indices_distinct_sorted_in_range_reproducible(n, k):
    a = sample_indices(n, k, torch.Generator().manual_seed(5))
    assert a.dtype == torch.int64 and a.numel() == k
    assert torch.equal(a, a.unique()) and int(a.min()) >= 0 and int(a.max()) < n
    assert torch.equal(a, sample_indices(n, k, torch.Generator().manual_seed(5)))
    if k < n:
        assert not torch.equal(a, sample_indices(n, k, torch.Generator().manual_seed(6)))


def test_sample_indices_is_uniform():
    """Every element of [0, 20) is chosen with probability k/n (chi-square over 4000 draws of 6 of 20)."""
    gen, n, k, draws = torch.Generator().manual_seed(0), 20, 6, 4000
    counts = torch.zeros(n)
    for _ in range(draws):
        counts[sample_indices(n, k, gen)] += 1
    expected = draws * k / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.8  # 99.9% quantile of chi-square with 19 degrees of freedom


def test_allocate_budgets():
    sizes = [100, 300, 600]
    assert allocate(sizes, Config(fraction=0.1), 2000) == [20, 60, 120]  # same density 20% on each matrix
    assert sum(allocate(sizes, Config(fraction=0.0101), 2000)) == 20  # largest remainder keeps the total
    assert allocate(sizes, Config(fraction=0.03, spread="equal"), 1000) == [10, 10, 10]
    assert allocate(sizes, Config(fraction=0.1, spread="equal"), 1000) == [34, 33, 33]
    assert allocate(sizes, Config(fraction=0.05, budget="matrix"), 10**9) == [5, 15, 30]


def test_too_small_budget_names_the_layer_and_what_works():
    model, _ = tiny()
    with pytest.raises(MethodError, match=r"model\.layers\.\d+\..*no trainable entry.*raise fraction"):
        apply(model, Config(fraction=1e-6))
    with pytest.raises(ConfigError, match="fraction must be in"):
        build_method_config({"name": "random-mask", "fraction": 0.0})


def test_mask_depends_on_seed_and_module_name_only():
    a, _ = tiny()
    b, _ = tiny()
    c, _ = tiny()
    ha = apply(a, Config(fraction=0.02, budget="matrix", seed=3))
    hb = apply(b, Config(fraction=0.02, budget="matrix", targets=["q_proj"], seed=3))
    hc = apply(c, Config(fraction=0.02, budget="matrix", targets=["q_proj"], seed=4))
    name = "model.layers.1.self_attn.q_proj"
    assert torch.equal(ha.layers[name].indices, hb.layers[name].indices)  # other targets do not matter
    assert not torch.equal(hb.layers[name].indices, hc.layers[name].indices)
    assert not torch.equal(ha.layers[name].indices, ha.layers["model.layers.0.self_attn.q_proj"].indices)
    assert matrix_seed(3, name) != matrix_seed(4, name)
    assert num_parameters(tiny()[0], Config(fraction=0.01)) == apply(tiny()[0], Config(fraction=0.01)).num_trainable()


# --------------------------------------------------------------------------------------------------------------
# Memory: no dense d_out × d_in tensor for a masked weight
# --------------------------------------------------------------------------------------------------------------


class DenseWatch(TorchDispatchMode):
    """Records every tensor an op creates with at least ``limit`` elements that is not a view of ``allowed``."""

    def __init__(self, limit: int, allowed: torch.Tensor) -> None:
        super().__init__()
        self.limit, self.allowed, self.seen = limit, allowed.untyped_storage().data_ptr(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.limit \
                    and t.untyped_storage().data_ptr() != self.allowed:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def _train_step(module: nn.Module, params: list[torch.Tensor], x: torch.Tensor) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(2):
        module(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


@pytest.mark.parametrize("bf16", [False, True])
def test_no_dense_gradient_mask_or_optimizer_state(bf16):
    d_in, d_out, k = 1024, 2048, 200
    layer = MaskedLinear(nn.Linear(d_in, d_out).requires_grad_(False),
                         sample_indices(d_in * d_out, k, torch.Generator().manual_seed(0)))
    if bf16:
        layer.base_layer.to(torch.bfloat16)
    x = torch.randn(16, d_in, dtype=torch.bfloat16 if bf16 else torch.float32, requires_grad=True)
    watch = DenseWatch(d_in * d_out // 8, layer.base_layer.weight)
    with watch, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        opt = _train_step(layer, [layer.values], x)
    assert watch.seen == []
    assert [p.shape for p in layer.parameters() if p.requires_grad] == [torch.Size([k])]
    assert all(t.numel() in (1, k) for s in opt.state.values() for t in s.values())
    assert all(b.numel() == k for b in layer.buffers())

    # the detector does see the authors' naive dense version (full-size Δ and mask)
    naive_delta = torch.zeros(d_out, d_in, requires_grad=True)
    naive_mask = torch.zeros(d_out, d_in)
    naive = lambda inp: F.linear(inp.float(), layer.base_layer.weight.float() + naive_mask * naive_delta)  # noqa: E731
    watch = DenseWatch(d_in * d_out // 8, layer.base_layer.weight)
    with watch:
        _train_step(naive, [naive_delta], x)
    assert watch.seen


# --------------------------------------------------------------------------------------------------------------
# Merge / unmerge, model level
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_restores_the_weights_bitwise(dtype):
    model, tok = tiny()
    handle = apply(model, Config(fraction=0.05))
    model.to(dtype)
    for layer in handle.layers.values():
        layer.values.data = torch.randn_like(layer.values.data.float()) * 0.1
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = batch_for(tok)
    with torch.no_grad():
        adapted = model(**batch).logits
        handle.merge()
        merged = model(**batch).logits
        handle.unmerge()
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    tol = 0 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(merged, adapted, rtol=0, atol=tol)


def test_fp32_forward_equals_the_merged_dense_model():
    """The whole model: masked forward == a plain model whose weights are W₀ + M⊙Δ (formed densely here)."""
    model, tok = tiny()
    plain, _ = tiny()
    handle = apply(model, Config(fraction=0.03, seed=11))
    with torch.no_grad():
        for name, layer in handle.layers.items():
            layer.values.normal_(0, 0.05)
            mask, delta = dense_oracle(layer.base_layer.weight, layer.indices, layer.values)
            plain.get_submodule(name).weight.add_(mask * delta.detach())
        batch = batch_for(tok)
        torch.testing.assert_close(model(**batch).logits, plain(**batch).logits, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Through the training loop: bf16 + autocast, checkpoint/resume, save/load of indices + values
# --------------------------------------------------------------------------------------------------------------


def _run_cfg(tmp_path: Path, steps: int, **method) -> dict:
    return {
        "model": {"name": "tiny-llama", "dtype": "bf16"},
        "method": {"name": "random-mask", "fraction": 0.02, "seed": 4, **method},
        "data": {"train": "synthetic:arith:train:64", "template": "plain", "max_length": 64,
                 "group_by_length": False},
        "train": {"lr": 3e-2, "max_steps": steps, "batch_size": 4, "seed": 1, "progress": False,
                  "save_every": 2, "warmup_steps": 0},
        "output_dir": str(tmp_path / "run"),
    }


def test_training_run_saves_indices_and_values_and_reloads_them(tmp_path):
    result = train(config_from_dict(_run_cfg(tmp_path, 4)))
    saved = load_file(str(result.run_dir / "adapter.safetensors"))
    idx_keys = [k for k in saved if k.endswith(".indices")]
    assert idx_keys and all(saved[k].dtype == torch.int64 for k in idx_keys)
    assert sum(v.numel() for k, v in saved.items() if k.endswith(".values")) == result.trainable_params
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if k.endswith(".values"))
    model, tok, handle, _ = load_run(result.run_dir)
    for name, layer in handle.layers.items():
        assert torch.equal(layer.indices, saved[f"{name}.indices"])
        assert torch.equal(layer.values, saved[f"{name}.values"])


def test_saved_indices_win_over_the_seed_on_load():
    model, _ = tiny()
    handle = apply(model, Config(fraction=0.02, seed=1))
    state = {k: v.clone() for k, v in handle.state_dict().items()}
    other, _ = tiny()
    h2 = apply(other, Config(fraction=0.02, seed=2))
    h2.load_state_dict(state)
    for name, layer in h2.layers.items():
        assert torch.equal(layer.indices, handle.layers[name].indices)


class _Interrupt(Exception):
    pass


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    """Checkpoints hold the int64 indices next to the values; a run stopped after step 3 resumes from step 2."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    full = train(config_from_dict(_run_cfg(tmp_path / "a", 4)))
    steps = []

    def stop(*_):
        steps.append(1)
        if len(steps) == 3:
            raise _Interrupt

    hook = register_optimizer_step_post_hook(stop)
    try:
        with pytest.raises(_Interrupt):
            train(config_from_dict(_run_cfg(tmp_path / "b", 4)))
    finally:
        hook.remove()
    resumed = train(config_from_dict(_run_cfg(tmp_path / "b", 4)), resume=True)
    a = load_file(str(full.run_dir / "adapter.safetensors"))
    b = load_file(str(resumed.run_dir / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
