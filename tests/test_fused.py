"""Fused element-wise kernels (tunelab.train.fused): same outputs and gradients, exact restore, only where they fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tunelab.config import config_from_dict
from tunelab.train import fused
from tunelab.train.loop import fused_kernels_wanted, train

from conftest import batch_for, tiny


@pytest.fixture(scope="module")
def kernels():
    if fused._compiled() is None:
        pytest.skip("torch.compile is not available here")
    return fused._compiled()


def _loss_and_grads(model, batch, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_model_matches_eager_and_restores(kernels, autocast):
    model, tok = tiny()
    batch = batch_for(tok)
    loss0, grads0 = _loss_and_grads(model, batch, autocast)
    layers = model.config.num_hidden_layers
    assert fused.fusable(model) == (2 * layers + 1) + layers  # every RMSNorm (+ the final one), every MLP
    restore = fused.use_fused_kernels(model)
    switched = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(switched) == 3 * layers + 1
    loss1, grads1 = _loss_and_grads(model, batch, autocast)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(loss1, loss0, **tol)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], **tol, msg=name)
    restore()
    assert not [m for m in model.modules() if "forward" in m.__dict__]
    loss2, _ = _loss_and_grads(model, batch, autocast)
    assert torch.equal(loss2, loss0)


def test_only_llama_style_modules_are_switched(kernels):
    gpt2, _ = tiny("tiny-gpt2")
    assert fused.fusable(gpt2) == 0  # LayerNorm, GELU MLP
    assert fused.use_fused_kernels(gpt2)() is None

    class OnePlusNorm(LlamaRMSNorm):  # Gemma-style (1 + w): another forward, must stay eager
        def forward(self, hidden_states):
            return super().forward(hidden_states) * 2

    holder = nn.Sequential(OnePlusNorm(8), LlamaRMSNorm(8))
    fused.use_fused_kernels(holder)
    assert "forward" not in holder[0].__dict__ and "forward" in holder[1].__dict__


def test_auto_setting_switches_on_only_for_wide_models():
    model, _ = tiny()
    assert not fused_kernels_wanted("auto", model)  # width 64: the compile would not pay back
    model.config.hidden_size = 576
    assert fused_kernels_wanted("auto", model)
    assert fused_kernels_wanted(True, model) and not fused_kernels_wanted(False, model)


def test_trainer_with_fused_kernels_matches_eager_training(kernels, tmp_path, monkeypatch):
    import tunelab.train.loop as loop

    switched, restored = [], []

    def spy(model):
        restore = fused.use_fused_kernels(model)
        switched.append(sum("forward" in m.__dict__ for m in model.modules()))
        return lambda: (restore(), restored.append(sum("forward" in m.__dict__ for m in model.modules())))

    monkeypatch.setattr(loop, "use_fused_kernels", spy)
    losses = []
    for flag in (False, True):
        cfg = config_from_dict({
            "model": {"name": "tiny-llama", "dtype": "fp32"}, "method": {"name": "lora", "r": 4, "alpha": 8},
            "data": {"train": "synthetic:arith:train:16", "template": "plain", "max_length": 48},
            "train": {"lr": 1e-2, "max_steps": 3, "batch_size": 4, "seed": 1, "progress": False,
                      "fused_kernels": flag},
            "output_dir": str(tmp_path / f"run-{flag}"),
        })
        result = train(cfg)
        losses.append(result.train_loss)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert switched == [7] and restored == [0]  # only the fused_kernels: true run; the model is left as it was


def test_a_kernel_that_cannot_be_built_falls_back_with_one_warning():
    def broken(x):
        raise ValueError("no kernel for this")

    with pytest.warns(RuntimeWarning, match="my kernel: torch.compile failed here"):
        assert fused.compiled_or_none(broken, (torch.ones(2),), "my kernel") is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused.compiled_or_none(broken, (torch.ones(2),), "my kernel") is None  # cached: no second warning
